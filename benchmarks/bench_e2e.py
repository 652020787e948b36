"""End to end: seconds per epoch on the shapes demo, and a projected COCO epoch on cached features.

    .venv/bin/python benchmarks/bench_e2e.py            # the demo configs, 1 epoch each; paper-size steps
    .venv/bin/python benchmarks/bench_e2e.py --quick    # a few hundred shapes images, tiny steps

1. Builds each ``experiments/demo_*.yaml`` model and data (the same classes and arguments) and
   times one training epoch and one validation pass (beam search + metrics) with Lightning.
2. Times capattn's training step at the paper's sizes (B=32, 196×2048 grid, V=10,000, cached
   features) and projects one COCO epoch: 113,287 images × 5 captions / B × step time.
Prints a table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

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
from bench_train import capattn_adam, capattn_loss, train_step  # noqa: E402

from capattn.data.datamodule import CaptionDataModule  # noqa: E402
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder  # noqa: E402
from capattn.module import CaptioningModule  # noqa: E402

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def instantiate(spec: Any) -> Any:
    """``{class_path, init_args}`` → the object, recursively (what LightningCLI does with a config)."""
    if isinstance(spec, dict) and "class_path" in spec:
        module, _, name = spec["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        return cls(**{k: instantiate(v) for k, v in (spec.get("init_args") or {}).items()})
    return spec


def shapes_epoch(name: str, quick: bool, device: str) -> dict[str, float]:
    """One training epoch and one validation pass of a demo config, timed."""
    import lightning as L  # after capattn: its torchvision guard must run first

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.train: list[float] = []
            self._start = 0.0

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            self.train.append(time.perf_counter() - self._start)

    config = yaml.safe_load((EXPERIMENTS / f"{name}.yaml").read_text())
    data_args = dict(config["data"])
    reader = dict(data_args.pop("reader"))
    if quick:
        reader["init_args"] = {**reader["init_args"], "num_train": 64, "num_val": 8, "num_test": 8}
    L.seed_everything(0, verbose=False)
    dm = CaptionDataModule(reader=instantiate(reader), **data_args)
    model_args = dict(config["model"])
    optimizer = model_args.pop("optimizer", None)
    for key in ("encoder", "decoder"):
        spec = model_args[key]
        init = dict(spec["init_args"])
        if key == "decoder":
            init["vocab_size"] = dm.vocab_size
        model_args[key] = instantiate({"class_path": spec["class_path"], "init_args": init})
    if optimizer is not None:
        module, _, cls = optimizer["class_path"].rpartition(".")
        opt_cls, opt_args = getattr(importlib.import_module(module), cls), optimizer.get("init_args") or {}
        model_args["optimizer"] = lambda params: opt_cls(params, **opt_args)
    if quick:  # no JVM for the PTB tokenizer in the test suite
        model_args.update(tokenizer="simple", val_scorers=("bleu",))
    model = CaptioningModule(**model_args)
    timer = EpochTimer()
    with tempfile.TemporaryDirectory() as tmp:
        quiet = dict(
            accelerator=device,
            devices=1,
            default_root_dir=tmp,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        trainer = L.Trainer(max_epochs=1, num_sanity_val_steps=0, limit_val_batches=0, callbacks=[timer], **quiet)
        trainer.fit(model, datamodule=dm)
        start = time.perf_counter()
        L.Trainer(**quiet).validate(model, datamodule=dm, verbose=False)
        val = time.perf_counter() - start
    return {
        "train_s": timer.train[0],
        "val_s": val,
        "captions": len(dm.train_dataloader().dataset),
        "val_images": len(dm.val_dataloader().dataset),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    note = load_note()

    rows = []
    for name in ("demo_show_tell", "demo_show_attend_tell"):
        r = shapes_epoch(name, args.quick, device.type)
        rows.append(
            [
                name,
                f"{r['captions']:,}",
                f"{r['train_s']:.1f}",
                f"{r['captions'] / r['train_s']:.0f}",
                f"{r['val_s']:.1f} ({r['val_images']} images)",
            ]
        )
    table1 = markdown_table(["config", "training captions", "train epoch s", "captions/s", "validation s"], rows)
    print(table1)

    sizes = dict(embed_dim=16, hidden_dim=16, attention_dim=16, vocab=50) if args.quick else {}
    s = {**PAPER, **sizes}
    d, batch = (32, 4) if args.quick else (2048, 32)
    repeats = 1 if args.quick else args.repeats
    enc = features(batch, d, device=device)
    tokens, lengths = caption_batch(batch, s["vocab"], device=device, longest_first=True)
    common = dict(vocab_size=s["vocab"], feature_dim=d, embed_dim=s["embed_dim"], hidden_dim=s["hidden_dim"])
    sat = ShowAttendTellDecoder(attention_dim=s["attention_dim"], **common).to(device)
    st = ShowTellDecoder(**common).to(device)
    fns = {
        "Show, Attend and Tell": train_step(capattn_adam(sat), capattn_loss(sat, enc, tokens, lengths)),
        "Show and Tell": train_step(capattn_adam(st), capattn_loss(st, enc, tokens, lengths)),
    }
    t = {name: median(xs) for name, xs in interleaved(fns, repeats, device).items()}
    rows2 = [[name, f"{1000 * t[name]:.0f}", f"{COCO_TRAIN_CAPTIONS / batch * t[name] / 60:.0f} min"] for name in fns]
    table2 = markdown_table(["decoder", f"ms/step (B={batch}, 196×{d})", "projected COCO epoch"], rows2)
    print(table2)
    title = results_title("bench_e2e.py", args.quick, device)
    body = (
        f"{note}. Shapes: one epoch of each demo config (batch, model and data as in experiments/), "
        f"validation = beam search + metrics over the validation split.\n\n{table1}\n\n"
        f"Projected COCO epoch on cached features: {COCO_TRAIN_CAPTIONS:,} captions / B × the median step "
        f"(forward, backward, Adam) of {repeats} interleaved repeats, data loading not included "
        f"(bench_data.py measures it).\n\n{table2}\n"
    )
    append_results(args.results, title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
