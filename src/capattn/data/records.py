"""The record every dataset reader returns, and the batch every loader yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from torch import Tensor

from capattn.models.encoder import EncoderOutput

SPLITS = ("train", "val", "test")  # the split names a prepared dataset has; readers map theirs onto these


@dataclass(frozen=True)
class CaptionRecord:
    """One image and all of its reference captions.

    Args:
        image_id: identifier unique within the dataset (COCO ids are written as digits).
        image_path: where the image file lives, or None for generated images.
        captions: every reference caption, raw text, in the dataset's order.
        split: ``"train"``, ``"val"`` or ``"test"``.
    """

    image_id: str
    image_path: Path | None
    captions: tuple[str, ...]
    split: str


@dataclass(frozen=True)
class CaptionBatch:
    """What a loader yields: images (or cached features), their captions, all references.

    Args:
        images: (B, 3, H, W) float in [0, 1], or None when ``features`` are given.
        features: cached encoder outputs, or None.
        tokens: (C, T) ``<bos> … <eos> <pad>…`` ids: one caption per image (C = B), or with
            ``image_index`` all the captions of each image (``data.group_captions``).
        lengths: (C,) caption lengths counting ``<bos>`` and ``<eos>``.
        image_ids: the B image ids.
        references: every reference caption of each image, raw text, for metrics.
        image_index: (C,) int64, the image (row of ``images``/``features``) of each caption, or
            None: caption c belongs to image c.
    """

    images: Tensor | None
    features: EncoderOutput | None
    tokens: Tensor
    lengths: Tensor
    image_ids: list[str]
    references: list[list[str]]
    image_index: Tensor | None = None

    def __len__(self) -> int:
        """The number of captions (training rows)."""
        return self.tokens.shape[0]

    def _map(self, fn: Callable[[Tensor], Tensor]) -> CaptionBatch:
        features = None if self.features is None else EncoderOutput(fn(self.features.grid), fn(self.features.pooled))
        return replace(
            self,
            images=None if self.images is None else fn(self.images),
            features=features,
            tokens=fn(self.tokens),
            lengths=fn(self.lengths),
            image_index=None if self.image_index is None else fn(self.image_index),
        )

    def to(self, *args, **kwargs) -> CaptionBatch:
        """Moves the tensors (Lightning calls this to put a batch on the device). A pinned tensor is
        copied asynchronously unless ``non_blocking`` says otherwise (Lightning passes none)."""
        return self._map(lambda t: t.to(*args, **{"non_blocking": t.is_pinned(), **kwargs}))

    def pin_memory(self) -> CaptionBatch:
        """The batch in page-locked memory (the DataLoader's ``pin_memory=True`` calls this, in its own
        thread): without it the loader passed the batch on unpinned, and the copy to the GPU then ran
        synchronously in the training loop."""
        return self._map(lambda t: t.pin_memory())
