"""``ValidationSamples``: a few fixed validation images, their generated and reference captions, every epoch.

What a person looks at while a run trains: the same images each epoch, so the captions (and, for
models that attend, where they look) can be seen improving. With the wandb logger they go to a
``wandb.Table`` of ``wandb.Image`` figures; with any other logger to image files and a JSON and
Markdown list of captions in the run folder.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import lightning as L
import torch

from capattn.io import write_json_atomic
from capattn.models.encoder import EncoderOutput
from capattn.viz import caption_figure
from capattn.vocab import words_of


class ValidationSamples(L.Callback):
    """Logs ``num_images`` fixed validation images with generated and reference captions after each validation.

    The images are the first ``num_images`` the validation loader yields on rank 0 (it is not shuffled,
    so they stay the same every epoch). They are decoded again with the model's own beam search, in
    the validation step's precision (so under bf16-mixed too they get the captions validation
    scored); the validation metrics are untouched. Nothing happens in the sanity check or on other ranks.

    With a ``WandbLogger`` a table ``val/samples`` (epoch, image id, figure, generated caption,
    references) is logged; otherwise ``<run folder>/samples/epochNN/<image id>.png`` and
    ``samples/epochNN.json`` and ``.md`` are written.

    Args:
        num_images: how many validation images to follow.
        every_n_epochs: log every n-th validation epoch.
        folder: sub-folder of the run folder for files (loggers other than wandb).
        references: reference captions shown per image.
    """

    def __init__(
        self, *, num_images: int = 4, every_n_epochs: int = 1, folder: str = "samples", references: int = 3
    ) -> None:
        if num_images < 1 or every_n_epochs < 1:
            raise ValueError(
                f"ValidationSamples: num_images and every_n_epochs must be ≥ 1, got {num_images} and {every_n_epochs}"
            )
        self.num_images = num_images
        self.every_n_epochs = every_n_epochs
        self.folder = folder
        self.references = references
        self.image_ids: list[str] = []  # chosen at the first validation, then fixed
        self._samples: list[dict[str, Any]] = []

    def _active(self, trainer: L.Trainer) -> bool:
        return (
            trainer.is_global_zero
            and not trainer.sanity_checking
            and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._samples = []

    def on_validation_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if not self._active(trainer) or _all_drawn(self._samples, self.image_ids, self.num_images):
            return
        rows = self._rows_of_interest(batch.image_ids)
        if not rows:
            return
        index = torch.tensor(rows, device=batch.tokens.device)
        # In the validation step's precision (Lightning runs callbacks outside its autocast): the
        # captions shown are the ones validation scored, and a compiled decoder step is not traced
        # again for another autocast state.
        with torch.no_grad(), trainer.precision_plugin.forward_context():
            if batch.features is not None:
                enc = EncoderOutput(grid=batch.features.grid[index], pooled=batch.features.pooled[index])
            else:
                enc = pl_module.encoder(batch.images[index])
            best = pl_module.decode(enc).best()
        vocab = pl_module.vocab
        for k, row in enumerate(rows):
            tokens = best.tokens[k, 0]  # (T,)
            self._samples.append(
                {
                    "image_id": batch.image_ids[row],
                    "caption": vocab.decode(tokens.tolist()),
                    "words": words_of(tokens, vocab.itos, eos=vocab.eos, pad=vocab.pad),
                    "alphas": None if best.alphas is None else best.alphas[k, 0].detach().cpu(),  # (T, L)
                    "image": None if batch.images is None else batch.images[row].detach().cpu(),  # (3, H, W)
                    "references": list(batch.references[row][: self.references]),
                }
            )

    def _rows_of_interest(self, image_ids: list[str]) -> list[int]:
        """Rows of this batch to draw: the fixed images, or (first epoch) the first ones seen."""
        taken = {sample["image_id"] for sample in self._samples}
        rows = []
        for row, image_id in enumerate(image_ids):
            if image_id in taken:
                continue
            fixed = image_id in self.image_ids
            choosing = len(self.image_ids) < self.num_images and image_id not in self.image_ids
            if fixed or choosing:
                if choosing:
                    self.image_ids.append(image_id)
                rows.append(row)
                taken.add(image_id)
        return rows

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._active(trainer) or not self._samples:
            return
        order = {image_id: n for n, image_id in enumerate(self.image_ids)}
        samples = sorted(self._samples, key=lambda s: order.get(s["image_id"], len(order)))
        wandb_logger = _wandb_logger(trainer)
        if wandb_logger is not None:
            self._log_to_wandb(wandb_logger, trainer, pl_module, samples)
        else:
            self._write_files(trainer, pl_module, samples)
        self._samples = []

    def _figure(self, pl_module: L.LightningModule, sample: dict[str, Any], path: Path, epoch: int) -> Path | None:
        if sample["image"] is None:  # cached features: there is no picture to draw on
            return None
        return caption_figure(
            sample["image"],
            sample["words"],
            sample["alphas"],
            path,
            title=f"{type(pl_module.decoder).__name__}, epoch {epoch}",
            references=sample["references"],
        )

    def _write_files(self, trainer: L.Trainer, pl_module: L.LightningModule, samples: list[dict[str, Any]]) -> None:
        epoch = trainer.current_epoch
        folder = Path(pl_module.output_dir) / self.folder
        rows = []
        for sample in samples:
            figure = self._figure(pl_module, sample, folder / f"epoch{epoch:02d}" / f"{sample['image_id']}.png", epoch)
            rows.append(
                {
                    "image_id": sample["image_id"],
                    "caption": sample["caption"],
                    "references": sample["references"],
                    "figure": None if figure is None else str(figure.relative_to(folder)),
                }
            )
        write_json_atomic(
            folder / f"epoch{epoch:02d}.json", {"epoch": epoch, "step": trainer.global_step, "samples": rows}
        )
        lines = [f"# Validation samples, epoch {epoch} (step {trainer.global_step})", ""]
        for row in rows:
            lines.append(f"## {row['image_id']}")
            if row["figure"]:
                lines.append(f"![{row['image_id']}]({row['figure']})")
            lines.append(f"- **generated:** {row['caption']}")
            lines.extend(f"- reference: {ref}" for ref in row["references"])
            lines.append("")
        (folder / f"epoch{epoch:02d}.md").write_text("\n".join(lines), encoding="utf-8")

    def _log_to_wandb(
        self, logger: Any, trainer: L.Trainer, pl_module: L.LightningModule, samples: list[dict[str, Any]]
    ) -> None:
        import wandb

        epoch = trainer.current_epoch
        with tempfile.TemporaryDirectory() as tmp:
            data = []
            for sample in samples:
                figure = self._figure(pl_module, sample, Path(tmp) / f"{sample['image_id']}.png", epoch)
                image = None if figure is None else wandb.Image(str(figure), caption=sample["caption"])
                data.append([epoch, sample["image_id"], image, sample["caption"], json.dumps(sample["references"])])
            columns = ["epoch", "image_id", "figure", "generated", "references"]
            # The media files are copied into the run when logged, before the temporary folder goes.
            logger.log_table("val/samples", columns=columns, data=data, step=trainer.global_step)


def _all_drawn(samples: list[dict[str, Any]], image_ids: list[str], num_images: int) -> bool:
    """Whether every fixed image of this epoch has been drawn already (the rest of the loader is skipped)."""
    return len(image_ids) >= num_images and len(samples) >= len(image_ids)


def _wandb_logger(trainer: L.Trainer) -> Any:
    from lightning.pytorch.loggers import WandbLogger

    return next((logger for logger in trainer.loggers if isinstance(logger, WandbLogger)), None)
