"""Reading checkpoints safely: ``weights_only`` always, and one clear line for every way a file can be wrong."""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

from capattn.errors import CapattnError

VOCAB_KEY = "capattn_vocabulary"


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
        raise CheckpointError(f"{path} is truncated or corrupt (was its write interrupted?): use an earlier checkpoint")
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
        raise CheckpointError(f"{path} is corrupt or not a PyTorch checkpoint ({message})") from None
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"{path} is not a Lightning checkpoint (no state_dict): give a .ckpt from `capattn fit`")
    if require_vocab and VOCAB_KEY not in checkpoint:
        raise CheckpointError(
            f"{path} carries no capattn vocabulary: it was not written by `capattn fit` (another program?)"
        )
    return checkpoint
