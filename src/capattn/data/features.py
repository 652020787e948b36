"""The feature cache: a frozen encoder's outputs for every image, once, as fp16 memory-mapped arrays.

A cache folder holds, per split, ``<split>.grid.npy`` (N, L, D) and ``<split>.pooled.npy`` (N, D)
in fp16 (``.npy`` files, so ``np.load(mmap_mode="r")`` maps them without reading), ``meta.json``
with the key it was built for, and ``progress.json`` with the rows written so far. The key is
the encoder's identity (backbone, weights and a hash of them, grid size), the image size and the
prepared image list; the folder's name carries its hash, so another encoder never reads a stale
cache. Rows are written in order and ``progress.json`` is replaced (atomically) only after they
are flushed, so an interrupted build resumes at the first row not yet on disk.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from capattn.data.records import SPLITS, CaptionRecord
from capattn.errors import DataError
from capattn.io import write_json_atomic

if TYPE_CHECKING:
    import torch

    from capattn.data.prepare import PreparedData
    from capattn.data.readers.base import CaptionReader
    from capattn.models.encoder import ImageEncoder

logger = logging.getLogger("capattn.features")

FORMAT = 1
_GB = 1e9
_FP16_MAX = 65504.0


def encoder_identity(encoder: torch.nn.Module) -> dict[str, Any]:
    """The encoder's ``identity()``; for other modules, their class and a hash of their weights."""
    if callable(getattr(encoder, "identity", None)):
        return encoder.identity()
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().reshape(-1).numpy().tobytes())
    return {"class": f"{type(encoder).__module__}.{type(encoder).__qualname__}", "state_sha256": digest.hexdigest()}


def cache_key(encoder: torch.nn.Module, *, image_size: int, prepared: PreparedData) -> dict[str, Any]:
    """Everything a cache's content depends on."""
    return {
        "format": FORMAT,
        "encoder": encoder_identity(encoder),
        "image_size": image_size,
        "images_sha256": prepared.image_digest,
    }


def cache_folder(root: str | Path, key: dict[str, Any], name: str) -> Path:
    """``<root>/<dataset>-<backbone>-<hash of the key>``."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    backbone = key["encoder"].get("backbone", "encoder")
    return Path(root) / f"{name}-{backbone}-{digest}"


def check_frozen(encoder: torch.nn.Module) -> None:
    """Refuses a trainable encoder: the cache holds fixed outputs, so it would never learn from them.

    Raises:
        DataError: some encoder parameter requires a gradient.
    """
    if any(p.requires_grad for p in encoder.parameters()):
        raise DataError(
            "data.features=cache needs a frozen encoder: cached features are computed once, so a trainable "
            "encoder would never learn — set model.encoder.init_args.trainable=none (or data.features=images)"
        )


class FeatureCache:
    """A complete cache opened for reading; each process maps the files on first use (no copies).

    Args:
        folder: the cache folder.

    Raises:
        DataError: the folder holds no complete cache.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
            progress = json.loads((self.folder / "progress.json").read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            raise DataError(
                f"no feature cache in {self.folder} — run `capattn prepare` with data.features=cache"
            ) from None
        unfinished = [s for s, shape in self.meta["shapes"].items() if progress.get(s, 0) < shape[0]]
        if unfinished:
            raise DataError(
                f"the feature cache in {self.folder} is incomplete ({unfinished}) — run `capattn prepare` to finish it"
            )
        self._maps: dict[str, np.ndarray] = {}

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers map the files themselves instead of receiving pickled arrays.
        return {**self.__dict__, "_maps": {}}

    def _map(self, split: str, part: str) -> np.ndarray:
        name = f"{split}.{part}"
        if name not in self._maps:
            self._maps[name] = np.load(self.folder / f"{name}.npy", mmap_mode="r")
        return self._maps[name]

    def grid(self, split: str) -> np.ndarray:
        """(N, L, D) fp16 memory map of the split's annotation grids."""
        return self._map(split, "grid")

    def pooled(self, split: str) -> np.ndarray:
        """(N, D) fp16 memory map of the split's pooled vectors."""
        return self._map(split, "pooled")


class _SplitImages:
    """Rows ``start…`` of a prepared split as (row, image tensor); picklable for DataLoader workers."""

    def __init__(self, prepared: PreparedData, split: str, reader: CaptionReader, transform: Any, start: int) -> None:
        self.images = prepared.split(split).images
        self.reader = reader
        self.transform = transform
        self.start = start

    def __len__(self) -> int:
        return len(self.images) - self.start

    def __getitem__(self, index: int) -> tuple[int, Any]:
        row = self.start + index
        item = self.images[row]
        path = item["image_path"]
        record = CaptionRecord(
            item["image_id"], None if path is None else Path(path), tuple(item["references"]), item["split"]
        )
        return row, self.transform(self.reader.load_image(record))


def _probe(encoder: torch.nn.Module, image_size: int, device: torch.device) -> tuple[int, int]:
    import torch

    with torch.inference_mode():
        out = encoder(torch.zeros(1, 3, image_size, image_size, device=device))
    return out.grid.shape[1], out.grid.shape[2]  # L, D


def _used_bytes(folder: Path) -> int:
    return sum(p.stat().st_blocks * 512 for p in folder.glob("*.npy")) if folder.is_dir() else 0


def _existing_parent(path: Path) -> Path:
    path = path.resolve()
    while not path.exists():
        path = path.parent
    return path


def _progress_bar():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeRemainingColumn
    from rich.text import Text

    class Rate(ProgressColumn):
        def render(self, task) -> Text:
            # rich's own speed needs several updates; a short split gets the average since its start.
            speed = task.speed
            if speed is None and task.elapsed:
                speed = (task.completed - task.fields.get("first", 0)) / task.elapsed
            return Text(f"{speed or 0:.1f} images/s")

    return Progress(
        TextColumn("capattn: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        Rate(),
        TimeRemainingColumn(),
        console=Console(stderr=True),
    )


def build_feature_cache(
    *,
    prepared: PreparedData,
    reader: CaptionReader,
    encoder: ImageEncoder,
    image_size: int,
    root: str | Path,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device | None = None,
) -> Path:
    """Runs the frozen encoder over every image of every split, unless a complete cache exists.

    Args:
        prepared: the prepared dataset (its image list, in its order).
        reader: loads the images.
        encoder: the frozen encoder.
        image_size: images are resized (shorter side) and centre-cropped to this size.
        root: the folder under which cache folders go.
        batch_size: images per encoder call.
        num_workers: DataLoader workers decoding images.
        device: where the encoder runs (default: CUDA if available, else CPU).

    Returns:
        The cache folder.

    Raises:
        DataError: the encoder is trainable, or the disk lacks the space the cache needs.
    """
    from filelock import FileLock

    check_frozen(encoder)
    key = cache_key(encoder, image_size=image_size, prepared=prepared)
    folder = cache_folder(root, key, prepared.manifest.get("name", "data"))
    # One builder at a time (several nodes' prepare_data on a shared disk): the others then find it done.
    lock = Path(root).parent / f".{Path(root).name}-{folder.name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        return _build(folder, key, prepared, reader, encoder, image_size, batch_size, num_workers, device)


def _build(
    folder: Path,
    key: dict[str, Any],
    prepared: PreparedData,
    reader: CaptionReader,
    encoder: ImageEncoder,
    image_size: int,
    batch_size: int,
    num_workers: int,
    device: str | torch.device | None,
) -> Path:
    import torch
    from torch.utils.data import DataLoader

    from capattn.models.encoder import image_transform

    progress_file = folder / "progress.json"
    try:
        done: dict[str, int] = json.loads(progress_file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        done = {}
    counts = {s: prepared.manifest["splits"][s]["images"] for s in SPLITS}
    if done and all(done.get(s, 0) >= n for s, n in counts.items()):
        logger.info("feature cache %s is up to date", folder)
        return folder

    device = (
        torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    )
    was_training, old_device = encoder.training, next(encoder.parameters()).device
    encoder.eval().to(device)
    try:
        L, D = _probe(encoder, image_size, device)
        total = sum(n * (L * D + D) * 2 for n in counts.values())
        free = shutil.disk_usage(_existing_parent(folder)).free
        needed = total - _used_bytes(folder)
        if needed > free:
            raise DataError(
                f"the feature cache needs {total / _GB:.1f} GB ({sum(counts.values()):,} images × {L}×{D} fp16) "
                f"at {folder} but only {free / _GB:.1f} GB are free — free space or set data.features_dir to a "
                "bigger disk"
            )
        folder.mkdir(parents=True, exist_ok=True)
        write_json_atomic(
            folder / "meta.json", {"key": key, "dtype": "float16", "shapes": {s: [n, L, D] for s, n in counts.items()}}
        )
        logger.info(
            "building the feature cache in %s: %s images, %.2f GB (%s done before)",
            folder,
            f"{sum(counts.values()):,}",
            total / _GB,
            f"{sum(done.values()):,}",
        )
        transform = image_transform(image_size)
        started, encoded, clipped = time.perf_counter(), 0, 0
        with _progress_bar() as bar:
            for split, n in counts.items():
                start = min(done.get(split, 0), n)
                task = bar.add_task(f"encoding {split}", total=n, completed=start, first=start)
                if start >= n:
                    done[split] = n
                    continue
                mode = "r+" if (folder / f"{split}.grid.npy").exists() and start > 0 else "w+"
                grid = np.lib.format.open_memmap(folder / f"{split}.grid.npy", mode, np.float16, (n, L, D))
                pooled = np.lib.format.open_memmap(folder / f"{split}.pooled.npy", mode, np.float16, (n, D))
                loader = DataLoader(
                    _SplitImages(prepared, split, reader, transform, start),
                    batch_size=batch_size,
                    num_workers=num_workers,
                    pin_memory=device.type == "cuda",
                )
                for rows, images in loader:
                    with torch.inference_mode():
                        out = encoder(images.to(device, non_blocking=True))
                    lo, hi = int(rows[0]), int(rows[-1]) + 1
                    # Beyond fp16's range a value would become inf and every loss NaN; clip it instead.
                    clipped += int((out.grid.abs() > _FP16_MAX).sum())
                    grid[lo:hi] = out.grid.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).cpu().numpy()  # (B, L, D)
                    pooled[lo:hi] = out.pooled.clamp(-_FP16_MAX, _FP16_MAX).to(torch.float16).cpu().numpy()  # (B, D)
                    grid.flush()
                    pooled.flush()
                    done[split] = hi
                    write_json_atomic(progress_file, done)  # only after the rows are on disk
                    encoded += hi - lo
                    bar.update(task, completed=hi)
                del grid, pooled
        seconds = time.perf_counter() - started
        logger.info(
            "feature cache done: %s images encoded in %.1f s (%.1f images/s)",
            f"{encoded:,}",
            seconds,
            encoded / max(seconds, 1e-9),
        )
        if clipped:
            logger.warning(
                "%s feature values exceeded fp16's range (±65504) and were clipped: is the encoder randomly "
                "initialised (weights=null)? Pretrained backbones stay far inside it",
                f"{clipped:,}",
            )
    finally:
        encoder.train(was_training).to(old_device)
    return folder
