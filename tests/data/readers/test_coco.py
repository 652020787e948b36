"""CocoReader on the real COCO val2014 captions subset (4,800 images, official format) and on broken copies."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from capattn.data.readers import CocoReader
from capattn.errors import DataError

SUBSET = "coco-caption-eval/extra/coco_val2014_captions_subset4800_from_Elsa1024.json"


@pytest.fixture(scope="module")
def subset(shared_data: Path) -> Path:
    return shared_data / SUBSET


@pytest.fixture(scope="module")
def annotations(subset: Path) -> dict:
    return json.loads(subset.read_text())


def test_val2014_subset(subset: Path, annotations: dict, tmp_path: Path) -> None:
    reader = CocoReader(annotations=subset, image_dirs=tmp_path / "val2014")
    records = reader.read()
    assert len(records) == 4800 and {record.split for record in records} == {"val"}  # "val2014" in the file name
    assert sum(len(record.captions) for record in records) == 24019
    assert Counter(len(record.captions) for record in records) == {5: 4781, 6: 19}
    first = annotations["images"][0]
    assert records[0].image_id == str(first["id"]) == "318219"
    assert records[0].image_path == tmp_path / "val2014" / "COCO_val2014_000000318219.jpg"
    expected = [a["caption"].strip() for a in annotations["annotations"] if a["image_id"] == first["id"]]
    assert records[0].captions == tuple(expected)
    assert "A young boy standing in front of a computer keyboard." in records[0].captions
    assert [record.image_id for record in records] == [str(image["id"]) for image in annotations["images"]]
    assert reader.name == "coco"
    assert reader.sources() == [subset]
    assert reader.settings() == {
        "annotations": [str(subset.resolve())],
        "image_dirs": [str((tmp_path / "val2014").resolve())],
        "split_json": None,
    }


def _write(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def _part(annotations: dict, images: slice) -> dict:
    kept = annotations["images"][images]
    ids = {image["id"] for image in kept}
    return {
        **annotations,
        "images": kept,
        "annotations": [a for a in annotations["annotations"] if a["image_id"] in ids],
    }


@pytest.fixture
def two_files(annotations: dict, tmp_path: Path) -> list[Path]:
    """captions_train2014.json with the subset's first 30 images, captions_val2014.json with the next 20."""
    return [
        _write(tmp_path / "captions_train2014.json", _part(annotations, slice(0, 30))),
        _write(tmp_path / "captions_val2014.json", _part(annotations, slice(30, 50))),
    ]


def test_split_from_each_file_name_and_its_image_folder(two_files: list[Path], tmp_path: Path) -> None:
    reader = CocoReader(annotations=two_files, image_dirs=[tmp_path / "train2014", tmp_path / "val2014"])
    records = reader.read()
    assert Counter(record.split for record in records) == {"train": 30, "val": 20}
    assert records[0].image_path.parent == tmp_path / "train2014"
    assert records[-1].image_path.parent == tmp_path / "val2014"


def test_karpathy_split_file_decides_the_splits(
    two_files: list[Path], annotations: dict, tmp_path: Path, reader_log: pytest.LogCaptureFixture
) -> None:
    ids = [image["id"] for image in annotations["images"][:50]]
    # Karpathy lists 40 of the 50 annotated images (restval goes to train), plus 3 that no annotation file has.
    splits = ["train"] * 10 + ["restval"] * 10 + ["val"] * 10 + ["test"] * 10
    entries = [(cocoid, split) for cocoid, split in zip(ids[5:45], splits)] + [(1, "train"), (2, "val"), (3, "test")]
    karpathy = {
        "dataset": "coco",
        "images": [
            {
                "filepath": "val2014",
                "filename": f"COCO_val2014_{cocoid:012d}.jpg",
                "split": split,
                "cocoid": cocoid,
                "sentences": [{"raw": "x", "tokens": ["x"], "imgid": 0, "sentid": 0}],
            }
            for cocoid, split in entries
        ],
    }
    split_json = _write(tmp_path / "dataset_coco.json", karpathy)
    reader = CocoReader(annotations=two_files, image_dirs=tmp_path, split_json=split_json)
    records = reader.read()
    assert Counter(record.split for record in records) == {"train": 20, "val": 10, "test": 10}
    assert {record.image_id: record.split for record in records} == {
        str(cocoid): {"restval": "train"}.get(split, split) for cocoid, split in entries[:40]
    }
    # captions come from the official annotations, not from the split file
    assert all(record.captions != ("x",) and len(record.captions) >= 5 for record in records)
    assert reader.sources() == [*two_files, split_json]
    assert reader_log.records[-1].getMessage() == (
        "COCO: 10 annotated images are not in dataset_coco.json's splits and are left out; "
        "3 of its images are in none of the annotation files"
    )


# --- bad input ---


def _error(annotations, tmp_path: Path, **options) -> str:
    with pytest.raises(DataError) as err:
        CocoReader(annotations=annotations, image_dirs=tmp_path, **options).read()
    message = str(err.value)
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    message = _error(tmp_path / "captions_train2014.json", tmp_path)
    assert str(tmp_path / "captions_train2014.json") in message and "data/README.md" in message


def test_missing_split_file(two_files: list[Path], tmp_path: Path) -> None:
    message = _error(two_files, tmp_path, split_json=tmp_path / "dataset_coco.json")
    assert f"Karpathy split file not found: {tmp_path / 'dataset_coco.json'}" in message


def test_not_json(tmp_path: Path) -> None:
    path = tmp_path / "captions_val2014.json"
    path.write_text('{"images": []\n"annotations": []}')
    assert f"{path}:2: not valid JSON" in _error(path, tmp_path)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"images": []}, "no 'images' and 'annotations' lists"),
        ({"images": [{"id": "1", "file_name": "a.jpg"}], "annotations": []}, "images[0] lacks an integer 'id'"),
        ({"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1}]}, "annotations[0] lacks"),
    ],
)
def test_wrong_schema(tmp_path: Path, data: dict, expected: str) -> None:
    message = _error(_write(tmp_path / "captions_val2014.json", data), tmp_path)
    assert expected in message and "COCO's caption format" in message


def test_image_in_two_files(two_files: list[Path], annotations: dict, tmp_path: Path) -> None:
    val = json.loads(two_files[1].read_text())
    val["images"].append(annotations["images"][0])
    _write(two_files[1], val)
    message = _error(two_files, tmp_path)
    assert f"{two_files[1]}: image {annotations['images'][0]['id']} is also in {two_files[0]}" in message


def test_image_without_caption(tmp_path: Path) -> None:
    data = {"images": [{"id": 7, "file_name": "a.jpg"}, {"id": 8, "file_name": "b.jpg"}]}
    data["annotations"] = [{"image_id": 7, "id": 1, "caption": "A cat."}]
    message = _error(_write(tmp_path / "captions_val2014.json", data), tmp_path)
    assert "image 8 has no caption" in message


def test_split_unknown_from_the_file_name(two_files: list[Path], tmp_path: Path) -> None:
    renamed = two_files[0].rename(tmp_path / "captions_2014.json")
    message = _error(renamed, tmp_path)
    assert f"{renamed}: cannot tell the split" in message and "split_json" in message


def test_one_image_folder_per_file(two_files: list[Path], tmp_path: Path) -> None:
    with pytest.raises(DataError, match="2 annotation files but 3 image folders"):
        CocoReader(annotations=two_files, image_dirs=[tmp_path] * 3)
