"""The output callbacks' DDP logic (every image once, in input order, whatever the number of ranks), and the
speed a run logs."""

from __future__ import annotations

import csv
import types
from pathlib import Path

import lightning as L
import pytest
from torch.utils.data import DistributedSampler

from capattn import callbacks
from capattn.callbacks import _id_order, _merge_in_input_order
from capattn.cli import main

from .conftest import REPO_ROOT, TINY_SHOW_TELL


def _shares(n: int, world: int, *, with_indices: bool) -> list[list[tuple[int | None, dict]]]:
    """What each rank of a DDP predict holds: its DistributedSampler's images (padded with repeats)."""
    images = [{"image_id": f"img-{i:03d}", "caption": f"caption {i}"} for i in range(n)]
    shares = []
    for rank in range(world):
        sampler = DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=False)
        shares.append([(i if with_indices else None, images[i]) for i in sampler])
    return shares


@pytest.mark.parametrize("with_indices", [True, False])
@pytest.mark.parametrize(("n", "world"), [(7, 2), (10, 3), (1, 4), (8, 1)])
def test_ranks_predictions_merge_into_the_input_order_each_image_once(n, world, with_indices):
    shares = _shares(n, world, with_indices=with_indices)
    assert sum(len(s) for s in shares) >= n  # the sampler padded the last round with repeats
    rows = _merge_in_input_order(shares)
    assert [r["image_id"] for r in rows] == [f"img-{i:03d}" for i in range(n)]


def test_figures_take_the_smallest_ids_numerically_when_ids_are_numbers():
    assert sorted(["10", "9", "100"], key=_id_order) == ["9", "10", "100"]
    assert sorted(["b", "10", "a"], key=_id_order) == ["10", "a", "b"]


# --- TrainingSpeed ----------------------------------------------------------------------------

_CLOCK = [0.0]  # the fake clock TrainingSpeed reads in the test below
_SEEN: list[tuple[int, int, int, int]] = []  # (epoch, global step after the batch, captions, predicted words)
_VALIDATIONS: list[int] = []  # batches of each validation


class Tick(L.Callback):
    """Advances the fake clock: 1 s per training batch, 1,000 s per validation batch; records each training batch."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _CLOCK[0] += 1.0

    def on_validation_start(self, trainer, pl_module) -> None:
        _VALIDATIONS.append(0)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        _CLOCK[0] += 1000.0
        _VALIDATIONS[-1] += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _SEEN.append((trainer.current_epoch, trainer.global_step, len(batch), int((batch.lengths - 1).sum())))


def _speed_rows(run_dir: Path, key: str) -> list[dict[str, float]]:
    with (run_dir / "metrics.csv").open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get(key)]
    return [{k: float(v) for k, v in r.items() if v and (k.startswith("speed/") or k == "step")} for r in rows]


def test_training_speed_logs_training_rates_without_validation_and_each_validations_time(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(callbacks, "time", types.SimpleNamespace(perf_counter=lambda: _CLOCK[0]))
    _SEEN.clear()
    _VALIDATIONS.clear()
    every = 4
    main([
        "fit", "--config", str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"), *TINY_SHOW_TELL,
        "--trainer.max_epochs=2", f"--trainer.log_every_n_steps={every}", "--trainer.val_check_interval=0.5",
        "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", "--test_after_fit=false",
        "--trainer.callbacks+=tests.test_callbacks.Tick",
    ])  # fmt: skip
    (run_dir,) = {p.parent for p in Path("runs").rglob("metrics.csv")}
    rows = _speed_rows(run_dir, "speed/captions_per_s")
    # What the log should hold: at every `every`-th step, the batches since the last such step of the same
    # epoch, each 1 s long on the fake clock. Validation ran twice an epoch, 1,000 s a batch: left out.
    per_epoch = sum(1 for epoch, *_ in _SEEN if epoch == 0)
    expected, interval = [], []
    for i, (epoch, step, captions, words) in enumerate(_SEEN):
        if i and epoch != _SEEN[i - 1][0]:
            interval = []
        interval.append((captions, words))
        if step % every == 0:
            seconds = len(interval)
            expected.append({
                "step": step - 1,
                "speed/captions_per_s": sum(c for c, _ in interval) / seconds,
                "speed/words_per_s": sum(w for _, w in interval) / seconds,
                "speed/epoch_minutes": per_epoch / 60,
            })  # fmt: skip
            interval = []
    assert len(expected) >= 4 and per_epoch % every != 0  # intervals cut short by an epoch's end are covered
    assert rows == [pytest.approx(e) for e in expected]
    # Each validation's own time, 1,000 s a batch, logged after it.
    validations = [row["speed/validation_minutes"] for row in _speed_rows(run_dir, "speed/validation_minutes")]
    assert len(_VALIDATIONS) == 4 and all(_VALIDATIONS)
    assert validations == pytest.approx([1000 * n / 60 for n in _VALIDATIONS])
