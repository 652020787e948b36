"""wandb logging, offline (no account, no server): experiments/logger/wandb.yaml with any experiment."""

from __future__ import annotations

import importlib.util
import json
import os
import struct
import time
from pathlib import Path

import pytest
import yaml

from capattn.cli import main

from .conftest import REPO_ROOT, TINY_SHAPES

CONFIG = REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"
WANDB = REPO_ROOT / "experiments" / "logger" / "wandb.yaml"
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    *TINY_SHAPES,
]


def _put(into: dict, item, value) -> None:
    """An item's value at its key, or at its nested key (wandb splits a logged dict into nested keys)."""
    keys = [item.key] if item.key else list(item.nested_key)
    for key in keys[:-1]:
        into = into.setdefault(key, {})
    into[keys[-1]] = value


def read_offline_run(run: Path) -> dict[str, dict]:
    """The config and summary an offline run recorded in its ``.wandb`` file (what `wandb sync` uploads).

    The file is a LevelDB-style log of protobuf records: 32 KiB blocks, each record split into chunks
    with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last).
    """
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run.glob("*.wandb")
    raw = path.read_bytes()
    assert raw[:4] == b":W&B"
    config: dict = {}
    summary: dict = {}
    exited = False
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos : pos + 7])
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = pb.Record()
        record.ParseFromString(chunks)
        chunks = b""
        if record.WhichOneof("record_type") == "exit":
            exited = True
        elif record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                _put(config, item, json.loads(item.value_json))
        elif record.WhichOneof("record_type") == "summary":
            for item in record.summary.update:
                _put(summary, item, json.loads(item.value_json))
    return {"config": config, "summary": summary, "exited": exited}


HAVE_SAMPLES = importlib.util.find_spec("capattn.samples") is not None


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory) -> tuple[Path, Path]:
    """One `capattn fit` with the wandb logger piece, offline: (its folder, the wandb run's folder)."""
    import wandb

    root = tmp_path_factory.mktemp("wandb")
    callbacks: list[str] = []  # the demo config already has BestMetrics and ValidationSamples
    cwd, mode = os.getcwd(), os.environ.get("WANDB_MODE")
    os.chdir(root)
    os.environ["WANDB_MODE"] = "offline"
    try:
        # An absolute save_dir: wandb's service process, started by an earlier test, keeps its own cwd.
        save_dir = f"--trainer.logger.init_args.save_dir={root / 'runs' / 'wandb'}"
        main(
            [
                "fit",
                "--config",
                str(CONFIG),
                "--config",
                str(WANDB),
                save_dir,
                "--test_after_fit=false",
                *callbacks,
                *TINY,
            ]
        )
    finally:
        wandb.finish()  # what the end of the `capattn` process does: writes the run's summary
        os.chdir(cwd)
        if mode is None:
            os.environ.pop("WANDB_MODE", None)
        else:
            os.environ["WANDB_MODE"] = mode
    (run,) = root.rglob("offline-run-*")
    deadline = time.monotonic() + 60
    while not (list(run.glob("*.wandb")) and read_offline_run(run)["exited"]) and time.monotonic() < deadline:
        time.sleep(0.2)  # wandb's service process writes the run file on its own schedule
    return root, run


def test_wandb_piece_is_a_trainer_logger_that_composes_with_any_experiment():
    piece = yaml.safe_load(WANDB.read_text())
    assert list(piece) == ["trainer"] and list(piece["trainer"]) == ["logger"]
    assert piece["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    assert {"project", "tags"} <= set(piece["trainer"]["logger"]["init_args"])
    assert WANDB.read_text().startswith("# capattn fit --config experiments/")


def test_offline_wandb_run_has_the_full_config_and_the_best_metrics(offline_run):
    root, run = offline_run
    recorded = read_offline_run(run)
    config, summary = recorded["config"], recorded["summary"]
    # The full resolved LightningCLI config, not only the module's hyperparameters.
    assert {"model", "data", "trainer", "seed_everything"} <= set(config), sorted(config)
    assert config["model"]["decoder"]["class_path"] == "capattn.models.decoders.ShowAttendTellDecoder"
    assert config["data"]["reader"]["init_args"]["num_train"] == 24
    assert config["trainer"]["logger"]["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    # The best checkpoint's metrics in the run summary (one epoch: the only validation is the best).
    assert summary["best/val/CIDEr-D"] > 0 and "best/val/BLEU-4" in summary
    assert summary["best/epoch"] == 0 and summary["best/checkpoint"].endswith(".ckpt")
    # The same numbers in the run folder, for any logger.
    (best_file,) = root.rglob("best_metrics.json")
    assert json.loads(best_file.read_text())["metrics"]["val/CIDEr-D"] == pytest.approx(summary["best/val/CIDEr-D"])


@pytest.mark.skipif(not HAVE_SAMPLES, reason="capattn.samples is not there yet")
def test_offline_wandb_run_has_the_sample_caption_table(offline_run):
    _, run = offline_run
    summary = read_offline_run(run)["summary"]
    tables = [v for v in summary.values() if isinstance(v, dict) and v.get("_type") == "table-file"]
    assert tables, sorted(summary)
    table = json.loads((run / "files" / tables[0]["path"]).read_text())
    assert len(table["data"]) > 0 and len(table["columns"]) >= 3  # image, generated, references
    # Every row has an image: wandb (0.2x+) stages a table's images in the table's artifact, which
    # `wandb sync` uploads; the run's copy of the table marks the cell "Image" (older wandb: an image-file).
    for row in table["data"]:
        assert any(c == "Image" or (isinstance(c, dict) and c.get("_type") == "image-file") for c in row), row
