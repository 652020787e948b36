"""Length-bucketed training batches: captions of similar length together, so little of a batch is padding."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import numpy as np
from torch.utils.data import BatchSampler, Sampler


class LengthBucketBatchSampler(BatchSampler):
    """Groups the indices a sampler yields into batches of similar caption length, in random order.

    The sampler's indices are cut into windows of ``batch_size × bucket_batches``; each window is
    sorted by length and cut into batches, each longest first, and the batches are shuffled. Every
    index the sampler yields lands in exactly one batch, and only the last window can leave a short
    batch, so the number of batches is ``ceil(n / batch_size)`` like a plain ``BatchSampler``'s.

    Under DDP Lightning replaces ``sampler`` with a ``DistributedSampler`` (this class keeps
    ``sampler`` as its first argument for that): each rank buckets its own shard, the shards
    together hold every sample once per epoch, and all ranks get the same number of batches.

    Args:
        sampler: yields dataset indices (a ``RandomSampler``, or a ``DistributedSampler``).
        batch_size: indices per batch.
        drop_last: drop the short batch, if any.
        lengths: (N,) the length of every dataset item.
        bucket_batches: batches per sorting window; larger buckets tighter, smaller shuffles more.
        seed: seeds the order of the batches (with the epoch).
    """

    def __init__(
        self,
        sampler: Sampler[int] | Sequence[int],
        batch_size: int,
        drop_last: bool = False,
        *,
        lengths: np.ndarray,
        bucket_batches: int = 100,
        seed: int = 0,
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        if bucket_batches < 1:
            raise ValueError(f"bucket_batches must be ≥ 1, got {bucket_batches}")
        self.lengths = np.asarray(lengths)
        self.bucket_batches = bucket_batches
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this each epoch; it reshuffles the batches and forwards it to the sampler."""
        self.epoch = epoch
        if callable(getattr(self.sampler, "set_epoch", None)):
            self.sampler.set_epoch(epoch)

    def __iter__(self) -> Iterator[list[int]]:
        indices = np.fromiter(iter(self.sampler), dtype=np.int64)
        window = self.batch_size * self.bucket_batches
        batches: list[np.ndarray] = []
        for start in range(0, len(indices), window):
            chunk = indices[start : start + window]
            chunk = chunk[np.argsort(self.lengths[chunk], kind="stable")]
            # longest caption first within a batch: the decoder's shrinking time loop wants rows in that
            # order, and would otherwise copy the batch's features into it (a 51 MB grid at COCO size)
            batches += [chunk[i : i + self.batch_size][::-1] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(batches))
        for i in order:
            yield batches[i].tolist()

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)


class LongestFirstBatchSampler(BatchSampler):
    """A plain ``BatchSampler``'s random batches, each ordered longest caption first.

    The order inside a batch changes nothing in the loss (a mean over its tokens); it lets Show,
    Attend and Tell's shrinking time loop use the batch as it comes instead of copying its features
    into length order. Under DDP Lightning swaps ``sampler`` for a ``DistributedSampler``, as for
    ``LengthBucketBatchSampler``.

    Args:
        sampler: yields dataset indices.
        batch_size: indices per batch.
        drop_last: drop the short batch, if any.
        lengths: (N,) the length of every dataset item.
    """

    def __init__(
        self, sampler: Sampler[int] | Sequence[int], batch_size: int, drop_last: bool = False, *, lengths: np.ndarray
    ) -> None:
        super().__init__(sampler, batch_size, drop_last)
        self.lengths = np.asarray(lengths)

    def __iter__(self) -> Iterator[list[int]]:
        for batch in super().__iter__():
            yield [batch[i] for i in np.argsort(-self.lengths[batch], kind="stable")]
