"""The reader package: what it exports, and what every reader tells ``prepare``."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

import capattn.data.readers as readers
from capattn.data.readers import CaptionReader, ShapesReader
from capattn.data.records import CaptionRecord
from capattn.data.synthetic import ShapesReader as SyntheticShapesReader
from capattn.errors import DataError


def test_every_reader_is_importable_from_the_package() -> None:
    assert set(readers.__all__) == {
        "CaptionReader",
        "CocoReader",
        "Flickr8kReader",
        "HFReader",
        "KarpathyReader",
        "ShapesReader",
    }
    for name in readers.__all__:
        reader = getattr(readers, name)
        assert issubclass(reader, CaptionReader)
        assert name in dir(readers)
    assert ShapesReader is SyntheticShapesReader


def test_synthetic_imported_first_has_no_import_cycle() -> None:
    code = (
        "import capattn.data.synthetic as s\n"
        "from capattn.data.readers import ShapesReader, CaptionReader\n"
        "assert ShapesReader is s.ShapesReader and issubclass(ShapesReader, CaptionReader)\n"
        "print(ShapesReader(num_train=1, num_val=1, num_test=1).name)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "shapes"


def test_shapes_reader_name_and_settings() -> None:
    reader = ShapesReader(num_train=3, num_val=2, num_test=1, image_size=30, seed=4)
    assert reader.name == "shapes"
    assert reader.settings() == {"num_train": 3, "num_val": 2, "num_test": 1, "image_size": 30, "seed": 4}
    assert ShapesReader(**reader.settings()).read() == reader.read()  # the settings rebuild the same data
    assert reader.sources() == []


class _TinyFolderReader(CaptionReader):
    """A reader as a user would write one: keyword-only options kept under their own names."""

    def __init__(self, *, folder: Path, names: list[str], repeat: int = 1) -> None:
        self.folder = Path(folder)
        self.names = names
        self.repeat = repeat

    def read(self) -> list[CaptionRecord]:
        return [
            CaptionRecord(name, self.folder / f"{name}.png", ("a picture",) * self.repeat, "train")
            for name in self.names
        ]


def test_defaults_of_a_new_reader(tmp_path: Path) -> None:
    reader = _TinyFolderReader(folder=tmp_path, names=["a", "b"])
    assert reader.name == "tiny-folder"
    assert reader.sources() == []
    assert reader.settings() == {"folder": str(tmp_path.resolve()), "names": ["a", "b"], "repeat": 1}
    assert json.loads(json.dumps(reader.settings())) == reader.settings()


def test_load_image_errors_are_one_line(tmp_path: Path) -> None:
    reader = _TinyFolderReader(folder=tmp_path, names=["a", "b"])
    missing, corrupt = reader.read()
    (tmp_path / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"image not found: .*a\.png \(image a\)"):
        reader.load_image(missing)
    with pytest.raises(DataError, match=r"cannot read image .*b\.png \(image b\)") as err:
        reader.load_image(corrupt)
    assert "\n" not in str(err.value)
    Image.new("L", (4, 3), 128).save(tmp_path / "a.png")
    image = reader.load_image(missing)
    assert image.mode == "RGB" and image.size == (4, 3) and image.getpixel((0, 0)) == (128, 128, 128)
