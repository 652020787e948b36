"""Dataset readers: each turns one on-disk (or generated) dataset into ``CaptionRecord``s."""

from __future__ import annotations

from abc import ABC, abstractmethod

from PIL import Image, UnidentifiedImageError

from capattn.data.records import CaptionRecord
from capattn.errors import DataError


class CaptionReader(ABC):
    """Reads a captioning dataset into records and loads each record's image.

    Subclasses set their options as keyword-only constructor arguments, so that a YAML file
    can choose one with ``class_path``/``init_args``.
    """

    @abstractmethod
    def read(self) -> list[CaptionRecord]:
        """Returns every record of the dataset, all splits, in a deterministic order."""

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
