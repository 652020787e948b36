"""A COCO epoch on cached features, measured through Lightning with capattn's own data path.

    .venv/bin/python benchmarks/bench_epoch.py            # paper sizes: B=32 on a CPU, 256 on a GPU
    .venv/bin/python benchmarks/bench_epoch.py --quick    # tiny sizes, for the test suite

bench_e2e.py projects a COCO epoch from the training step alone, and bench_data.py times the
loader alone; this times what a run does, both together: the datamodule's loader reading the
feature cache (worker processes or ``data.loader_threads``; (image, caption) pairs or
``data.group_captions``), the batch sent to the device, Show, Attend and Tell's step with Adam, and
Lightning's loop around them, overlapping as they do in ``capattn fit``. It generates a
Karpathy-format, COCO-like dataset (``bench_data.generate_karpathy``; tiny JPEGs, since a stand-in
encoder gives every image a 196 × 2048 grid, ResNet-101's shape at 224 px, from its mean colours),
builds the feature cache through the datamodule, then for each loader setting trains a number of
batches and times the last ones. A COCO epoch (113,287 images × 5 captions) is projected at the
measured captions/s. The cache of a few thousand images sits in the page cache; a real COCO cache
(91 GB at fp16) may also wait on the disk. Prints a table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    COCO_TRAIN_CAPTIONS,
    PAPER,
    RESULTS,
    append_results,
    caption_batch,
    features,
    interleaved,
    load_note,
    markdown_table,
    median,
    results_title,
)
from bench_data import generate_karpathy  # noqa: E402
from bench_train import capattn_adam, capattn_loss, train_step  # noqa: E402

from capattn.data.datamodule import CaptionDataModule  # noqa: E402
from capattn.data.readers import KarpathyReader  # noqa: E402
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder  # noqa: E402
from capattn.models.encoder import EncoderOutput  # noqa: E402
from capattn.module import CaptioningModule  # noqa: E402

# "A" and 7–12 more words: 10.5 words a caption on average, as COCO's (bench_train.py's batches too).
COCO_WORDS = (7, 13)


class StandInEncoder(nn.Module):
    """A frozen encoder with ResNet-101's output shape, (B, 196, D), at no compute cost: the feature
    cache only needs something of the right shape, and what is timed is reading it back."""

    backbone = "stand-in"

    def __init__(self, feature_dim: int) -> None:
        super().__init__()
        self.out_dim = feature_dim
        self.proj = nn.Linear(3, feature_dim).requires_grad_(False)
        g = torch.Generator().manual_seed(0)  # the same weights in every instance: one cache, found again
        with torch.no_grad():
            self.proj.weight.copy_(torch.rand(self.proj.weight.shape, generator=g) - 0.5)
            self.proj.bias.copy_(torch.rand(feature_dim, generator=g) - 0.5)

    def forward(self, images: torch.Tensor) -> EncoderOutput:
        colours = nn.functional.adaptive_avg_pool2d(images, 14).flatten(2).transpose(1, 2)  # (B, 196, 3)
        grid = self.proj(colours).relu()  # (B, L=196, D)
        return EncoderOutput(grid=grid, pooled=grid.mean(1))


def generate_images(split_json: Path, image_dir: Path, size: int = 32) -> None:
    """One small JPEG per entry of ``split_json`` at ``image_dir/filepath/filename``, each its own colour."""
    from PIL import Image

    for entry in json.loads(split_json.read_text())["images"]:
        path = image_dir / entry["filepath"] / entry["filename"]
        path.parent.mkdir(parents=True, exist_ok=True)
        i = entry["imgid"]
        Image.new("RGB", (size, size), (i % 251, (7 * i) % 253, (13 * i) % 255)).save(path, quality=90)


DECODERS = {"show_attend_tell": "Show, Attend and Tell", "show_tell": "Show and Tell"}


def build_decoder(vocab: int, decoder_args: dict) -> ShowAttendTellDecoder | ShowTellDecoder:
    args = dict(decoder_args)
    if args.pop("kind") == "show_tell":  # the pooled vector only: its batches read no grid from the cache
        args.pop("attention_dim")
        return ShowTellDecoder(vocab_size=vocab, **args)
    return ShowAttendTellDecoder(vocab_size=vocab, **args)


def timed_fit(
    dm_args: dict, decoder_args: dict, *, device: str, precision: str, warmup: int, batches: int, out: Path
) -> dict:
    """Trains ``warmup + batches`` batches with Lightning; returns captions/s over the last ``batches``."""
    import lightning as L  # after capattn: its torchvision guard must run first

    class Timer(L.Callback):
        def __init__(self) -> None:
            self.start: float | None = None
            self.stop = 0.0
            self.captions = 0

        def _now(self) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter()

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            if batch_idx == warmup:
                self.start = self._now()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx >= warmup:
                self.captions += len(batch)
                self.stop = self._now()

    L.seed_everything(0, verbose=False)
    dm = CaptionDataModule(**dm_args)
    encoder = StandInEncoder(decoder_args["feature_dim"])
    decoder = build_decoder(dm.vocab_size, decoder_args)
    model = CaptioningModule(encoder=encoder, decoder=decoder, tokenizer="simple", output_dir=str(out))
    timer = Timer()
    trainer = L.Trainer(
        accelerator=device,
        devices=1,
        precision=precision,
        max_epochs=1,
        limit_train_batches=warmup + batches,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=str(out),
        callbacks=[timer],
    )
    trainer.fit(model, datamodule=dm)
    if timer.start is None or timer.captions == 0:
        raise RuntimeError(f"the epoch had fewer than {warmup + 1} batches: generate more images (--images)")
    return {"captions_per_s": timer.captions / (timer.stop - timer.start)}


def step_alone(decoder_args: dict, vocab: int, batch: int, *, device: torch.device, repeats: int) -> float:
    """Captions/s of the same decoder's training step on a batch already on the device (bench_train.py's
    step: forward, backward, Adam): what the loader and Lightning's loop add is the rest."""
    torch.manual_seed(0)
    decoder = build_decoder(vocab, decoder_args).to(device)
    enc = features(batch, decoder_args["feature_dim"], device=device)
    tokens, lengths = caption_batch(batch, vocab, device=device, longest_first=True)
    step = train_step(capattn_adam(decoder), capattn_loss(decoder, enc, tokens, lengths))
    return batch / median(interleaved({"step": step}, repeats, device)["step"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--images", type=int, default=None, help="images generated (default: enough for the batches)")
    parser.add_argument("--batch-size", type=int, default=None, help="captions a batch (default: 32; 256 on a GPU)")
    parser.add_argument("--batches", type=int, default=None, help="timed batches a setting (12; GPU: 100)")
    parser.add_argument("--decoder", choices=sorted(DECODERS), default="show_attend_tell")
    parser.add_argument("--precision", default="32-true", help="Lightning's trainer.precision (e.g. bf16-mixed)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        torch.set_float32_matmul_precision("high")  # TF32, as bench_gpu.py and --float32_matmul_precision=high
    note = load_note()
    cpus = len(os.sched_getaffinity(0))
    if args.quick:
        images, batch, batches, warmup, d = 60, 8, 2, 1, 32
        sizes = dict(embed_dim=16, hidden_dim=16, attention_dim=16)
        settings = [("0 workers", 0, 0, False), ("2 threads", 0, 2, False), ("0 workers", 0, 0, True)]
    else:
        batch = args.batch_size or (256 if gpu else 32)
        batches, warmup, d = args.batches or (100 if gpu else 12), (10 if gpu else 3), 2048
        # Enough training images (92% of them, Karpathy's proportions) for one more grouped batch than is run.
        images = args.images or max(2000, math.ceil((warmup + batches + 1) * max(1, batch // 5) / 0.9))
        sizes = {k: PAPER[k] for k in ("embed_dim", "hidden_dim", "attention_dim")}
        many = min(8, cpus)
        settings = [
            ("0 workers", 0, 0, False),
            (f"{min(2, cpus)} workers", min(2, cpus), 0, False),
            (f"{many} workers", many, 0, False),
            (f"{min(4, cpus)} threads", 0, min(4, cpus), False),
            ("0 workers", 0, 0, True),
            (f"{many} workers", many, 0, True),
            (f"{min(4, cpus)} threads", 0, min(4, cpus), True),
        ]
        settings = list(dict.fromkeys(settings))  # a 2-core machine: 2 workers twice
    decoder_args = dict(kind=args.decoder, feature_dim=d, dropout=0.5, **sizes)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        split_json = work / "dataset_coco.json"
        if not split_json.exists():
            generate_karpathy(split_json, images, lengths=COCO_WORDS)
            generate_images(split_json, work / "images")
        common = dict(
            reader=KarpathyReader(split_json=split_json, image_dir=work / "images"),
            image_size=32,
            prepared_dir=str(work / "prepared"),
            features="cache",
            features_dir=str(work / "features"),
        )
        start = time.perf_counter()
        dm = CaptionDataModule(**common)
        dm.prepare_features(StandInEncoder(d), device=device)
        cache_s = time.perf_counter() - start
        sentences = [len(c["tokens"]) for e in json.loads(split_json.read_text())["images"] for c in e["sentences"]]
        mean_words = sum(sentences) / len(sentences)
        vocab = dm.vocab_size
        # The step alone, before the loaders and after them: a shared machine's speed drifts.
        alone, rows = [step_alone(decoder_args, vocab, batch, device=device, repeats=batches)], []
        for name, workers, threads, grouped in settings:
            dm_args = {
                **common,
                "batch_size": max(1, batch // 5) if grouped else batch,
                "num_workers": workers,
                "loader_threads": threads,
                "group_captions": grouped,
            }
            r = timed_fit(
                dm_args,
                decoder_args,
                device=device.type,
                precision=args.precision,
                warmup=warmup,
                batches=batches,
                out=work / "run",
            )
            rate = r["captions_per_s"]
            rows.append(
                [
                    name,
                    "images, all their captions" if grouped else "(image, caption) pairs",
                    f"{dm_args['batch_size']} {'images' if grouped else 'captions'}",
                    f"{rate:,.0f}",
                    f"{COCO_TRAIN_CAPTIONS / rate / 60:.1f} min",
                ]
            )
            print(rows[-1], flush=True)
    alone.append(step_alone(decoder_args, vocab, batch, device=device, repeats=batches))
    rate = sum(alone) / 2
    both = f"{alone[0]:,.0f} before, {alone[1]:,.0f} after"
    rows.append(["none: the step alone", "a batch on the device", f"{batch} captions", both,
                 f"{COCO_TRAIN_CAPTIONS / rate / 60:.1f} min"])  # fmt: skip
    print(rows[-1], flush=True)
    table = markdown_table(["loader", "items", "batch", "captions/s", "projected COCO epoch"], rows)
    print(table)
    title = results_title("bench_epoch.py", args.quick, device)
    read = " (its batches read the pooled vector only)" if args.decoder == "show_tell" else ""
    body = (
        f"{note}. {DECODERS[args.decoder]}, grid 196×{d}{read}, V={vocab:,} (the generated captions' words), "
        f"{sizes['embed_dim']} dims, precision {args.precision}{' (fp32 matmuls on TF32)' if gpu else ''}; "
        f"Lightning fit on a generated COCO-like dataset of {images:,} images × 5 captions and its fp16 "
        f"feature cache (built in {cache_s:.0f} s), {mean_words:.1f} words a caption, Adam as configure_optimizers "
        f"builds it; captions/s over "
        f"{batches} batches after {warmup} (the loader, the copy to the device, the step and Lightning's loop "
        f"together); projected epoch: {COCO_TRAIN_CAPTIONS:,} captions at that rate. {cpus} CPUs. Last row: "
        f"the same step on one batch already on the device ({batches} repeats, bench_train.py's COCO-like "
        f"captions), without the loader and Lightning's loop, timed before the loaders and after them; the "
        f"epoch at their mean.\n\n{table}\n"
    )
    append_results(args.results, title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
