"""CaptionDataModule: vocabulary from training captions, padded batches, all references, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from capattn.data.datamodule import CaptionDataModule
from capattn.data.readers import CaptionReader
from capattn.data.records import CaptionRecord
from capattn.data.synthetic import ShapesReader
from capattn.errors import DataError


class FolderReader(CaptionReader):
    """Records given directly, images read from files (the base class's loader)."""

    def __init__(self, records: list[CaptionRecord]) -> None:
        self.records = records

    def read(self) -> list[CaptionRecord]:
        return self.records


def shapes(**kwargs) -> CaptionDataModule:
    reader = ShapesReader(num_train=20, num_val=6, num_test=5, image_size=48, seed=3)
    return CaptionDataModule(reader=reader, **kwargs)


def test_vocab_comes_from_training_captions_only():
    dm = shapes()
    train_words = {w for r in dm.records["train"] for c in r.captions for w in c.split()}
    assert set(dm.vocab.itos[4:]) == train_words
    assert dm.vocab_size == len(dm.vocab)


def test_training_batches_pair_each_caption_and_pad_correctly():
    dm = shapes(batch_size=8)
    assert len(dm.train_dataloader().dataset) == 20 * 5  # every (image, caption) pair
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (8, 3, 48, 48)
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    assert batch.tokens.shape == (8, int(batch.lengths.max()))
    for row, n in zip(batch.tokens, batch.lengths.tolist(), strict=True):
        assert row[0] == dm.vocab.bos and row[n - 1] == dm.vocab.eos
        assert (row[n:] == dm.vocab.pad).all() and (row[:n] != dm.vocab.pad).all()
    assert all(len(refs) == 5 for refs in batch.references)


def test_evaluation_batches_have_one_item_per_image_with_all_references():
    dm = shapes(batch_size=4, eval_batch_size=3)
    batches = list(dm.val_dataloader())
    ids = [i for b in batches for i in b.image_ids]
    assert ids == [r.image_id for r in dm.records["val"]]
    assert len(batches[0]) == 3
    record = dm.records["val"][0]
    assert batches[0].references[0] == list(record.captions)
    assert dm.vocab.decode(batches[0].tokens[0].tolist()) == " ".join(record.captions[0].lower().split())
    assert [b.image_ids for b in dm.predict_dataloader()] == [b.image_ids for b in dm.test_dataloader()]


def test_max_caption_len_cuts_training_captions_but_keeps_eos():
    dm = shapes(max_caption_len=3)
    batch = next(iter(dm.train_dataloader()))
    assert int(batch.lengths.max()) <= 3 + 2
    assert all(row[n - 1] == dm.vocab.eos for row, n in zip(batch.tokens, batch.lengths.tolist(), strict=True))


def test_image_size_resizes_and_crops(tmp_path):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "a.jpg")
    records = [CaptionRecord("1", tmp_path / "a.jpg", ("a red picture",), "train")]
    dm = CaptionDataModule(reader=FolderReader(records), image_size=32)
    assert next(iter(dm.train_dataloader())).images.shape == (1, 3, 32, 32)


def test_empty_caption_is_a_clear_error():
    records = [CaptionRecord("7", Path("x.jpg"), ("a dog", " ,. "), "train")]
    with pytest.raises(DataError, match=r"image 7 has an empty caption"):
        _ = CaptionDataModule(reader=FolderReader(records)).vocab


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    records = [
        CaptionRecord("1", tmp_path / "gone.jpg", ("a dog",), "train"),
        CaptionRecord("2", tmp_path / "broken.jpg", ("a cat",), "train"),
    ]
    dm = CaptionDataModule(reader=FolderReader(records), batch_size=1)
    dataset = dm.train_dataloader().dataset
    with pytest.raises(DataError, match="gone.jpg"):
        dataset[0]
    with pytest.raises(DataError, match="broken.jpg"):
        dataset[1]


def test_missing_split_is_a_clear_error():
    records = [CaptionRecord("1", None, ("a dog",), "train")]
    with pytest.raises(DataError, match="no 'val' records"):
        CaptionDataModule(reader=FolderReader(records)).val_dataloader()


def test_loader_workers_render_the_same_batches():
    torch.manual_seed(0)
    single = next(iter(shapes(batch_size=4, num_workers=0).val_dataloader()))
    multi = next(iter(shapes(batch_size=4, num_workers=2).val_dataloader()))
    assert torch.equal(single.images, multi.images) and torch.equal(single.tokens, multi.tokens)


def test_real_flickr8k_jpegs_load_through_the_datamodule(shared_data):
    """Real JPEGs of any aspect ratio → resized, centre-cropped [0, 1] tensors, decoded with Pillow."""
    images = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:3]
    records = [CaptionRecord(p.stem, p, ("a photo of something",), "train") for p in images]
    dm = CaptionDataModule(reader=FolderReader(records), batch_size=3, image_size=224)
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (3, 3, 224, 224)
    assert 0.0 <= float(batch.images.min()) < float(batch.images.max()) <= 1.0
    assert batch.images.std() > 0.05  # real pictures, not a blank canvas
