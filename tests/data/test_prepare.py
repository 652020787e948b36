"""`capattn prepare`: vocabulary from train only, Arrow + manifest, idempotent, atomic, one-line errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capattn.cli import main
from capattn.data import prepare as prepare_module
from capattn.data.prepare import PreparedData, PrepareSettings, is_up_to_date, prepare
from capattn.data.readers import Flickr8kReader
from capattn.data.records import CaptionRecord
from capattn.errors import DataError

from ..conftest import REPO_ROOT, ListReader

EXPERIMENT = REPO_ROOT / "experiments" / "flickr8k_show_attend_tell.yaml"

WORDS = "dog cat man woman child ball grass water red blue runs jumps sits on in the a".split()


def write_image(path: Path, seed: int, size: tuple[int, int] = (64, 48)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=90)


def caption(rng: np.random.Generator) -> str:
    return "A " + " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))) + " ."


def write_flickr8k(folder: Path, sizes: tuple[int, int, int] = (8, 3, 3), images: bool = True) -> Path:
    """A Flickr8k stand-in in the official format: token file, three split lists, JPEGs. Returns the token file."""
    rng = np.random.default_rng(0)
    text = folder / "text"
    text.mkdir(parents=True, exist_ok=True)
    lines, k = [], 0
    for split_file, n in zip(("trainImages", "devImages", "testImages"), sizes, strict=True):
        names = [f"{1000 + k + i}_{i:04x}.jpg" for i in range(n)]
        k += n
        (text / f"Flickr_8k.{split_file}.txt").write_text("\n".join(names) + "\n")
        for i, name in enumerate(names):
            lines += [f"{name}#{j}\t{caption(rng)}" for j in range(5)]
            if images:
                write_image(folder / "images" / name, seed=k + i)
    token = text / "Flickr8k.token.txt"
    token.write_text("\n".join(lines) + "\n")
    return token


@pytest.fixture
def notes():
    """The `capattn: …` notes prepare logs, as a list of strings."""
    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger("capattn")  # prepare's and the feature cache's notes
    logger.addHandler(handler)
    old = logger.level
    logger.setLevel(logging.INFO)
    yield lines
    logger.removeHandler(handler)
    logger.setLevel(old)


def test_prepare_writes_vocab_from_train_only_arrow_splits_and_manifest(tmp_path):
    token = write_flickr8k(tmp_path / "f8k")
    reader = Flickr8kReader(captions=token, image_dir=tmp_path / "f8k" / "images")
    folder = prepare(reader, prepared_dir=tmp_path / "prepared")
    data = PreparedData(folder)
    records = reader.read()
    from capattn.vocab import tokenize

    train_words = {w for r in records if r.split == "train" for c in r.captions for w in tokenize(c)}
    assert set(data.vocab.itos[4:]) == train_words
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"] == {
        "train": {"images": 8, "captions": 40},
        "val": {"images": 3, "captions": 15},
        "test": {"images": 3, "captions": 15},
    }
    assert {Path(s["path"]).name for s in manifest["sources"]} == {
        "Flickr8k.token.txt",
        "Flickr_8k.trainImages.txt",
        "Flickr_8k.devImages.txt",
        "Flickr_8k.testImages.txt",
    }
    assert all(s["size"] > 0 and s["mtime_ns"] > 0 for s in manifest["sources"])
    assert manifest["vocab"]["size"] == len(data.vocab)
    val = data.split("val")
    first = records[8]
    assert val.images[0]["image_id"] == first.image_id and val.images[0]["references"] == list(first.captions)
    words = [w if w in data.vocab.stoi else "<unk>" for w in tokenize(first.captions[0])]
    assert data.vocab.decode(val.captions[0]["tokens"]) == " ".join(words)
    assert val.lengths.tolist() == [len(t) for t in val.captions["tokens"]]


def test_second_run_does_nothing_and_changed_inputs_or_settings_rebuild(tmp_path, notes):
    token = write_flickr8k(tmp_path / "f8k")
    reader = Flickr8kReader(captions=token, image_dir=tmp_path / "f8k" / "images")
    folder = prepare(reader, prepared_dir=tmp_path / "p")
    stamp = (folder / "manifest.json").stat().st_mtime_ns
    assert prepare(reader, prepared_dir=tmp_path / "p") == folder
    assert (folder / "manifest.json").stat().st_mtime_ns == stamp
    assert any("up to date" in line for line in notes)

    # Changed settings: not up to date, and by default a folder of their own.
    two = PrepareSettings(min_word_count=25)
    assert is_up_to_date(folder, reader, two) == (False, "the reader or settings changed")
    assert prepare_module.default_prepared_dir(reader, two) != prepare_module.default_prepared_dir(
        reader, PrepareSettings()
    )
    before = len(PreparedData(folder).vocab)
    prepare(reader, settings=two, prepared_dir=tmp_path / "p")
    assert len(PreparedData(folder).vocab) < before
    assert json.loads((folder / "manifest.json").read_text())["identity"]["settings"]["min_word_count"] == 25

    # A changed annotation file rebuilds: a new word appears in the vocabulary.
    first_train = (token.parent / "Flickr_8k.trainImages.txt").read_text().split()[0]
    with token.open("a") as f:
        f.write(f"{first_train}#5\tA zebra .\n")
    os.utime(token, ns=(stamp + 10**9, stamp + 10**9))
    assert is_up_to_date(folder, reader, two) == (False, "a source file changed")
    prepare(reader, settings=two, prepared_dir=tmp_path / "p")
    assert "zebra" not in PreparedData(folder).vocab.stoi  # min count 25: seen once
    prepare(reader, prepared_dir=tmp_path / "p")
    assert "zebra" in PreparedData(folder).vocab.stoi


def test_interrupted_prepare_leaves_nothing_a_later_run_trusts(tmp_path, monkeypatch):
    token = write_flickr8k(tmp_path / "f8k")
    reader = Flickr8kReader(captions=token, image_dir=tmp_path / "f8k" / "images")
    saves = []
    real_save = prepare_module._save

    def interrupted(table, path):
        saves.append(path)
        if len(saves) == 3:  # train written, the user presses Ctrl-C while val is being written
            raise KeyboardInterrupt
        real_save(table, path)

    monkeypatch.setattr(prepare_module, "_save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare(reader, prepared_dir=tmp_path / "p")
    assert not (tmp_path / "p").exists()
    assert not list(tmp_path.glob(".p.tmp-*"))  # the partial folder is gone too
    assert is_up_to_date(tmp_path / "p", reader, PrepareSettings())[0] is False

    # A process killed outright leaves its temporary folder: the next run removes it and builds.
    monkeypatch.setattr(prepare_module, "_save", real_save)
    leftover = tmp_path / ".p.tmp-999999999-deadbeef"
    (leftover / "images").mkdir(parents=True)
    folder = prepare(reader, prepared_dir=tmp_path / "p")
    assert not leftover.exists()
    assert PreparedData(folder).split("train").num_images == 8


def test_missing_images_error_names_the_file_or_skip_drops_and_counts(tmp_path, notes):
    token = write_flickr8k(tmp_path / "f8k")
    images = tmp_path / "f8k" / "images"
    gone = sorted(images.glob("*.jpg"))[-2:]  # two test images
    for path in gone:
        path.unlink()
    reader = Flickr8kReader(captions=token, image_dir=images)
    with pytest.raises(DataError, match=rf"{gone[0].name} .*missing — .*data.missing_images=skip") as err:
        prepare(reader, prepared_dir=tmp_path / "p")
    assert "\n" not in str(err.value)
    folder = prepare(reader, settings=PrepareSettings(missing_images="skip"), prepared_dir=tmp_path / "p")
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["splits"]["test"]["images"] == 1 and manifest["skipped_images"]["count"] == 2
    assert any("kept 12 images, skipped 2" in line for line in notes)


@pytest.mark.parametrize(
    ("records", "message"),
    [
        ([CaptionRecord("7", None, ("a dog", " ,. !"), "train")], r"image 7 has a caption that is empty after token"),
        (
            [CaptionRecord("7", None, ("a dog",), "train"), CaptionRecord("7", None, ("a cat",), "test")],
            r"image 7 is listed twice \(train and test\)",
        ),
        ([CaptionRecord("7", None, ("a dog",), "dev")], r"image 7 has unknown split 'dev'"),
        ([CaptionRecord("7", None, ("a dog",), "val")], r"no training images"),
    ],
    ids=["empty-caption", "two-splits", "unknown-split", "no-train"],
)
def test_bad_records_are_one_line_errors_naming_the_image(records, message, tmp_path):
    with pytest.raises(DataError, match=message) as err:
        prepare(ListReader(records), prepared_dir=tmp_path / "p")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "p").exists()


def test_empty_caption_in_a_real_token_file_names_the_file(tmp_path):
    token = write_flickr8k(tmp_path / "f8k")
    lines = token.read_text().splitlines()
    key = lines[3].split("\t")[0]
    lines[3] = f"{key}\t!!! ..."
    token.write_text("\n".join(lines) + "\n")
    reader = Flickr8kReader(captions=token, image_dir=tmp_path / "f8k" / "images")
    image_id = key.split(".jpg")[0]
    with pytest.raises(DataError, match=rf"Flickr8k.token.txt: image {image_id} has a caption that is empty"):
        prepare(reader, prepared_dir=tmp_path / "p")


def _run(*args: str) -> int:
    try:
        return main(list(args))
    except SystemExit as done:
        return int(done.code or 0)


def test_cli_missing_annotation_file_and_unknown_key_fail_in_one_line(tmp_path, capsys):
    code = _run(
        "prepare",
        "--config",
        str(EXPERIMENT),
        f"--data.reader.init_args.captions={tmp_path}/nope/Flickr8k.token.txt",
        f"--data.prepared_dir={tmp_path}/p",
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("capattn: error:") and "Flickr8k.token.txt" in err[-1]
    assert _run("prepare", "--config", str(EXPERIMENT), "--data.no_such_option=1") != 0
    assert "no_such_option" in capsys.readouterr().err


def test_prepare_keeps_the_116_real_flickr8k_jpegs_and_reports_the_missing(shared_data, tmp_path, notes):
    """The acceptance's first command: the real token file, 116 real JPEGs, the other 7,884 missing."""
    f8k = shared_data / "flickr8k"
    args = [
        "prepare",
        "--config",
        str(EXPERIMENT),
        f"--data.reader.init_args.captions={f8k}/text/Flickr8k.token.txt",
        f"--data.reader.init_args.image_dir={f8k}/images",
        "--data.missing_images=skip",
        f"--data.prepared_dir={tmp_path}/f8k",
    ]
    assert main(args) == 0
    manifest = json.loads((tmp_path / "f8k" / "manifest.json").read_text())
    assert {s: n["images"] for s, n in manifest["splits"].items()} == {"train": 95, "val": 15, "test": 6}
    assert manifest["skipped_images"]["count"] == 7884
    assert any("kept 116 images, skipped 7,884" in line for line in notes)
    notes.clear()
    assert main(args) == 0
    assert any("up to date" in line for line in notes) and not any("kept" in line for line in notes)


@pytest.mark.slow
def test_prepare_then_fit_on_the_real_flickr8k_jpegs(shared_data, tmp_path, monkeypatch, notes):
    """The real token file and the 116 real JPEGs (the rest missing, skipped): prepare with a feature
    cache, then `capattn fit` on the images and on the cache, both reusing what prepare wrote."""
    import torch

    from capattn.models.encoder import ImageEncoder

    monkeypatch.chdir(tmp_path)
    f8k = shared_data / "flickr8k"
    # A weights file, as a user without internet would pass: prepare's and fit's encoders are then
    # equal, and fit must find prepare's cache (random weights would differ, and rightly miss it).
    torch.save(ImageEncoder(backbone="resnet18").trunk.state_dict(), tmp_path / "resnet18.pt")
    common = [
        "--config",
        str(EXPERIMENT),
        f"--data.reader.init_args.captions={f8k}/text/Flickr8k.token.txt",
        f"--data.reader.init_args.image_dir={f8k}/images",
        "--data.missing_images=skip",
        "--data.prepared_dir=prepared/f8k",
        "--data.image_size=64",
        "--data.batch_size=8",
        "--data.num_workers=0",
        f"--model.encoder.init_args.weights={tmp_path}/resnet18.pt",
        "--model.encoder.init_args.backbone=resnet18",
    ]
    assert main(["prepare", *common, "--data.features=cache"]) == 0
    manifest = json.loads(Path("prepared/f8k/manifest.json").read_text())
    assert {s: n["images"] for s, n in manifest["splits"].items()} == {"train": 95, "val": 15, "test": 6}
    assert manifest["skipped_images"]["count"] == 7884
    assert any("kept 116 images, skipped 7,884" in line for line in notes)
    (cache,) = Path("prepared/features").iterdir()
    assert np.load(cache / "train.grid.npy", mmap_mode="r").shape == (95, 196, 512)  # resnet18, pooled to 14×14
    stamp = Path("prepared/f8k/manifest.json").stat().st_mtime_ns
    fit = [
        "fit",
        *common,
        "--model.decoder.init_args.feature_dim=512",
        "--model.decoder.init_args.embed_dim=32",
        "--model.decoder.init_args.hidden_dim=32",
        "--model.decoder.init_args.attention_dim=32",
        "--model.val_scorers=[bleu,cider]",
        "--model.test_scorers=[bleu,cider]",
        "--model.tokenizer=simple",
        "--trainer.fast_dev_run=1",
    ]
    assert main(fit) == 0
    notes.clear()
    assert main([*fit, "--data.features=cache"]) == 0
    assert any(f"feature cache {cache} is up to date" in line for line in notes)
    assert not any("building the feature cache" in line for line in notes)
    assert Path("prepared/f8k/manifest.json").stat().st_mtime_ns == stamp  # fit reused the prepared data
