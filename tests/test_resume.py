"""Exact resume: a run killed mid-epoch and resumed with ``--ckpt_path last`` ends where an uninterrupted one does.

Real `capattn fit` processes on the shapes world (CPU, fixed seed), killed with SIGKILL or SIGTERM
at a random step of the first epoch.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch

from capattn.checkpointing import PREEMPTED_EXIT_CODE

from .conftest import REPO_ROOT

STEPS_PER_EPOCH = 8  # 16 images × 5 captions / batch 10
EPOCHS = 2
RUN = Path("runs/demo/show_tell/show_tell-shapes-seed7")
FIT = [
    sys.executable,
    "-m",
    "capattn.cli",
    "fit",
    "--config",
    str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"),
    "--seed_everything=7",
    f"--trainer.max_epochs={EPOCHS}",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=4",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=10",
    "--model.encoder.init_args.small_cnn_channels=[8,8,16]",
    "--model.decoder.init_args.feature_dim=16",
    "--model.decoder.init_args.embed_dim=16",
    "--model.decoder.init_args.hidden_dim=32",
    "--model.beam_size=1",
    "--model.max_len=8",
    "--model.val_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--test_after_fit=false",
    "--checkpoint_every_n_steps=1",
]


def fit(root: Path, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*FIT, f"--trainer.default_root_dir={root}", *extra], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def last_state(root: Path, cwd: Path) -> dict:
    return torch.load(cwd / root / RUN / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)


def assert_same_training(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] == EPOCHS * STEPS_PER_EPOCH
    assert a["epoch"] == b["epoch"]
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    for sa, sb in zip(a["optimizer_states"][0]["state"].values(), b["optimizer_states"][0]["state"].values()):
        assert torch.equal(sa["exp_avg"], sb["exp_avg"])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("resume")


@pytest.fixture(scope="module")
def uninterrupted(workdir) -> dict:
    done = fit(Path("U"), cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    return last_state(Path("U"), workdir)


class Unhurried(L.Callback):
    """Makes each step of epoch 0 last 0.3 s, before its last.ckpt is saved (Lightning runs checkpoint
    callbacks last): these tiny steps take milliseconds, and a kill sent on seeing step k's file could
    otherwise land after the epoch's last step."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.current_epoch == 0:
            time.sleep(0.3)


def kill_mid_epoch(root: Path, sig: signal.Signals, cwd: Path) -> tuple[int, int, str]:
    """Starts a fit and signals it once last.ckpt reaches a random step of epoch 0: (exit code, step, stderr)."""
    target = random.randint(2, STEPS_PER_EPOCH - 3)
    proc = subprocess.Popen(
        [*FIT, f"--trainer.default_root_dir={root}", "--trainer.callbacks+=tests.test_resume.Unhurried"],
        cwd=cwd,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},  # Unhurried lives in tests/
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    ckpt = cwd / root / RUN / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    step = -1
    while step < target and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
        if ckpt.is_file():
            step = torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"]
    assert proc.poll() is None, "the run ended before it could be killed"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, step, err


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(workdir, uninterrupted):
    code, step, _ = kill_mid_epoch(Path("K"), signal.SIGKILL, workdir)
    assert code == -signal.SIGKILL
    resumed_from = last_state(Path("K"), workdir)["global_step"]
    assert 0 < resumed_from % STEPS_PER_EPOCH, "killed at an epoch boundary: not a mid-epoch test"

    done = fit(Path("K"), "--ckpt_path=last", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"resuming from K/{RUN}/checkpoints/last.ckpt (epoch 0, step {resumed_from})" in done.stderr
    assert_same_training(uninterrupted, last_state(Path("K"), workdir))
    assert not list((workdir / "K" / RUN / "checkpoints").glob("last-v*.ckpt"))
    assert [p.name for p in (workdir / "K" / RUN.parent).iterdir()] == [RUN.name]  # the same run folder


def test_sigterm_saves_exits_75_and_resumes_exactly(workdir, uninterrupted):
    code, step, err = kill_mid_epoch(Path("T"), signal.SIGTERM, workdir)
    assert code == PREEMPTED_EXIT_CODE == 75
    saved = last_state(Path("T"), workdir)["global_step"]
    assert saved >= step and f"stopped by SIGTERM at step {saved}" in err
    assert "Traceback" not in err

    done = fit(Path("T"), "--ckpt_path=last", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(uninterrupted, last_state(Path("T"), workdir))


def test_more_epochs_from_an_end_of_epoch_checkpoint_equals_uninterrupted(workdir, uninterrupted):
    """A finished run continued with a higher ``max_epochs`` (as a kill between epochs): Lightning
    restores no loader state there and makes the next epoch's loader before any hook, which must
    still draw that epoch's order, not epoch 0's again."""
    first = fit(Path("E"), "--trainer.max_epochs=1", cwd=workdir)
    assert first.returncode == 0, first.stderr[-3000:]
    assert last_state(Path("E"), workdir)["global_step"] == STEPS_PER_EPOCH

    done = fit(Path("E"), "--ckpt_path=last", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_same_training(uninterrupted, last_state(Path("E"), workdir))


def test_ckpt_path_last_without_checkpoint_starts_from_scratch(workdir, uninterrupted):
    """A requeued job's command never changes: `--ckpt_path last` the first time trains from step 0."""
    done = fit(Path("F"), "--ckpt_path=last", "--trainer.max_epochs=1", "--trainer.limit_train_batches=2", cwd=workdir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "no checkpoint of this run yet" in done.stderr and "training from scratch" in done.stderr
    assert last_state(Path("F"), workdir)["global_step"] == 2


SLURM = {
    "SLURM_JOB_ID": "4242",
    "SLURM_JOB_NAME": "capattn",
    "SLURM_NTASKS": "1",
    "SLURM_NTASKS_PER_NODE": "1",
    "SLURM_NNODES": "1",
    "SLURM_PROCID": "0",
    "SLURM_LOCALID": "0",
    "SLURM_NODEID": "0",
    "SLURM_NODELIST": "localhost",
}


@pytest.mark.slow
def test_slurm_preemption_saves_requeues_and_the_requeued_job_resumes(workdir, uninterrupted):
    """SLURM (simulated): USR1 → Lightning's hpc checkpoint at a batch boundary; TERM → exit 75; the requeued job
    (same command, SLURM_RESTART_COUNT=1) continues the same run folder and ends as an uninterrupted run."""
    import os

    env = {**os.environ, **SLURM, "PATH": os.environ["PATH"]}
    run = Path("S/runs/demo/show_tell/show_tell-shapes-seed7-job4242")
    proc = subprocess.Popen(
        [*FIT, "--trainer.default_root_dir=S"], cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    ckpt = workdir / run / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 240
    while not ckpt.is_file() and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    while not list((workdir / run).glob("hpc_ckpt_*.ckpt")) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-3000:]
    assert "SLURM preemption warning: saving and requeueing the job" in err
    assert list((workdir / run).glob("hpc_ckpt_*.ckpt"))

    requeued = subprocess.run(
        [*FIT, "--trainer.default_root_dir=S"], cwd=workdir, env={**env, "SLURM_RESTART_COUNT": "1"},
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert requeued.returncode == 0, requeued.stderr[-3000:]
    assert f"resuming from {run}/" in requeued.stderr
    assert_same_training(uninterrupted, torch.load(ckpt, map_location="cpu", weights_only=True))
