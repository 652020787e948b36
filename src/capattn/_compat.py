"""Let ``import torchvision`` succeed when its C++ extension cannot load.

PyPI ships torchvision only as a CUDA build. Installed beside a CPU-only torch, its ``_C``
extension fails to load, and ``torchvision/_meta_registrations.py`` then raises
``RuntimeError: operator torchvision::nms does not exist`` at import time, which also breaks
``import lightning`` and ``import torchmetrics``. capattn uses no torchvision C++ op (images
are decoded with Pillow, transforms and models are pure PyTorch), so when, and only when, the
extension cannot load we declare the two op schemas that the fake-tensor registrations need.
Calling ``torchvision.ops.nms`` then still fails with torchvision's own clear error.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

# Schemas exactly as torchvision's csrc/ops/nms.cpp and quantized qnms declare them.
_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_library = None  # torch.library.Library, kept alive  # kept alive: a Library frees its ops when collected


def _extension_loads() -> bool:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return True  # no torchvision: nothing to guard
    candidates = sorted(Path(spec.origin).parent.glob("_C*.so")) + sorted(Path(spec.origin).parent.glob("_C*.pyd"))
    if not candidates:
        return False
    import torch

    try:
        torch.ops.load_library(str(candidates[0]))
    except (OSError, RuntimeError):
        return False
    return True


def ensure_torchvision_importable() -> bool:
    """Declare torchvision's nms schemas if its extension cannot load.

    Returns:
        True when the guard acted (the extension is unusable), False when nothing was needed.
    """
    global _library
    import torch

    if _library is not None:
        return True
    if _extension_loads() or hasattr(torch.ops.torchvision, "nms"):
        return False
    _library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _SCHEMAS.values():
        _library.define(schema)
    return True


class _GuardBeforeTorchvision(importlib.abc.MetaPathFinder):
    """Runs the guard once, just before the first ``import torchvision``; finds nothing itself."""

    def find_spec(self, name, path=None, target=None):
        if name == "torchvision":
            sys.meta_path.remove(self)
            ensure_torchvision_importable()
        return None


def install_import_hook() -> None:
    """Arranges for the guard to run before torchvision is imported (at once if it already was)."""
    if "torchvision" in sys.modules:
        return
    if not any(isinstance(f, _GuardBeforeTorchvision) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardBeforeTorchvision())
