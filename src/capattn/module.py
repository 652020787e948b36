"""``CaptioningModule``: training, decoding and scoring for any encoder + decoder pair."""

from __future__ import annotations

import functools
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import GradClipAlgorithmType, rank_zero_warn

from capattn.data.records import CaptionBatch
from capattn.decoding import Captions, beam_search
from capattn.errors import ConfigError, NonFiniteLossError, VocabularyMismatchError
from capattn.io import DATA_KEY, VOCAB_KEY, coco_image_id, run_dir, write_json_atomic
from capattn.metrics import SCORERS, CaptionScorer
from capattn.models.decoders import CaptionDecoder, DecoderOutput
from capattn.models.encoder import EncoderOutput, ImageEncoder
from capattn.models.native import bf16_in_hardware
from capattn.vocab import Vocabulary

_VOCAB_KEY = VOCAB_KEY


@functools.cache
def _takes_image_index(decoder_cls: type[CaptionDecoder]) -> bool:
    """Whether a decoder class's ``forward`` takes ``image_index`` (a decoder of one's own may not)."""
    return "image_index" in inspect.signature(decoder_cls.forward).parameters


_TIME_KEY = "capattn_train_time_s"
_log = logging.getLogger("capattn.module")


def _check_settings(*, beam_size: int, max_len: int, length_alpha: float, label_smoothing: float) -> None:
    """Decoding and loss settings out of range: one line naming the key, before anything runs."""
    if beam_size < 1:
        raise ConfigError(f"model.beam_size must be ≥ 1 (1 = greedy), got {beam_size}")
    if max_len < 1:
        raise ConfigError(f"model.max_len must be ≥ 1 token, got {max_len}")
    if length_alpha < 0:
        raise ConfigError(f"model.length_alpha must be ≥ 0 (0 = no length penalty), got {length_alpha}")
    if not 0 <= label_smoothing < 1:
        raise ConfigError(f"model.label_smoothing must be in [0, 1), got {label_smoothing}")


def with_fused_cpu_kernel(optimizer: torch.optim.Optimizer, *, precision: str) -> torch.optim.Optimizer:
    """Adam/AdamW on CPU parameters with torch's fused CPU kernel, unless the user chose an implementation.

    torch's default on a CPU is a Python loop over parameters, several passes over each: 85 ms of a
    425 ms Show, Attend and Tell step at the paper's sizes (21 M parameters); the fused kernel, the
    same update, takes 15 ms (``foreach=True``: 69 ms against 70). Also under ``bf16-mixed``, whose
    gradient clipping ``CaptioningModule.configure_gradient_clipping`` allows. Left alone:
    ``fused``/``foreach`` set in ``init_args``, parameters on a GPU (torch already picks its
    multi-tensor kernel there), and fp16 (``16-mixed``), whose loss scaler the fused kernel unscales
    itself, so Lightning refuses gradient clipping with it.
    """
    fits = precision.startswith(("32", "64")) or precision == "bf16-mixed"
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or not fits:
        return optimizer
    d = optimizer.defaults
    if d.get("fused") is not None or d.get("foreach") is not None or d.get("differentiable") or d.get("capturable"):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or any(p.device.type != "cpu" or not p.is_floating_point() for p in params):
        return optimizer
    groups = [{**group, "fused": True} for group in optimizer.param_groups]
    accepted = inspect.signature(type(optimizer)).parameters  # AdamW's defaults hold a key its __init__ refuses
    return type(optimizer)(groups, **{**{k: v for k, v in d.items() if k in accepted}, "fused": True})


class CaptioningModule(L.LightningModule):
    """Trains an image encoder and a caption decoder; decodes and scores captions.

    The module never asks which decoder it holds: it calls ``decoder.forward`` for teacher
    forcing and ``beam_search`` (which uses ``prepare``/``init_state``/``step``) for captions.

    Args:
        encoder: the image encoder.
        decoder: any ``CaptionDecoder``; its ``vocab_size`` is linked from the data by the CLI.
        optimizer: optimiser factory (``class_path``/``init_args`` in YAML); gets the trainable parameters.
        scheduler: optional LR scheduler factory; ``ReduceLROnPlateau`` watches ``scheduler_monitor``.
        scheduler_monitor: metric a plateau scheduler watches.
        beam_size: beams when decoding in validation, test and predict (1 = greedy).
        max_len: most tokens per decoded caption.
        length_alpha: GNMT length-penalty α for ranking beams (0 = none).
        label_smoothing: of the cross-entropy.
        val_scorers: metrics computed every validation (METEOR is slow: it starts a JVM).
        test_scorers: metrics computed in test.
        tokenizer: ``"ptb"`` (the official PTB tokenizer, needs Java) or ``"simple"`` for metrics.
        output_dir: where test results and figures go (default: the logger's run folder).
        nonfinite_loss: a NaN/inf training loss ``"stop"``s the run (naming the step and the last
            good checkpoint) or is ``"skip"``ped (no optimizer step; skips are counted and logged).
    """

    def __init__(
        self,
        *,
        encoder: ImageEncoder,
        decoder: CaptionDecoder,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_monitor: str = "val/loss",
        beam_size: int = 3,
        max_len: int = 20,
        length_alpha: float = 0.0,
        label_smoothing: float = 0.0,
        val_scorers: tuple[str, ...] = ("bleu", "rouge", "cider"),
        test_scorers: tuple[str, ...] = SCORERS,
        tokenizer: Literal["ptb", "simple"] = "ptb",
        output_dir: str | None = None,
        nonfinite_loss: Literal["stop", "skip"] = "stop",
    ) -> None:
        super().__init__()
        _check_settings(
            beam_size=beam_size, max_len=max_len, length_alpha=length_alpha, label_smoothing=label_smoothing
        )
        if nonfinite_loss not in ("stop", "skip"):
            raise ConfigError(f"model.nonfinite_loss must be 'stop' or 'skip', got {nonfinite_loss!r}")
        wanted = getattr(decoder, "feature_dim", encoder.out_dim)
        if wanted != encoder.out_dim:
            raise ValueError(
                f"the encoder ({encoder.backbone}) gives D={encoder.out_dim} features but the decoder expects "
                f"feature_dim={wanted}: set model.decoder.init_args.feature_dim={encoder.out_dim}"
            )
        self.save_hyperparameters()
        self.encoder = encoder
        self.decoder = decoder
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.vocab: Vocabulary | None = None
        self._vocab_source = ""
        self.val_scorer = CaptionScorer(scorers=val_scorers, tokenizer=tokenizer)
        self.test_scorer = CaptionScorer(scorers=test_scorers, tokenizer=tokenizer)
        self._train_time_s = 0.0  # carried in checkpoints, so a resumed run keeps counting
        self._fit_started: float | None = None
        self._output_dir: Path | None = None
        self.skipped_batches = 0  # non-finite losses skipped (nonfinite_loss="skip")
        self.untrained = False  # set by the CLI for `capattn test --allow_untrained`: results say so

    # --- vocabulary -------------------------------------------------------------------------

    def _adopt_vocab(self, vocab: Vocabulary, source: str) -> None:
        """Takes ``vocab`` from ``source`` ("the data", "the checkpoint"), refusing one that differs."""
        if self.vocab is not None and vocab != self.vocab:
            raise VocabularyMismatchError(
                f"{source}'s vocabulary differs from {self._vocab_source}'s: "
                f"{vocab.difference(self.vocab, this=source, that=self._vocab_source)} — "
                "use the dataset settings (reader, min_word_count, max_vocab_size) the checkpoint was trained with"
            )
        if len(vocab) != self.decoder.vocab_size:
            raise VocabularyMismatchError(
                f"{source} has a vocabulary of {len(vocab)} tokens but the decoder was built for "
                f"{self.decoder.vocab_size}: leave model.decoder.init_args.vocab_size to the CLI link"
            )
        self.vocab, self._vocab_source = vocab, source

    def setup(self, stage: str) -> None:
        self._output_dir = Path(self.hparams.output_dir) if self.hparams.output_dir else self._run_dir()
        self._warn_emulated_bf16()
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and hasattr(datamodule, "vocab"):
            self._adopt_vocab(datamodule.vocab, "the data")

    def _warn_emulated_bf16(self) -> None:
        """One warning when a bf16 precision runs on a device that would emulate it (slower than
        fp32, 15–18× a training step on an AVX2 CPU): ``experiments/trainer/ddp.yaml`` asks for
        ``bf16-mixed``, which a laptop or an older GPU should override."""
        precision = str(self.trainer.precision)
        device = self.trainer.strategy.root_device
        if not precision.startswith("bf16") or bf16_in_hardware(device):
            return
        if device.type == "cuda":
            where, fix = f"this GPU ({torch.cuda.get_device_name(device)}) has no bf16 tensor cores", "16-mixed"
        else:
            where, fix = "this CPU has no bf16 instructions (AVX-512 BF16 or AMX)", "32"
        rank_zero_warn(
            f"trainer.precision={precision}, but {where}: torch emulates bf16 there, slower than "
            f"fp32. Add --trainer.precision={fix}."
        )

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.vocab is not None:
            checkpoint[_VOCAB_KEY] = self.vocab.to_dict()
        checkpoint[_TIME_KEY] = self.train_time_s
        # The preprocessing the weights expect, for `capattn caption` on image files.
        datamodule = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        checkpoint[DATA_KEY] = {"image_size": getattr(datamodule, "image_size", None)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Runs before the weights are loaded, so a vocabulary mismatch is reported as such, not as
        # a tensor-shape error deep inside load_state_dict.
        if _VOCAB_KEY in checkpoint:
            self._adopt_vocab(Vocabulary.from_dict(checkpoint[_VOCAB_KEY]), "the checkpoint")
        # A resumed fit starts from the saved time; testing right after fit keeps the whole fit's time.
        self._train_time_s = max(self._train_time_s, float(checkpoint.get(_TIME_KEY, 0.0)))

    def _require_vocab(self) -> Vocabulary:
        if self.vocab is None:
            raise RuntimeError("no vocabulary: train with a datamodule or load a capattn checkpoint")
        return self.vocab

    # --- timing -------------------------------------------------------------------------------

    @property
    def train_time_s(self) -> float:
        """Wall-clock seconds of fitting so far (training and validation), across resumes."""
        running = time.perf_counter() - self._fit_started if self._fit_started is not None else 0.0
        return self._train_time_s + running

    def on_train_start(self) -> None:
        self._fit_started = time.perf_counter()

    def on_train_end(self) -> None:
        self._train_time_s = self.train_time_s
        self._fit_started = None

    # --- training -----------------------------------------------------------------------------

    def encode(self, batch: CaptionBatch) -> EncoderOutput:
        """Encoder output of a batch: cached features if the batch has them, else the encoder's."""
        return batch.features if batch.features is not None else self.encoder(batch.images)

    def _teacher_forced(self, batch: CaptionBatch, enc: EncoderOutput) -> DecoderOutput:
        """The decoder over the batch's captions; with several captions per image (``image_index``)
        it sees each image once, unless its ``forward`` does not take ``image_index``: it then gets
        a row of ``enc`` per caption."""
        if batch.image_index is None:
            return self.decoder(enc, batch.tokens, batch.lengths)
        if _takes_image_index(type(self.decoder)):
            return self.decoder(enc, batch.tokens, batch.lengths, image_index=batch.image_index)
        rows = batch.image_index
        enc = EncoderOutput(grid=enc.grid.index_select(0, rows), pooled=enc.pooled.index_select(0, rows))
        return self.decoder(enc, batch.tokens, batch.lengths)

    def _losses(self, batch: CaptionBatch, enc: EncoderOutput) -> dict[str, torch.Tensor]:
        out = self._teacher_forced(batch, enc)
        # The decoder scores only the N real positions, (N, V) against (N,) targets, so padding is
        # never computed; the mean over them is the padded cross-entropy with ignore_index=<pad>.
        ce = F.cross_entropy(out.logits, out.targets, label_smoothing=self.hparams.label_smoothing)
        return {"loss": ce + out.aux_loss, "ce": ce, "aux": out.aux_loss}

    def training_step(self, batch: CaptionBatch, batch_idx: int) -> torch.Tensor | None:
        losses = self._losses(batch, self.encode(batch))
        if not torch.isfinite(losses["loss"]):
            return self._nonfinite(losses["loss"], batch_idx)
        self.log("train/loss", losses["loss"], prog_bar=True, batch_size=len(batch))
        self.log("train/ce", losses["ce"], batch_size=len(batch))
        self.log("train/aux", losses["aux"], batch_size=len(batch))
        return losses["loss"]

    def _nonfinite(self, loss: torch.Tensor, batch_idx: int) -> None:
        """A NaN/inf loss: stop with a message, or skip the batch (returning None skips the optimizer step)."""
        step, epoch = self.trainer.global_step, self.trainer.current_epoch
        if self.hparams.nonfinite_loss == "skip":
            self.skipped_batches += 1
            self.log("train/skipped_batches", float(self.skipped_batches), batch_size=1)
            _log.info(f"training loss is {float(loss)} at step {step} (epoch {epoch}, batch {batch_idx}): skipped")
            return None
        last = [cb.last_model_path for cb in self.trainer.checkpoint_callbacks if getattr(cb, "last_model_path", "")]
        resume = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved yet"
        raise NonFiniteLossError(
            f"training loss is {float(loss)} at step {step} (epoch {epoch}, batch {batch_idx}); stopped — {resume}. "
            "Lower model.optimizer.init_args.lr or set trainer.gradient_clip_val, "
            "or pass --model.nonfinite_loss=skip to skip such batches"
        )

    def configure_gradient_clipping(
        self,
        optimizer: torch.optim.Optimizer,
        gradient_clip_val: int | float | None = None,
        gradient_clip_algorithm: str | None = None,
    ) -> None:
        """Lightning's clipping, which under ``bf16-mixed`` also accepts a fused optimizer.

        Lightning refuses to clip for any optimizer that unscales gradients itself (torch's fused
        Adam), because under fp16 the gradients it would clip are still multiplied by the loss
        scale. bf16 has no loss scaler (``scaler`` is None), so there is nothing to unscale and the
        precision plugin's own norm or value clipping is exact; everything else goes to Lightning.
        """
        plugin = self.trainer.precision_plugin
        if gradient_clip_val and getattr(plugin, "scaler", False) is None:
            if gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
                plugin.clip_grad_by_value(optimizer, gradient_clip_val)
            else:
                plugin.clip_grad_by_norm(optimizer, gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def configure_optimizers(self) -> Any:
        try:
            optimizer = self.optimizer_factory([p for p in self.parameters() if p.requires_grad])
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.optimizer: {err} — fix model.optimizer.init_args") from None
        trainer = self._trainer  # None when called outside a Trainer
        optimizer = with_fused_cpu_kernel(optimizer, precision=str(trainer.precision) if trainer else "32-true")
        if self.scheduler_factory is None:
            return optimizer
        try:
            scheduler = self.scheduler_factory(optimizer)
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model.scheduler: {err} — fix model.scheduler.init_args") from None
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "monitor": self.hparams.scheduler_monitor},
        }

    # --- decoding -----------------------------------------------------------------------------

    def decode(self, enc: EncoderOutput) -> Captions:
        """Beam search (beam size from the config) over a batch of encoded images."""
        vocab = self._require_vocab()
        return beam_search(
            self.decoder,
            enc,
            bos=vocab.bos,
            eos=vocab.eos,
            pad=vocab.pad,
            beam_size=self.hparams.beam_size,
            max_len=self.hparams.max_len,
            length_alpha=self.hparams.length_alpha,
        )

    def _caption_batch(self, batch: CaptionBatch, enc: EncoderOutput) -> dict[str, Any]:
        vocab = self._require_vocab()
        best = self.decode(enc).best()
        tokens = best.tokens[:, 0]  # (B, T)
        return {
            "image_ids": batch.image_ids,
            "captions": [vocab.decode(row.tolist()) for row in tokens],
            "tokens": tokens,
            "scores": best.scores[:, 0],
            "alphas": None if best.alphas is None else best.alphas[:, 0],  # (B, T, L)
        }

    def validation_step(self, batch: CaptionBatch, batch_idx: int) -> None:
        enc = self.encode(batch)  # once for both the teacher-forced loss and the decoded captions
        self.log("val/loss", self._losses(batch, enc)["loss"], prog_bar=True, batch_size=len(batch), sync_dist=True)
        out = self._caption_batch(batch, enc)
        self.val_scorer.update(out["image_ids"], out["captions"], batch.references)

    def on_validation_epoch_end(self) -> None:
        scores = self.val_scorer.compute()  # every rank gets the same scores of the whole split
        self.val_scorer.reset()
        for name, value in scores.items():
            # Every rank holds the same score of the whole split; sync_dist averages equal values (and
            # keeps Lightning from warning that epoch-level values are not synced under DDP).
            self.log(f"val/{name}", value, prog_bar=name in ("BLEU-4", "CIDEr-D"), sync_dist=True)

    def test_step(self, batch: CaptionBatch, batch_idx: int) -> dict[str, Any]:
        out = self._caption_batch(batch, self.encode(batch))
        self.test_scorer.update(out["image_ids"], out["captions"], batch.references)
        return out

    def on_test_epoch_end(self) -> None:
        hypotheses, references = self.test_scorer.gather()
        scores = self.test_scorer.score(hypotheses, references)
        self.test_scorer.reset()
        for name, value in scores.items():
            self.log(f"test/{name}", value, sync_dist=True)  # equal on every rank, as above
        if self.trainer.is_global_zero:
            self._write_test_results(hypotheses, scores)

    def predict_step(self, batch: CaptionBatch, batch_idx: int) -> list[dict[str, Any]]:
        out = self._caption_batch(batch, self.encode(batch))
        return [
            {
                "image_id": image_id,
                "caption": caption,
                "score": float(out["scores"][i]),
                "alphas": None if out["alphas"] is None else out["alphas"][i].cpu(),
            }
            for i, (image_id, caption) in enumerate(zip(out["image_ids"], out["captions"], strict=True))
        ]

    # --- results ------------------------------------------------------------------------------

    @property
    def output_dir(self) -> Path:
        """Folder of results JSONs and figures: ``output_dir`` if set, else the run's log folder."""
        if self._output_dir is None:
            raise RuntimeError("output_dir is known once the Trainer has set the module up")
        return self._output_dir

    def _run_dir(self) -> Path:
        """The run's folder (``save_dir/name/version`` of the first logger, for any logger).

        ``Trainer.log_dir`` is the logger's ``save_dir`` for wandb, so every wandb run would write
        into the same folder. This runs in ``setup`` on every rank because it broadcasts from rank 0.
        """
        return Path(self.trainer.strategy.broadcast(str(run_dir(self.trainer))))

    def parameter_counts(self) -> dict[str, int]:
        """Total and trainable parameters of encoder + decoder."""
        params = list(self.encoder.parameters()) + list(self.decoder.parameters())
        return {
            "params": sum(p.numel() for p in params),
            "trainable_params": sum(p.numel() for p in params if p.requires_grad),
        }

    def _write_test_results(self, hypotheses: dict[str, str], scores: dict[str, float]) -> None:
        results = [{"image_id": coco_image_id(i), "caption": c} for i, c in sorted(hypotheses.items())]
        out = self.output_dir
        # An untrained model's scores never sit where a trained run's are looked for.
        suffix = "_untrained" if self.untrained else ""
        write_json_atomic(out / f"results_test{suffix}.json", results)
        write_json_atomic(
            out / f"metrics_test{suffix}.json",
            {
                "run": out.name if self.trainer.loggers else type(self.decoder).__name__,
                "model": type(self.decoder).__name__,
                "encoder": self.encoder.backbone,
                **self.parameter_counts(),
                "vocab_size": len(self._require_vocab()),
                "decoding": {
                    "beam_size": self.hparams.beam_size,
                    "length_alpha": self.hparams.length_alpha,
                    "max_len": self.hparams.max_len,
                },
                "beam_size": self.hparams.beam_size,
                "images": len(hypotheses),
                "train_time_s": round(self.train_time_s, 1),
                "checkpoint": self.trainer.ckpt_path,
                "untrained": self.untrained,
                "metrics": scores,
            },
        )
