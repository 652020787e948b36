"""Flickr8k: the official ``Flickr8k.token.txt`` (or Kaggle's ``captions.txt``) and the official split lists."""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from capattn.data.readers.base import CaptionReader, read_text, require_file
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

logger = logging.getLogger("capattn.data.readers")

# Our split name -> the official list of its images; "dev" is the validation split.
SPLIT_FILES = {
    "train": "Flickr_8k.trainImages.txt",
    "val": "Flickr_8k.devImages.txt",
    "test": "Flickr_8k.testImages.txt",
}
_CSV_HEADER = ["image", "caption"]


class Flickr8kReader(CaptionReader):
    """Flickr8k's captions with its official 6,000 / 1,000 / 1,000 split.

    The captions come from either file that circulates: the official token file, one
    ``<image>#<n>\\t<caption>`` line per caption, or the Kaggle ``captions.txt`` CSV (header
    ``image,caption``; captions holding a comma are quoted). The splits come from the official
    ``Flickr_8k.{train,dev,test}Images.txt``. Only images in a split become records: the token file
    also holds 91 real images that are in no split and one bogus key
    (``2258277193_586949ec62.jpg.1``); how many were left out is logged once.

    Image ids are the file names without ``.jpg`` (``1000268201_693b08cb0e``).

    Args:
        captions: ``Flickr8k.token.txt`` or Kaggle's ``captions.txt``.
        image_dir: the folder holding the ``.jpg`` files (``Flicker8k_Dataset/`` in the official zip).
        split_dir: the folder holding the three split lists; default: the captions file's folder.
    """

    def __init__(self, *, captions: Path, image_dir: Path, split_dir: Path | None = None) -> None:
        self.captions = Path(captions)
        self.image_dir = Path(image_dir)
        self.split_dir = None if split_dir is None else Path(split_dir)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(captions={str(self.captions)!r}, image_dir={str(self.image_dir)!r})"

    @property
    def name(self) -> str:
        """``"flickr8k"``."""
        return "flickr8k"

    def split_files(self) -> dict[str, Path]:
        """Our split name → the official list of its images."""
        folder = self.captions.parent if self.split_dir is None else self.split_dir
        return {split: folder / filename for split, filename in SPLIT_FILES.items()}

    def sources(self) -> list[Path]:
        """The captions file and the three split lists."""
        return [self.captions, *self.split_files().values()]

    def read(self) -> list[CaptionRecord]:
        """Returns the split images' records: train, val, test, each in its split list's order.

        Raises:
            DataError: a file is missing or malformed, an image is in two splits or has no caption.
        """
        captions = self.read_captions()
        splits = self._read_splits()
        records = []
        for split, names in splits.items():
            for name in names:
                if not captions.get(name):
                    raise DataError(
                        f"{self.split_files()[split]}: image {name} has no caption in {self.captions} — "
                        "use the captions file of the same Flickr8k release"
                    )
                records.append(
                    CaptionRecord(
                        image_id=name.removesuffix(".jpg"),
                        image_path=self.image_dir / name,
                        captions=tuple(captions[name]),
                        split=split,
                    )
                )
        in_splits = {name for names in splits.values() for name in names}
        left_out = [name for name in captions if name not in in_splits]
        if left_out:
            bogus = [name for name in left_out if not name.endswith(".jpg")]
            logger.info(
                "Flickr8k: %s of the %s images in %s are in no official split and are left out%s",
                f"{len(left_out):,}",
                f"{len(captions):,}",
                self.captions.name,
                f" (incl. {len(bogus)} bogus key{'s' * (len(bogus) > 1)}: {', '.join(bogus[:3])})" if bogus else "",
            )
        return records

    def read_captions(self) -> dict[str, list[str]]:
        """Returns every image of the captions file, split or not, with its captions in the file's order.

        Raises:
            DataError: the file is missing or a line is malformed.
        """
        require_file(self.captions, "Flickr8k captions file")
        text = read_text(self.captions)
        if text.lstrip("\ufeff").startswith(",".join(_CSV_HEADER)):
            return self._read_csv(text)
        return self._read_tokens(text)

    def _read_tokens(self, text: str) -> dict[str, list[str]]:
        captions: dict[str, list[str]] = {}
        # split("\n"), not splitlines(): a caption may hold characters splitlines() breaks at (\x1c, \u2028).
        for lineno, line in enumerate(text.split("\n"), 1):
            line = line.removesuffix("\r")
            if not line.strip():
                continue
            key, tab, caption = line.partition("\t")
            image, hash_sign, number = key.rpartition("#")
            if not tab or not hash_sign or not image or not number.isdigit():
                raise DataError(
                    f"{self.captions}:{lineno}: expected '<image>.jpg#<n><TAB><caption>', got {line[:60]!r} — "
                    "use the official Flickr8k.token.txt or Kaggle's captions.txt (see data/README.md)"
                )
            captions.setdefault(image, []).append(caption.strip())
        return captions

    def _read_csv(self, text: str) -> dict[str, list[str]]:
        captions: dict[str, list[str]] = {}
        rows = csv.reader(io.StringIO(text.lstrip("\ufeff"), newline=""))
        next(rows)  # the header
        for row in rows:
            if not row:
                continue
            if len(row) < 2:
                raise DataError(
                    f"{self.captions}:{rows.line_num}: expected 'image,caption', got {','.join(row)[:60]!r} — "
                    "quote captions that hold commas, as Kaggle's captions.txt does"
                )
            # An unquoted comma splits a caption into more fields: joining them gives the caption back.
            captions.setdefault(row[0], []).append(",".join(row[1:]).strip())
        return captions

    def _read_splits(self) -> dict[str, list[str]]:
        splits: dict[str, list[str]] = {}
        seen: dict[str, str] = {}  # image -> its split
        for split, path in self.split_files().items():
            require_file(path, "Flickr8k split list", "put the split lists beside the captions file or set split_dir; ")
            names = list(dict.fromkeys(line.strip() for line in read_text(path).split("\n") if line.strip()))
            for name in names:
                if name in seen:
                    raise DataError(
                        f"{path}: image {name} is also in the {seen[name]} split "
                        f"({self.split_files()[seen[name]].name}) — an image belongs to one split only"
                    )
                seen[name] = split
            splits[split] = names
        return splits
