"""SLURM: ranks from SLURM's variables (Lightning's SLURMEnvironment), requeue on SIGUSR1, the sbatch files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path
from unittest import mock

import lightning as L
import pytest
import yaml

from .conftest import REPO_ROOT

SLURM_DIR = REPO_ROOT / "experiments" / "slurm"
DDP_YAML = REPO_ROOT / "experiments" / "trainer" / "ddp.yaml"


def slurm_env(*, job_id: str, ntasks: int, per_node: int, procid: int, nodes: int) -> dict[str, str]:
    """The variables `srun` gives task ``procid`` of a batch job (tasks are laid out node by node)."""
    return {
        "SLURM_JOB_ID": job_id,
        "SLURM_JOB_NAME": "capattn-fit",
        "SLURM_NTASKS": str(ntasks),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_NNODES": str(nodes),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NODELIST": "node[1-2]" if nodes > 1 else "localhost",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(procid // per_node),
    }


@pytest.fixture
def _restore_rank_zero(monkeypatch):
    """A Trainer built as rank 3 sets Lightning's process-wide rank; later in-process runs must be rank 0 again."""
    from lightning.fabric.utilities import rank_zero as fabric_rank_zero
    from lightning.pytorch.utilities import rank_zero as pl_rank_zero
    from lightning_utilities.core import rank_zero as utils_rank_zero

    for module in (fabric_rank_zero, pl_rank_zero, utils_rank_zero):
        monkeypatch.setattr(module.rank_zero_only, "rank", getattr(module.rank_zero_only, "rank", 0))


@pytest.fixture(autouse=True)
def _restore_environ():
    """Lightning's SLURMEnvironment writes MASTER_ADDR (here "node1") into os.environ when asked for
    it; left there, a later test's DDP run dials that host and hangs. Every test leaves os.environ as it found it."""
    with mock.patch.dict(os.environ):
        yield


@pytest.mark.parametrize("procid", [0, 3])
@pytest.mark.usefixtures("_restore_rank_zero")
def test_ranks_come_from_slurm_with_the_ddp_piece(procid, monkeypatch):
    """Task 3 of 2 nodes × 2 tasks is global rank 3, local rank 1, node 1; the requeue handler is installed."""
    for key in [k for k in os.environ if k.startswith("SLURM_")]:
        monkeypatch.delenv(key)
    for key, value in slurm_env(job_id="4242", ntasks=4, per_node=2, procid=procid, nodes=2).items():
        monkeypatch.setenv(key, value)
    trainer_cfg = yaml.safe_load(DDP_YAML.read_text())["trainer"]
    trainer_cfg.update(accelerator="cpu", devices=2, num_nodes=2, precision="32")
    trainer = L.Trainer(**trainer_cfg, logger=False, enable_checkpointing=False)
    from lightning.fabric.plugins.environments import SLURMEnvironment

    environment = trainer._accelerator_connector.cluster_environment
    assert isinstance(environment, SLURMEnvironment) and environment.auto_requeue
    assert (trainer.global_rank, trainer.local_rank, trainer.node_rank) == (procid, procid % 2, procid // 2)
    assert trainer.world_size == 4 and environment.main_address == "node1"
    # What Trainer.fit installs before training: SIGUSR1 (sbatch --signal=SIGUSR1@90) → checkpoint + requeue.
    previous = signal.getsignal(signal.SIGUSR1)
    trainer._signal_connector.register_signal_handlers()
    try:
        handler = signal.getsignal(signal.SIGUSR1)
        names = [getattr(h, "__name__", "") for h in getattr(handler, "signal_handlers", [])]
        assert "_slurm_sigusr_handler_fn" in names
    finally:
        trainer._signal_connector.teardown()
        signal.signal(signal.SIGUSR1, previous)


class SlurmProbe(L.Callback):
    """Records each rank's view of the cluster at the start of training, then plays SLURM's SIGUSR1 at step 1."""

    def __init__(self, *, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_start(self, trainer, pl_module) -> None:
        handler = signal.getsignal(signal.SIGUSR1)
        environment = trainer._accelerator_connector.cluster_environment
        seen = {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "environment": type(environment).__name__,
            "auto_requeue": getattr(environment, "auto_requeue", None),
            "sigusr1": [getattr(h, "__name__", "") for h in getattr(handler, "signal_handlers", [])],
        }
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == 1:
            os.kill(os.getpid(), signal.SIGUSR1)  # SLURM signals every task of the step alike


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_srun_tasks_train_as_ranks_and_requeue_on_sigusr1(tmp_path):
    """Two `capattn fit` processes started as `srun` starts them: ranks from SLURM, checkpoint + requeue on SIGUSR1."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    scontrol = bin_dir / "scontrol"  # SLURM's own command is not here: this one records how it was called
    scontrol.write_text(f'#!/bin/sh\necho "$@" >> {tmp_path / "scontrol.log"}\n')
    scontrol.chmod(0o755)
    env_common = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO_ROOT),  # the probe callback lives in tests/
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
    }
    cmd = [
        sys.executable, "-m", "capattn.cli", "fit",
        "--config", str(REPO_ROOT / "experiments" / "demo_show_tell.yaml"),
        "--config", str(DDP_YAML),
        "--trainer.accelerator=cpu", "--trainer.devices=2", "--trainer.num_nodes=1", "--trainer.precision=32",
        "--trainer.max_epochs=1", "--trainer.limit_train_batches=3", "--trainer.limit_val_batches=1",
        f"--trainer.default_root_dir={tmp_path / 'root'}",
        "--trainer.callbacks+=tests.test_slurm.SlurmProbe",
        f"--trainer.callbacks.init_args.folder={tmp_path / 'probe'}",
        "--data.reader.init_args.num_train=24", "--data.reader.init_args.num_val=6",
        "--data.reader.init_args.num_test=6",
        "--data.batch_size=4", "--model.val_scorers=[bleu,cider]", "--model.tokenizer=simple",
    ]  # fmt: skip
    tasks = [
        subprocess.Popen(
            cmd,
            cwd=tmp_path,
            env={**env_common, **slurm_env(job_id="4242", ntasks=2, per_node=2, procid=rank, nodes=1)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = [task.communicate(timeout=600)[0] for task in tasks]
    for task, output in zip(tasks, outputs, strict=True):
        assert task.returncode == 0, output[-3000:]
    for rank in (0, 1):
        seen = json.loads((tmp_path / "probe" / f"rank{rank}.json").read_text())
        assert seen["global_rank"] == rank and seen["local_rank"] == rank and seen["world_size"] == 2
        assert seen["environment"] == "SLURMEnvironment" and seen["auto_requeue"] is True
        assert "_slurm_sigusr_handler_fn" in seen["sigusr1"]
    # Rank 0 asked SLURM to requeue this job, once, after a checkpoint was written.
    assert (tmp_path / "scontrol.log").read_text().split("\n")[:-1] == ["requeue 4242"]
    (hpc,) = tmp_path.rglob("hpc_ckpt_*.ckpt")  # the checkpoint the requeued job resumes from
    assert hpc.stat().st_size > 0


def _sbatch_options(path: Path) -> dict[str, str]:
    options = {}
    for line in path.read_text().splitlines():
        if m := re.match(r"^#SBATCH\s+--([\w-]+)(?:=(\S+))?", line):
            options[m[1]] = m[2] or ""
    return options


def test_fit_sbatch_requeues_resumes_and_matches_tasks_to_devices():
    path = SLURM_DIR / "fit.sbatch"
    options = _sbatch_options(path)
    assert options["signal"] == "SIGUSR1@90" and "requeue" in options
    assert options["ntasks-per-node"] == options["gpus-per-node"]  # one task per GPU
    text = path.read_text()
    command = text[text.index("srun capattn fit") :]
    assert "--ckpt_path last" in command and "--ckpt_path hpc" not in text
    assert '--trainer.num_nodes="${SLURM_JOB_NUM_NODES}"' in command
    assert "--trainer.devices=" in command and "SLURM_NTASKS_PER_NODE" in command
    assert "experiments/trainer/ddp.yaml" in command
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_sweep_agents_sbatch_is_an_array_of_wandb_agents():
    path = SLURM_DIR / "sweep_agents.sbatch"
    text = path.read_text()
    assert text.startswith("#!/bin/bash\n# sbatch --array=")
    assert "exec wandb agent" in text and "capattn sweep" in text  # points at the local alternative too
    assert _sbatch_options(path)["ntasks"] == "1"
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
