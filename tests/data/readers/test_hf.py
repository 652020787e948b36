"""HFReader on small datasets the tests build: save_to_disk folders and imagefolders, in the hub's layouts."""

from __future__ import annotations

import csv
import json
import pickle
import time
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from capattn.data.readers import HFReader
from capattn.errors import DataError

COLOURS = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40), (240, 240, 240), (10, 10, 10)]


def picture(index: int) -> Image.Image:
    return Image.new("RGB", (12, 10), COLOURS[index % len(COLOURS)])


def _features(**columns) -> datasets.Features:
    return datasets.Features({"image": datasets.Image(), **columns})


@pytest.fixture
def list_captions(tmp_path: Path) -> Path:
    """A DatasetDict like nlphuji/flickr30k's rows: one image and a list of captions per row."""

    def split(indices: range) -> datasets.Dataset:
        rows = {
            "image": [picture(i) for i in indices],
            "caption": [[f"image {i} one", f"image {i} two"] for i in indices],
        }
        return datasets.Dataset.from_dict(rows, features=_features(caption=datasets.List(datasets.Value("string"))))

    folder = tmp_path / "flickr-lists"
    datasets.DatasetDict(
        {"train": split(range(3)), "validation": split(range(3, 5)), "test": split(range(5, 6))}
    ).save_to_disk(str(folder))
    return folder


def test_save_to_disk_with_lists_of_captions(list_captions: Path) -> None:
    reader = HFReader(path=str(list_captions))
    records = reader.read()
    assert [(record.image_id, record.split) for record in records] == [
        ("train-0", "train"),
        ("train-1", "train"),
        ("train-2", "train"),
        ("validation-0", "val"),
        ("validation-1", "val"),
        ("test-0", "test"),
    ]
    assert records[4].captions == ("image 4 one", "image 4 two")
    assert all(record.image_path is None for record in records)  # the pixels stay in the Arrow table
    for index, record in enumerate(records):
        image = reader.load_image(record)
        assert image.mode == "RGB" and image.size == (12, 10)
        assert image.getpixel((5, 5)) == pytest.approx(COLOURS[index], abs=3)
    assert reader.name == "hf-flickr-lists"
    assert reader.settings()["path"] == str(list_captions.resolve())
    assert json.loads(json.dumps(reader.settings())) == reader.settings()
    assert [path.name for path in reader.sources()] == [
        "dataset_dict.json",
        "data-00000-of-00001.arrow",
        "state.json",
        "data-00000-of-00001.arrow",
        "state.json",
        "data-00000-of-00001.arrow",
        "state.json",
    ]


def test_a_pickled_reader_loads_images_without_the_parent(list_captions: Path) -> None:
    reader = HFReader(path=str(list_captions))
    records = reader.read()
    reader.datasets()
    copy = pickle.loads(pickle.dumps(reader))  # what a DataLoader worker gets
    assert copy._datasets is None
    assert copy.load_image(records[2]).getpixel((0, 0)) == pytest.approx(COLOURS[2], abs=3)
    fresh = HFReader(path=str(list_captions))  # never read(): finds the rows itself
    assert fresh.load_image(records[5]).getpixel((0, 0)) == pytest.approx(COLOURS[5], abs=3)


def test_several_caption_columns_and_a_split_column(tmp_path: Path) -> None:
    """Like jxie/flickr8k: caption_0 … caption_4; here with one table and a split column, dev for validation."""
    columns = {f"caption_{n}": [f"picture {i} says {n}" for i in range(4)] for n in range(5)}
    rows = {
        "image": [picture(i) for i in range(4)],
        "image_id": ["a", "b", "c", "d"],
        "split": ["train", "dev", "test", "train"],
        **columns,
    }
    features = _features(
        image_id=datasets.Value("string"),
        split=datasets.Value("string"),
        **{n: datasets.Value("string") for n in columns},
    )
    datasets.Dataset.from_dict(rows, features=features).save_to_disk(str(tmp_path / "f8k"))
    reader = HFReader(
        path=str(tmp_path / "f8k"),
        caption_column=[f"caption_{n}" for n in range(5)],
        image_id_column="image_id",
        split_column="split",
    )
    records = reader.read()
    assert [(record.image_id, record.split) for record in records] == [
        ("a", "train"),
        ("d", "train"),
        ("b", "val"),
        ("c", "test"),
    ]
    assert records[1].captions == tuple(f"picture 3 says {n}" for n in range(5))
    assert reader.load_image(records[1]).getpixel((0, 0)) == pytest.approx(COLOURS[3], abs=3)


def test_one_row_per_caption_grouped_by_image_id(tmp_path: Path) -> None:
    """Like bitmind/MS-COCO: each row one caption, rows of one image share its id."""
    ids = [139, 285, 139, 632, 285, 139]
    rows = {
        "image": [picture(i) for i in ids],
        "image_id": ids,
        "caption": [f"caption {n} of {i}" for n, i in enumerate(ids)],
    }
    table = datasets.Dataset.from_dict(
        rows, features=_features(image_id=datasets.Value("int64"), caption=datasets.Value("string"))
    )
    datasets.DatasetDict(
        {"train": table.select(range(5)), "validation": table.select([5]).map(lambda row: {"image_id": 724})}
    ).save_to_disk(str(tmp_path / "coco"))
    reader = HFReader(path=str(tmp_path / "coco"), image_id_column="image_id")
    records = reader.read()
    assert [(record.image_id, record.split, record.captions) for record in records] == [
        ("139", "train", ("caption 0 of 139", "caption 2 of 139")),
        ("285", "train", ("caption 1 of 285", "caption 4 of 285")),
        ("632", "train", ("caption 3 of 632",)),
        ("724", "val", ("caption 5 of 139",)),
    ]
    assert reader.load_image(records[1]).getpixel((0, 0)) == pytest.approx(COLOURS[285 % 6], abs=3)


def _imagefolder(folder: Path, splits: dict[str, int], metadata: str) -> Path:
    index = 0
    for split, count in splits.items():
        place = folder / split if split else folder
        place.mkdir(parents=True)
        rows = []
        for _ in range(count):
            picture(index).save(place / f"img{index}.png")
            rows.append({"file_name": f"img{index}.png", "text": f"a picture number {index}"})
            index += 1
        if metadata == "jsonl":
            (place / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
        else:
            with (place / "metadata.csv").open("w", newline="") as file:
                writer = csv.DictWriter(file, ["file_name", "text"])
                writer.writeheader()
                writer.writerows(rows)
    return folder


@pytest.mark.parametrize("metadata", ["jsonl", "csv"])
def test_imagefolder_with_split_folders(tmp_path: Path, metadata: str) -> None:
    folder = _imagefolder(tmp_path / "pictures", {"train": 3, "validation": 1, "test": 2}, metadata)
    reader = HFReader(path=str(folder), caption_column="text", cache_dir=tmp_path / "cache")
    records = reader.read()
    assert Counter(record.split for record in records) == {"train": 3, "val": 1, "test": 2}
    assert records[3].image_path == folder / "validation" / "img3.png"  # images stay files
    assert records[3].captions == ("a picture number 3",)
    assert reader.load_image(records[3]).getpixel((1, 1)) == COLOURS[3]
    assert [path.relative_to(folder).as_posix() for path in reader.sources()] == [
        f"{split}/metadata.{metadata}" for split in ("test", "train", "validation")
    ]


def test_imagefolder_without_split_folders_is_all_train(tmp_path: Path) -> None:
    folder = _imagefolder(tmp_path / "pictures", {"": 2}, "jsonl")
    records = HFReader(path=str(folder), caption_column="text", cache_dir=tmp_path / "cache").read()
    assert [(record.image_id, record.split) for record in records] == [("train-0", "train"), ("train-1", "train")]


# --- what cannot be loaded, and bad input ---


def _error(reader: HFReader) -> str:
    with pytest.raises(DataError) as err:
        reader.read()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_hub_name_offline_fails_at_once(tmp_path: Path) -> None:
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py sets HF_HUB_OFFLINE=1 before datasets loads
    start = time.perf_counter()
    message = _error(HFReader(path="nlphuji/flickr30k", cache_dir=tmp_path))
    assert time.perf_counter() - start < 5
    assert message.startswith("cannot load hub dataset 'nlphuji/flickr30k'")
    assert "HF_DATASETS_OFFLINE=1" in message and "save_to_disk" in message


def test_dataset_with_a_loading_script(tmp_path: Path) -> None:
    folder = tmp_path / "old_flickr"
    folder.mkdir()
    (folder / "old_flickr.py").write_text("import datasets\n")
    message = _error(HFReader(path=str(folder), cache_dir=tmp_path))
    assert "loading script (old_flickr.py)" in message and "no longer run" in message


def test_missing_folder(tmp_path: Path) -> None:
    assert "dataset folder not found" in _error(HFReader(path=str(tmp_path / "nothing")))


def test_missing_column(list_captions: Path) -> None:
    message = _error(HFReader(path=str(list_captions), caption_column="sentences"))
    assert "no column 'sentences'" in message and "it has image, caption" in message


def test_unknown_split_name(list_captions: Path) -> None:
    message = _error(HFReader(path=str(list_captions), splits={"train": "train", "test": "test"}))
    assert "unknown split name 'validation'" in message
    records = HFReader(path=str(list_captions), splits={"train": "train", "validation": "drop", "test": "test"}).read()
    assert Counter(record.split for record in records) == {"train": 3, "test": 1}
    with pytest.raises(DataError, match="splits must map to train, val, test or drop"):
        HFReader(path=str(list_captions), splits={"train": "training"})


def test_image_without_caption(tmp_path: Path) -> None:
    rows = {"image": [picture(0), picture(1)], "caption": [["a red one"], ["", "  "]]}
    datasets.Dataset.from_dict(rows, features=_features(caption=datasets.List(datasets.Value("string")))).save_to_disk(
        str(tmp_path / "empty")
    )
    assert "image train-1 has no caption in caption" in _error(HFReader(path=str(tmp_path / "empty")))


def test_image_in_two_splits(tmp_path: Path) -> None:
    def split(ids: list[str]) -> datasets.Dataset:
        rows = {"image": [picture(0)] * len(ids), "image_id": ids, "caption": ["a caption"] * len(ids)}
        return datasets.Dataset.from_dict(
            rows, features=_features(image_id=datasets.Value("string"), caption=datasets.Value("string"))
        )

    datasets.DatasetDict({"train": split(["x", "y"]), "test": split(["z", "y"])}).save_to_disk(str(tmp_path / "twice"))
    message = _error(HFReader(path=str(tmp_path / "twice"), image_id_column="image_id"))
    assert "image y is in two splits (train and test)" in message
