"""DDP on 2 CPU processes (gloo): the same files, metrics and figures as one process, written once."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from capattn.cli import main

from .conftest import REPO_ROOT

CONFIG = REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"
TINY = [
    "--data.reader.init_args.num_train=24",
    "--data.reader.init_args.num_val=6",
    "--data.reader.init_args.num_test=7",  # odd: DistributedSampler pads the second rank with a repeat
    "--data.batch_size=4",
    "--data.num_workers=0",
    "--model.val_scorers=[bleu,cider]",
    "--model.test_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
]
DDP = ["--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.strategy=ddp"]
# The one-process runs compared with DDP's: on the CPU too (the demo config's ``accelerator: auto``
# would put them on a GPU where there is one, and a GPU's float rounding is not the CPU's).
ONE_PROCESS = ["--trainer.accelerator=cpu", "--trainer.devices=1"]


def _newest(root: Path, name: str) -> Path:
    """The newest ``name`` file a command wrote under ``root`` (where depends on the run-folder policy)."""
    paths = [p for p in root.rglob(name) if "data" not in p.relative_to(root).parts[:1]]
    assert paths, f"no {name} under {root}"
    return max(paths, key=lambda p: p.stat().st_mtime_ns)


def _capattn(*args: str, cwd: Path) -> str:
    """Runs `capattn` in a fresh process (DDP launches its second rank by re-running the command)."""
    done = subprocess.run(
        [sys.executable, "-m", "capattn.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def _outputs(run_dir: Path) -> dict:
    """What a test run wrote, read at once (a later run may write into the same folder)."""
    return {
        "metrics": json.loads((run_dir / "metrics_test.json").read_text()),
        "results": json.loads((run_dir / "results_test.json").read_text()),
        "figures": sorted(p.name for p in (run_dir / "attention").glob("*.png")),
    }


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, dict]:
    """`capattn fit` on 2 gloo processes, testing its best checkpoint right after: (folder, what it wrote)."""
    root = tmp_path_factory.mktemp("ddp")
    _capattn(
        "fit",
        "--config",
        str(CONFIG),
        "--config",
        str(REPO_ROOT / "experiments" / "trainer" / "ddp.yaml"),
        *DDP,
        "--trainer.precision=32",
        "--trainer.max_epochs=2",
        "--trainer.limit_train_batches=2",
        "--trainer.log_every_n_steps=1",
        "--test_after_fit=true",
        *TINY,
        cwd=root,
    )
    run_dir = _newest(root, "metrics_test.json").parent
    with (run_dir / "metrics.csv").open(newline="") as f:
        history = list(csv.DictReader(f))
    best = json.loads((run_dir / "best_metrics.json").read_text())
    return root, {**_outputs(run_dir), "history": history, "best": best}


def test_ddp_test_equals_a_one_process_test_of_the_same_checkpoint(ddp_run, monkeypatch):
    root, ddp = ddp_run
    assert ddp["metrics"]["images"] == 7
    ckpt = ddp["metrics"]["checkpoint"]
    monkeypatch.chdir(root)
    assert Path(ckpt).is_file()
    main(["test", "--config", str(CONFIG), "--ckpt_path", ckpt, *ONE_PROCESS, *TINY])
    one = _outputs(_newest(root, "metrics_test.json").parent)
    assert one["metrics"]["images"] == 7
    assert ddp["metrics"]["metrics"] == pytest.approx(one["metrics"]["metrics"], rel=1e-9, abs=1e-12)
    assert ddp["results"] == one["results"] and len({r["image_id"] for r in one["results"]}) == 7
    # The same test images are drawn, once, whatever the number of processes.
    assert ddp["figures"] == one["figures"] and len(one["figures"]) == 2


def test_best_metrics_are_those_of_the_best_validation(ddp_run):
    _, ddp = ddp_run
    best = ddp["best"]
    scores = [float(row["val/CIDEr-D"]) for row in ddp["history"] if row.get("val/CIDEr-D")]
    assert len(scores) == 2  # one validation per epoch
    assert best["monitor"] == "val/CIDEr-D" and best["score"] == pytest.approx(max(scores))
    assert best["metrics"]["val/CIDEr-D"] == pytest.approx(max(scores)) and "val/BLEU-4" in best["metrics"]
    assert best["checkpoint"] and Path(best["checkpoint"]).name.startswith(f"epoch{best['epoch']:02d}")


def test_training_speed_counts_the_captions_of_both_ranks(ddp_run):
    _, ddp = ddp_run
    rows = [row for row in ddp["history"] if row.get("speed/captions_per_s")]
    assert len(rows) == 4  # logged at every step: 2 epochs of 2 batches
    for row in rows:
        # captions/s × an epoch's seconds = the captions of an epoch: 2 batches of 4 on each of the 2 ranks
        per_epoch = float(row["speed/captions_per_s"]) * float(row["speed/epoch_minutes"]) * 60
        assert per_epoch == pytest.approx(2 * 2 * 4)


@pytest.mark.slow
def test_ddp_predict_writes_one_file_in_input_order_equal_to_one_process(ddp_run, monkeypatch):
    root, ddp = ddp_run
    predict = ["predict", "--config", str(CONFIG), "--ckpt_path", ddp["metrics"]["checkpoint"], *TINY]
    out = _capattn(*predict, *DDP, cwd=root)
    assert out.count("wrote 7 captions") == 1  # rank 0 alone writes
    assert not [p for p in root.rglob("rank*") if "data" not in p.relative_to(root).parts[:1]]  # no shards
    ddp_predictions = json.loads(_newest(root, "predictions.json").read_text())
    monkeypatch.chdir(root)
    main([*predict, *ONE_PROCESS])
    one_predictions = json.loads(_newest(root, "predictions.json").read_text())
    assert ddp_predictions == one_predictions and len(one_predictions) == 7
    ids = [p["image_id"] for p in one_predictions]
    assert ids == sorted(ids)  # the test split's own order
