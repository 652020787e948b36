"""Any Hugging Face ``datasets`` caption dataset: a hub name, a ``save_to_disk`` folder or a local ``imagefolder``."""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from capattn.data.readers.base import SPLITS, CaptionReader
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

logger = logging.getLogger("capattn.data.readers")

# The split names datasets on the hub use, and ours; "drop" leaves a split out.
DEFAULT_SPLITS = {
    "train": "train",
    "restval": "train",
    "validation": "val",
    "valid": "val",
    "val": "val",
    "dev": "val",
    "test": "test",
}
_TARGETS = (*SPLITS, "drop")


class HFReader(CaptionReader):
    """A caption dataset loaded with Hugging Face ``datasets``, in any of the layouts the hub has.

    ``path`` is a hub name (``nlphuji/flickr30k``), a folder written by ``save_to_disk``, or a local
    ``imagefolder`` (images with a ``metadata.jsonl`` or ``metadata.csv`` naming each ``file_name``).
    The captions of a row are in ``caption_column``, a string or a list of strings per row, or in
    several columns (``caption_column: [caption_0, …, caption_4]``). When ``image_id_column`` is
    given, rows with the same id are one image, so datasets with one row per caption are grouped;
    without it, each row is one image named ``<split>-<row>``. A record's split is its row's split in
    the dataset or, with ``split_column``, that column's value, renamed by ``splits``.

    The tables stay memory-mapped Arrow: records hold no pixels, and ``load_image`` reads one row
    (or the image file, for an imagefolder) when asked. ``datasets`` 4 and later run no loading
    scripts, so hub datasets that only have one cannot be read; offline
    (``HF_DATASETS_OFFLINE=1``) a hub name that is not in the local cache fails at once.

    Args:
        path: hub name, ``save_to_disk`` folder or imagefolder folder.
        image_column: the column holding the image (an ``Image`` feature, or a file path).
        caption_column: the caption column, or several.
        image_id_column: the column that identifies an image; rows sharing it are one image.
        split_column: the column holding each row's split, instead of the dataset's own splits.
        splits: dataset split name → ``"train"``, ``"val"``, ``"test"`` or ``"drop"``; default: the
            usual names (``train``, ``validation``/``val``/``dev``, ``test``, ``restval`` → train).
        config: the hub dataset's configuration name, if it has several.
        cache_dir: where ``datasets`` keeps downloads and the imagefolder's Arrow files; default: its own.

    Raises:
        DataError: ``splits`` maps a name to something other than train, val, test or drop.
    """

    def __init__(
        self,
        *,
        path: str,
        image_column: str = "image",
        caption_column: str | list[str] = "caption",
        image_id_column: str | None = None,
        split_column: str | None = None,
        splits: dict[str, str] | None = None,
        config: str | None = None,
        cache_dir: Path | None = None,
    ) -> None:
        self.path = str(path)
        self.image_column = image_column
        self.caption_column = caption_column
        self.image_id_column = image_id_column
        self.split_column = split_column
        self.splits = dict(DEFAULT_SPLITS if splits is None else splits)
        self.config = config
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        wrong = {name: target for name, target in self.splits.items() if target not in _TARGETS}
        if wrong:
            raise DataError(
                f"HFReader: splits must map to train, val, test or drop, got {wrong} — fix data.reader's splits"
            )
        self._datasets: dict[str, Any] | None = None  # dataset split name -> datasets.Dataset, opened lazily
        self._rows: dict[str, tuple[str, int]] = {}  # image id -> (dataset split, first row), filled by read()
        self._images: dict[str, Any] = {}  # dataset split -> its image column alone, for load_image

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r})"

    def __getstate__(self) -> dict[str, Any]:
        # DataLoader workers reopen the memory-mapped tables themselves rather than unpickling them.
        return {**self.__dict__, "_datasets": None, "_images": {}}

    @property
    def name(self) -> str:
        """``"hf-<dataset>"``: the hub name's last part or the folder's name, e.g. ``"hf-flickr30k"``."""
        stem = re.sub(r"[^a-z0-9]+", "-", Path(self.path.rstrip("/")).name.lower()).strip("-")
        return f"hf-{stem or 'dataset'}"

    def _local(self) -> Path | None:
        path = Path(self.path).expanduser()
        return path if path.exists() else None

    def sources(self) -> list[Path]:
        """A local dataset's metadata and Arrow files; nothing for a hub name."""
        local = self._local()
        if local is None or not local.is_dir():
            return []
        patterns = ("dataset_dict.json", "state.json", "*.arrow", "metadata.jsonl", "metadata.csv")
        # The top folder and its split folders: an imagefolder's images are not sources, only its metadata.
        return sorted({file for pattern in patterns for file in [*local.glob(pattern), *local.glob(f"*/{pattern}")]})

    def settings(self) -> dict[str, Any]:
        """The constructor's arguments, with a local ``path`` made absolute."""
        settings = super().settings()
        local = self._local()
        if local is not None:
            settings["path"] = str(local.resolve())
        return settings

    def datasets(self) -> dict[str, Any]:
        """The dataset's splits as memory-mapped ``datasets.Dataset``s, keyed by the dataset's split names.

        Raises:
            DataError: the folder or hub dataset cannot be loaded; the line says why and what to do.
        """
        if self._datasets is None:
            loaded = self._load()
            self._datasets = dict(loaded.items()) if hasattr(loaded, "keys") else {str(loaded.split or "train"): loaded}
        return self._datasets

    def _load(self) -> Any:
        import datasets

        local = self._local()
        with _quiet(datasets):
            if local is not None:
                if (local / "dataset_dict.json").is_file() or (local / "state.json").is_file():
                    try:
                        return datasets.load_from_disk(str(local))
                    except (OSError, ValueError) as err:
                        raise DataError(f"{local}: cannot load this save_to_disk folder: {_first_line(err)}") from None
                if local.is_dir() and (local / f"{local.name}.py").is_file():
                    raise DataError(
                        f"{local} is a dataset with a loading script ({local.name}.py), which datasets 4 and later "
                        "no longer run — convert it to Parquet or save_to_disk with an older datasets"
                    )
                if not local.is_dir():
                    raise DataError(
                        f"{local} is a file — HFReader reads a hub name, a save_to_disk folder or an imagefolder folder"
                    )
                builder, kwargs = "imagefolder", {"data_dir": str(local)}
            else:
                if self.path.startswith((".", "/", "~")) or self.path.count("/") > 1:
                    raise DataError(f"dataset folder not found: {self.path} — check data.reader's path")
                builder, kwargs = self.path, {"name": self.config}
            try:
                return datasets.load_dataset(
                    builder, cache_dir=None if self.cache_dir is None else str(self.cache_dir), **kwargs
                )
            except ConnectionError as err:
                raise DataError(
                    f"cannot load hub dataset {self.path!r}: {_first_line(err)} — it is not in the local cache; "
                    "without internet (HF_DATASETS_OFFLINE=1), download it elsewhere, save_to_disk it and pass "
                    "that folder as path"
                ) from None
            except RuntimeError as err:
                if "scripts are no longer supported" not in str(err):
                    raise
                raise DataError(
                    f"hub dataset {self.path!r} needs a loading script, which datasets 4 and later no longer run — "
                    "use a Parquet version of it (look for its refs/convert/parquet branch or a copy on the hub)"
                ) from None
            except (FileNotFoundError, ValueError) as err:  # DatasetNotFoundError, an imagefolder without images
                raise DataError(f"cannot load dataset {self.path!r}: {_first_line(err)}") from None

    def read(self) -> list[CaptionRecord]:
        """Returns the records of train, val and test; within a split, in the dataset's row order.

        Raises:
            DataError: the dataset cannot be loaded, lacks a named column, has a split name that
                ``splits`` does not map, an image in two splits, or an image with no caption.
        """
        caption_columns = [self.caption_column] if isinstance(self.caption_column, str) else list(self.caption_column)
        # image id -> [split, image path, captions, (dataset split, first row)]
        images: dict[str, list[Any]] = {}
        for dataset_split, dataset in self.datasets().items():
            wanted = [self.image_column, *caption_columns, self.image_id_column, self.split_column]
            missing = [column for column in wanted if column is not None and column not in dataset.column_names]
            if missing:
                raise DataError(
                    f"{self.path} (split {dataset_split}): no column {', '.join(map(repr, missing))}; it has "
                    f"{', '.join(dataset.column_names)} — set image_column/caption_column/… of data.reader"
                )
            # Only the named columns, as Arrow: zero-copy slices of the memory map, no image decoded.
            selected = dataset.select_columns([column for column in dict.fromkeys(wanted) if column])
            table = selected.with_format("arrow")[:]
            paths = self._image_paths(table.column(self.image_column))
            columns = [table.column(column).to_pylist() for column in caption_columns]
            ids = table.column(self.image_id_column).to_pylist() if self.image_id_column else None
            row_splits = table.column(self.split_column).to_pylist() if self.split_column else None
            for row in range(table.num_rows):
                name = str(row_splits[row]) if row_splits is not None else dataset_split
                split = self.splits.get(name)
                if split is None:
                    raise DataError(
                        f"{self.path}: unknown split name {name!r} (row {row} of split {dataset_split}) — "
                        f"map it with data.reader's splits, e.g. {{{name!r}: train}}, or drop it"
                    )
                if split == "drop":
                    continue
                image_id = str(ids[row]) if ids is not None else f"{dataset_split}-{row}"
                entry = images.get(image_id)
                if entry is None:
                    entry = images[image_id] = [split, paths[row], [], (dataset_split, row)]
                elif entry[0] != split:
                    raise DataError(
                        f"{self.path}: image {image_id} is in two splits ({entry[0]} and {split}) — "
                        "an image belongs to one split only; check image_id_column and the split names"
                    )
                for column in columns:
                    entry[2].extend(_captions(column[row]))
        records = []
        for split in SPLITS:
            for image_id, (image_split, path, captions, _) in images.items():
                if image_split != split:
                    continue
                if not captions:
                    raise DataError(
                        f"{self.path}: image {image_id} has no caption in {', '.join(caption_columns)} — "
                        "fix the dataset or caption_column"
                    )
                records.append(CaptionRecord(image_id=image_id, image_path=path, captions=tuple(captions), split=split))
        self._rows = {image_id: entry[3] for image_id, entry in images.items()}
        return records

    def _image_paths(self, column: Any) -> list[Path | None]:
        """The image file of each row, where the image is a file rather than bytes inside the Arrow table."""
        import pyarrow as pa
        import pyarrow.compute as pc

        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
            base = self._local() or Path()
            return [None if value is None else base / value for value in column.to_pylist()]
        if not pa.types.is_struct(column.type) or column.type.get_field_index("path") < 0:
            return [None] * len(column)
        paths = pc.struct_field(column, "path").to_pylist()
        stored = pc.is_valid(pc.struct_field(column, "bytes")).to_pylist()
        return [None if has_bytes or path is None else Path(path) for path, has_bytes in zip(paths, stored)]

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """Returns the record's image as RGB, from its file or from its row of the Arrow table.

        Raises:
            DataError: the image is missing, unreadable, or the record is not from this dataset.
        """
        if record.image_path is not None:
            return super().load_image(record)
        if record.image_id not in self._rows:
            self.read()  # a fresh copy of the reader (e.g. in a DataLoader worker) finds the rows again
        if record.image_id not in self._rows:
            raise DataError(
                f"image {record.image_id!r} is not in {self.path} — "
                "build the images with the reader that read the records"
            )
        dataset_split, row = self._rows[record.image_id]
        try:
            if dataset_split not in self._images:
                self._images[dataset_split] = self.datasets()[dataset_split].select_columns([self.image_column])
            image = self._images[dataset_split][row][self.image_column]
            if not isinstance(image, Image.Image):
                raise TypeError(f"column {self.image_column!r} holds {type(image).__name__}, not an image")
            return image.convert("RGB")
        except (OSError, TypeError, ValueError) as err:
            raise DataError(
                f"cannot read the image of {record.image_id} ({self.path}, split {dataset_split}, row {row}): "
                f"{_first_line(err)} — fix or drop that row"
            ) from None


def _captions(value: Any) -> Iterator[str]:
    """The non-empty captions of one cell: a string, a list of strings, or nothing."""
    if isinstance(value, str):
        value = [value]
    for caption in value or ():
        if isinstance(caption, str) and caption.strip():
            yield caption.strip()


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


@contextlib.contextmanager
def _quiet(datasets: Any) -> Iterator[None]:
    """Silences datasets' progress bars while it loads (capattn reports its own progress)."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()
