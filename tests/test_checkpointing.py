"""Checkpoint files (``capattn.io``, ``capattn.checkpointing``): atomic writes survive a kill, and every
bad file is refused in one line without running code."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from capattn.checkpointing import find_last_checkpoint
from capattn.io import CheckpointError, load_checkpoint, save_atomic


def checkpoint(step: int, size: int = 1) -> dict:
    return {"state_dict": {"w": torch.full((size,), float(step))}, "global_step": step, "capattn_vocabulary": {}}


def test_kill_during_checkpoint_writing_leaves_the_previous_file_loadable(tmp_path):
    """A process rewriting last.ckpt in a loop is SIGKILLed at a random moment: the file is always whole."""
    path = tmp_path / "checkpoints" / "last.ckpt"
    writer = textwrap.dedent(
        f"""
        import torch
        from capattn.io import save_atomic
        step = 0
        while True:
            step += 1
            save_atomic({{"state_dict": {{"w": torch.full((2_000_000,), float(step))}}, "global_step": step}},
                        {str(path)!r})
        """
    )
    for _ in range(2):
        proc = subprocess.Popen([sys.executable, "-c", writer])
        try:
            deadline = time.monotonic() + 60
            while not path.is_file() and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(random.uniform(0.05, 0.6))  # lands inside a write most of the time (8 MB each)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        loaded = load_checkpoint(path, require_vocab=False)
        assert torch.all(loaded["state_dict"]["w"] == loaded["global_step"])
    # Leftover temporary files never count as the run's last checkpoint.
    assert find_last_checkpoint(tmp_path) == path


def test_truncated_checkpoint_names_the_file_and_says_truncated(tmp_path):
    path = tmp_path / "last.ckpt"
    save_atomic(checkpoint(1, size=10_000), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"last\.ckpt is truncated"):
        load_checkpoint(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"epoch: 3\nweights: none\n", "is not a PyTorch checkpoint"),
        (b"", "is not a PyTorch checkpoint"),
    ],
    ids=["text", "empty"],
)
def test_a_file_that_is_not_a_checkpoint_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "model.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "missing.ckpt")


class _RunsCode:
    """Unpickling this opens (creates) a file: what a malicious checkpoint could do instead."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_code_running_pickle_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "capattn_vocabulary": {}, "payload": _RunsCode(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing .*evil.ckpt.*would create objects or run code"):
        load_checkpoint(path)
    assert not marker.exists()


def test_foreign_checkpoint_without_vocabulary_is_refused(tmp_path):
    path = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    with pytest.raises(CheckpointError, match="carries no capattn vocabulary"):
        load_checkpoint(path)
    torch.save({"weights": torch.zeros(1)}, path)
    with pytest.raises(CheckpointError, match="not a Lightning checkpoint"):
        load_checkpoint(path)


def test_find_last_checkpoint_takes_the_newest_of_last_and_slurm_hpc(tmp_path):
    assert find_last_checkpoint(tmp_path) is None
    last = tmp_path / "checkpoints" / "last.ckpt"
    save_atomic(checkpoint(1), last)
    hpc = tmp_path / "hpc_ckpt_1.ckpt"
    save_atomic(checkpoint(2), hpc)
    older = time.time() - 60
    import os

    os.utime(last, (older, older))
    assert find_last_checkpoint(tmp_path) == hpc


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resumable_loader_continues_an_epoch_after_its_last_trained_batch(num_workers):
    from capattn.checkpointing import ResumableDataLoader

    def loader() -> ResumableDataLoader:
        return ResumableDataLoader(
            list(range(20)), batch_size=4, shuffle=True, seed=5, num_workers=num_workers,
            persistent_workers=num_workers > 0,
        )  # fmt: skip

    def epoch(dl) -> list[list[int]]:
        return [b.tolist() for b in dl]

    full = loader()
    epochs = [epoch(full) for _ in range(3)]
    assert epochs[0] != epochs[1] and sorted(sum(epochs[1], [])) == list(range(20))
    torch.manual_seed(123)  # the global random state does not decide the order
    again = loader()
    assert [epoch(again), epoch(again)] == epochs[:2]

    resumed = loader()
    resumed.load_state_dict({"seed": 5, "epoch": 1, "batches_done": 2})
    assert epoch(resumed) == epochs[1][2:]  # the rest of epoch 1, no batch twice or skipped
    assert resumed.state_dict() == {"seed": 5, "epoch": 1, "batches_done": 2}
    assert len(resumed) == 5
    assert epoch(resumed) == epochs[2]  # then whole epochs again
