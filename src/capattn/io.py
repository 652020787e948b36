"""Files: COCO-style ids in results, writes that never leave a truncated file behind, checkpoints
loaded without running code. Light: torch is imported only to read or write a checkpoint, and
nothing here imports Lightning (``capattn caption`` loads a checkpoint without it)."""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from capattn.errors import CapattnError

VOCAB_KEY = "capattn_vocabulary"
DATA_KEY = "capattn_data"  # preprocessing a checkpoint's model expects, e.g. {"image_size": 224}


def coco_image_id(image_id: str) -> int | str:
    """COCO results files use integer image ids; ids that are not digits (the shapes world's) stay strings."""
    return int(image_id) if image_id.isdigit() else image_id


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Writes ``text`` to a temporary file beside ``path`` and renames it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, data: Any) -> Path:
    """Writes JSON to a temporary file beside ``path`` and renames it into place."""
    return write_text_atomic(path, json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def run_dir(trainer: Any) -> Path:
    """A run's own folder, for any logger: ``save_dir/name/version`` of its first logger.

    CSV and TensorBoard loggers log there; wandb logs to ``save_dir/wandb`` but its checkpoints,
    config, results and figures go here too (Lightning's ``ModelCheckpoint`` builds the same path).
    Without a logger it is ``trainer.default_root_dir``.
    """
    if not trainer.loggers:
        return Path(trainer.default_root_dir)
    logger = trainer.loggers[0]
    version = logger.version if isinstance(logger.version, str) else f"version_{logger.version}"
    return Path(logger.save_dir or trainer.default_root_dir, str(logger.name), version)


class CheckpointError(CapattnError, ValueError):
    """A checkpoint file is missing, truncated, unsafe, or not capattn's."""


def load_checkpoint(path: str | Path, *, require_vocab: bool = True) -> dict[str, Any]:
    """Loads a checkpoint's plain data with ``torch.load(weights_only=True)``.

    Nothing in the file is executed: a pickle that would build arbitrary objects is refused.

    Args:
        path: the ``.ckpt`` file.
        require_vocab: refuse a checkpoint that carries no capattn vocabulary (from another program).

    Returns:
        The checkpoint dictionary (tensors on the CPU).

    Raises:
        CheckpointError: missing, not a checkpoint, truncated, unsafe, or not written by capattn.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(
            f"checkpoint not found: {path} — give a .ckpt that `capattn fit` wrote (runs/…/checkpoints/last.ckpt)"
        )
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != b"PK\x03\x04":  # torch.save writes a zip archive since PyTorch 1.6
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: give a .ckpt that `capattn fit` wrote")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(f"{path} is truncated (its write was interrupted?): use an earlier checkpoint of the run")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "weights only" in str(err).lower() or "weights_only" in str(err):
            raise CheckpointError(
                f"refusing {path}: its pickle would create objects or run code; "
                "capattn loads only plain data — use a checkpoint that capattn wrote, from a source you trust"
            ) from None
        raise CheckpointError(f"{path} is not a PyTorch checkpoint: give a .ckpt that `capattn fit` wrote") from None
    except (RuntimeError, zipfile.BadZipFile, EOFError, OSError, KeyError) as err:
        message = (str(err).splitlines() or [type(err).__name__])[0][:120]
        raise CheckpointError(f"{path} is truncated or corrupt ({message}): use an earlier checkpoint") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict): give a .ckpt from `capattn fit`")
    if require_vocab and VOCAB_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} carries no capattn vocabulary: it was not written by `capattn fit` (another program?)"
        )
    return checkpoint


def save_atomic(checkpoint: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over ``path``.

    A kill at any moment leaves either the old file or the new one, never a truncated one.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # The rename itself is durable only once the folder's entry is on disk.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
