"""COCO's official caption annotations (``captions_train2014.json``, ``captions_val2014.json``, or 2017's)."""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Any

from capattn.data.readers.base import SPLITS, CaptionReader, load_json, require_file
from capattn.data.readers.karpathy import karpathy_splits
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

logger = logging.getLogger("capattn.data.readers")

_SCHEMA_HELP = (
    "expected COCO's caption format, {'images': [{'id', 'file_name'}], 'annotations': [{'image_id', 'caption'}]}"
)


class CocoReader(CaptionReader):
    """COCO captions from the official annotation files, read with pycocotools.

    Image ids are COCO's numeric ids written as digits, so results files match the official
    annotations. Without ``split_json``, each image's split comes from the name of the file it is
    in (``captions_train2014.json`` → train, ``captions_val2014.json`` → val); with it, from
    Karpathy's split file (``restval`` goes to train), leaving out images that file does not list.

    Args:
        annotations: one or more ``captions_*.json`` files.
        image_dirs: the image folder of each annotation file, in the same order (``train2014/``,
            ``val2014/``); one folder serves all files.
        split_json: Karpathy's ``dataset_coco.json``, to use its train/val/test split.

    Raises:
        DataError: no annotation file, or not as many image folders as annotation files.
    """

    def __init__(
        self, *, annotations: Path | list[Path], image_dirs: Path | list[Path], split_json: Path | None = None
    ) -> None:
        self.annotations = [Path(path) for path in _as_list(annotations)]
        self.image_dirs = [Path(path) for path in _as_list(image_dirs)]
        self.split_json = None if split_json is None else Path(split_json)
        if not self.annotations:
            raise DataError("CocoReader: give at least one annotation file (captions_train2014.json …)")
        if len(self.image_dirs) not in (1, len(self.annotations)):
            raise DataError(
                f"CocoReader: {len(self.annotations)} annotation files but {len(self.image_dirs)} image folders — "
                "give one folder per annotation file, in the same order, or one for all"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}(annotations={[str(path) for path in self.annotations]!r})"

    @property
    def name(self) -> str:
        """``"coco"``."""
        return "coco"

    def sources(self) -> list[Path]:
        """The annotation files and the Karpathy split file when given."""
        return [*self.annotations, *([] if self.split_json is None else [self.split_json])]

    def read(self) -> list[CaptionRecord]:
        """Returns the records of train, val and test, each in the annotation files' order.

        Raises:
            DataError: a file is missing, not JSON or not in COCO's format; an image is in two files
                or has no caption; a file's split cannot be told from its name and no split file is given.
        """
        from pycocotools.coco import COCO

        karpathy = (
            None if self.split_json is None else karpathy_splits(require_file(self.split_json, "Karpathy split file"))
        )
        dirs = self.image_dirs * len(self.annotations) if len(self.image_dirs) == 1 else self.image_dirs
        by_split: dict[str, list[CaptionRecord]] = {split: [] for split in SPLITS}
        seen: dict[str, Path] = {}  # image id -> the annotation file it came from
        left_out = 0
        for path, image_dir in zip(self.annotations, dirs):
            file_split = _split_of(path) if karpathy is None else None
            coco = COCO()
            coco.dataset = _load(path)
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress lines
                coco.createIndex()
            for image in coco.dataset["images"]:
                image_id = str(image["id"])
                if image_id in seen:
                    raise DataError(
                        f"{path}: image {image_id} is also in {seen[image_id]} — an image belongs to one split only"
                    )
                seen[image_id] = path
                split = file_split if karpathy is None else karpathy.get(image_id)
                if split is None:
                    left_out += 1
                    continue
                captions = tuple(annotation["caption"].strip() for annotation in coco.imgToAnns[image["id"]])
                if not captions:
                    raise DataError(
                        f"{path}: image {image_id} has no caption — "
                        "use the official captions_*.json (see data/README.md)"
                    )
                record = CaptionRecord(
                    image_id=image_id, image_path=image_dir / image["file_name"], captions=captions, split=split
                )
                by_split[split].append(record)
        if karpathy is not None:
            missing = len(karpathy.keys() - seen.keys())
            if left_out or missing:
                logger.info(
                    "COCO: %s annotated images are not in %s's splits and are left out; "
                    "%s of its images are in none of the annotation files",
                    f"{left_out:,}",
                    self.split_json.name,
                    f"{missing:,}",
                )
        return [record for split in SPLITS for record in by_split[split]]


def _as_list(value: Path | str | list[Path] | tuple[Path, ...]) -> list[Path]:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _split_of(path: Path) -> str:
    """train/val/test from an annotation file's name (``captions_val2014.json`` → val)."""
    found = {"val" if word in ("val", "dev") else word for word in re.findall(r"train|val|dev|test", path.stem.lower())}
    if len(found) != 1:
        raise DataError(
            f"{path}: cannot tell the split from the file name (expected captions_train2014.json, "
            "captions_val2014.json or the like) — rename it or give split_json (Karpathy's dataset_coco.json)"
        )
    return found.pop()


def _load(path: Path) -> dict[str, Any]:
    """Loads and checks one annotation file, naming the first problem."""
    require_file(path, "COCO annotation file")
    data = load_json(path)
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("images"), list)
        or not isinstance(data.get("annotations"), list)
    ):
        raise DataError(f"{path}: no 'images' and 'annotations' lists at the top — {_SCHEMA_HELP}")
    for index, image in enumerate(data["images"]):
        if (
            not isinstance(image, dict)
            or not isinstance(image.get("id"), int)
            or not isinstance(image.get("file_name"), str)
        ):
            raise DataError(f"{path}: images[{index}] lacks an integer 'id' or a 'file_name' — {_SCHEMA_HELP}")
    for index, annotation in enumerate(data["annotations"]):
        if (
            not isinstance(annotation, dict)
            or not isinstance(annotation.get("caption"), str)
            or not isinstance(annotation.get("image_id"), int)
        ):
            raise DataError(f"{path}: annotations[{index}] lacks an integer 'image_id' or a 'caption' — {_SCHEMA_HELP}")
    return data
