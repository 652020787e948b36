"""KarpathyReader on small generated files in Karpathy's real schema (COCO and Flickr), and on broken ones."""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import pytest

from capattn.data.readers import KarpathyReader
from capattn.errors import DataError

# Per split: how many images, and whether they come from COCO's train2014 or val2014 folder.
COCO_LAYOUT = (("train", 6, "train2014"), ("restval", 3, "val2014"), ("val", 2, "val2014"), ("test", 2, "val2014"))


def _sentence(raw: str, image: int, sentence: int) -> dict:
    tokens = raw.lower().rstrip(".").split()
    return {"tokens": tokens, "raw": raw, "imgid": image, "sentid": sentence}


def coco_json(layout=COCO_LAYOUT, captions: int = 5) -> dict:
    """A dataset_coco.json in Karpathy's schema; splits interleaved as in the real file."""
    images, sentence = [], 0
    entries = [(split, folder) for split, count, folder in layout for _ in range(count)]
    for index, (split, folder) in enumerate(entries[1::2] + entries[::2]):
        cocoid = 391895 + 7 * index
        sentences = [_sentence(f"Picture {cocoid} caption {n}.", index, sentence + n) for n in range(captions)]
        sentence += captions
        images.append(
            {
                "filepath": folder,
                "sentids": [s["sentid"] for s in sentences],
                "filename": f"COCO_{folder}_{cocoid:012d}.jpg",
                "imgid": index,
                "split": split,
                "sentences": sentences,
                "cocoid": cocoid,
            }
        )
    return {"images": images, "dataset": "coco"}


def flickr_json() -> dict:
    names = [
        ("1000268201_693b08cb0e.jpg", "train"),
        ("1001773457_577c3a7d70.jpg", "val"),
        ("101654506_8eb26cfb60.jpg", "test"),
    ]
    images = [
        {
            "sentids": [2 * index, 2 * index + 1],
            "imgid": index,
            "sentences": [
                _sentence(f"A photo {index} .", index, 2 * index),
                _sentence(f"Another {index} .", index, 2 * index + 1),
            ],
            "split": split,
            "filename": name,
        }
        for index, (name, split) in enumerate(names)
    ]
    images[2]["sentences"][1]["raw"] = 'Un café "noir" \\ é 😀'
    return {"images": images, "dataset": "flickr8k"}


def write(path: Path, data: dict, **dump) -> Path:
    path.write_text(json.dumps(data, **dump))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return write(tmp_path / "dataset_coco.json", coco_json())


def test_coco_records(coco_file: Path, tmp_path: Path) -> None:
    data = json.loads(coco_file.read_text())
    reader = KarpathyReader(split_json=coco_file, image_dir=tmp_path / "coco")
    records = reader.read()
    assert Counter(record.split for record in records) == {"train": 9, "val": 2, "test": 2}  # restval -> train
    assert [record.split for record in records] == ["train"] * 9 + ["val"] * 2 + ["test"] * 2
    by_id = {record.image_id: record for record in records}
    for entry in data["images"]:
        record = by_id[str(entry["cocoid"])]  # the COCO id, so results match the official annotations
        assert record.image_path == tmp_path / "coco" / entry["filepath"] / entry["filename"]
        assert record.captions == tuple(sentence["raw"] for sentence in entry["sentences"])
        assert record.split == {"restval": "train"}.get(entry["split"], entry["split"])
    # within a split, the file's order
    train_ids = [str(entry["cocoid"]) for entry in data["images"] if entry["split"] in ("train", "restval")]
    assert [record.image_id for record in records[:9]] == train_ids
    assert reader.name == "karpathy-coco"
    assert reader.sources() == [coco_file]
    assert reader.settings() == {
        "split_json": str(coco_file.resolve()),
        "image_dir": str((tmp_path / "coco").resolve()),
        "restval": "train",
    }


@pytest.mark.parametrize(
    ("restval", "counts"), [("val", {"train": 6, "val": 5, "test": 2}), ("drop", {"train": 6, "val": 2, "test": 2})]
)
def test_restval_option(coco_file: Path, restval: str, counts: dict) -> None:
    records = KarpathyReader(split_json=coco_file, image_dir=Path("coco"), restval=restval).read()
    assert Counter(record.split for record in records) == counts


def test_pretty_printed_file_reads_the_same(coco_file: Path, tmp_path: Path) -> None:
    pretty = write(tmp_path / "pretty.json", json.loads(coco_file.read_text()), indent=2)
    assert (
        KarpathyReader(split_json=pretty, image_dir=Path("c")).read()
        == KarpathyReader(split_json=coco_file, image_dir=Path("c")).read()
    )


def test_flickr_file_has_file_name_ids(tmp_path: Path) -> None:
    path = write(tmp_path / "dataset_flickr8k.json", flickr_json())
    reader = KarpathyReader(split_json=path, image_dir=tmp_path)
    records = reader.read()
    assert [(record.image_id, record.split) for record in records] == [
        ("1000268201_693b08cb0e", "train"),
        ("1001773457_577c3a7d70", "val"),
        ("101654506_8eb26cfb60", "test"),
    ]
    assert records[0].image_path == tmp_path / "1000268201_693b08cb0e.jpg"
    assert records[1].captions == ("A photo 1 .", "Another 1 .")
    assert records[2].captions[1] == 'Un café "noir" \\ é 😀'  # escapes and non-ASCII text survive pyarrow
    assert reader.name == "karpathy-flickr8k"


def test_mixed_types_fall_back_to_json_and_read_the_same(tmp_path: Path) -> None:
    data = flickr_json()
    data["images"][1]["imgid"] = "one"  # pyarrow cannot type this column; json still reads the file
    path = write(tmp_path / "dataset_flickr8k.json", data)
    assert len(KarpathyReader(split_json=path, image_dir=tmp_path).read()) == 3


# --- bad input ---


def _error(path: Path, **options) -> str:
    with pytest.raises(DataError) as err:
        KarpathyReader(split_json=path, image_dir=path.parent, **options).read()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "dataset_coco.json")
    assert str(tmp_path / "dataset_coco.json") in message and "data/README.md" in message


def test_not_json_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "dataset_coco.json"
    path.write_text('{"images": [\n{"filename": "a.jpg",\n "split": train}]}')
    assert f"{path}:3: not valid JSON" in _error(path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ([1, 2], "no 'images' list"),
        ({"dataset": "coco"}, "no 'images' list"),
        ({"images": [{"filename": "a.jpg", "split": "train"}]}, "images[0] has no 'sentences' list"),
        ({"images": [{"split": "train", "sentences": [{"raw": "A cat."}]}]}, "images[0] lacks filename"),
    ],
)
def test_wrong_schema(tmp_path: Path, data, expected: str) -> None:
    message = _error(write(tmp_path / "dataset_coco.json", data))
    assert expected in message and "Karpathy's format" in message


def test_unknown_split(tmp_path: Path) -> None:
    data = coco_json()
    data["images"][3]["split"] = "training"
    message = _error(write(tmp_path / "dataset_coco.json", data))
    assert f"image {data['images'][3]['cocoid']} has unknown split 'training'" in message


def test_image_listed_twice(tmp_path: Path) -> None:
    data = coco_json()
    twin = dict(data["images"][0], split="test")
    data["images"].append(twin)
    message = _error(write(tmp_path / "dataset_coco.json", data))
    assert f"image {twin['cocoid']} is listed twice" in message


def test_image_without_caption(tmp_path: Path) -> None:
    data = coco_json()
    data["images"][2]["sentences"] = []
    message = _error(write(tmp_path / "dataset_coco.json", data))
    assert f"image {data['images'][2]['cocoid']} has no caption" in message


def test_unknown_restval_option(coco_file: Path) -> None:
    with pytest.raises(DataError, match="restval must be 'train', 'val' or 'drop'"):
        KarpathyReader(split_json=coco_file, image_dir=Path(), restval="test")


@pytest.mark.slow
def test_coco_sized_file_reads_in_seconds(tmp_path: Path) -> None:
    """123,287 images × 5–6 captions (about 150 MB, like the real dataset_coco.json)."""
    layout = (
        ("train", 82783, "train2014"),
        ("restval", 30504, "val2014"),
        ("val", 5000, "val2014"),
        ("test", 5000, "val2014"),
    )
    path = write(tmp_path / "dataset_coco.json", coco_json(layout))
    start = time.perf_counter()
    records = KarpathyReader(split_json=path, image_dir=Path("data/coco")).read()
    seconds = time.perf_counter() - start
    assert Counter(record.split for record in records) == {"train": 113287, "val": 5000, "test": 5000}
    assert seconds < 15, f"reading took {seconds:.1f} s"
