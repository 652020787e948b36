"""Lightning callbacks that write what a run produced: caption files and attention figures."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import BasePredictionWriter

from capattn.io import coco_image_id, write_json_atomic
from capattn.viz import caption_figure, words_of


class CaptionWriter(BasePredictionWriter):
    """Writes ``capattn predict``'s captions as COCO results JSON (``[{"image_id", "caption"}]``).

    Args:
        filename: file name inside the model's output folder.
    """

    def __init__(self, *, filename: str = "predictions.json") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        rows = [
            {"image_id": coco_image_id(p["image_id"]), "caption": p["caption"]} for batch in predictions for p in batch
        ]
        # Each rank writes its own shard under DDP; rank 0 alone writes the plain file name.
        name = self.filename if trainer.world_size == 1 else f"rank{trainer.global_rank}-{self.filename}"
        path = write_json_atomic(Path(pl_module.output_dir) / name, rows)
        print(f"capattn: wrote {len(rows)} captions to {path}")


class AttentionFigures(L.Callback):
    """After test, writes one PNG per test image (the first ``num_images``): caption and per-word attention.

    Models without attention get the image with its caption and references, so runs compare side by side.

    Args:
        num_images: how many test images to draw.
        folder: sub-folder of the model's output folder.
    """

    def __init__(self, *, num_images: int = 4, folder: str = "attention") -> None:
        self.num_images = num_images
        self.folder = folder
        self._drawn = 0

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._drawn = 0

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if not trainer.is_global_zero or self._drawn >= self.num_images or batch.images is None:
            return
        vocab = pl_module.vocab
        for i in range(min(len(batch), self.num_images - self._drawn)):
            words = words_of(outputs["tokens"][i], vocab.itos, eos=vocab.eos, pad=vocab.pad)
            alphas = None if outputs["alphas"] is None else outputs["alphas"][i]
            path = Path(pl_module.output_dir) / self.folder / f"{outputs['image_ids'][i]}.png"
            caption_figure(
                batch.images[i],
                words,
                alphas,
                path,
                title=type(pl_module.decoder).__name__,
                references=batch.references[i][:3],
            )
            self._drawn += 1
