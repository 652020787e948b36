"""``capattn prepare``: records → vocabulary + tokenized captions (Arrow) + manifest, once.

A prepared folder holds::

    manifest.json      what it was built from: reader, source files (size, mtime), settings, vocabulary hash
    vocab.json         the vocabulary of the training captions
    images/<split>/    one row per image: image_id, image_path, split, references (all raw captions)
    captions/<split>/  one row per caption: image (row in images/<split>), tokens (<bos> … <eos>), length

written with ``datasets`` (Arrow files, memory-mapped when read back), into a temporary folder
renamed into place at the end: an interrupted run never leaves a folder a later run trusts. A
second run with the same inputs and settings finds the manifest up to date and does nothing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from capattn.data.records import SPLITS, CaptionRecord
from capattn.errors import ConfigError, DataError
from capattn.vocab import Vocabulary

if TYPE_CHECKING:
    import datasets

    from capattn.data.readers.base import CaptionReader

logger = logging.getLogger("capattn.prepare")

FORMAT = 1  # bump when the folder layout changes: older folders are then rebuilt
DEFAULT_ROOT = Path("data/prepared")
MANIFEST = "manifest.json"
MissingImages = Literal["error", "skip"]


# --- what a prepared folder depends on ---------------------------------------------------------


def reader_name(reader: CaptionReader) -> str:
    """The reader's short dataset name (``"flickr8k"``), for folder names."""
    name = getattr(reader, "name", None)
    return str(name) if name else type(reader).__name__.removesuffix("Reader").lower()


def reader_settings(reader: CaptionReader) -> dict[str, Any]:
    """The reader's JSON-able options (its ``settings()``), or ``{}`` for a reader without them."""
    settings = reader.settings() if callable(getattr(reader, "settings", None)) else {}
    return json.loads(json.dumps(settings, sort_keys=True, default=str))


def reader_sources(reader: CaptionReader) -> list[Path]:
    """The annotation files the reader reads (whose size and mtime the manifest records)."""
    return [Path(p) for p in reader.sources()] if callable(getattr(reader, "sources", None)) else []


def _digest(data: Any, n: int = 64) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:n]


@dataclass(frozen=True)
class PrepareSettings:
    """The options that change a prepared folder's content (batch sizes and the like do not).

    Args:
        min_word_count: words seen fewer times in the training captions become ``<unk>``.
        max_vocab_size: keep at most this many tokens (specials included).
        train_splits: record splits that become the training split.
        missing_images: ``"error"`` stops at the first missing or unreadable image file;
            ``"skip"`` drops those images and reports how many at the end.
    """

    min_word_count: int = 1
    max_vocab_size: int | None = None
    train_splits: tuple[str, ...] = ("train",)
    missing_images: MissingImages = "error"

    def __post_init__(self) -> None:
        if self.min_word_count < 1:
            raise ConfigError(f"data.min_word_count must be ≥ 1, got {self.min_word_count}")
        if self.max_vocab_size is not None and self.max_vocab_size < 5:
            raise ConfigError(f"data.max_vocab_size must be ≥ 5 (4 special tokens + 1 word), got {self.max_vocab_size}")
        if self.missing_images not in ("error", "skip"):
            raise ConfigError(f"data.missing_images must be 'error' or 'skip', got {self.missing_images!r}")
        unknown = [s for s in self.train_splits if s not in (*SPLITS, "restval")]
        if unknown or not self.train_splits:
            choices = [*SPLITS, "restval"]
            raise ConfigError(f"data.train_splits has unknown split names {unknown}: choose from {choices}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "min_word_count": self.min_word_count,
            "max_vocab_size": self.max_vocab_size,
            "train_splits": list(self.train_splits),
            "missing_images": self.missing_images,
        }


def identity(reader: CaptionReader, settings: PrepareSettings) -> dict[str, Any]:
    """What names a prepared folder: the reader (class, name, options) and the prepare settings."""
    return {
        "format": FORMAT,
        "reader": f"{type(reader).__module__}.{type(reader).__qualname__}",
        "name": reader_name(reader),
        "reader_settings": reader_settings(reader),
        "settings": settings.to_dict(),
    }


def default_prepared_dir(reader: CaptionReader, settings: PrepareSettings, root: Path = DEFAULT_ROOT) -> Path:
    """``data/prepared/<dataset name>-<short hash of the reader's and prepare's settings>``."""
    return root / f"{reader_name(reader)}-{_digest(identity(reader, settings), 8)}"


def _stat(path: Path) -> dict[str, Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        return {"path": str(path.resolve()), "missing": True}
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _records_digest(records: Sequence[CaptionRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.image_id, str(r.image_path), r.split, list(r.captions)]).encode())
    return h.hexdigest()


# --- the prepared folder -----------------------------------------------------------------------


class PreparedSplit:
    """One split of a prepared folder, memory-mapped: nothing is copied into Python lists.

    Attributes:
        images: Arrow table, one row per image (``image_id``, ``image_path``, ``split``, ``references``).
        captions: Arrow table, one row per caption (``image``, ``tokens``, ``length``).
        caption_image: (N_captions,) int32, the image row of each caption.
        lengths: (N_captions,) int32, tokens per caption counting ``<bos>``/``<eos>``.
        first_caption: (N_images,) int64, the row of each image's first caption.
    """

    def __init__(self, folder: Path, split: str) -> None:
        import datasets

        self.name = split
        self.images: datasets.Dataset = datasets.load_from_disk(str(folder / "images" / split))
        self.captions: datasets.Dataset = datasets.load_from_disk(str(folder / "captions" / split))
        self.caption_image = self.captions.data.column("image").to_numpy().astype(np.int32, copy=False)
        self.lengths = self.captions.data.column("length").to_numpy().astype(np.int32, copy=False)
        # Captions are stored grouped by image, so an image's first caption is where its run starts.
        counts = np.bincount(self.caption_image, minlength=len(self.images))
        self.first_caption = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)
        self._token_chunks: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Views into the memory map are rebuilt in each DataLoader worker, not pickled as copies.
        return {**self.__dict__, "_token_chunks": None}

    def tokens(self, rows: np.ndarray) -> list[np.ndarray]:
        """Token ids of caption ``rows``, as int32 views into the memory-mapped Arrow file (no copies).

        Much faster per batch than ``captions[rows]``, which builds Python lists through ``datasets``.
        """
        if self._token_chunks is None:
            column = self.captions.data.table.column("tokens")
            # A ListArray's offsets index its whole values buffer (they include the chunk's own offset).
            self._token_chunks = [
                (chunk.offsets.to_numpy(), chunk.values.to_numpy(zero_copy_only=True)) for chunk in column.chunks
            ]
            self._chunk_starts = np.cumsum([0, *(len(o) - 1 for o, _ in self._token_chunks)])
        chunk_of = np.searchsorted(self._chunk_starts, rows, side="right") - 1
        out = []
        for row, c in zip(rows.tolist(), chunk_of.tolist(), strict=True):
            offsets, values = self._token_chunks[c]
            local = row - int(self._chunk_starts[c])
            out.append(values[offsets[local] : offsets[local + 1]])
        return out

    def image_rows(self, rows: np.ndarray) -> dict[str, list[Any]]:
        """Columns of image ``rows`` (id, path, split, references), in the order given.

        ``datasets``' own gather slices the record batches holding the rows; ``pyarrow``'s
        ``take`` would first concatenate a whole column's record batches, per call.
        """
        return self.images.data.fast_gather(np.asarray(rows, dtype=np.int64)).to_pydict()

    @property
    def num_images(self) -> int:
        return len(self.images)

    @property
    def num_captions(self) -> int:
        return len(self.captions)


class PreparedData:
    """A prepared folder opened for reading.

    Args:
        folder: the folder ``prepare`` wrote.

    Raises:
        DataError: the folder is not a complete prepared folder.
    """

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        try:
            self.manifest: dict[str, Any] = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (FileNotFoundError, json.JSONDecodeError):
            raise DataError(
                f"{self.folder} is not a prepared dataset (no readable {MANIFEST}) — run `capattn prepare`"
            ) from None
        self.vocab = Vocabulary.load(self.folder / "vocab.json")
        self._splits: dict[str, PreparedSplit] = {}

    @property
    def splits(self) -> list[str]:
        """The splits that have at least one image."""
        return [s for s, n in self.manifest["splits"].items() if n["images"]]

    def split(self, name: str) -> PreparedSplit:
        """The split ``name``, opened on first use.

        Raises:
            DataError: the dataset has no images in that split.
        """
        if name not in SPLITS:
            raise DataError(f"unknown split {name!r}: choose one of {list(SPLITS)}")
        if name not in self.splits:
            raise DataError(
                f"{self.manifest.get('name', 'the dataset')} has no {name!r} images in {self.folder} "
                f"(it has {self.splits})"
            )
        if name not in self._splits:
            self._splits[name] = PreparedSplit(self.folder, name)
        return self._splits[name]

    @cached_property
    def image_digest(self) -> str:
        """Hash of every split's image ids and paths: a feature cache is valid only for this image list."""
        return self.manifest["images_sha256"]


def is_up_to_date(folder: Path, reader: CaptionReader, settings: PrepareSettings) -> tuple[bool, str]:
    """Whether ``folder`` was prepared from the same inputs and settings, and if not, why."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return False, "not prepared yet"
    except json.JSONDecodeError:
        return False, f"{MANIFEST} is unreadable"
    if manifest.get("identity") != identity(reader, settings):
        return False, "the reader or settings changed"
    sources = [_stat(p) for p in reader_sources(reader)]
    if manifest.get("sources") != sources:
        return False, "a source file changed"
    if manifest.get("image_dirs") != [_stat(Path(d["path"])) for d in manifest.get("image_dirs", [])]:
        return False, "an image folder changed"
    if not sources and manifest.get("records_sha256") != _records_digest(reader.read()):
        return False, "the reader's records changed"
    return True, ""


# --- building ----------------------------------------------------------------------------------


def _progress():
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn("capattn: {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=False,
    )


def _tracked(items: Sequence, description: str) -> Iterator:
    with _progress() as progress:
        yield from progress.track(items, total=len(items), description=description)


def _source_label(reader: CaptionReader) -> str:
    sources = reader_sources(reader)
    return str(sources[0]) if sources else type(reader).__name__


def _image_problem(path: Path) -> str | None:
    """Why an image file cannot be used (missing, empty, not an image), or None. Reads the header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        if path.stat().st_size == 0:
            return "empty file"
        with Image.open(path) as image:
            image.size  # noqa: B018  (parsing the header is the check)
    except FileNotFoundError:
        return "missing"
    except (UnidentifiedImageError, OSError) as err:
        return f"not a readable image ({err})"
    return None


def _check_records(
    records: Sequence[CaptionRecord], reader: CaptionReader, settings: PrepareSettings
) -> tuple[dict[str, list[CaptionRecord]], list[tuple[CaptionRecord, str]]]:
    """Groups records into splits; returns them and the (record, problem) pairs of dropped images."""
    label = _source_label(reader)
    seen: dict[str, str] = {}
    by_split: dict[str, list[CaptionRecord]] = {s: [] for s in SPLITS}
    for record in records:
        split = "train" if record.split in settings.train_splits else record.split
        if split not in by_split:
            raise DataError(
                f"{label}: image {record.image_id} has unknown split {record.split!r} — "
                f"splits are {list(SPLITS)} (data.train_splits: {list(settings.train_splits)})"
            )
        if record.image_id in seen:
            raise DataError(
                f"{label}: image {record.image_id} is listed twice ({seen[record.image_id]} and {record.split}) — "
                "an image belongs to one split; fix the split files"
            )
        seen[record.image_id] = record.split
        if not record.captions:
            raise DataError(f"{label}: image {record.image_id} has no caption — add one or drop the image")
        by_split[split].append(record)
    dropped: list[tuple[CaptionRecord, str]] = []
    with_files = [r for r in records if r.image_path is not None]
    if with_files:
        bad = {}
        for record in _tracked(with_files, "checking image files"):
            problem = _image_problem(Path(record.image_path))
            if problem is None:
                continue
            if settings.missing_images == "error":
                raise DataError(
                    f"image {record.image_path} (image {record.image_id}, {label}): {problem} — "
                    "download the images (see data/README.md) or set data.missing_images=skip"
                )
            bad[record.image_id] = problem
            dropped.append((record, problem))
        if bad:
            by_split = {s: [r for r in rs if r.image_id not in bad] for s, rs in by_split.items()}
    if not by_split["train"]:
        raise DataError(
            f"{label}: no training images"
            + (f" left after skipping {len(dropped)} missing ones" if dropped else "")
            + f" (data.train_splits: {list(settings.train_splits)}) — check the image folder and split files"
        )
    return by_split, dropped


def _encode_split(
    records: Sequence[CaptionRecord], vocab: Vocabulary, label: str, advance=lambda n: None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Flat token ids, per-caption offsets and per-caption image rows, as numpy (no lists of lists)."""
    n = sum(len(r.captions) for r in records)
    image = np.empty(n, dtype=np.int32)
    offsets = np.zeros(n + 1, dtype=np.int64)
    chunks: list[np.ndarray] = []
    k = 0
    for row, record in enumerate(records):
        for j, caption in enumerate(record.captions):
            ids = vocab.encode(caption)
            if len(ids) <= 2:  # <bos> <eos> only
                raise DataError(
                    f"{label}: image {record.image_id} has a caption that is empty after tokenization "
                    f"(#{j}: {caption!r}) — fix or remove it in the annotation file"
                )
            chunks.append(np.asarray(ids, dtype=np.int32))
            image[k] = row
            offsets[k + 1] = offsets[k] + len(ids)
            k += 1
        if row % 1000 == 999:
            advance(1000)
    advance(len(records) % 1000)
    tokens = np.concatenate(chunks) if chunks else np.empty(0, dtype=np.int32)
    return tokens, offsets, image


def _split_tables(records: Sequence[CaptionRecord], vocab: Vocabulary, label: str, advance=lambda n: None):
    import pyarrow as pa

    tokens, offsets, image = _encode_split(records, vocab, label, advance)
    images = pa.table(
        {
            "image_id": pa.array([r.image_id for r in records], pa.string()),
            # Absolute, so that `capattn fit` finds the images from any working folder.
            "image_path": pa.array(
                [None if r.image_path is None else str(Path(r.image_path).absolute()) for r in records], pa.string()
            ),
            "split": pa.array([r.split for r in records], pa.string()),
            "references": pa.array([list(r.captions) for r in records], pa.list_(pa.string())),
        }
    )
    captions = pa.table(
        {
            "image": pa.array(image, pa.int32()),
            "tokens": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(tokens, pa.int32())),
            "length": pa.array(np.diff(offsets).astype(np.int32), pa.int32()),
        }
    )
    return images, captions


def _save(table, path: Path) -> None:
    import datasets

    quiet = datasets.utils.are_progress_bars_disabled()
    datasets.disable_progress_bars()  # one bar of our own, not one per file
    try:
        datasets.Dataset(table).save_to_disk(str(path))
    finally:
        if not quiet:
            datasets.enable_progress_bars()


def _write(
    folder: Path, reader: CaptionReader, settings: PrepareSettings, records: Sequence[CaptionRecord]
) -> dict[str, Any]:
    """Builds everything into ``folder``; returns the manifest."""
    label = _source_label(reader)
    by_split, dropped = _check_records(records, reader, settings)
    vocab = Vocabulary.build(
        (c for r in by_split["train"] for c in r.captions),
        min_count=settings.min_word_count,
        max_size=settings.max_vocab_size,
    )
    with _progress() as progress:
        task = progress.add_task("tokenizing", total=sum(len(by_split[s]) for s in SPLITS))
        for split in SPLITS:
            images, captions = _split_tables(by_split[split], vocab, label, lambda n: progress.advance(task, n))
            _save(images, folder / "images" / split)
            _save(captions, folder / "captions" / split)
    vocab.save(folder / "vocab.json")
    image_dirs = sorted({str(Path(r.image_path).parent) for rs in by_split.values() for r in rs if r.image_path})
    kept = [r for s in SPLITS for r in by_split[s]]
    sources = reader_sources(reader)
    manifest = {
        "identity": identity(reader, settings),
        "name": reader_name(reader),
        "sources": [_stat(p) for p in sources],
        "image_dirs": [_stat(Path(d)) for d in image_dirs[:100]],
        "records_sha256": None if sources else _records_digest(records),
        "images_sha256": _digest([[r.image_id, str(r.image_path), r.split] for r in kept]),
        "vocab": {"size": len(vocab), "sha256": _digest(vocab.itos)},
        "splits": {
            s: {"images": len(by_split[s]), "captions": sum(len(r.captions) for r in by_split[s])} for s in SPLITS
        },
        "skipped_images": {"count": len(dropped), "first": [str(r.image_path) for r, _ in dropped[:5]]},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    return manifest


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_temporaries(folder: Path) -> None:
    """Deletes temporary folders that interrupted runs (now dead) left beside ``folder``."""
    for tmp in folder.parent.glob(f".{folder.name}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 2)[-2])
        except ValueError:
            continue
        if not _pid_alive(pid):
            shutil.rmtree(tmp, ignore_errors=True)


def prepare(
    reader: CaptionReader,
    *,
    settings: PrepareSettings | None = None,
    prepared_dir: str | Path | None = None,
    force: bool = False,
) -> Path:
    """Prepares ``reader``'s dataset unless an up-to-date prepared folder exists.

    Safe to call from several processes at once (a file lock serialises them): the first builds,
    the others find it up to date.

    Args:
        reader: the dataset.
        settings: vocabulary and image options (default: ``PrepareSettings()``).
        prepared_dir: the folder to write; default ``data/prepared/<name>-<settings hash>``.
        force: rebuild even when the folder is up to date.

    Returns:
        The prepared folder.

    Raises:
        DataError: a file is missing or malformed, a caption is empty, an image is missing (with
            ``missing_images="error"``) …
    """
    from filelock import FileLock

    settings = settings or PrepareSettings()
    folder = Path(prepared_dir) if prepared_dir is not None else default_prepared_dir(reader, settings)
    if folder.exists() and not folder.is_dir():
        raise DataError(f"data.prepared_dir {folder} is a file — give a folder (it is created if missing)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder.parent / f".{folder.name}.lock")):
        fresh, why = is_up_to_date(folder, reader, settings)
        if fresh and not force:
            logger.info("%s is up to date (%s); nothing to do", folder, reader_name(reader))
            return folder
        logger.info("preparing %s into %s (%s)", reader_name(reader), folder, "forced" if fresh else why)
        _remove_stale_temporaries(folder)
        started = time.perf_counter()
        records = reader.read()
        tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            tmp.mkdir()
            manifest = _write(tmp, reader, settings, records)
            old = None
            if folder.exists():  # a stale build: move it aside first, so the rename below cannot fail half-way
                old = folder.parent / f".{folder.name}.tmp-{os.getpid()}-old"
                folder.rename(old)
            tmp.rename(folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    splits = manifest["splits"]
    logger.info(
        "prepared %s in %.1f s: vocabulary %d tokens; %s",
        folder,
        time.perf_counter() - started,
        manifest["vocab"]["size"],
        ", ".join(f"{s} {n['images']:,} images / {n['captions']:,} captions" for s, n in splits.items()),
    )
    skipped = manifest["skipped_images"]
    if skipped["count"]:
        kept = sum(n["images"] for n in splits.values())
        logger.info(
            "kept %s images, skipped %s whose files are missing or unreadable (data.missing_images=skip; first: %s)",
            f"{kept:,}",
            f"{skipped['count']:,}",
            skipped["first"][0],
        )
    return folder


# --- the command -------------------------------------------------------------------------------


def _parser_cli(argv: list[str]):
    """Parses ``argv`` with fit's own parser (same experiment YAML, same overrides, same errors)."""
    from capattn.data.datamodule import CaptionDataModule
    from capattn.lightning_cli import CaptioningCLI
    from capattn.module import CaptioningModule

    class PrepareCLI(CaptioningCLI):
        def add_arguments_to_parser(self, parser) -> None:
            super().add_arguments_to_parser(parser)
            parser.add_argument("--force", type=bool, default=False, help="rebuild even when up to date")

        # prepare builds only the data (and the encoder for a cache), below: none of fit's run set-up.
        def before_instantiate_classes(self) -> None:
            pass

        def instantiate_classes(self) -> None:
            pass

        def after_instantiate_classes(self) -> None:
            pass

    # `capattn prepare` hands its own argv over; LightningCLI would warn that sys.argv differs.
    warnings.filterwarnings("ignore", message=r"LightningCLI's args parameter is intended")
    return PrepareCLI(
        CaptioningModule,
        CaptionDataModule,
        args=argv,
        run=False,
        auto_configure_optimizers=False,
        parser_kwargs={
            "prog": "capattn prepare",
            "description": (
                "Build the vocabulary, tokenized captions (and with data.features=cache the encoder's feature "
                "cache) of an experiment's dataset. Takes the same --config as `capattn fit` and uses its data "
                "section (and model.encoder for the cache); other sections are accepted and ignored."
            ),
        },
    )


def main(argv: Iterable[str]) -> int:
    """``capattn prepare --config experiments/<name>.yaml [--data.… overrides]``."""
    import capattn  # noqa: F401  (torchvision guard before Lightning)

    cli = _parser_cli(list(argv))
    config = cli.config
    from jsonargparse import ArgumentParser, Namespace

    from capattn.data.datamodule import CaptionDataModule

    cache = config.data.get("features") == "cache"
    small = ArgumentParser(exit_on_error=False)
    small.add_class_arguments(CaptionDataModule, "data")
    datamodule: CaptionDataModule = small.instantiate_classes(Namespace(data=config.data)).data
    datamodule.prepare_text(force=bool(config.get("force")))
    if cache:
        datamodule.prepare_features(_build_encoder(config.model.encoder))
    return 0


def _build_encoder(spec: Any) -> Any:
    """``model.encoder`` from its ``class_path``/``init_args``, with a download failure as one line."""
    import importlib

    module, _, name = spec.class_path.rpartition(".")
    cls = getattr(importlib.import_module(module), name)
    init_args = spec.init_args.as_dict() if spec.get("init_args") is not None else {}
    try:
        return cls(**init_args)
    except OSError as err:  # weights that cannot be downloaded here
        raise ConfigError(f"model.encoder: {err}") from None
