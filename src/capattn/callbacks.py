"""Lightning callbacks that write what a run produced (caption files, attention figures, the best metrics)
and one that logs how fast it trains.

Under DDP every rank decodes its share of the images; these callbacks gather the shares so that each file
and figure covers every image exactly once, the same as on one device, and only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter

from capattn.io import coco_image_id, write_json_atomic
from capattn.viz import caption_figure
from capattn.vocab import words_of

log = logging.getLogger("capattn.callbacks")


def gather_objects(trainer: L.Trainer, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (a one-element list without DDP). Every rank must call it."""
    if trainer.world_size == 1 or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    gathered: list[Any] = [None] * trainer.world_size
    torch.distributed.all_gather_object(gathered, obj)
    return gathered


def _output_dir(trainer: L.Trainer, pl_module: L.LightningModule) -> Path:
    """The module's output folder (the run folder), else the trainer's log folder."""
    try:
        return Path(pl_module.output_dir)
    except (AttributeError, RuntimeError):
        return Path(trainer.log_dir or trainer.default_root_dir)


class CaptionWriter(BasePredictionWriter):
    """Writes ``capattn predict``'s captions as COCO results JSON (``[{"image_id", "caption"}]``).

    Under DDP the ranks' captions are gathered into the one file, in the order of the input, each image
    once (``DistributedSampler`` pads the last round with repeated images); rank 0 writes it.

    Args:
        filename: file name inside the model's output folder.
    """

    def __init__(self, *, filename: str = "predictions.json") -> None:
        super().__init__(write_interval="epoch")
        self.filename = filename

    def write_on_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, predictions, batch_indices) -> None:
        # (dataset index, row) pairs; Lightning records the indices of every predict batch it samples.
        local = []
        for b, batch in enumerate(predictions):
            indices = batch_indices[b] if b < len(batch_indices) else [None] * len(batch)
            for i, p in enumerate(batch):
                index = indices[i] if i < len(indices) else None
                local.append((index, {"image_id": coco_image_id(p["image_id"]), "caption": p["caption"]}))
        shares = gather_objects(trainer, local)
        if not trainer.is_global_zero:
            return
        rows = _merge_in_input_order(shares)
        path = write_json_atomic(_output_dir(trainer, pl_module) / self.filename, rows)
        print(f"capattn: wrote {len(rows)} captions to {path}")


def _merge_in_input_order(shares: list[list[tuple[int | None, dict]]]) -> list[dict]:
    """The ranks' (index, row) lists → rows in input order, each input once."""
    if all(index is not None for share in shares for index, _ in share):
        by_index: dict[int, dict] = {}
        for share in shares:
            for index, row in share:
                by_index.setdefault(index, row)  # a padded repeat carries the same image again
        return [by_index[i] for i in sorted(by_index)]
    # Without indices: DistributedSampler deals the inputs round-robin, so interleaving restores the order.
    rows, seen = [], set()
    for j in range(max((len(s) for s in shares), default=0)):
        for share in shares:
            if j < len(share) and share[j][1]["image_id"] not in seen:
                seen.add(share[j][1]["image_id"])
                rows.append(share[j][1])
    return rows


def _id_order(image_id: str) -> tuple[int, int | str]:
    return (0, int(image_id)) if image_id.isdigit() else (1, image_id)


class AttentionFigures(L.Callback):
    """After test, writes one PNG per test image: caption and per-word attention, for ``num_images`` images.

    The images drawn are the test images with the smallest ids, so runs (and runs on any number of
    devices) draw the same images. Models without attention get the image with its caption and
    references, so runs compare side by side. Only rank 0 draws.

    Args:
        num_images: how many test images to draw.
        folder: sub-folder of the model's output folder.
    """

    def __init__(self, *, num_images: int = 4, folder: str = "attention") -> None:
        self.num_images = num_images
        self.folder = folder
        self._candidates: dict[str, dict[str, Any]] = {}

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._candidates = {}

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if self.num_images <= 0 or batch.images is None:
            return
        vocab = pl_module.vocab
        for i, image_id in enumerate(outputs["image_ids"]):
            if image_id in self._candidates:
                continue
            self._candidates[image_id] = {
                "image": batch.images[i].detach().cpu(),
                "words": words_of(outputs["tokens"][i], vocab.itos, eos=vocab.eos, pad=vocab.pad),
                "alphas": None if outputs["alphas"] is None else outputs["alphas"][i].detach().cpu(),
                "references": list(batch.references[i][:3]),
            }
            # Keep only the smallest ids seen so far: memory stays at num_images figures per rank.
            if len(self._candidates) > self.num_images:
                del self._candidates[max(self._candidates, key=_id_order)]

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.num_images <= 0:
            return
        shares = gather_objects(trainer, self._candidates)
        self._candidates = {}
        if not trainer.is_global_zero:
            return
        merged: dict[str, dict[str, Any]] = {}
        for share in shares:
            for image_id, item in share.items():
                merged.setdefault(image_id, item)
        out = _output_dir(trainer, pl_module) / self.folder
        for image_id in sorted(merged, key=_id_order)[: self.num_images]:
            item = merged[image_id]
            caption_figure(
                item["image"],
                item["words"],
                item["alphas"],
                out / f"{image_id}.png",
                title=type(pl_module.decoder).__name__,
                references=item["references"],
            )


class BestMetrics(L.Callback):
    """Keeps the metrics of the best validation so far: ``best_metrics.json`` in the run folder, wandb's summary.

    "Best" is judged as the ``ModelCheckpoint`` that picks the best checkpoint judges it (its ``monitor``
    and ``mode``, unless given here), so the file describes the checkpoint ``--ckpt_path best`` loads.
    Every ``WandbLogger`` of the run gets the same numbers as ``best/<metric>`` keys of its run summary.
    The file is rewritten at every new best, so a run that is killed keeps it; it survives resuming.

    Args:
        monitor: metric to judge by (default: the first ``ModelCheckpoint``'s).
        mode: ``"max"`` or ``"min"`` (default: that checkpoint callback's).
        filename: file name inside the run folder.
    """

    def __init__(
        self,
        *,
        monitor: str | None = None,
        mode: Literal["max", "min"] | None = None,
        filename: str = "best_metrics.json",
    ) -> None:
        self.monitor = monitor
        self.mode = mode
        self.filename = filename
        self.best: dict[str, Any] | None = None

    def _criterion(self, trainer: L.Trainer) -> tuple[str | None, str]:
        checkpoint = trainer.checkpoint_callback
        monitor = self.monitor or getattr(checkpoint, "monitor", None)
        mode = self.mode or getattr(checkpoint, "mode", None) or "min"
        return monitor, mode

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        monitor, mode = self._criterion(trainer)
        if monitor is None or monitor not in trainer.callback_metrics:
            return
        score = float(trainer.callback_metrics[monitor])
        if not math.isfinite(score):
            return
        if self.best is not None:
            better = score > self.best["score"] if mode == "max" else score < self.best["score"]
            if not better:
                return
        metrics = {
            name: float(value)
            for name, value in trainer.callback_metrics.items()
            if name.startswith("val/") and torch.as_tensor(value).numel() == 1
        }
        self.best = {
            "monitor": monitor,
            "mode": mode,
            "score": score,
            "epoch": trainer.current_epoch,
            "step": trainer.global_step,
            "metrics": metrics,
        }
        self._publish(trainer, pl_module)

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.best is None:
            return
        path = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
        self.best["checkpoint"] = path
        self._publish(trainer, pl_module)

    def _publish(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero or self.best is None:
            return
        write_json_atomic(_output_dir(trainer, pl_module) / self.filename, self.best)
        from lightning.pytorch.loggers import WandbLogger

        summary = {f"best/{k}": v for k, v in self.best["metrics"].items()}
        summary.update({"best/epoch": self.best["epoch"], "best/step": self.best["step"]})
        if self.best.get("checkpoint"):
            summary["best/checkpoint"] = self.best["checkpoint"]
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.experiment.summary.update(summary)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")


class TrainingSpeed(L.Callback):
    """Logs how fast a run trains, while it trains: captions and words per second, minutes per epoch.

    At each of the trainer's logging steps (``trainer.log_every_n_steps``) it logs, over the steps
    since the last one (or since the epoch began):

    * ``speed/captions_per_s``: training captions per second, all devices together;
    * ``speed/words_per_s``: predicted words per second (each caption's words and its ``<eos>``);
    * ``speed/epoch_minutes``: the minutes an epoch takes at that rate.

    After each validation inside a fit it logs ``speed/validation_minutes``: how long that validation
    took, decoding and scoring included (validation's hooks and the metrics' logging; not the
    checkpoint saved after it).

    Wall time counts everything a training epoch waits for (loading batches, moving them to the device,
    logging, saving checkpoints) except validation, which is left out. On a GPU the clock is read after
    the device has finished its queued work, at the logging steps only, so the steps between run as
    they would without this callback.

    Written here rather than taken from Lightning's ``ThroughputMonitor``, which assumes that every
    device sees as many samples as rank 0 (with ``data.group_captions`` batches hold different numbers
    of captions), waits for the GPU after every batch, and logs validation's speed at validation
    batch numbers in place of training steps.
    """

    def __init__(self) -> None:
        self._start = 0.0  # when the current interval began
        self._validation_start: float | None = None
        self._paused = 0.0  # seconds of validation inside the interval
        self._batches = 0
        self._counts: torch.Tensor | None = None  # (captions, words) of the interval, on the model's device

    def _restart(self, pl_module: L.LightningModule) -> None:
        self._start, self._paused, self._batches = time.perf_counter(), 0.0, 0
        self._counts = torch.zeros(2, dtype=torch.long, device=pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # (a run resumed in the middle of an epoch gets no on_train_epoch_start for that epoch)
        self._restart(pl_module)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restart(pl_module)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit":  # validation inside a fit
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._validation_start is None:
            return
        seconds = time.perf_counter() - self._validation_start
        self._paused += seconds
        self._validation_start = None
        if not trainer.sanity_checking:
            # Through Lightning's logger connector, as its own ThroughputMonitor logs (self.log is closed by
            # this hook): the epoch and step that the validation's metrics were logged with.
            trainer._logger_connector.log_metrics({"speed/validation_minutes": seconds / 60})

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # A caption of length n (<bos> and <eos> counted) predicts n − 1 words. Summed on the device, so
        # that no batch waits for the sum.
        self._counts[0] += len(batch)
        self._counts[1] += (batch.lengths - 1).sum()
        self._batches += 1
        # Lightning's own tests for "this batch's metrics go to the loggers" (as its ThroughputMonitor reads them)
        if trainer.fit_loop._should_accumulate() or not trainer._logger_connector.should_update_logs:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        seconds = time.perf_counter() - self._start - self._paused
        captions, words = trainer.strategy.reduce(self._counts, reduce_op="sum").tolist()  # all devices
        if seconds > 0:
            metrics = {"speed/captions_per_s": captions / seconds, "speed/words_per_s": words / seconds}
            epoch = trainer.num_training_batches
            if math.isfinite(epoch) and self._batches:
                metrics["speed/epoch_minutes"] = epoch * seconds / self._batches / 60
            pl_module.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self._restart(pl_module)
