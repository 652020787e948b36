"""Length-bucketed batches: every sample once per epoch across DDP ranks, similar lengths, reshuffled per epoch."""

from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import BatchSampler, DistributedSampler, RandomSampler

from capattn.data.sampler import LengthBucketBatchSampler, LongestFirstBatchSampler

N = 1000
LENGTHS = np.random.default_rng(0).integers(5, 40, size=N)


class Sized:
    def __len__(self) -> int:
        return N


def spread(batches: list[list[int]]) -> float:
    """Mean (longest − shortest) caption length within a batch: the padding a batch carries."""
    return float(np.mean([LENGTHS[b].max() - LENGTHS[b].min() for b in batches]))


def rank_batches(rank: int, epoch: int, world: int = 2) -> list[list[int]]:
    # What Lightning does under DDP: a DistributedSampler takes the place of the sampler.
    sampler = DistributedSampler(Sized(), num_replicas=world, rank=rank, shuffle=True, seed=7)
    batch_sampler = LengthBucketBatchSampler(sampler, 16, False, lengths=LENGTHS, bucket_batches=8, seed=1)
    batch_sampler.set_epoch(epoch)
    return list(batch_sampler)


def test_two_ranks_see_every_sample_once_per_epoch_with_equal_batch_counts():
    ranks = [rank_batches(rank, epoch=0) for rank in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == int(np.ceil(N / 2 / 16))
    flat = [i for batches in ranks for b in batches for i in b]
    assert sorted(flat) == list(range(N))  # each sample exactly once across the two ranks
    assert set(ranks[0][0]).isdisjoint(i for b in ranks[1] for i in b)


def test_batches_hold_similar_lengths_far_tighter_than_random_batches():
    bucketed = rank_batches(0, epoch=0)
    plain = list(BatchSampler(DistributedSampler(Sized(), num_replicas=2, rank=0, seed=7), 16, False))
    assert spread(bucketed) < 0.35 * spread(plain), (spread(bucketed), spread(plain))


def test_each_epoch_reshuffles_and_only_the_last_window_leaves_a_short_batch():
    first, second = rank_batches(0, epoch=0), rank_batches(0, epoch=1)
    assert first != second and sorted(map(sorted, first)) != sorted(map(sorted, second))
    assert sum(len(b) < 16 for b in first) <= 1
    assert rank_batches(0, epoch=0) == first  # same epoch, same seed → same batches


@pytest.mark.parametrize("drop_last", [False, True])
def test_len_matches_iteration(drop_last):
    sampler = LengthBucketBatchSampler(RandomSampler(range(N)), 64, drop_last, lengths=LENGTHS, bucket_batches=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == (N // 64 if drop_last else -(-N // 64))
    assert all(len(b) == 64 for b in batches) if drop_last else sum(map(len, batches)) == N


def test_each_batch_comes_longest_first():
    """The decoder's shrinking time loop wants rows longest first; in that order it copies nothing."""
    for batch in rank_batches(0, epoch=3):
        assert all(np.diff(LENGTHS[batch]) <= 0), LENGTHS[batch]


def test_random_batches_come_longest_first_and_hold_every_sample_once():
    """The default (no bucketing): a plain BatchSampler's batches, each reordered longest first."""
    plain = list(BatchSampler(list(range(N)), 16, False))
    batches = list(LongestFirstBatchSampler(list(range(N)), 16, False, lengths=LENGTHS))
    assert [sorted(b) for b in batches] == [sorted(b) for b in plain]  # same batches, only reordered
    assert all(all(np.diff(LENGTHS[b]) <= 0) for b in batches)


def test_longest_first_batches_split_across_ddp_ranks():
    """Lightning swaps in a DistributedSampler: two ranks see every sample once, longest first."""
    ranks = [
        list(
            LongestFirstBatchSampler(
                DistributedSampler(Sized(), num_replicas=2, rank=rank, shuffle=True, seed=7), 16, False, lengths=LENGTHS
            )
        )
        for rank in (0, 1)
    ]
    assert sorted(i for batches in ranks for b in batches for i in b) == list(range(N))
