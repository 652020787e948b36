"""Flickr8kReader on the real Flickr8k text files (token file and Kaggle CSV) and on broken copies of them."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest

from capattn.data.readers import Flickr8kReader
from capattn.errors import DataError

BOGUS_KEY = "2258277193_586949ec62.jpg.1"


@pytest.fixture(scope="module")
def flickr(shared_data: Path) -> Path:
    return shared_data / "flickr8k"


@pytest.fixture(scope="module")
def token_reader(flickr: Path) -> Flickr8kReader:
    return Flickr8kReader(captions=flickr / "text" / "Flickr8k.token.txt", image_dir=flickr / "images")


@pytest.fixture(scope="module")
def csv_reader(flickr: Path) -> Flickr8kReader:
    return Flickr8kReader(captions=flickr / "captions.txt", image_dir=flickr / "images", split_dir=flickr / "text")


def test_token_file_holds_8091_images_a_bogus_key_and_40460_captions(token_reader: Flickr8kReader) -> None:
    captions = token_reader.read_captions()
    assert len(captions) == 8092
    assert BOGUS_KEY in captions
    assert sum(len(texts) for texts in captions.values()) == 40460
    assert Counter(len(texts) for texts in captions.values()) == {5: 8092}
    assert captions["1000268201_693b08cb0e.jpg"][0] == (
        "A child in a pink dress is climbing up a set of stairs in an entry way ."
    )


def test_kaggle_csv_has_the_same_caption_sets_without_the_bogus_key(
    token_reader: Flickr8kReader, csv_reader: Flickr8kReader
) -> None:
    tokens, kaggle = token_reader.read_captions(), csv_reader.read_captions()
    assert len(kaggle) == 8091 and sum(len(texts) for texts in kaggle.values()) == 40455
    del tokens[BOGUS_KEY]
    assert {name: sorted(texts) for name, texts in kaggle.items()} == {
        name: sorted(texts) for name, texts in tokens.items()
    }
    # a quoted caption keeps its commas
    assert "A dog shakes its head near the shore , a red ball next to it ." in kaggle["1012212859_01547e3f17.jpg"]


def test_only_the_8000_split_images_become_records(
    token_reader: Flickr8kReader, csv_reader: Flickr8kReader, flickr: Path, reader_log: pytest.LogCaptureFixture
) -> None:
    records = token_reader.read()
    assert Counter(record.split for record in records) == {"train": 6000, "val": 1000, "test": 1000}
    assert [record.split for record in records] == sorted(
        (r.split for r in records), key=["train", "val", "test"].index
    )
    assert all(len(record.captions) == 5 for record in records)
    train = (flickr / "text" / "Flickr_8k.trainImages.txt").read_text().split()
    assert [record.image_id + ".jpg" for record in records[:6000]] == train  # the split list's order
    assert records[0].image_path == flickr / "images" / train[0]
    assert len({record.image_id for record in records}) == 8000
    assert "2258277193_586949ec62" not in {record.image_id for record in records}
    notes = [entry.getMessage() for entry in reader_log.records]
    assert notes == [
        "Flickr8k: 92 of the 8,092 images in Flickr8k.token.txt are in no official split and are left out "
        "(incl. 1 bogus key: 2258277193_586949ec62.jpg.1)"
    ]
    # the CSV gives the same records, captions in the same order; its 91 unsplit images are reported too
    assert csv_reader.read() == records
    assert reader_log.records[-1].getMessage() == (
        "Flickr8k: 91 of the 8,091 images in captions.txt are in no official split and are left out"
    )


def test_the_real_images_load(token_reader: Flickr8kReader, flickr: Path) -> None:
    present = {path.name for path in (flickr / "images").glob("*.jpg")}
    records = [record for record in token_reader.read() if record.image_path.name in present]
    assert len(records) == 116
    assert Counter(record.split for record in records) == {"train": 95, "val": 15, "test": 6}
    image = token_reader.load_image(records[0])
    assert image.mode == "RGB" and max(image.size) == 256


def test_settings_and_sources(csv_reader: Flickr8kReader, flickr: Path) -> None:
    assert csv_reader.name == "flickr8k"
    settings = csv_reader.settings()
    assert settings == {
        "captions": str((flickr / "captions.txt").resolve()),
        "image_dir": str((flickr / "images").resolve()),
        "split_dir": str((flickr / "text").resolve()),
    }
    assert csv_reader.sources() == [
        flickr / "captions.txt",
        *(flickr / "text" / f"Flickr_8k.{name}Images.txt" for name in ("train", "dev", "test")),
    ]


# --- bad input: a small copy of the real files, broken one way at a time ---


@pytest.fixture
def small(flickr: Path, tmp_path: Path) -> Path:
    """A Flickr8k text folder with the first 10 train, 2 dev and 2 test images of the real files."""
    lines = (flickr / "text" / "Flickr8k.token.txt").read_text().splitlines()
    keep = {}
    for name, count in (("train", 10), ("dev", 2), ("test", 2)):
        names = (flickr / "text" / f"Flickr_8k.{name}Images.txt").read_text().split()[:count]
        (tmp_path / f"Flickr_8k.{name}Images.txt").write_text("\n".join(names) + "\n")
        keep.update(dict.fromkeys(names))
    (tmp_path / "Flickr8k.token.txt").write_text("\n".join(line for line in lines if line.split("#")[0] in keep) + "\n")
    return tmp_path


def _read(folder: Path, captions: str = "Flickr8k.token.txt") -> list:
    return Flickr8kReader(captions=folder / captions, image_dir=folder / "images").read()


def _one_line(err: pytest.ExceptionInfo) -> str:
    message = str(err.value)
    assert "\n" not in message
    return message


def test_small_copy_reads(small: Path) -> None:
    assert Counter(record.split for record in _read(small)) == {"train": 10, "val": 2, "test": 2}


def test_missing_captions_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        _read(tmp_path)
    message = _one_line(err)
    assert str(tmp_path / "Flickr8k.token.txt") in message and "data/README.md" in message


def test_missing_split_file(small: Path) -> None:
    (small / "Flickr_8k.devImages.txt").unlink()
    with pytest.raises(DataError) as err:
        _read(small)
    assert "Flickr_8k.devImages.txt" in _one_line(err) and "data/README.md" in str(err.value)


def test_split_dir_is_where_the_split_lists_are(small: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("captions")
    shutil.move(small / "Flickr8k.token.txt", other / "Flickr8k.token.txt")
    with pytest.raises(DataError, match="Flickr_8k.trainImages.txt"):
        Flickr8kReader(captions=other / "Flickr8k.token.txt", image_dir=small).read()
    reader = Flickr8kReader(captions=other / "Flickr8k.token.txt", image_dir=small, split_dir=small)
    assert len(reader.read()) == 14


@pytest.mark.parametrize(
    ("bad_line", "why"),
    [("1000268201_693b08cb0e.jpg#0 A child without a tab", "no tab"), ("1000268201_693b08cb0e.jpg\tNo #n", "no #n")],
)
def test_malformed_token_line_names_its_line(small: Path, bad_line: str, why: str) -> None:
    path = small / "Flickr8k.token.txt"
    lines = path.read_text().splitlines()
    lines.insert(6, bad_line)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        _read(small)
    assert f"{path}:7:" in _one_line(err), why


def test_malformed_csv_row_names_its_line(small: Path) -> None:
    (small / "captions.txt").write_text("image,caption\na.jpg,A dog .\nb.jpg\n")
    with pytest.raises(DataError) as err:
        _read(small, "captions.txt")
    assert f"{small / 'captions.txt'}:3:" in _one_line(err)


def test_image_in_two_splits(small: Path) -> None:
    first_train = (small / "Flickr_8k.trainImages.txt").read_text().split()[0]
    with (small / "Flickr_8k.testImages.txt").open("a") as file:
        file.write(first_train + "\n")
    with pytest.raises(DataError) as err:
        _read(small)
    message = _one_line(err)
    assert first_train in message and "Flickr_8k.testImages.txt" in message and "train" in message


def test_split_image_without_caption(small: Path) -> None:
    with (small / "Flickr_8k.devImages.txt").open("a") as file:
        file.write("999_nocaption.jpg\n")
    with pytest.raises(DataError) as err:
        _read(small)
    assert "999_nocaption.jpg" in _one_line(err) and "no caption" in str(err.value)


def test_not_utf8(small: Path) -> None:
    (small / "Flickr8k.token.txt").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DataError, match="not UTF-8"):
        _read(small)


def test_missing_image_is_a_clear_error_at_load_time(small: Path) -> None:
    reader = Flickr8kReader(captions=small / "Flickr8k.token.txt", image_dir=small / "images")
    record = reader.read()[0]
    with pytest.raises(DataError) as err:
        reader.load_image(record)
    assert str(record.image_path) in _one_line(err) and record.image_id in str(err.value)
