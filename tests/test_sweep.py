"""`capattn sweep`: wandb's sweep format and engine, run locally, one trial per CPU slot."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from capattn.cli import main
from capattn.sweep import SweepError, load_sweep_file, parse_devices, schema_violations, trial_argv

from .conftest import REPO_ROOT, TINY_SHAPES

SWEEP_FILES = sorted((REPO_ROOT / "experiments" / "sweeps").glob("*.yaml"))
# capattn fit at its smallest: a few seconds per trial
TINY_FIT = [
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    *TINY_SHAPES,
]


def _write_sweep(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _state(out: Path) -> list[dict]:
    return json.loads((out / "sweep_state.json").read_text())["trials"]


def _results(out: Path) -> list[dict]:
    with (out / "results.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# --- sweep files ----------------------------------------------------------------------------------


def test_shipped_sweep_files_exist():
    names = {p.name for p in SWEEP_FILES}
    assert "compare_baselines.yaml" in names


@pytest.mark.parametrize("path", SWEEP_FILES, ids=lambda p: p.stem)
def test_every_shipped_sweep_file_passes_wandbs_schema(path):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

    config = yaml.safe_load(path.read_text())
    assert sweeps.schema_violations_from_proposed_config(config) == []
    sweeps.SweepConfig(config)  # what `wandb sweep` and next_run(validate=True) build
    assert path.read_text().startswith("# capattn sweep experiments/sweeps/" + path.name)
    command = config["command"]
    assert command[:3] == ["${env}", "capattn", "fit"] and "${args}" in command
    # under `wandb agent` a trial reports its metrics through wandb: the command logs with the wandb piece
    assert "experiments/logger/wandb.yaml" in command
    for i, chunk in enumerate(command):  # every --config the command names exists (paths from the repo root)
        if chunk == "--config":
            assert (REPO_ROOT / command[i + 1]).is_file(), command[i + 1]
    # every parameter is a dotted capattn key LightningCLI knows
    for name in config["parameters"]:
        assert name.split(".")[0] in ("model", "data", "trainer", "seed_everything"), name


def test_a_sweep_file_that_breaks_the_schema_is_a_one_line_error(tmp_path, capsys):
    bad = _write_sweep(tmp_path / "bad.yaml", {"method": "grdi", "parameters": {"x": {"values": [1]}}})
    assert schema_violations(yaml.safe_load(bad.read_text()))
    with pytest.raises(SystemExit) as exit_:
        main(["sweep", str(bad), "--devices", "cpu:1", "--out", str(tmp_path / "out")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("capattn: error:") and "bad.yaml" in err[0] and "grdi" in err[0]


def test_devices_give_one_slot_per_gpu_or_cpu_share():
    assert [s.env["CUDA_VISIBLE_DEVICES"] for s in parse_devices("0,2,3")] == ["0", "2", "3"]
    cpu = parse_devices("cpu:2")
    assert len(cpu) == 2 and all(s.env["CUDA_VISIBLE_DEVICES"] == "" for s in cpu)
    for bad in ("cpu:0", "gpu", "0,0", "1,x"):
        with pytest.raises(SweepError):
            parse_devices(bad)


def test_random_or_bayes_without_a_trial_budget_is_refused(tmp_path, capsys):
    sweep = _write_sweep(
        tmp_path / "s.yaml",
        {"method": "random", "program": "x.py", "parameters": {"x": {"min": 0.0, "max": 1.0}}},
    )
    with pytest.raises(SystemExit):
        main(["sweep", str(sweep), "--devices", "cpu:1", "--out", str(tmp_path / "out")])
    assert "--max-trials" in capsys.readouterr().err


# --- command lines ----------------------------------------------------------------------------------


def test_trial_command_line_is_built_as_wandb_agent_builds_it(tmp_path):
    config = {
        "method": "grid",
        "program": "train.py",
        "command": ["${env}", "${interpreter}", "${program}", "--fixed", "1", "${args}", "${args_no_hyphens}"],
        "parameters": {},
    }
    args = {
        "a.none": {"value": None},
        "b.flag": {"value": True},
        "c.list": {"value": [1, 2]},
        "d.lr": {"value": 1e-05},
        "e.name": {"value": "two words"},
    }
    argv = trial_argv(config, args, args_json_file=tmp_path / "args.json")
    assert argv == [
        "/usr/bin/env",
        "python",
        "train.py",
        "--fixed",
        "1",
        "--a.none=None",
        "--b.flag=True",
        "--c.list=[1, 2]",
        "--d.lr=1e-05",
        "--e.name=two words",  # one argv entry: no shell ever splits it
        "a.none=None",
        "b.flag=True",
        "c.list=[1, 2]",
        "d.lr=1e-05",
        "e.name=two words",
    ]
    config["command"] = ["${env}", "${interpreter}", "${program}", "${args_json_file}"]
    argv = trial_argv(config, args, args_json_file=tmp_path / "args.json")
    assert argv[-1] == str(tmp_path / "args.json")
    assert json.loads((tmp_path / "args.json").read_text())["c.list"] == [1, 2]


def test_wandb_agent_command_line_is_accepted_by_capattn_fit(tmp_path, monkeypatch):
    """`${args}` writes Python's str(): None, True, [1, 2], 1e-05 — `capattn fit` must read every one."""
    monkeypatch.chdir(tmp_path)
    config = load_sweep_file(REPO_ROOT / "experiments" / "sweeps" / "compare_baselines.yaml")
    config["command"] = [c.replace("experiments/", f"{REPO_ROOT}/experiments/") for c in config["command"]]
    args = {
        "model.decoder.class_path": {"value": "capattn.models.decoders.ShowTellDecoder"},
        "model.optimizer.init_args.lr": {"value": 1e-05},
        "seed_everything": {"value": 1},
        "model.scheduler": {"value": None},
        "trainer.gradient_clip_val": {"value": None},
        "test_after_fit": {"value": True},
        "model.val_scorers": {"value": ["bleu", "cider"]},
        "model.encoder.init_args.small_cnn_channels": {"value": [8, 16, 64]},
    }
    argv = trial_argv(config, args, args_json_file=tmp_path / "args.json")
    assert argv[:3] == ["/usr/bin/env", "capattn", "fit"]
    assert "--model.scheduler=None" in argv and "--model.val_scorers=['bleu', 'cider']" in argv
    tiny = [a for a in TINY_FIT if not a.startswith("--model.val_scorers")]
    main([*argv[2:], *tiny, "--trainer.fast_dev_run=1"])


@pytest.mark.parametrize("path", [p for p in SWEEP_FILES if p.stem != "compare_baselines"], ids=lambda p: p.stem)
def test_every_shipped_sweep_files_first_trial_runs(path, tmp_path, monkeypatch):
    """The engine's first proposal, as wandb's agent would run it (compare_baselines: the test above)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import sweeps

    monkeypatch.chdir(tmp_path)
    config = load_sweep_file(path)
    proposal = sweeps.next_run(config, [], validate=True)
    config["command"] = [c.replace("experiments/", f"{REPO_ROOT}/experiments/") for c in config["command"]]
    argv = trial_argv(config, proposal.config, args_json_file=tmp_path / "args.json")
    main([*argv[2:], *TINY_FIT, "--trainer.fast_dev_run=1"])


# --- running sweeps ---------------------------------------------------------------------------------


def test_grid_sweep_runs_concurrently_records_a_failure_and_resumes(tmp_path, monkeypatch):
    """4 real `capattn fit` trials on 2 CPU slots; one fails; a second session skips what is done."""
    monkeypatch.chdir(tmp_path)
    sweep = _write_sweep(
        tmp_path / "grid.yaml",
        {
            "name": "tiny_grid",
            "method": "grid",
            "metric": {"name": "val/CIDEr-D", "goal": "maximize"},
            # Adam refuses a negative learning rate: the last trial fails
            "parameters": {"model.optimizer.init_args.lr": {"values": [0.001, 0.002, 0.003, -1.0]}},
            "command": [
                "${env}",
                "capattn",
                "fit",
                "--config",
                str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"),
                *TINY_FIT,
                "${args}",
            ],
        },
    )
    out = tmp_path / "sweep"
    # Session 1: two trials, one per slot, side by side.
    assert (
        main(["sweep", str(sweep), "--devices", "cpu:2", "--max-trials", "2", "--out", str(out), "--poll_s", "0.3"])
        == 0
    )
    first = _state(out)
    assert [t["state"] for t in first] == ["finished", "finished"]
    (a, b) = first
    assert a["started"] < b["ended"] and b["started"] < a["ended"], "the two trials did not run concurrently"
    assert {a["device"], b["device"]} == {"cpu0", "cpu1"}
    logs_before = {t["name"]: (out / "trials" / t["name"] / "trial.log").stat().st_mtime_ns for t in first}

    # Session 2 (no budget: the grid runs out): only the two new trials run.
    assert main(["sweep", str(sweep), "--devices", "cpu:2", "--out", str(out), "--poll_s", "0.3"]) == 0
    trials = _state(out)
    assert [t["name"] for t in trials] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert [t["state"] for t in trials] == ["finished", "finished", "finished", "failed"]
    for name, mtime in logs_before.items():
        assert (out / "trials" / name / "trial.log").stat().st_mtime_ns == mtime, f"{name} was run again"
    assert trials[3]["exitcode"] != 0
    assert "lr" in (out / "trials" / "trial-003" / "trial.log").read_text().lower()

    # Each trial has its own run folder, with its metrics; the table says it all.
    run_dirs = [t["run_dir"] for t in trials[:3]]
    assert len(set(run_dirs)) == 3 and all(Path(d).is_relative_to(out / "trials") for d in run_dirs)
    for trial in trials[:3]:
        assert trial["summary"]["val/CIDEr-D"] >= 0 and any("val/CIDEr-D" in row for row in trial["history"])
    rows = _results(out)
    assert [r["trial"] for r in rows] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert [r["model.optimizer.init_args.lr"] for r in rows] == ["0.001", "0.002", "0.003", "-1.0"]
    assert [r["status"] for r in rows][-1].startswith("failed") and rows[0]["val/CIDEr-D"] != ""
    assert rows[0]["run folder"] == run_dirs[0]
    markdown = (out / "results.md").read_text()
    assert markdown.startswith("| trial | status | val/CIDEr-D | model.optimizer.init_args.lr | run folder |")

    # A third session finds nothing left to do.
    assert main(["sweep", str(sweep), "--devices", "cpu:2", "--out", str(out)]) == 0
    assert len(_state(out)) == 4


@pytest.mark.slow
def test_a_trial_logging_to_wandb_offline_feeds_its_metrics_back(tmp_path, monkeypatch):
    """The shipped sweep files log with wandb: capattn sweep reads the metrics from the run's .wandb file."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # capattn sweep makes its trials offline by itself
    sweep = _write_sweep(
        tmp_path / "wandb.yaml",
        {
            "method": "grid",
            "metric": {"name": "val/CIDEr-D", "goal": "maximize"},
            "parameters": {"seed_everything": {"values": [3]}},
            "command": [
                "${env}", "capattn", "fit",
                "--config", str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"),
                "--config", str(REPO_ROOT / "experiments" / "logger" / "wandb.yaml"),
                "--trainer.max_epochs=2", *TINY_FIT[1:], "${args}",
            ],
        },
    )  # fmt: skip
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--devices", "cpu:1", "--out", str(out), "--poll_s", "0.3"]) == 0
    (trial,) = _state(out)
    assert trial["state"] == "finished", (out / "trials" / "trial-000" / "trial.log").read_text()[-2000:]
    assert list((out / "trials" / "trial-000").rglob("offline-run-*"))
    assert not list((out / "trials" / "trial-000").rglob("metrics.csv"))  # wandb alone logged
    scores = [row["val/CIDEr-D"] for row in trial["history"] if "val/CIDEr-D" in row]
    assert len(scores) == 2 and trial["summary"]["val/CIDEr-D"] == pytest.approx(scores[-1])
    assert _results(out)[0]["val/CIDEr-D"] == f"{max(scores):.4g}"


# A stand-in training program (any program can be a sweep's command): it logs `score` per epoch
# into its trial folder as Lightning's CSV logger would, sleeping between epochs.
PROGRAM = """
import csv, os, sys, time
args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
x, epochs, pause = float(args["x"]), int(args.get("epochs", "3")), float(args.get("pause", "0"))
pause = pause if x > float(args.get("pause_above", "-inf")) else 0.0
with open(os.path.join(os.environ["CAPATTN_TRIAL_DIR"], "metrics.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["epoch", "score"])
    for epoch in range(epochs):
        writer.writerow([epoch, round(1 - (x - 0.3) ** 2 + 0.01 * epoch, 6)])
        f.flush()
        time.sleep(pause)
print("done", x)
"""


def _program_sweep(tmp_path: Path, **config) -> Path:
    (tmp_path / "train.py").write_text(PROGRAM)
    return _write_sweep(
        tmp_path / "sweep.yaml",
        {"program": str(tmp_path / "train.py"), "metric": {"name": "score", "goal": "maximize"}, **config},
    )


def test_bayes_sweep_receives_the_finished_trials_metrics(tmp_path):
    sweep = _program_sweep(tmp_path, method="bayes", parameters={"x": {"min": 0.0, "max": 1.0}})
    out = tmp_path / "out"
    assert (
        main(["sweep", str(sweep), "--devices", "cpu:1", "--max-trials", "4", "--out", str(out), "--poll_s", "0.1"])
        == 0
    )
    trials = _state(out)
    assert [t["state"] for t in trials] == ["finished"] * 4
    for t in trials:
        expected = 1 - (t["config"]["x"]["value"] - 0.3) ** 2 + 0.02
        assert t["summary"]["score"] == pytest.approx(expected, abs=1e-5)
        assert len(t["history"]) == 3
    # The first proposal had nothing to learn from; every later one was fitted to the finished trials' scores.
    assert "no valid samples" in trials[0]["search_info"]["warnings"]
    for t in trials[1:]:
        assert "no valid samples" not in t["search_info"]["warnings"]
    assert all(isinstance(t["search_info"]["predicted_value"], float) for t in trials[1:])


def test_hyperband_stops_a_lagging_trial(tmp_path):
    """Three trials set the bar; the fourth scores far lower and wandb's hyperband stops it before its last epoch."""
    sweep = _program_sweep(
        tmp_path,
        method="grid",
        parameters={
            "x": {"values": [0.3, 0.31, 0.32, 5.0]},
            "epochs": {"value": 40},
            "pause": {"value": 0.2},
            "pause_above": {"value": 1.0},  # only the lagging trial takes its time
        },
        early_terminate={"type": "hyperband", "min_iter": 2, "eta": 2},
    )
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--devices", "cpu:1", "--out", str(out), "--poll_s", "0.1"]) == 0
    *good, bad = _state(out)
    assert all(t["state"] == "finished" and not t["stopped"] and len(t["history"]) == 40 for t in good)
    assert bad["state"] == "finished" and bad["stopped"] and 2 < len(bad["history"]) < 40
    assert [r["status"] for r in _results(out)] == ["finished"] * 3 + ["stopped early"]


@pytest.mark.slow
def test_interrupted_sweep_reruns_only_the_unfinished_trial(tmp_path):
    sweep = _program_sweep(
        tmp_path,
        method="grid",
        parameters={"x": {"value": 0.1}, "pause": {"values": [0.0, 1.0]}},
    )
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "capattn.cli", "sweep", str(sweep), "--devices", "cpu:1", "--out", str(out)]
    proc = subprocess.Popen([*cmd, "--poll_s", "0.1"], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # wait until the first trial is done and the second runs
        trials = _state(out) if (out / "sweep_state.json").exists() else []
        if len(trials) == 2 and trials[0]["state"] == "finished" and trials[1]["state"] == "running":
            break
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=60) == 130, proc.stderr.read()
    trials = _state(out)
    assert [t["state"] for t in trials] == ["finished", "pending"]
    first_log = (out / "trials" / "trial-000" / "trial.log").stat().st_mtime_ns

    done = subprocess.run([*cmd, "--poll_s", "0.1"], capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert "1 trials done, 1 to rerun" in done.stderr
    trials = _state(out)
    assert [t["state"] for t in trials] == ["finished", "finished"]
    assert (out / "trials" / "trial-000" / "trial.log").stat().st_mtime_ns == first_log


def test_another_sweep_file_in_the_same_folder_is_refused(tmp_path, capsys):
    sweep = _program_sweep(tmp_path, method="grid", parameters={"x": {"values": [0.1]}})
    out = tmp_path / "out"
    assert main(["sweep", str(sweep), "--devices", "cpu:1", "--out", str(out), "--poll_s", "0.1"]) == 0
    other = _program_sweep(tmp_path, method="grid", parameters={"x": {"values": [0.5]}})
    with pytest.raises(SystemExit):
        main(["sweep", str(other), "--devices", "cpu:1", "--out", str(out)])
    assert "different sweep file" in capsys.readouterr().err
