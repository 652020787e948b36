"""The reader interface every dataset implements: records, images, and what a prepared copy depends on."""

from __future__ import annotations

import inspect
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from capattn.data.records import CaptionRecord
from capattn.errors import DataError

SPLITS = ("train", "val", "test")  # the only split names a record carries
DOWNLOAD_HELP = "see data/README.md for where to download it"


class CaptionReader(ABC):
    """Reads a captioning dataset into records and loads each record's image.

    Subclasses set their options as keyword-only constructor arguments, so that a YAML file
    can choose one with ``class_path``/``init_args``. They keep each option in an attribute of
    the same name, which is what the default ``settings()`` reports.
    """

    @abstractmethod
    def read(self) -> list[CaptionRecord]:
        """Returns every record of the dataset, all splits, in a deterministic order."""

    @property
    def name(self) -> str:
        """Short dataset name for default folder names, e.g. ``"flickr8k"``."""
        # FooBarReader -> "foo-bar"
        return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "-", type(self).__name__.lstrip("_").removesuffix("Reader")).lower()

    def sources(self) -> list[Path]:
        """The annotation and split files the records come from; a prepared copy is stale when one changes."""
        return []

    def settings(self) -> dict[str, Any]:
        """The reader's options as JSON-able values (paths as absolute strings), keyed by argument name.

        The default reads the constructor's keyword arguments back from attributes of the same name.
        """
        settings = {}
        for parameter in inspect.signature(type(self).__init__).parameters.values():
            if parameter.kind is inspect.Parameter.KEYWORD_ONLY:
                settings[parameter.name] = _jsonable(getattr(self, parameter.name))
        return settings

    def load_image(self, record: CaptionRecord) -> Image.Image:
        """Returns the record's image as RGB.

        Raises:
            DataError: the file is missing or is not a readable image.
        """
        if record.image_path is None:
            raise DataError(f"record {record.image_id!r} has no image_path and {type(self).__name__} cannot render it")
        try:
            with Image.open(record.image_path) as image:
                return image.convert("RGB")
        except FileNotFoundError:
            raise DataError(
                f"image not found: {record.image_path} (image {record.image_id}) — check the dataset's image folder"
            ) from None
        except (UnidentifiedImageError, OSError) as err:
            raise DataError(
                f"cannot read image {record.image_path} (image {record.image_id}): {err} — re-download or remove it"
            ) from None


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value.resolve())
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    return value


def require_file(path: Path, what: str, hint: str = "") -> Path:
    """Returns ``path`` when it is a file; else raises a one-line DataError saying where to get it."""
    if not path.is_file():
        raise DataError(f"{what} not found: {path} — {hint}{DOWNLOAD_HELP}")
    return path


def load_json(path: Path) -> Any:
    """Parses a JSON annotation file; a syntax or encoding problem is one DataError naming the file and line."""
    try:
        with path.open("rb") as file:
            return json.load(file)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}:{err.lineno}: not valid JSON ({err.msg}, column {err.colno}) — re-download it (see data/README.md)"
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path} is not UTF-8 JSON ({err.reason}) — re-download it (see data/README.md)") from None


def read_text(path: Path) -> str:
    """Returns a UTF-8 text file's contents; a one-line DataError when it is not text."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}) — is it the right file?"
        ) from None
