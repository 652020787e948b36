"""CaptionDataModule: prepared splits, padded batches, all references, length buckets, bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capattn.data.datamodule import CaptionDataModule, ThreadedDataLoader
from capattn.data.records import CaptionBatch, CaptionRecord
from capattn.data.synthetic import ShapesReader
from capattn.errors import ConfigError, DataError

from ..conftest import ListReader


@pytest.fixture
def shapes(tmp_path):
    def make(**kwargs) -> CaptionDataModule:
        reader = ShapesReader(num_train=20, num_val=6, num_test=5, image_size=48, seed=3)
        return CaptionDataModule(reader=reader, prepared_dir=str(tmp_path / "shapes"), **kwargs)

    return make


def test_vocab_comes_from_training_captions_only(shapes):
    dm = shapes()
    records = ShapesReader(num_train=20, num_val=6, num_test=5, image_size=48, seed=3).read()
    train_words = {w for r in records if r.split == "train" for c in r.captions for w in c.split()}
    assert set(dm.vocab.itos[4:]) == train_words
    assert dm.vocab_size == len(dm.vocab)


def test_training_batches_pair_each_caption_and_pad_correctly(shapes):
    dm = shapes(batch_size=8)
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 20 * 5  # every (image, caption) pair
    assert len(loader) == 13  # ceil(100 / 8): bucketing keeps every pair
    batch = next(iter(loader))
    assert batch.images.shape[1:] == (3, 48, 48) and batch.features is None
    assert 0.0 <= float(batch.images.min()) and float(batch.images.max()) <= 1.0
    assert batch.tokens.shape == (len(batch), int(batch.lengths.max()))
    for row, n in zip(batch.tokens, batch.lengths.tolist(), strict=True):
        assert row[0] == dm.vocab.bos and row[n - 1] == dm.vocab.eos
        assert (row[n:] == dm.vocab.pad).all() and (row[:n] != dm.vocab.pad).all()
    assert all(len(refs) == 5 for refs in batch.references)
    seen = sorted((i, tuple(t[:n].tolist())) for b in loader for i, t, n in zip(b.image_ids, b.tokens, b.lengths))
    assert len(seen) == 100


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_training_batches_hold_every_caption_of_each_image_once(shapes, workers):
    dm = shapes(batch_size=3, group_captions=True, max_caption_len=6, num_workers=workers)
    loader = dm.train_dataloader()
    assert len(loader.dataset) == 20 and len(loader) == 7  # batch_size counts images: ceil(20 / 3)
    pairs = []
    for batch in loader:
        assert len(batch.image_ids) <= 3 and batch.images.shape[0] == len(batch.image_ids)
        assert batch.image_index.shape == (len(batch),) and batch.tokens.shape[0] == len(batch)
        assert batch.image_index.tolist() == sorted(batch.image_index.tolist())  # each image's captions together
        for row, n, image in zip(batch.tokens, batch.lengths.tolist(), batch.image_index.tolist(), strict=True):
            assert row[0] == dm.vocab.bos and row[n - 1] == dm.vocab.eos and (row[n:] == dm.vocab.pad).all()
            assert n <= 6 + 2
            pairs.append((batch.image_ids[image], tuple(row[: n - 1].tolist())))
    # the same (image, caption) pairs, each once, as one pair per item
    single = shapes(batch_size=7, max_caption_len=6).train_dataloader()
    expected = [(i, tuple(t[: n - 1].tolist())) for b in single for i, t, n in zip(b.image_ids, b.tokens, b.lengths)]
    assert len(pairs) == 100 and sorted(pairs) == sorted(expected)


def test_the_loaders_pin_memory_pins_every_tensor_of_a_batch(shapes, monkeypatch):
    """DataLoader(pin_memory=True), as on a GPU machine, pins a batch through ``CaptionBatch.pin_memory``:
    a dataclass without it is passed on unpinned, and its copy to the GPU is then synchronous."""
    from torch.utils.data._utils.pin_memory import pin_memory

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self, *a, **k: pinned.append(self) or self.clone())
    batch = next(iter(shapes(batch_size=4, group_captions=True).train_dataloader()))
    out = pin_memory(batch)
    assert isinstance(out, CaptionBatch) and len(pinned) == 4  # images, tokens, lengths, image_index
    assert torch.equal(out.image_index, batch.image_index) and torch.equal(out.images, batch.images)
    assert out.image_ids == batch.image_ids and out.references == batch.references


@pytest.mark.parametrize("grouped", [False, True], ids=["pairs", "grouped"])
def test_loader_threads_give_the_batches_of_worker_processes(shapes, grouped):
    """``data.loader_threads``: the same batches, in the same order, for the same seed, as worker
    processes (training, shuffled) and as no workers (evaluation)."""
    batches = {}
    for kind, kwargs in {"threads": {"loader_threads": 3}, "processes": {"num_workers": 2}}.items():
        dm = shapes(batch_size=4, group_captions=grouped, **kwargs)
        torch.manual_seed(0)
        batches[kind] = list(dm.train_dataloader()), list(dm.val_dataloader())
    assert isinstance(shapes(loader_threads=3).train_dataloader(), ThreadedDataLoader)
    for (train_a, val_a), (train_b, val_b) in [(batches["threads"], batches["processes"])]:
        assert len(train_a) == len(train_b) > 1 and len(val_a) == len(val_b)
        for a, b in zip(train_a + val_a, train_b + val_b, strict=True):
            assert a.image_ids == b.image_ids and torch.equal(a.tokens, b.tokens) and torch.equal(a.images, b.images)
        assert all((a.image_index is not None) == grouped for a in train_a)


def test_loader_threads_survive_lightnings_ddp_sampler_injection(shapes):
    """Under DDP Lightning rebuilds each loader with a DistributedSampler inside its batch sampler:
    the rebuilt loader is still threaded and yields its rank's share."""
    from lightning.fabric.utilities.data import _replace_dunder_methods
    from lightning.pytorch.trainer.states import RunningStage
    from lightning.pytorch.utilities.data import _update_dataloader
    from torch.utils.data import BatchSampler, DataLoader, DistributedSampler

    dm = shapes(batch_size=4, loader_threads=2)
    with _replace_dunder_methods(DataLoader, "dataset"), _replace_dunder_methods(BatchSampler):
        loader = dm.train_dataloader()  # as Lightning calls the hook: recording the loader's arguments
    sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=1, shuffle=False)
    rebuilt = _update_dataloader(loader, sampler, mode=RunningStage.TRAINING)
    assert isinstance(rebuilt, ThreadedDataLoader) and rebuilt.threads == 2
    assert sum(len(b) for b in rebuilt) == 50  # half of the 100 (image, caption) pairs


def test_loader_threads_and_worker_processes_exclude_each_other():
    with pytest.raises(ConfigError, match="set one of them to 0"):
        CaptionDataModule(reader=ShapesReader(num_train=4), num_workers=2, loader_threads=2)
    with pytest.raises(ValueError, match="num_workers must be 0"):
        ThreadedDataLoader([1, 2], num_workers=1)


def test_grouped_batch_size_is_checked_against_the_images(shapes):
    with pytest.raises(ConfigError, match=r"batch_size=21 is larger than the training split \(20 images"):
        shapes(batch_size=21, group_captions=True).setup("fit")


def test_evaluation_batches_have_one_item_per_image_with_all_references(shapes):
    dm = shapes(batch_size=4, eval_batch_size=3)
    batches = list(dm.val_dataloader())
    records = [r for r in ShapesReader(num_train=20, num_val=6, num_test=5, seed=3).read() if r.split == "val"]
    assert [i for b in batches for i in b.image_ids] == [r.image_id for r in records]
    assert len(batches[0]) == 3
    assert batches[0].references[0] == list(records[0].captions)
    assert dm.vocab.decode(batches[0].tokens[0].tolist()) == " ".join(records[0].captions[0].lower().split())
    assert [b.image_ids for b in dm.predict_dataloader()] == [b.image_ids for b in dm.test_dataloader()]


def test_max_caption_len_cuts_training_captions_but_keeps_eos(shapes):
    dm = shapes(max_caption_len=3)
    batch = next(iter(dm.train_dataloader()))
    assert int(batch.lengths.max()) <= 3 + 2
    assert all(row[n - 1] == dm.vocab.eos for row, n in zip(batch.tokens, batch.lengths.tolist(), strict=True))


def test_image_size_resizes_and_crops(tmp_path):
    Image.new("RGB", (80, 60), "red").save(tmp_path / "a.jpg")
    records = [CaptionRecord("1", tmp_path / "a.jpg", ("a red picture",), "train")]
    dm = CaptionDataModule(reader=ListReader(records), image_size=32, prepared_dir=str(tmp_path / "p"))
    assert next(iter(dm.train_dataloader())).images.shape == (1, 3, 32, 32)


def test_augmentations_apply_to_training_images_only(tmp_path):
    from torchvision.transforms import v2

    image = np.zeros((32, 32, 3), np.uint8)
    image[:, :16] = 255  # left half white
    Image.fromarray(image).save(tmp_path / "a.png")
    records = [
        CaptionRecord("1", tmp_path / "a.png", ("white on the left",), "train"),
        CaptionRecord("2", tmp_path / "a.png", ("white on the left",), "val"),
    ]
    dm = CaptionDataModule(
        reader=ListReader(records), augmentations=[v2.RandomHorizontalFlip(p=1.0)], prepared_dir=str(tmp_path / "p")
    )
    train = next(iter(dm.train_dataloader())).images[0]
    val = next(iter(dm.val_dataloader())).images[0]
    assert float(train[:, :, :16].mean()) == 0.0 and float(val[:, :, :16].mean()) == 1.0


def test_readers_records_are_memory_maps_not_python_lists(shapes):
    dm = shapes()
    split = dm.prepared.split("train")
    assert split.captions.cache_files and split.images.cache_files  # Arrow files on disk, memory-mapped
    assert isinstance(split.lengths, np.ndarray) and isinstance(split.caption_image, np.ndarray)


def test_missing_and_corrupt_images_name_the_file(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    noise = np.random.default_rng(0).integers(0, 255, (120, 120, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])  # header intact, pixels cut
    ok = CaptionRecord("0", tmp_path / "ok.jpg", ("a blue square",), "train")
    for name, message in (("gone.jpg", "gone.jpg.*missing"), ("broken.jpg", "broken.jpg.*not a readable image")):
        records = [ok, CaptionRecord("1", tmp_path / name, ("a dog",), "train")]
        with pytest.raises(DataError, match=message):
            _ = CaptionDataModule(reader=ListReader(records), prepared_dir=str(tmp_path / f"p-{name}")).vocab
    # A truncated JPEG passes the header check and is caught, naming it, when its pixels are decoded.
    records = [ok, CaptionRecord("2", tmp_path / "truncated.jpg", ("a cat",), "train")]
    dm = CaptionDataModule(reader=ListReader(records), batch_size=1, prepared_dir=str(tmp_path / "t"))
    dataset = dm.dataset("train")
    dataset[0]
    with pytest.raises(DataError, match="truncated.jpg"):
        dataset[1]


def test_missing_split_and_unknown_split_are_clear_errors(tmp_path):
    records = [CaptionRecord("1", None, ("a dog",), "train")]
    dm = CaptionDataModule(reader=ListReader(records), prepared_dir=str(tmp_path / "p"))
    with pytest.raises(DataError, match="no 'val' images"):
        dm.val_dataloader()
    with pytest.raises(ConfigError, match="predict_split"):
        CaptionDataModule(reader=ListReader(records), predict_split="dev")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_size": 0}, "batch_size must be ≥ 1"),
        ({"num_workers": -1}, "num_workers must be ≥ 0"),
        ({"train_splits": ["train", "extra"]}, "unknown split names"),
        ({"features": "cache"}, "needs a fixed data.image_size"),
    ],
)
def test_bad_options_are_one_line_errors(kwargs, message):
    with pytest.raises(ConfigError, match=message) as err:
        CaptionDataModule(reader=ListReader([]), **kwargs)
    assert "\n" not in str(err.value)


def test_batch_size_larger_than_the_training_split_is_refused(shapes):
    dm = shapes(batch_size=101)
    with pytest.raises(ConfigError, match=r"batch_size=101 is larger than the training split \(100 captions"):
        dm.setup("fit")


def test_loader_workers_render_the_same_batches(shapes):
    torch.manual_seed(0)
    single = next(iter(shapes(batch_size=4, num_workers=0).val_dataloader()))
    multi = next(iter(shapes(batch_size=4, num_workers=2).val_dataloader()))
    assert torch.equal(single.images, multi.images) and torch.equal(single.tokens, multi.tokens)


def test_real_flickr8k_jpegs_load_through_the_datamodule(shared_data, tmp_path):
    """Real JPEGs of any aspect ratio → resized, centre-cropped [0, 1] tensors, decoded with Pillow."""
    images = sorted((shared_data / "flickr8k" / "images").glob("*.jpg"))[:3]
    records = [CaptionRecord(p.stem, p, ("a photo of something",), "train") for p in images]
    dm = CaptionDataModule(reader=ListReader(records), batch_size=3, image_size=224, prepared_dir=str(tmp_path))
    batch = next(iter(dm.train_dataloader()))
    assert batch.images.shape == (3, 3, 224, 224)
    assert 0.0 <= float(batch.images.min()) < float(batch.images.max()) <= 1.0
    assert batch.images.std() > 0.05  # real pictures, not a blank canvas


def test_prepared_folder_defaults_under_data_prepared(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    dm = CaptionDataModule(reader=ShapesReader(num_train=3, num_val=1, num_test=1), min_word_count=2)
    assert dm.prepared_dir.parent == Path("data/prepared") and dm.prepared_dir.name.startswith("shapes-")
    other = CaptionDataModule(reader=ShapesReader(num_train=3, num_val=1, num_test=1), min_word_count=1)
    assert other.prepared_dir != dm.prepared_dir  # settings are part of the name


def test_token_views_equal_the_arrow_rows_across_record_batches(tmp_path):
    reader = ShapesReader(num_train=300, num_val=2, num_test=2, seed=4)
    split = CaptionDataModule(reader=reader, prepared_dir=str(tmp_path)).prepared.split("train")
    assert split.captions.data.table.column("tokens").num_chunks > 1  # rows span several Arrow record batches
    rows = np.array([0, 999, 1000, 1001, 1499, 7, 1234])
    views = split.tokens(rows)
    assert [v.tolist() for v in views] == split.captions[rows.tolist()]["tokens"]
    assert all(not v.flags.owndata for v in views)  # views into the memory map, not copies
    assert split.image_rows(np.array([3, 1]))["image_id"] == ["shapes-train-00003", "shapes-train-00001"]
