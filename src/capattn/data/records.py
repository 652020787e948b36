"""The record every dataset reader returns, and the batch every loader yields."""

from __future__ import annotations

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

    def to(self, *args, **kwargs) -> CaptionBatch:
        """Moves the tensors (Lightning calls this to put a batch on the device)."""
        return replace(
            self,
            images=None if self.images is None else self.images.to(*args, **kwargs),
            features=None if self.features is None else self.features.to(*args, **kwargs),
            tokens=self.tokens.to(*args, **kwargs),
            lengths=self.lengths.to(*args, **kwargs),
            image_index=None if self.image_index is None else self.image_index.to(*args, **kwargs),
        )
