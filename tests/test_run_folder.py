"""Run folders: one per run for any logger, named from the experiment, continued by `--ckpt_path last`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from capattn.cli import main
from capattn.lightning_cli import normalize_argv

from .conftest import REPO_ROOT, TINY_SHOW_TELL

SHOW_TELL = str(REPO_ROOT / "experiments" / "demo_show_tell.yaml")
TINY = [
    "--config",
    SHOW_TELL,
    "--seed_everything=7",
    *TINY_SHOW_TELL,
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
]
EXPERIMENT = Path("runs/demo/show_tell")


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)


def test_each_fit_gets_its_own_folder_and_last_continues_the_newest(capsys):
    main(["fit", *TINY, "--trainer.max_epochs=1"])
    main(["fit", *TINY, "--trainer.max_epochs=1"])
    runs = sorted(p.name for p in EXPERIMENT.iterdir())
    assert runs == ["show_tell-shapes-seed7", "show_tell-shapes-seed7-2"]
    for run in runs:
        files = {p.name for p in (EXPERIMENT / run).rglob("*")}
        assert {"config.yaml", "metrics.csv", "last.ckpt"} <= files
        assert not any(name.startswith("last-v") for name in files)
    capsys.readouterr()

    main(["fit", *TINY, "--trainer.max_epochs=2", "--ckpt_path=last"])
    err = capsys.readouterr().err
    assert f"resuming from {EXPERIMENT}/show_tell-shapes-seed7-2/checkpoints/last.ckpt (epoch 0, step 2)" in err
    assert sorted(p.name for p in EXPERIMENT.iterdir()) == runs  # no new folder
    assert not list(EXPERIMENT.rglob("last-v*.ckpt"))
    # The resumed run's log keeps the first epoch's rows (Lightning's CSVLogger would delete them).
    rows = (EXPERIMENT / "show_tell-shapes-seed7-2/metrics.csv").read_text().splitlines()
    epochs = {line.split(",")[0] for line in rows[1:]}
    assert rows[0].startswith("epoch,") and epochs == {"0", "1"}, rows


def test_a_named_run_is_continued_never_overwritten(capsys):
    main(["fit", *TINY, "--trainer.max_epochs=1", "--run_name=mine"])
    before = (EXPERIMENT / "mine/checkpoints/last.ckpt").read_bytes()
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.max_epochs=1", "--run_name=mine"])
    assert exit_.value.code == 2
    assert "already holds checkpoints: add --ckpt_path last" in capsys.readouterr().err
    assert (EXPERIMENT / "mine/checkpoints/last.ckpt").read_bytes() == before


def test_tensorboard_logger_from_the_command_line():
    main(["fit", *TINY, "--trainer.max_epochs=1", "--trainer.logger=TensorBoardLogger"])
    (run,) = EXPERIMENT.iterdir()
    assert run.name == "show_tell-shapes-seed7"
    assert list(run.glob("events.out.tfevents.*")) and (run / "config.yaml").is_file()
    assert (run / "checkpoints/last.ckpt").is_file()


def test_wandb_runs_keep_their_config_and_results_apart_and_are_named_after_the_experiment():
    wandb = [
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline=true",
        "--trainer.logger.init_args.save_dir=runs/wandb",
        "--trainer.logger.init_args.project=capattn-tests",
        "--trainer.max_epochs=1",
        "--test_after_fit=true",
    ]
    main(["fit", *TINY, *wandb])
    main(["fit", *TINY, *wandb, "--seed_everything=8"])
    project = Path("runs/wandb/capattn-tests")
    runs = sorted(p.name for p in project.iterdir())
    assert runs == ["show_tell-shapes-seed7", "show_tell-shapes-seed8"]
    for run in runs:
        assert (project / run / "config.yaml").is_file()
        assert json.loads((project / run / "metrics_test.json").read_text())["run"] == run
    assert not Path("runs/wandb/config.yaml").exists()


def test_wandb_agent_arguments_are_accepted():
    """wandb's ${args} writes values with Python's str(): None, True/False, [1, 2], 1e-05."""
    assert normalize_argv(
        ["--trainer.gradient_clip_val=None", "--a=True", "--b=False", "--c=[1, None]", "--lr=1e-05", "--d=(1, 2)"]
    ) == ["--trainer.gradient_clip_val=null", "--a=true", "--b=false", "--c=[1, null]", "--lr=1.0e-05", "--d=[1, 2]"]
    assert normalize_argv(["fit", "--config", "x.yaml", "--name=None_of_these"]) == [
        "fit",
        "--config",
        "x.yaml",
        "--name=None_of_these",
    ]
    main(
        [
            "fit",
            *TINY,
            "--trainer.fast_dev_run=1",
            "--trainer.gradient_clip_val=None",
            "--model.optimizer.init_args.lr=1e-05",
            "--model.optimizer.init_args.amsgrad=True",
            "--model.optimizer.init_args.betas=[0.8, 0.99]",
        ]
    )


def test_slurm_layout_mismatch_is_one_line_instead_of_a_hang(monkeypatch, capsys):
    for key, value in {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NAME": "capattn",
        "SLURM_NTASKS": "4",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_NNODES": "1",
    }.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", *TINY, "--trainer.accelerator=cpu", "--trainer.devices=2"])
    assert exit_.value.code == 2
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("capattn: error:")]
    assert "--ntasks-per-node=4 but trainer.devices=2" in line and "Initializing distributed" in line


def test_testing_a_checkpoint_keeps_the_fits_metrics_history():
    """`capattn test` writes into the checkpoint's run folder; Lightning's CSVLogger would wipe the fit's rows."""
    import csv

    main(["fit", *TINY, "--trainer.max_epochs=2"])
    metrics = EXPERIMENT / "show_tell-shapes-seed7" / "metrics.csv"
    before = list(csv.DictReader(metrics.open()))
    assert any(row.get("val/CIDEr-D") for row in before)
    main(["test", *TINY, "--ckpt_path", str(EXPERIMENT / "show_tell-shapes-seed7" / "checkpoints" / "last.ckpt")])
    after = list(csv.DictReader(metrics.open()))
    assert len(after) == len(before) + 1 and after[-1]["test/CIDEr-D"]
    for old, new in zip(before, after, strict=False):
        assert {k: v for k, v in new.items() if k in old} == old
