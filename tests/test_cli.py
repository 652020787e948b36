"""The real `capattn` command line on every experiment file, at tiny sizes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from capattn.cli import main
from capattn.module import CaptioningModule

from .conftest import REPO_ROOT, TINY_SHAPES

# The shapes-world experiments; those on real datasets are run on stand-in data in tests/test_experiments.py.
EXPERIMENTS = sorted((REPO_ROOT / "experiments").glob("demo_*.yaml"))
TINY = TINY_SHAPES


def run(*args: str) -> None:
    main(list(args))


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # runs/ lands in a temporary folder


def test_help_lists_every_command_without_importing_torch():
    import subprocess
    import sys

    code = "import sys; from capattn.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("fit", "validate", "test", "predict", "prepare", "evaluate", "caption", "report", "sweep"):
        assert f"\n  {command} " in out


def test_unknown_command_is_a_one_line_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("trian")
    assert exit_.value.code == 2
    assert capsys.readouterr().err.strip() == "capattn: error: unknown command 'trian' — see `capattn --help`"


def test_every_experiment_starts_with_its_run_command():
    assert EXPERIMENTS, "no experiments/*.yaml found"
    for path in EXPERIMENTS:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# capattn ") and f"experiments/{path.name}" in first, path.name


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_runs_through_the_cli(config):
    run("fit", "--config", str(config), "--trainer.fast_dev_run=1", *TINY)


def test_print_config_shows_the_linked_vocab_and_overrides(capsys):
    with pytest.raises(SystemExit) as exit_:
        run("fit", "--print_config", "--config", str(EXPERIMENTS[0]), "--model.optimizer.init_args.lr=1e-3")
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "lr: 0.001" in out and "class_path: capattn.models.decoders" in out


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("--model.no_such_key=1", "no_such_key"),
        ("--data.batch_size=many", "batch_size"),
        ("--float32_matmul_precision=low", "float32_matmul_precision"),
    ],
)
def test_unknown_key_or_wrong_type_is_a_one_line_error(arg, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        run("fit", "--config", str(EXPERIMENTS[0]), arg)
    assert exit_.value.code != 0
    assert message in capsys.readouterr().err


def _fit(config: Path, *extra: str) -> Path:
    run(
        "fit",
        "--config",
        str(config),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=3",
        "--trainer.limit_val_batches=1",
        "--test_after_fit=true",
        *TINY,
        *extra,
    )
    (ckpt,) = Path("runs").rglob("last.ckpt")
    return ckpt


def test_float32_matmul_precision_applies_to_the_run_and_is_saved_with_it():
    """--float32_matmul_precision=high: TF32 matmuls on an Ampere-or-newer GPU (the GPU benchmarks'
    setting). It is torch's process-wide setting, made before anything is built, and the run's
    config.yaml records it."""
    before = torch.get_float32_matmul_precision()
    try:
        _fit(EXPERIMENTS[0], "--float32_matmul_precision=high", "--run_name=tf32")
        assert torch.get_float32_matmul_precision() == "high"
        (config,) = Path("runs").rglob("tf32/config.yaml")
        assert "float32_matmul_precision: high" in config.read_text()
    finally:
        torch.set_float32_matmul_precision(before)


def test_fit_test_predict_and_checkpoint_alone(capsys):
    config = next(p for p in EXPERIMENTS if "attend" in p.stem)
    ckpt = _fit(config)
    run_dir = ckpt.parent.parent
    results = json.loads((run_dir / "results_test.json").read_text())
    assert len(results) == 6 and set(results[0]) == {"image_id", "caption"}
    metrics = json.loads((run_dir / "metrics_test.json").read_text())
    assert {"BLEU-4", "CIDEr-D"} <= set(metrics["metrics"]) and metrics["params"] > 0
    assert list((run_dir / "attention").glob("*.png"))

    run("predict", "--config", str(config), "--ckpt_path", str(ckpt), *TINY)
    assert "wrote 6 captions" in capsys.readouterr().out

    # The checkpoint alone rebuilds the model, vocabulary included.
    model = CaptioningModule.load_from_checkpoint(ckpt, map_location="cpu", weights_only=False).eval()
    assert model.vocab is not None and len(model.vocab) == model.decoder.vocab_size
    with torch.no_grad():
        captions = model.decode(model.encoder(torch.rand(2, 3, 48, 48)))
    assert captions.tokens.shape[:2] == (2, 3)


def test_checkpoint_from_another_vocabulary_is_a_clear_error(capsys):
    ckpt = _fit(EXPERIMENTS[0])
    with pytest.raises(SystemExit) as exit_:
        run("test", "--config", str(EXPERIMENTS[0]), "--ckpt_path", str(ckpt), *TINY, "--data.max_vocab_size=20")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("capattn: error:") and "20" in err[-1] and "vocabulary" in err[-1]


def test_report_compares_runs(capsys):
    _fit(EXPERIMENTS[0])
    assert main(["report", "--latest", "runs"]) == 0
    table = capsys.readouterr().out
    assert "| run | model | params |" in table and "CIDEr-D" in table


def test_ddp_on_two_cpu_processes_scores_the_whole_split(tmp_path):
    """`capattn fit` under DDP (2 gloo processes): test metrics cover every test image once."""
    import subprocess
    import sys

    config = next(p for p in EXPERIMENTS if "attend" in p.stem)
    cmd = [
        sys.executable,
        "-m",
        "capattn.cli",
        "fit",
        "--config",
        str(config),
        "--trainer.accelerator=cpu",
        "--trainer.devices=2",
        "--trainer.strategy=ddp",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--test_after_fit=true",
        *TINY,
        "--data.reader.init_args.num_test=7",  # odd: DistributedSampler pads one image twice
    ]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    (metrics_file,) = Path(tmp_path, "runs").rglob("metrics_test.json")
    metrics = json.loads(metrics_file.read_text())
    assert metrics["images"] == 7
    results = json.loads((metrics_file.parent / "results_test.json").read_text())
    assert len({r["image_id"] for r in results}) == 7


def test_scheduler_and_wandb_logger_from_the_command_line():
    """An LR scheduler and the wandb logger (offline) are plain config choices; results get their own run folder."""
    run(
        "fit",
        "--config",
        str(EXPERIMENTS[0]),
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--test_after_fit=true",
        "--model.scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
        "--model.scheduler.init_args.patience=0",
        "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
        "--trainer.logger.init_args.offline=true",
        "--trainer.logger.init_args.save_dir=runs/wandb",
        "--trainer.logger.init_args.project=capattn-tests",
        *TINY,
    )
    (metrics,) = Path("runs/wandb").rglob("metrics_test.json")
    assert metrics.parent.parent.name == "capattn-tests"  # save_dir/project/run-id


def test_checkpoint_model_wins_and_decoding_settings_from_the_command_line_apply(capsys):
    show_tell = next(p for p in EXPERIMENTS if "attend" not in p.stem)
    attend = next(p for p in EXPERIMENTS if "attend" in p.stem)
    ckpt = _fit(show_tell, "--test_after_fit=false")
    capsys.readouterr()

    run("test", "--config", str(attend), "--ckpt_path", str(ckpt), *TINY, "--model.beam_size=5")
    err = capsys.readouterr().err
    assert (
        "holds a ShowTellDecoder model (small_cnn encoder); the config's model (ShowAttendTellDecoder) is ignored"
        in (err)
    )
    metrics = json.loads((ckpt.parent.parent / "metrics_test.json").read_text())  # into the checkpoint's run
    assert metrics["model"] == "ShowTellDecoder" and metrics["decoding"]["beam_size"] == 5
    assert metrics["checkpoint"] == str(ckpt) and metrics["untrained"] is False

    run("test", "--config", str(show_tell), "--ckpt_path", str(ckpt), *TINY, "--model.decoder.init_args.hidden_dim=64")
    assert "ignored from the config: model.decoder.init_args.hidden_dim=64 (checkpoint: 256)" in capsys.readouterr().err


def test_compile_step_of_a_checkpoint_gives_way_to_the_command_line(monkeypatch, capsys):
    """compile_step chooses how the decoder runs, not what it computes: a checkpoint trained with it
    (on a GPU) is tested on this CPU without compiling, unless the command line asks for it, and the
    difference is not reported as an ignored model setting."""
    attend = next(p for p in EXPERIMENTS if "attend" in p.stem)
    ckpt = _fit(attend, "--test_after_fit=false")
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["decoder"]["init_args"]["compile_step"] = True
    torch.save(saved, ckpt)
    capsys.readouterr()
    real_compile = torch.compile
    compiled = []

    def recording_compile(fn, **kwargs):
        compiled.append(fn)
        return real_compile(fn, **{**kwargs, "backend": "eager"})  # traced, not code-generated: quick

    monkeypatch.setattr(torch, "compile", recording_compile)
    run("test", "--config", str(attend), "--ckpt_path", str(ckpt), *TINY)
    assert compiled == [] and "compile_step" not in capsys.readouterr().err
    run("test", "--config", str(attend), "--ckpt_path", str(ckpt), *TINY, "--model.decoder.init_args.compile_step=true")
    assert len(compiled) == 1


def test_checkpoint_stores_the_preprocessing_for_captioning_files():
    ckpt = _fit(EXPERIMENTS[0], "--test_after_fit=false")
    data = torch.load(ckpt, map_location="cpu", weights_only=True)["capattn_data"]
    assert set(data) == {"image_size"}
