"""Dataset readers: each turns one on-disk (or generated) dataset into ``CaptionRecord``s.

Every reader is importable from here, so YAML chooses one with a short ``class_path``
(``capattn.data.readers.Flickr8kReader``).
"""

from __future__ import annotations

from typing import Any

from capattn.data.readers.base import CaptionReader
from capattn.data.readers.coco import CocoReader
from capattn.data.readers.flickr8k import Flickr8kReader
from capattn.data.readers.hf import HFReader
from capattn.data.readers.karpathy import KarpathyReader

__all__ = ["CaptionReader", "CocoReader", "Flickr8kReader", "HFReader", "KarpathyReader", "ShapesReader"]


def __getattr__(name: str) -> Any:
    # ShapesReader lives in capattn.data.synthetic, which imports this package's base: importing it
    # here at load time would be circular when synthetic is imported first.
    if name == "ShapesReader":
        from capattn.data.synthetic import ShapesReader

        return ShapesReader
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | {"ShapesReader"})
