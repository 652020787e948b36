"""The fp16 feature cache: equal to running the encoder, resumable, keyed by the encoder, refuses a full disk."""

from __future__ import annotations

import shutil
import warnings

import lightning as L
import numpy as np
import pytest
import torch

from capattn.data import features as features_module
from capattn.data.datamodule import CaptionDataModule
from capattn.data.synthetic import ShapesReader
from capattn.errors import DataError
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import ImageEncoder
from capattn.module import CaptioningModule

SIZES = {"num_train": 10, "num_val": 4, "num_test": 3, "image_size": 48, "seed": 1}


class InterruptedShapes(ShapesReader):
    """The shapes world, with Ctrl-C pressed while one chosen image is being loaded."""

    def __init__(self, *, stop_at: str | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.stop_at = stop_at

    def load_image(self, record):
        if record.image_id == self.stop_at:
            raise KeyboardInterrupt
        return super().load_image(record)


def encoder(seed: int = 0) -> ImageEncoder:
    torch.manual_seed(seed)
    return ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 16, 32), trainable="none")


def datamodule(tmp_path, reader=None, image_size: int = 48, **kwargs) -> CaptionDataModule:
    return CaptionDataModule(
        reader=reader or ShapesReader(**SIZES),
        image_size=image_size,
        batch_size=4,
        eval_batch_size=4,
        prepared_dir=str(tmp_path / "prepared"),
        features_dir=str(tmp_path / "features"),
        **kwargs,
    )


def test_cached_features_equal_the_encoder_on_every_split(tmp_path):
    enc = encoder()
    cached = datamodule(tmp_path, features="cache")
    folder = cached.prepare_features(enc)
    assert {p.name for p in folder.glob("*.npy")} >= {"train.grid.npy", "val.pooled.npy", "test.grid.npy"}
    cached.use_feature_cache(enc)
    images = datamodule(tmp_path)  # same prepared folder, images decoded per item
    enc.eval()
    for split in ("train", "val", "test"):
        a, b = cached.dataset(split), images.dataset(split)
        batch_c = cached.dataset(split).__getitems__(list(range(len(a))))
        batch_i = b.__getitems__(list(range(len(b))))
        assert [x[4] for x in batch_c] == [x[4] for x in batch_i]  # same image ids, same order
        with torch.no_grad():
            expected = enc(torch.stack([x[0] for x in batch_i]))
        grid = torch.from_numpy(np.stack([x[1] for x in batch_c]))
        pooled = torch.from_numpy(np.stack([x[2] for x in batch_c]))
        assert grid.dtype == torch.float16 and grid.shape == expected.grid.shape  # (N, 36, 32)
        torch.testing.assert_close(grid.float(), expected.grid, rtol=2e-3, atol=2e-3)
        torch.testing.assert_close(pooled.float(), expected.pooled, rtol=2e-3, atol=2e-3)
    batch = next(iter(cached.val_dataloader()))
    assert batch.images is None and batch.features.grid.shape == (4, 36, 32)
    # on the device, the model gets float32, and on a CPU the cached float16 grid beside it (decoding reads it)
    features = cached.on_after_batch_transfer(batch, 0).features
    assert features.grid.dtype == features.pooled.dtype == torch.float32
    assert features.cached_grid is batch.features.grid and torch.equal(features.cached_grid.float(), features.grid)


def test_interrupted_build_resumes_without_recomputing_written_rows(tmp_path):
    enc = encoder()
    interrupted = datamodule(tmp_path, InterruptedShapes(stop_at="shapes-train-00006", **SIZES), features="cache")
    with pytest.raises(KeyboardInterrupt):
        interrupted.prepare_features(enc)
    (folder,) = (tmp_path / "features").iterdir()
    assert (folder / "progress.json").read_text().strip().endswith("}")
    with pytest.raises(DataError, match="incomplete"):
        interrupted.use_feature_cache(enc)

    seen: list[int] = []
    hook = enc.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    resumed = datamodule(tmp_path, InterruptedShapes(**SIZES), features="cache")
    assert resumed.prepare_features(enc) == folder
    hook.remove()
    seen = seen[1:]  # the first call is the 1-image probe of the grid's shape
    assert sum(seen) == 17 - 4  # rows 0–3 (the first batch) were on disk already

    fresh = datamodule(tmp_path / "fresh", InterruptedShapes(**SIZES), features="cache")
    fresh_folder = fresh.prepare_features(enc)
    for name in ("train.grid.npy", "train.pooled.npy", "test.grid.npy"):
        np.testing.assert_allclose(
            np.load(folder / name).astype(np.float32), np.load(fresh_folder / name).astype(np.float32), atol=2e-3
        )
    resumed.use_feature_cache(enc)  # complete now


def test_another_encoder_never_reads_a_stale_cache(tmp_path):
    dm = datamodule(tmp_path, features="cache")
    first = dm.prepare_features(encoder(seed=0))
    second = dm.prepare_features(encoder(seed=1))  # same config, other weights
    assert first != second
    bigger = ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 16, 32), trainable="none", grid_size=3)
    bigger.load_state_dict(encoder(seed=0).state_dict())
    assert dm.prepare_features(bigger) not in (first, second)  # grid size is part of the key
    with pytest.raises(DataError, match="no feature cache"):
        datamodule(tmp_path, features="cache", image_size=24).use_feature_cache(encoder(seed=0))


def test_refuses_before_writing_when_the_disk_lacks_space(tmp_path, monkeypatch):
    real = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(features_module.shutil, "disk_usage", lambda path: real._replace(free=10_000))
    dm = datamodule(tmp_path, features="cache")
    with pytest.raises(DataError, match=r"needs 0\.0 GB .* only 0\.0 GB are free .*data.features_dir") as err:
        dm.prepare_features(encoder())
    assert "\n" not in str(err.value)
    assert not (tmp_path / "features").exists()


def test_a_trainable_encoder_is_refused_with_the_reason(tmp_path):
    dm = datamodule(tmp_path, features="cache")
    with pytest.raises(DataError, match="frozen encoder.*trainable=none"):
        dm.prepare_features(ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 16, 32)))


def test_workers_map_the_cache_instead_of_copying_it(tmp_path):
    enc = encoder()
    dm = datamodule(tmp_path, features="cache", num_workers=2)
    dm.prepare_features(enc)
    cache = dm.use_feature_cache(enc)
    cache.grid("val")
    assert "_maps" in cache.__getstate__() and not cache.__getstate__()["_maps"]  # pickled without arrays
    single = datamodule(tmp_path, features="cache")
    single.use_feature_cache(enc)
    a, b = next(iter(dm.val_dataloader())), next(iter(single.val_dataloader()))
    assert torch.equal(a.features.grid, b.features.grid) and torch.equal(a.tokens, b.tokens)


@pytest.mark.parametrize("workers", [0, 2])
def test_grouped_batches_carry_each_images_cached_grid_once(tmp_path, workers):
    """``group_captions`` on the cache: one grid per image, the cache's own rows, its captions pointing
    at it; from workers the batch arrives in shared memory, gathered in one copy."""
    enc = encoder()
    dm = datamodule(tmp_path, features="cache", group_captions=True, num_workers=workers)
    dm.prepare_features(enc)
    cache = dm.use_feature_cache(enc)
    train = dm.dataset("train")
    row_of = {train.split.image_rows([i])["image_id"][0]: i for i in range(len(train))}
    batches = list(dm.train_dataloader())
    assert sum(len(b.image_ids) for b in batches) == len(train)
    for batch in batches:
        rows = [row_of[i] for i in batch.image_ids]
        assert batch.features.grid.shape[0] == len(batch.image_ids) and batch.features.grid.dtype == torch.float16
        assert torch.equal(batch.features.grid, torch.from_numpy(cache.grid("train")[rows]))
        assert torch.equal(batch.features.pooled, torch.from_numpy(cache.pooled("train")[rows]))
        assert batch.image_index.max() < len(batch.image_ids) and len(batch) == len(batch.image_index)
        assert batch.features.grid.is_shared() == (workers > 0)


def test_training_on_cached_features_never_runs_the_encoder(tmp_path):
    L.seed_everything(0)
    enc = encoder()
    dm = datamodule(tmp_path, features="cache")
    model = CaptioningModule(
        encoder=enc,
        decoder=ShowAttendTellDecoder(vocab_size=dm.vocab_size, feature_dim=32, embed_dim=16, hidden_dim=16),
        val_scorers=("bleu",),
        tokenizer="simple",
    )
    enc.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    calls: list = []
    trainer = L.Trainer(
        fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)  # prepare_data builds the cache from trainer.lightning_module.encoder
    # The cache build only: the 1-image probe, then train (10), val (4) and test (3) in batches of 4.
    assert [s[0] for s in calls] == [1, 4, 4, 2, 4, 3]
    calls.clear()
    trainer.validate(model, datamodule=dm, verbose=False)
    assert calls == [] and np.isfinite(trainer.callback_metrics["val/loss"].item())


def test_a_decoder_that_reads_no_grid_trains_and_validates_without_reading_grids(tmp_path, monkeypatch):
    """Show and Tell sees only the pooled vector (``reads_grid = False``): its batches from the cache
    carry that vector as a one-location grid, and no grid is read from disk in fit, validate or test;
    its loss is the one it gets from the full grid."""
    L.seed_everything(0)
    enc = encoder()
    dm = datamodule(tmp_path, features="cache")
    decoder = ShowTellDecoder(vocab_size=dm.vocab_size, feature_dim=32, embed_dim=16, hidden_dim=16, dropout=0.0)
    model = CaptioningModule(encoder=enc, decoder=decoder, val_scorers=("bleu",), tokenizer="simple")
    reads: list[str] = []
    grid = features_module.FeatureCache.grid
    monkeypatch.setattr(
        features_module.FeatureCache, "grid", lambda self, split: reads.append(split) or grid(self, split)
    )
    trainer = L.Trainer(
        fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)
    trainer.validate(model, datamodule=dm, verbose=False)
    assert np.isfinite(trainer.callback_metrics["val/loss"].item())
    trainer.test(model, datamodule=dm, verbose=False)
    assert reads == []
    batch = dm.on_after_batch_transfer(next(iter(dm.val_dataloader())), 0)
    assert batch.features.grid.shape == (4, 1, 32) and torch.equal(batch.features.grid[:, 0], batch.features.pooled)
    full = datamodule(tmp_path, features="cache")  # no trainer: reads the grids
    full.use_feature_cache(enc)
    full_batch = full.on_after_batch_transfer(next(iter(full.val_dataloader())), 0)
    assert reads == ["val"] and full_batch.features.grid.shape == (4, 36, 32)
    model.eval()
    with torch.no_grad():
        ours, theirs = model._losses(batch, batch.features), model._losses(full_batch, full_batch.features)
    torch.testing.assert_close(ours["loss"], theirs["loss"])


def test_training_with_loader_threads_on_the_cache(tmp_path, recwarn, monkeypatch):
    """``data.loader_threads`` with grouped captions through a Lightning fit: it trains, and
    Lightning's tip to add worker processes is not shown for a threaded loader."""
    from lightning.pytorch.trainer.connectors import data_connector

    monkeypatch.setattr(data_connector, "suggested_max_num_workers", lambda devices: 8)  # a machine with cores
    monkeypatch.setattr(warnings, "filters", list(warnings.filters))  # the filter added below stays in this test
    data_connector._worker_check(L.Trainer(logger=False), torch.utils.data.DataLoader([1]), "train_dataloader")
    assert [w for w in recwarn if "does not have many workers" in str(w.message)]  # shown for processes
    recwarn.clear()
    L.seed_everything(0)
    enc = encoder()
    dm = datamodule(tmp_path, features="cache", loader_threads=2, group_captions=True)
    model = CaptioningModule(
        encoder=enc,
        decoder=ShowAttendTellDecoder(vocab_size=dm.vocab_size, feature_dim=32, embed_dim=16, hidden_dim=16),
        val_scorers=("bleu",),
        tokenizer="simple",
    )
    trainer = L.Trainer(
        fast_dev_run=2, logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path
    )
    trainer.fit(model, datamodule=dm)
    assert np.isfinite(trainer.callback_metrics["train/loss"].item())
    assert not [w for w in recwarn if "does not have many workers" in str(w.message)]
