"""Result files: COCO-style ids, and writes that never leave a truncated file behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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
