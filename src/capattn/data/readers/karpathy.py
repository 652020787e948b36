"""Karpathy's split files: ``dataset_coco.json``, ``dataset_flickr8k.json``, ``dataset_flickr30k.json``."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

from capattn.data.readers.base import SPLITS, CaptionReader, load_json, require_file
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

logger = logging.getLogger("capattn.data.readers")

_KARPATHY_SPLITS = ("train", "restval", "val", "test")
_SCHEMA_HELP = "expected Karpathy's format, {'images': [{'filename', 'split', 'sentences': [{'raw'}]}, …]}"


class KarpathyReader(CaptionReader):
    """A Karpathy split file, the standard train/val/test split of COCO, Flickr8k and Flickr30k.

    Each entry of ``images`` has ``filename``, ``split`` (``train``, ``restval``, ``val`` or
    ``test``) and ``sentences[].raw``; COCO's entries also have ``filepath`` (``train2014`` or
    ``val2014``: the image is ``image_dir/filepath/filename``) and ``cocoid``, which becomes the
    image id so that results files match the official annotations. Other datasets' image ids are
    the file names without extension. ``restval`` (COCO's 30,504 validation images outside
    Karpathy's val and test) goes to train by default, giving 113,287 / 5,000 / 5,000 images.

    The file (about 150 MB for COCO) is parsed with pyarrow's JSON reader, which takes about a
    quarter of the time and memory of ``json.load``.

    Args:
        split_json: the Karpathy JSON file.
        image_dir: the folder the images' ``filepath``/``filename`` are relative to.
        restval: where ``restval`` images go: ``"train"``, ``"val"`` or ``"drop"``.

    Raises:
        DataError: ``restval`` is not one of the three.
    """

    def __init__(
        self, *, split_json: Path, image_dir: Path, restval: Literal["train", "val", "drop"] = "train"
    ) -> None:
        if restval not in ("train", "val", "drop"):
            raise DataError(f"KarpathyReader: restval must be 'train', 'val' or 'drop', got {restval!r}")
        self.split_json = Path(split_json)
        self.image_dir = Path(image_dir)
        self.restval = restval

    def __repr__(self) -> str:
        return f"{type(self).__name__}(split_json={str(self.split_json)!r}, restval={self.restval!r})"

    @property
    def name(self) -> str:
        """``"karpathy-coco"`` for ``dataset_coco.json``, ``"karpathy-<file stem>"`` for other names."""
        return "karpathy-" + self.split_json.stem.removeprefix("dataset_")

    def sources(self) -> list[Path]:
        """The split file."""
        return [self.split_json]

    def read(self) -> list[CaptionRecord]:
        """Returns the records of train, val and test, each in the file's order.

        Raises:
            DataError: the file is missing, not JSON or not in Karpathy's format; an image is listed
                twice, has an unknown split or no caption.
        """
        require_file(self.split_json, "Karpathy split file")
        columns = _read_arrow(self.split_json)
        if columns is None:  # pyarrow could not read it: json names the problem precisely
            columns = _read_python(self.split_json)
        filenames, filepaths, splits, cocoids, counts, raws = columns
        by_split: dict[str, list[CaptionRecord]] = {split: [] for split in SPLITS}
        seen: dict[str, str] = {}  # image id -> its Karpathy split
        start = 0
        for index, (filename, filepath, split, cocoid, count) in enumerate(
            zip(filenames, filepaths, splits, cocoids, counts)
        ):
            if not isinstance(filename, str) or not isinstance(split, str) or count is None:
                raise DataError(
                    f"{self.split_json}: images[{index}] lacks filename, split or sentences — {_SCHEMA_HELP}"
                )
            image_id = str(cocoid) if cocoid is not None else filename.rsplit(".", 1)[0]
            captions = tuple(raws[start : start + count])
            start += count
            if split not in _KARPATHY_SPLITS:
                raise DataError(
                    f"{self.split_json}: image {image_id} has unknown split {split!r} — "
                    f"expected one of {', '.join(_KARPATHY_SPLITS)}"
                )
            if image_id in seen:
                raise DataError(
                    f"{self.split_json}: image {image_id} is listed twice (splits {seen[image_id]} and {split}) — "
                    "an image belongs to one split only; use the original file"
                )
            seen[image_id] = split
            if not captions or not all(isinstance(caption, str) for caption in captions):
                raise DataError(
                    f"{self.split_json}: image {image_id} has no caption (sentences[].raw) — {_SCHEMA_HELP}"
                )
            if split == "restval":
                if self.restval == "drop":
                    continue
                split = self.restval
            path = self.image_dir / filepath / filename if filepath else self.image_dir / filename
            by_split[split].append(CaptionRecord(image_id=image_id, image_path=path, captions=captions, split=split))
        return [record for split in SPLITS for record in by_split[split]]


# Per image: filename, filepath (or None), split, cocoid (or None), number of sentences; then all raw captions.
_Columns = tuple[list[Any], list[Any], list[Any], list[Any], list[Any], list[Any]]


def _read_arrow(path: Path) -> _Columns | None:
    """Reads the file's columns with pyarrow; None when pyarrow cannot (the caller then falls back to json)."""
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.json as pj

    try:
        # The whole file is one JSON object, so the block must hold all of it.
        table = pj.read_json(
            path,
            read_options=pj.ReadOptions(block_size=os.path.getsize(path) + 1),
            parse_options=pj.ParseOptions(newlines_in_values=True),
        )
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OverflowError):
        return None
    if table.num_rows != 1 or "images" not in table.column_names:
        return None
    images = table.column("images").combine_chunks()
    if not pa.types.is_list(images.type) or not pa.types.is_struct(images.type.value_type):
        return None
    fields = {field.name: field.type for field in images.type.value_type}
    sentences = fields.get("sentences")
    if (
        sentences is None
        or not pa.types.is_list(sentences)
        or not pa.types.is_struct(sentences.value_type)
        or sentences.value_type.get_field_index("raw") < 0
    ):
        return None
    entries = pc.list_flatten(images)  # one struct per image

    def column(name: str) -> list[Any]:
        if name not in fields:
            return [None] * len(entries)
        return pc.struct_field(entries, name).to_pylist()

    sentences = pc.struct_field(entries, "sentences")
    raws = pc.struct_field(pc.list_flatten(sentences), "raw").to_pylist()
    return (
        column("filename"),
        column("filepath"),
        column("split"),
        column("cocoid"),
        pc.list_value_length(sentences).to_pylist(),
        raws,
    )


def _read_python(path: Path) -> _Columns:
    """Reads the file's columns with json, naming the first problem it finds."""
    data = load_json(path)
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DataError(f"{path}: no 'images' list at the top — {_SCHEMA_HELP}")
    columns: _Columns = ([], [], [], [], [], [])
    filenames, filepaths, splits, cocoids, counts, raws = columns
    for index, entry in enumerate(data["images"]):
        sentences = entry.get("sentences") if isinstance(entry, dict) else None
        if not isinstance(sentences, list) or not all(isinstance(sentence, dict) for sentence in sentences):
            raise DataError(f"{path}: images[{index}] has no 'sentences' list — {_SCHEMA_HELP}")
        filenames.append(entry.get("filename"))
        filepaths.append(entry.get("filepath"))
        splits.append(entry.get("split"))
        cocoids.append(entry.get("cocoid"))
        counts.append(len(sentences))
        raws.extend(sentence.get("raw") for sentence in sentences)
    return columns


def karpathy_splits(path: Path, *, restval: str = "train") -> dict[str, str]:
    """Returns ``{image id: split}`` of a Karpathy split file (ids as ``KarpathyReader`` makes them).

    Args:
        path: the Karpathy JSON file.
        restval: where ``restval`` images go: ``"train"``, ``"val"`` or ``"drop"`` (left out).
    """
    reader = KarpathyReader(split_json=path, image_dir=Path(), restval=restval)  # type: ignore[arg-type]
    return {record.image_id: record.split for record in reader.read()}
