"""YAML chooses a reader by ``class_path``: each one builds from its ``init_args`` through jsonargparse."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from jsonargparse import ArgumentParser

from capattn.data.readers import CaptionReader, CocoReader, Flickr8kReader, HFReader, KarpathyReader, ShapesReader


def _build(text: str) -> CaptionReader:
    parser = ArgumentParser()
    parser.add_argument("--reader", type=CaptionReader)
    config = parser.parse_object(yaml.safe_load(text))
    return parser.instantiate_classes(config).reader


@pytest.mark.parametrize(
    ("text", "kind", "settings"),
    [
        (
            """reader:
  class_path: capattn.data.readers.Flickr8kReader
  init_args: {captions: data/flickr8k/Flickr8k.token.txt, image_dir: data/flickr8k/Flicker8k_Dataset}""",
            Flickr8kReader,
            {"split_dir": None},
        ),
        (
            """reader:
  class_path: capattn.data.readers.KarpathyReader
  init_args: {split_json: data/karpathy/dataset_coco.json, image_dir: data/coco, restval: drop}""",
            KarpathyReader,
            {"restval": "drop"},
        ),
        (
            """reader:
  class_path: capattn.data.readers.CocoReader
  init_args:
    annotations: [data/coco/annotations/captions_train2014.json, data/coco/annotations/captions_val2014.json]
    image_dirs: [data/coco/train2014, data/coco/val2014]
    split_json: data/karpathy/dataset_coco.json""",
            CocoReader,
            {"image_dirs": [str(Path("data/coco/train2014").resolve()), str(Path("data/coco/val2014").resolve())]},
        ),
        (
            """reader:
  class_path: capattn.data.readers.CocoReader
  init_args: {annotations: data/coco/annotations/captions_val2014.json, image_dirs: data/coco/val2014}""",
            CocoReader,
            {"annotations": [str(Path("data/coco/annotations/captions_val2014.json").resolve())]},
        ),
        (
            """reader:
  class_path: capattn.data.readers.HFReader
  init_args:
    path: jxie/flickr8k
    caption_column: [caption_0, caption_1, caption_2, caption_3, caption_4]
    splits: {train: train, validation: val, test: test}""",
            HFReader,
            {"caption_column": [f"caption_{n}" for n in range(5)], "path": "jxie/flickr8k"},
        ),
        (
            """reader:
  class_path: capattn.data.readers.ShapesReader
  init_args: {num_train: 10, seed: 3}""",
            ShapesReader,
            {"num_train": 10, "seed": 3},
        ),
    ],
)
def test_reader_from_yaml(text: str, kind: type, settings: dict) -> None:
    reader = _build(text)
    assert type(reader) is kind
    assert settings.items() <= reader.settings().items()
