"""ValidationSamples through the real `capattn fit`: files in the run folder, or a wandb table (offline)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from capattn.cli import main
from capattn.module import CaptioningModule
from capattn.samples import ValidationSamples

from .conftest import REPO_ROOT

TINY = [
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=8",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=2",
    "--data.num_workers=0",
    "--model.val_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--model.max_len=6",  # untrained models ramble; short captions keep the figures quick
    "--trainer.limit_train_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
]


def _samples(num_images: int) -> str:
    spec = {"class_path": "capattn.samples.ValidationSamples", "init_args": {"num_images": num_images}}
    # Replaces the demo config's callbacks (which hold a ValidationSamples of their own).
    return f"--trainer.callbacks=[{json.dumps(spec)}]"


def test_files_in_the_run_folder_show_the_same_images_every_epoch(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"
    # Three images with batches of two: the fixed images span two validation batches.
    main(
        ["fit", "--config", str(config), *TINY, "--trainer.max_epochs=2", "--trainer.limit_val_batches=2", _samples(3)]
    )
    (run,) = Path("runs").rglob("metrics.csv")
    folder = run.parent / "samples"
    assert sorted(p.name for p in folder.iterdir()) == [
        "epoch00",
        "epoch00.json",
        "epoch00.md",
        "epoch01",
        "epoch01.json",
        "epoch01.md",
    ]
    epochs = [json.loads((folder / f"epoch{e:02d}.json").read_text()) for e in (0, 1)]
    ids = [[s["image_id"] for s in epoch["samples"]] for epoch in epochs]
    assert ids[0] == ids[1] and len(ids[0]) == 3 and len(set(ids[0])) == 3
    for epoch in epochs:
        for sample in epoch["samples"]:
            assert sample["caption"] and len(sample["references"]) == 3
            with Image.open(folder / sample["figure"]) as png:  # image + one attention panel per word
                assert png.format == "PNG" and png.width > png.height
    markdown = (folder / "epoch01.md").read_text()
    assert markdown.count("- **generated:** ") == 3 and f"![{ids[0][0]}](epoch01/{ids[0][0]}.png)" in markdown


def test_samples_are_decoded_in_the_precision_validation_scored(tmp_path, monkeypatch):
    """Lightning runs callbacks outside its autocast. Under bf16-mixed the samples were decoded in
    fp32, so they could differ from the captions validation scored (and a compiled decoder step was
    traced again for the other autocast state). Now both decode under the trainer's precision."""
    monkeypatch.chdir(tmp_path)
    autocast_at_decode = []
    decode = CaptioningModule.decode

    def recording_decode(self, enc):
        autocast_at_decode.append(torch.is_autocast_enabled(enc.grid.device.type))
        return decode(self, enc)

    monkeypatch.setattr(CaptioningModule, "decode", recording_decode)
    config = REPO_ROOT / "experiments" / "demo_show_attend_tell.yaml"
    main(
        ["fit", "--config", str(config), *TINY, "--trainer.max_epochs=1", "--trainer.limit_val_batches=1"]
        + ["--trainer.precision=bf16-mixed", _samples(1)]
    )
    assert autocast_at_decode == [True, True]  # the validation step's batch, then the sample's image


def test_wandb_offline_run_holds_the_samples_table(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DATA_DIR", str(tmp_path / "wandb-data"))  # offline artifacts are staged here
    config = REPO_ROOT / "experiments" / "demo_show_tell.yaml"
    main(
        [
            "fit",
            "--config",
            str(config),
            *TINY,
            "--trainer.max_epochs=1",
            "--trainer.limit_val_batches=1",
            "--trainer.logger=lightning.pytorch.loggers.WandbLogger",
            "--trainer.logger.init_args.offline=true",
            "--trainer.logger.init_args.save_dir=runs/wandb",
            "--trainer.logger.init_args.project=capattn-tests",
            _samples(2),
        ]
    )
    (table,) = Path("runs/wandb/wandb").glob("offline-run-*/files/media/table/val/samples_*.table.json")
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["epoch", "image_id", "figure", "generated", "references"]
    assert len(logged["data"]) == 2 and all(row[3] for row in logged["data"])
    # The figures themselves are wandb.Images: their PNGs are staged with the table for upload.
    staged = [p for p in (tmp_path / "wandb-data").rglob("*") if p.is_file() and p.read_bytes()[:4] == b"\x89PNG"]
    assert len(staged) == 2
    # No image files in the run folder: wandb holds them.
    assert not list(Path("runs/wandb").rglob("samples/epoch00"))


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="num_images and every_n_epochs must be ≥ 1"):
        ValidationSamples(num_images=0)
