"""Every real-dataset experiment through the real `capattn` CLI, on tiny stand-in data in the real formats.

The stand-ins are written where the experiments look by default (``data/flickr8k/…``, ``data/coco/…``,
as data/README.md says), so the shipped paths are tested too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from capattn.cli import main

from .conftest import REPO_ROOT
from .data.test_prepare import caption, write_flickr8k, write_image

EXPERIMENTS = sorted(p for p in (REPO_ROOT / "experiments").glob("*.yaml") if not p.name.startswith("demo_"))
SMALL = [
    "--model.encoder.init_args.weights=null",  # no downloads offline
    "--model.decoder.init_args.embed_dim=16",
    "--model.decoder.init_args.hidden_dim=16",
    "--model.val_scorers=[bleu,cider]",
    "--model.test_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--data.image_size=32",  # ResNet-101 still gives its 14×14 grid (pooled up from 1×1)
    "--data.batch_size=4",
    "--data.eval_batch_size=4",
    "--data.num_workers=0",
    "--data.min_word_count=1",
    "--trainer.fast_dev_run=1",
]


def write_karpathy_coco(folder: Path, sizes: dict[str, int]) -> Path:
    """A ``dataset_coco.json`` stand-in with the real schema, and its JPEGs under train2014/ and val2014/."""
    rng = np.random.default_rng(1)
    images, cocoid = [], 100
    for split, n in sizes.items():
        for _ in range(n):
            cocoid += 7
            filepath = "train2014" if split == "train" else "val2014"
            filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
            write_image(folder / filepath / filename, seed=cocoid)
            raws = [caption(rng) for _ in range(5)]
            images.append(
                {
                    "filepath": filepath,
                    "filename": filename,
                    "imgid": len(images),
                    "split": split,
                    "cocoid": cocoid,
                    "sentids": list(range(5 * len(images), 5 * len(images) + 5)),
                    "sentences": [
                        {"tokens": raw.lower().split(), "raw": raw, "imgid": len(images), "sentid": 5 * len(images) + j}
                        for j, raw in enumerate(raws)
                    ],
                }
            )
    path = folder / "dataset_coco.json"
    path.write_text(json.dumps({"images": images, "dataset": "coco"}))
    return path


@pytest.fixture
def standins(tmp_path, monkeypatch):
    """The default data paths of experiments/data/*.yaml, filled with tiny stand-ins; cwd is their root."""
    monkeypatch.chdir(tmp_path)
    token = write_flickr8k(tmp_path / "f8k", sizes=(6, 2, 2))
    flickr = tmp_path / "data" / "flickr8k"
    flickr.mkdir(parents=True)
    for path in token.parent.glob("*.txt"):  # the official zip puts text files and images side by side
        path.rename(flickr / path.name)
    (tmp_path / "f8k" / "images").rename(flickr / "Flicker8k_Dataset")
    write_karpathy_coco(tmp_path / "data" / "coco", {"train": 4, "restval": 2, "val": 2, "test": 2})
    return tmp_path


def test_every_experiment_starts_with_its_run_command():
    assert len(EXPERIMENTS) >= 4, [p.name for p in EXPERIMENTS]
    for path in EXPERIMENTS:
        assert path.read_text().splitlines()[0] == f"# capattn fit --config experiments/{path.name}"


def test_shared_data_configs_point_where_data_readme_says():
    readme = (REPO_ROOT / "data" / "README.md").read_text()
    for path in (REPO_ROOT / "experiments" / "data").glob("*.yaml"):
        for value in re.findall(r"^\s+\w+: (data/\S+)", path.read_text(), flags=re.M):
            assert value in readme, f"{path.name}: {value} is not in data/README.md"


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.stem)
def test_every_experiment_runs_through_the_cli(config, standins):
    assert main(["fit", "--config", str(config), *SMALL]) == 0
    (prepared,) = Path("data/prepared").glob("*/manifest.json")  # the default prepared folder
    name = "flickr8k" if "flickr8k" in config.stem else "karpathy-coco"
    assert prepared.parent.name.startswith(f"{name}-")
    train = json.loads(prepared.read_text())["splits"]["train"]["images"]
    assert train == 6  # Flickr8k: 6 train; COCO: 4 train + 2 restval


@pytest.mark.slow
def test_an_experiment_on_cached_features(standins):
    config = REPO_ROOT / "experiments" / "coco_show_attend_tell.yaml"
    assert main(["fit", "--config", str(config), *SMALL, "--data.features=cache"]) == 0
    (cache,) = Path("data/prepared/features").iterdir()
    grid = np.load(cache / "train.grid.npy", mmap_mode="r")
    assert grid.shape == (6, 196, 2048) and grid.dtype == np.float16  # resnet101 pooled to 14×14
