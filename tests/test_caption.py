"""`capattn caption` on real Flickr8k JPEGs with checkpoints trained here: captions, attention figures, bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from capattn.caption import Captioner, caption_images
from capattn.cli import main

from .conftest import REPO_ROOT

TINY = [
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=4",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--model.val_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--model.max_len=6",  # untrained models ramble; short captions keep the figures quick
    "--trainer.max_epochs=1",
    "--trainer.limit_train_batches=2",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
]
IMAGES = ["1000268201_693b08cb0e.jpg", "1001773457_577c3a7d70.jpg", "1002674143_1b742ab4b8.jpg"]


def _fit(name: str, root: Path, *extra: str) -> Path:
    main(["fit", "--config", str(REPO_ROOT / "experiments" / f"demo_{name}.yaml"), *TINY, *extra])
    (ckpt,) = (root / "runs" / name).rglob("last.ckpt")
    return ckpt


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny Show, Attend and Tell (trained at image_size 40) and Show and Tell checkpoints."""
    root = tmp_path_factory.mktemp("fits")
    cwd = Path.cwd()
    os.chdir(root)  # anything a fit writes beside its run folder lands here too
    try:
        save_dir = f"--trainer.logger.init_args.save_dir={root / 'runs'}"
        return {
            "attend": _fit("show_attend_tell", root, save_dir, "--data.image_size=40"),
            "tell": _fit("show_tell", root, save_dir),
        }
    finally:
        os.chdir(cwd)


@pytest.fixture
def photos(shared_data: Path, tmp_path: Path) -> Path:
    """A folder with three real Flickr8k JPEGs (links) and one file that is no image."""
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in IMAGES:
        (folder / name).symlink_to(shared_data / "flickr8k" / "images" / name)
    (folder / "notes.jpg").write_text("not a picture")
    return folder


def test_captions_and_one_attention_figure_per_image(checkpoints, photos, tmp_path, capsys, caplog):
    out = tmp_path / "figures"
    assert main(["caption", str(photos), "--ckpt", str(checkpoints["attend"]), "--attention", str(out), "--json"]) == 0
    captured = capsys.readouterr()
    rows = json.loads(captured.out)
    assert [Path(r["image"]).name for r in rows] == IMAGES  # sorted, the unreadable one left out
    vocab = set(Captioner(checkpoint=checkpoints["attend"]).vocab.itos)
    for row in rows:
        assert row["caption"] and set(row["caption"].split()) <= vocab
        figure = Path(row["attention"])
        assert figure.parent == out and figure.stem == Path(row["image"]).stem
        with Image.open(figure) as png:  # the image panel and one panel per word, side by side
            assert png.format == "PNG" and png.width > 2 * png.height / 3
    assert sorted(p.name for p in out.iterdir()) == [n.replace(".jpg", ".png") for n in IMAGES]
    assert "cannot read image" in caplog.text and "notes.jpg" in caplog.text
    assert "1 of 4 images could not be read" in caplog.text


def test_the_checkpoint_alone_gives_vocabulary_and_preprocessing(checkpoints, photos):
    captioner = Captioner(checkpoint=checkpoints["attend"], beam_size=3)
    assert captioner.image_size == 40 and captioner.has_attention
    image = captioner.load(photos / IMAGES[0])
    assert image.shape == (3, 40, 40) and 0.0 <= float(image.min()) and float(image.max()) <= 1.0
    # Batched decoding gives what one image at a time gives.
    files = [photos / name for name in IMAGES]
    together = caption_images(captioner, files, batch_size=3)
    alone = caption_images(captioner, files, batch_size=1)
    assert [c.caption for c in together] == [c.caption for c in alone]
    assert [c.score for c in together] == pytest.approx([c.score for c in alone], abs=1e-4)


def test_captioning_starts_without_lightning(checkpoints, photos):
    """``capattn caption`` never imports Lightning or matplotlib without figures: of a one-image
    caption's 5.3 s they were 2 s, all of it import time (the model's work is 0.1 s)."""
    script = (
        "import sys\n"
        "from capattn.cli import main\n"
        f"assert main(['caption', {str(photos / IMAGES[0])!r}, '--ckpt', {str(checkpoints['attend'])!r}]) == 0\n"
        "heavy = ('lightning', 'lightning_fabric', 'pytorch_lightning', 'torchmetrics', 'matplotlib')\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & set(heavy)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]", out


def test_a_checkpoint_trained_with_compile_step_captions_without_compiling(checkpoints, photos, tmp_path, monkeypatch):
    """compile_step is a GPU switch; captioning runs on the CPU, where compiling the step costs
    minutes. A checkpoint that was trained with it captions as one trained without."""
    saved = torch.load(checkpoints["attend"], map_location="cpu", weights_only=True)
    saved["hyper_parameters"]["decoder"]["init_args"]["compile_step"] = True
    compiled = tmp_path / "trained-with-compile-step.ckpt"
    torch.save(saved, compiled)

    def refuse(*args, **kwargs):
        raise AssertionError("capattn caption compiled the decoding step")

    monkeypatch.setattr(torch, "compile", refuse)
    files = [photos / IMAGES[0]]
    got = caption_images(Captioner(checkpoint=compiled, beam_size=3), files, batch_size=1)
    want = caption_images(Captioner(checkpoint=checkpoints["attend"], beam_size=3), files, batch_size=1)
    assert [c.caption for c in got] == [c.caption for c in want]


def test_show_and_tell_writes_captions_only_and_says_so(checkpoints, photos, tmp_path, capsys, caplog):
    out = tmp_path / "figures"
    files = [str(photos / name) for name in IMAGES[:2]]
    assert main(["caption", *files, "--ckpt", str(checkpoints["tell"]), "--attention", str(out)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == files and all(line.split("\t")[1] for line in lines)
    assert "has no attention (ShowTellDecoder): writing captions only" in caplog.text
    assert not out.exists() or not any(out.iterdir())


def _write_garbage(path: Path) -> None:
    path.write_text("model weights, honest\n")


def _write_truncated(path: Path, source: Path) -> None:
    path.write_bytes(source.read_bytes()[:5000])


def _write_foreign(path: Path) -> None:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "epoch": 3}, path)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p, src: None, "checkpoint not found"),
        (lambda p, src: _write_garbage(p), "is not a PyTorch checkpoint"),
        (_write_truncated, "is truncated"),
        (lambda p, src: _write_foreign(p), "carries no capattn vocabulary"),
    ],
    ids=["missing", "text", "truncated", "foreign"],
)
def test_bad_checkpoint_is_one_clear_line(checkpoints, photos, tmp_path, capsys, make, message):
    ckpt = tmp_path / "model.ckpt"
    make(ckpt, checkpoints["tell"])
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(photos), "--ckpt", str(ckpt)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("capattn: error:") and str(ckpt) in err and message in err, err


def test_no_readable_image_fails_and_a_missing_path_is_named(checkpoints, photos, tmp_path, capsys, caplog):
    with pytest.raises(SystemExit) as exit_:
        main(["caption", str(photos / "notes.jpg"), "--ckpt", str(checkpoints["tell"])])
    assert exit_.value.code == 2
    assert "cannot read image" in caplog.text
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "capattn: error: none of the 1 images could be read — check the files (see the warnings above)"
    )
    with pytest.raises(SystemExit):
        main(["caption", str(tmp_path / "nope.jpg"), "--ckpt", str(checkpoints["tell"])])
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"capattn: error: no such image or folder: {tmp_path / 'nope.jpg'}"]
