"""``CaptionDataModule``: a reader's records → vocabulary → datasets → loaders of ``CaptionBatch``."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from capattn.data.readers import CaptionReader
from capattn.data.records import CaptionBatch, CaptionRecord
from capattn.errors import DataError
from capattn.vocab import Vocabulary


def image_transform(image_size: int | None) -> v2.Transform:
    """PIL image → (3, H, W) float in [0, 1]; resized (shorter side) and centre-cropped if ``image_size``.

    No random flip: it would turn "left of" into a false caption.
    """
    steps: list[v2.Transform] = [v2.ToImage()]
    if image_size is not None:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


class CaptionDataset(Dataset):
    """Images with their captions.

    In training each (image, caption) pair is one item; in evaluation each image is one item,
    carrying its first caption (for the validation loss) and all references (for the metrics).

    Args:
        records: the split's records.
        reader: loads each record's image.
        vocab: encodes captions.
        transform: PIL image → tensor.
        pairs: one item per caption (training) rather than per image.
        max_caption_len: longer captions are cut to this many words (None: never).
    """

    def __init__(
        self,
        records: Sequence[CaptionRecord],
        *,
        reader: CaptionReader,
        vocab: Vocabulary,
        transform: v2.Transform,
        pairs: bool,
        max_caption_len: int | None = None,
    ) -> None:
        self.records = list(records)
        self.reader = reader
        self.transform = transform
        self.encoded = [[self._encode(vocab, c, max_caption_len) for c in r.captions] for r in self.records]
        self.items = (
            [(i, j) for i, caps in enumerate(self.encoded) for j in range(len(caps))]
            if pairs
            else [(i, 0) for i in range(len(self.records))]
        )

    @staticmethod
    def _encode(vocab: Vocabulary, caption: str, max_len: int | None) -> list[int]:
        ids = vocab.encode(caption)
        if max_len is not None and len(ids) > max_len + 2:
            ids = [*ids[: max_len + 1], vocab.eos]
        return ids

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[Tensor, list[int], str, list[str]]:
        i, j = self.items[index]
        record = self.records[i]
        return (
            self.transform(self.reader.load_image(record)),
            self.encoded[i][j],
            record.image_id,
            list(record.captions),
        )


def collate(items: list[tuple[Tensor, list[int], str, list[str]]], *, pad: int) -> CaptionBatch:
    """Stacks images and right-pads captions with ``pad`` into a ``CaptionBatch``."""
    images, captions, image_ids, references = zip(*items, strict=True)
    lengths = torch.tensor([len(c) for c in captions])
    tokens = torch.full((len(captions), int(lengths.max())), pad, dtype=torch.long)  # (B, T)
    for row, caption in enumerate(captions):
        tokens[row, : len(caption)] = torch.tensor(caption)
    return CaptionBatch(
        images=torch.stack(images),  # (B, 3, H, W)
        features=None,
        tokens=tokens,
        lengths=lengths,
        image_ids=list(image_ids),
        references=[list(r) for r in references],
    )


class _Collate:
    """Picklable collate (DataLoader workers may be spawned processes)."""

    def __init__(self, pad: int) -> None:
        self.pad = pad

    def __call__(self, items):
        return collate(items, pad=self.pad)


class CaptionDataModule(L.LightningDataModule):
    """Records from a reader, a vocabulary built on the training captions, and the loaders.

    Args:
        reader: where the records and images come from (``class_path``/``init_args`` in YAML).
        batch_size: images per device per step; under DDP every device gets this many.
        eval_batch_size: images per device in validation/test/predict (default: ``batch_size``).
        num_workers: DataLoader worker processes per device.
        image_size: resize (shorter side) and centre-crop to this size; None keeps the size.
        min_word_count: words seen fewer times in the training captions become ``<unk>``.
        max_vocab_size: keep at most this many tokens (specials included).
        max_caption_len: cut longer training captions to this many words (None: never).
        train_splits: record splits that train (Karpathy's ``restval`` is usually added).
        predict_split: the split ``capattn predict`` captions.
    """

    def __init__(
        self,
        *,
        reader: CaptionReader,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        image_size: int | None = None,
        min_word_count: int = 1,
        max_vocab_size: int | None = None,
        max_caption_len: int | None = None,
        train_splits: Sequence[str] = ("train",),
        predict_split: str = "test",
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
        self.reader = reader
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.image_size = image_size
        self.min_word_count = min_word_count
        self.max_vocab_size = max_vocab_size
        self.max_caption_len = max_caption_len
        self.train_splits = tuple(train_splits)
        self.predict_split = predict_split
        self._datasets: dict[str, CaptionDataset] = {}

    @cached_property
    def records(self) -> dict[str, list[CaptionRecord]]:
        """The reader's records by split, checked for empty captions."""
        by_split: dict[str, list[CaptionRecord]] = {}
        for record in self.reader.read():
            if not record.captions:
                raise DataError(f"image {record.image_id} has no caption — fix or drop it in the annotation file")
            for k, caption in enumerate(record.captions):
                if not caption.strip() or not any(ch.isalnum() for ch in caption):
                    raise DataError(
                        f"image {record.image_id} has an empty caption (#{k}: {caption!r}) — "
                        "fix or drop it in the annotation file"
                    )
            split = "train" if record.split in self.train_splits else record.split
            by_split.setdefault(split, []).append(record)
        if not by_split.get("train"):
            raise DataError(f"{type(self.reader).__name__} gave no training records (splits {self.train_splits})")
        return by_split

    @cached_property
    def vocab(self) -> Vocabulary:
        """Vocabulary of the training captions (test words stay unknown)."""
        captions = (c for r in self.records["train"] for c in r.captions)
        return Vocabulary.build(captions, min_count=self.min_word_count, max_size=self.max_vocab_size)

    @property
    def vocab_size(self) -> int:
        """V, linked by the CLI into the decoder's ``vocab_size``."""
        return len(self.vocab)

    def _dataset(self, split: str) -> CaptionDataset:
        if split not in self._datasets:
            if not self.records.get(split):
                raise DataError(
                    f"{type(self.reader).__name__} has no {split!r} records (it has {sorted(self.records)})"
                )
            self._datasets[split] = CaptionDataset(
                self.records[split],
                reader=self.reader,
                vocab=self.vocab,
                transform=image_transform(self.image_size),
                pairs=split == "train",
                max_caption_len=self.max_caption_len if split == "train" else None,
            )
        return self._datasets[split]

    def _loader(self, split: str, *, shuffle: bool) -> DataLoader:
        return DataLoader(
            self._dataset(split),
            batch_size=self.batch_size if shuffle else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=_Collate(self.vocab.pad),
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, shuffle=False)
