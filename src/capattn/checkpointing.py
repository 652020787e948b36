"""Checkpoint policy: safe loading, atomic writes, ``last.ckpt`` every N steps and on preemption, exact resume.

What a resumed ``capattn fit … --ckpt_path last`` needs beyond Lightning's own checkpoint (weights,
optimizer, schedulers, loop counters, callback bookkeeping):

* the position of the training data within the epoch — ``ResumableDataLoader`` orders each epoch's
  batches from ``(seed, epoch)`` alone and starts a resumed epoch at the first batch not yet trained on;
* the random-number generators at the moment of the save — ``ExactResume``;
* a ``last.ckpt`` that is never half-written — ``AtomicCheckpointIO`` — and that is recent —
  ``LastCheckpoint`` writes it every N training steps, after every epoch and on SIGTERM.

The CLI installs all of them on every ``fit``; nothing in an experiment YAML is needed.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler

from capattn.errors import CapattnError

# Checkpoint files are read and written in capattn.io, which needs no Lightning (``capattn caption``).
from capattn.io import load_checkpoint, save_atomic

LAST = "last"
# `capattn fit` exits with this after SIGTERM (or SLURM's preemption warning) once last.ckpt is saved:
# EX_TEMPFAIL, "try again" — rerunning the same command with --ckpt_path last continues the run.
PREEMPTED_EXIT_CODE = 75

log = logging.getLogger("capattn.checkpointing")


def _checkpoint_io_base() -> type:
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    return TorchCheckpointIO


class AtomicCheckpointIO(_checkpoint_io_base()):
    """Lightning ``CheckpointIO`` that writes atomically and reads with ``weights_only=True`` and clear errors."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        save_atomic(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # weights_only is always True: checkpoints are data, never code (the argument is ignored on purpose).
        return load_checkpoint(path, require_vocab=False)


def find_last_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest resumable checkpoint of a run folder: ``checkpoints/last.ckpt`` or SLURM's ``hpc_ckpt_N.ckpt``."""
    run_dir = Path(run_dir)
    candidates = [p for p in (run_dir / "checkpoints" / f"{LAST}.ckpt",) if p.is_file()]
    candidates += [p for p in run_dir.glob("hpc_ckpt_*.ckpt") if p.is_file()]
    return max(candidates, key=lambda p: p.stat().st_mtime_ns, default=None)


# --- the data position ------------------------------------------------------------------------


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed % 2**32, epoch]).generate_state(1)[0])


class _SkipFirst:
    """The loader's batch sampler; its iterations start ``skip`` batches in (indices only: no data is read)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.skip = 0

    def __iter__(self):
        return itertools.islice(iter(self.inner), self.skip, None)

    def __len__(self) -> int:
        return len(self.inner)


class ResumableDataLoader(DataLoader):
    """A training ``DataLoader`` that Lightning can checkpoint in the middle of an epoch.

    Each epoch's batches depend only on ``(seed, epoch)``: a shuffling ``RandomSampler`` (also one inside
    a batch sampler) gets a generator seeded from them, a sampler or batch sampler with ``set_epoch``
    is told the epoch, and worker seeds come from them too — not from the global random state, which
    differs in a resumed process. ``state_dict()`` holds the epoch and how many of its batches were
    trained on (``ExactResume`` keeps that count); after ``load_state_dict`` the next epoch starts at
    the first batch not trained on. Skipped batches are skipped as indices: their images are never read.

    Args:
        *args: as ``torch.utils.data.DataLoader``.
        seed: base seed of the epoch orders (default: ``torch.initial_seed()``, i.e. ``seed_everything``'s).
        **kwargs: as ``torch.utils.data.DataLoader``.
    """

    def __init__(self, *args: Any, seed: int | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.seed = int(torch.initial_seed()) if seed is None else int(seed)
        self.epoch = 0  # the epoch being iterated
        self.batches_done = 0  # of this epoch, counted by the trainer (a loader's own count runs ahead by prefetching)
        self._next_epoch = 0
        self._skip = 0

    @property
    def _index_sampler(self):  # noqa: D401  (DataLoader's own hook: what its iterators draw batches of indices from)
        inner = super()._index_sampler
        skipper = self.__dict__.get("_skipper")
        if skipper is None or skipper.inner is not inner:
            skipper = _SkipFirst(inner)
            self.__dict__["_skipper"] = skipper  # DataLoader.__setattr__ guards its sampler attributes
        return skipper

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (the trainer sets it; by default one more than the last)."""
        self._next_epoch = epoch

    def _seed_epoch(self, epoch: int) -> None:
        seed = _epoch_seed(self.seed, epoch)
        self.generator = torch.Generator().manual_seed(seed)  # worker base seeds
        samplers = [self.sampler, self.batch_sampler, getattr(self.batch_sampler, "sampler", None)]
        for sampler in samplers:
            if isinstance(sampler, RandomSampler):
                sampler.generator = torch.Generator().manual_seed(seed + 1)
            if callable(getattr(sampler, "set_epoch", None)):
                sampler.set_epoch(epoch)

    def __iter__(self):
        self.epoch, self._next_epoch = self._next_epoch, self._next_epoch + 1
        self._seed_epoch(self.epoch)
        self.batches_done, self._skip = self._skip, 0
        skipper = self._index_sampler
        skipper.skip = self.batches_done
        try:
            # A worker iterator draws iter() of the batch sampler twice while it is made: both must skip.
            return super().__iter__()
        finally:
            skipper.skip = 0

    def end_epoch(self, next_epoch: int) -> None:
        """Every batch of the epoch is trained on: a checkpoint saved from now on resumes at the first
        batch of ``next_epoch`` (not after the last batch of this one, whose order it would reuse)."""
        self.epoch, self.batches_done = next_epoch, 0

    def state_dict(self) -> dict[str, int]:
        """Seed, epoch and batches of it trained on (Lightning saves this in every checkpoint)."""
        return {"seed": self.seed, "epoch": self.epoch, "batches_done": self.batches_done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Makes the next iteration continue the saved epoch after its last trained batch."""
        self.seed = int(state.get("seed", self.seed))
        self._next_epoch = int(state["epoch"])
        self._skip = int(state["batches_done"])


def resumable(loader: Any, *, seed: int | None = None) -> Any:
    """``loader`` as a ``ResumableDataLoader`` (same dataset, batch sampler, workers and collate function)."""
    if isinstance(loader, ResumableDataLoader) or type(loader) is not DataLoader:
        return loader
    kwargs: dict[str, Any] = {
        "num_workers": loader.num_workers,
        "collate_fn": loader.collate_fn,
        "pin_memory": loader.pin_memory,
        "timeout": loader.timeout,
        "worker_init_fn": loader.worker_init_fn,
        "multiprocessing_context": loader.multiprocessing_context,
        "prefetch_factor": loader.prefetch_factor,
        "persistent_workers": loader.persistent_workers,
        "pin_memory_device": loader.pin_memory_device,
    }
    if loader.batch_sampler is not None:
        kwargs["batch_sampler"] = loader.batch_sampler
    else:
        kwargs.update(batch_size=None, sampler=loader.sampler)
    return ResumableDataLoader(loader.dataset, seed=seed, **kwargs)


def _train_loaders(trainer: Any) -> list[ResumableDataLoader]:
    combined = getattr(trainer.fit_loop, "_combined_loader", None)
    loaders = combined.flattened if combined is not None else []
    return [dl for dl in loaders if isinstance(dl, ResumableDataLoader)]


# --- random state -----------------------------------------------------------------------------


def _rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)},
        "numpy_gauss": [int(has_gauss), float(cached)],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    has_gauss, cached = state["numpy_gauss"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], int(has_gauss), cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _callback_base() -> type:
    from lightning.pytorch.callbacks import Callback

    return Callback


class ExactResume(_callback_base()):
    """Saves what Lightning's checkpoint lacks for an exact resume: random state and the data position.

    With it (and a ``ResumableDataLoader``), a run killed mid-epoch and resumed from its last
    checkpoint ends with the same weights as an uninterrupted run (CPU, same seed). On GPU, cuDNN and
    atomics stay nondeterministic unless ``trainer.deterministic=true``; under DDP each rank's random
    state is not saved (rank 0's is).

    Lightning restores a loader's own state only when it resumes inside an epoch; from a checkpoint
    saved after an epoch's last batch (at its end, or by SIGTERM between epochs) it starts the next
    epoch with a new loader, whose first iterator it makes before any callback hook runs. So this
    callback keeps the data position too, and ``adopt`` hands it to the loader the datamodule makes.
    """

    def __init__(self) -> None:
        self._pending_rng: dict[str, Any] | None = None
        self._pending_loaders: list[dict[str, int]] = []
        self._trainer: Any = None

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        loaders = _train_loaders(self._trainer) if self._trainer is not None else []
        return {"rng": _rng_state(), "loaders": [loader.state_dict() for loader in loaders]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")
        self._pending_loaders = list(state_dict.get("loaders", []))

    def adopt(self, loader: Any) -> Any:
        """``loader`` (a new train loader) continues where the loaded checkpoint's left off."""
        if self._pending_loaders and isinstance(loader, ResumableDataLoader):
            loader.load_state_dict(self._pending_loaders.pop(0))
        return loader

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        # Restored here, after Lightning's set-up has drawn whatever random numbers it draws,
        # so the first resumed step sees the generators exactly as the saved step left them.
        if self._pending_rng is not None:
            _set_rng_state(self._pending_rng)
            self._pending_rng = None

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        for loader in _train_loaders(trainer):
            loader.batches_done = 0
            loader.set_epoch(trainer.current_epoch)  # for an iterator made after this hook

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Before any checkpoint callback of this hook saves (Lightning runs those last).
        done = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for loader in _train_loaders(trainer):
            if done >= trainer.num_training_batches:
                loader.end_epoch(trainer.current_epoch + 1)
            else:
                loader.batches_done = done


# --- bad numbers ------------------------------------------------------------------------------


class NonFiniteStateError(CapattnError, FloatingPointError):
    """Weights or buffers became NaN/inf during training."""


def nonfinite_tensor(module: torch.nn.Module) -> str | None:
    """The name of the first parameter or buffer holding NaN/inf, or None (one device sync when all are finite)."""
    named = [
        (n, t) for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_floating_point()
    ]
    if not named or bool(torch.stack([torch.isfinite(t).all() for _, t in named]).all()):
        return None
    return next(n for n, t in named if not bool(torch.isfinite(t).all()))


class StopOnNonFinite(_callback_base()):
    """Stops training when an optimizer step has left NaN/inf in the weights or buffers (``lr=1e12``).

    It runs before any checkpoint callback of the same step, so the run's ``last.ckpt`` is still the
    last good state; the message names the tensor, the step and that checkpoint.
    """

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        name = nonfinite_tensor(pl_module)
        if name is None:
            return
        last = [cb.last_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
        resume = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise NonFiniteStateError(
            f"{name} became NaN/inf at step {trainer.global_step} (epoch {trainer.current_epoch}, batch {batch_idx}); "
            f"stopped — {resume}. Lower model.optimizer.init_args.lr or set trainer.gradient_clip_val"
        )


# --- last.ckpt --------------------------------------------------------------------------------


def _model_checkpoint_base() -> type:
    from lightning.pytorch.callbacks import ModelCheckpoint

    return ModelCheckpoint


class LastCheckpoint(_model_checkpoint_base()):
    """Writes the run's ``checkpoints/last.ckpt``: every N training steps, after every epoch, on SIGTERM.

    The file is overwritten in place (never ``last-v1.ckpt``), so ``--ckpt_path last`` always
    finds the newest state. On SIGTERM (and, under SLURM, the ``--signal=USR1`` warning, handled
    at the next batch boundary so the saved state is consistent) it saves and ``capattn fit``
    exits with ``PREEMPTED_EXIT_CODE``.

    Args:
        every_n_train_steps: also save every this many optimizer steps (0: only per epoch and on SIGTERM).
    """

    def __init__(self, *, every_n_train_steps: int = 100) -> None:
        super().__init__(
            filename=LAST,
            monitor=None,
            save_top_k=1,
            every_n_train_steps=max(0, every_n_train_steps),
            enable_version_counter=False,
        )
        self.preempted = False
        self._usr1 = False
        self._lightning_usr1: Any = None

    @property
    def state_key(self) -> str:
        return "capattn.LastCheckpoint"  # the same in every run, whatever N is

    def _save_last(self, trainer: Any) -> None:
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))

    def on_train_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        # Always at epoch end — after validation, early stopping and the best checkpoint have
        # updated their bookkeeping, even when a step-triggered save already wrote this step.
        self._save_last(trainer)

    def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
        pass  # on_train_epoch_end saves after validation

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        super().on_train_start(trainer, pl_module)
        # SLURM's preemption warning: Lightning's handler saves hpc_ckpt_N.ckpt and requeues the job
        # at whatever instruction the signal interrupts; run it at the next batch boundary instead.
        sigusr1 = getattr(signal, "SIGUSR1", None)
        if sigusr1 is None or trainer.world_size > 1:
            return
        current = signal.getsignal(sigusr1)
        if callable(current) and type(current).__name__ == "_HandlersCompose":
            self._lightning_usr1 = current
            signal.signal(sigusr1, self._on_usr1)

    def _on_usr1(self, signum: int, frame: Any) -> None:
        self._usr1 = True

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self._usr1 and self._lightning_usr1 is not None:
            self._usr1 = False
            log.info("SLURM preemption warning: saving and requeueing the job")
            self._lightning_usr1(signal.SIGUSR1, None)

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        if self._lightning_usr1 is not None:
            signal.signal(signal.SIGUSR1, self._lightning_usr1)
            self._lightning_usr1 = None

    def on_exception(self, trainer: Any, pl_module: Any, exception: BaseException) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        if not isinstance(exception, SIGTERMException):
            return
        self.preempted = True
        if trainer.fast_dev_run or trainer.sanity_checking:
            return
        self._save_topk_checkpoint(trainer, self._monitor_candidates(trainer))
        log.info(f"SIGTERM: saved {self.last_model_path or self.dirpath} at step {trainer.global_step}")

    def _save_topk_checkpoint(self, trainer: Any, monitor_candidates: dict[str, Any]) -> None:
        # One file, last.ckpt, replaced in place: what "top k" means for a monitor-less checkpoint.
        filepath = os.path.join(self.dirpath, f"{LAST}{self.FILE_EXTENSION}")
        self.last_model_path = filepath
        self.best_model_path = filepath
        self._save_checkpoint(trainer, filepath)
