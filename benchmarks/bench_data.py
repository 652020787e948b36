"""Memory and speed of the data side at COCO scale: prepare, datamodule RSS, image and feature-cache loaders.

    .venv/bin/python benchmarks/bench_data.py            # 123,287 images × 5 captions (a few minutes)
    .venv/bin/python benchmarks/bench_data.py --quick    # tiny sizes, for the test suite

1. Generates a Karpathy ``dataset_coco.json`` of COCO's size (random captions with a Zipf-like
   vocabulary; no image files: the text side needs none) and prepares it (``capattn prepare``'s code).
2. Opens it with ``CaptionDataModule`` and walks one training epoch of token batches (its default
   sampler: random batches, each longest first) and every evaluation image's references. Peak RSS must stay ≤ 1.5 GB.
3. Generates JPEGs of Flickr/COCO size and times the image pipeline (decode, resize 224, crop)
   per DataLoader worker, then the feature-cache pipeline (fp16 196×2048 grids) in samples/s.

Each phase runs in a fresh process so its peak RSS is its own (``--quick`` runs them in one).
Prints a table and appends it, dated, with the machine, torch version and device, to
benchmarks/RESULTS.md (``--results``).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).with_name("RESULTS.md")
LIMIT_GB = 1.5
COCO_IMAGES = 123_287


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux reports KiB


def rss_gb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


# --- inputs ------------------------------------------------------------------------------------


def generate_karpathy(path: Path, images: int, seed: int = 0, lengths: tuple[int, int] = (8, 20)) -> None:
    """A ``dataset_coco.json`` in Karpathy's schema: 113,287/5,000/5,000 proportions, 5 captions each,
    of "A" and ``lengths[0]`` to ``lengths[1] − 1`` more words (Zipf-distributed over 12,000)."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(12_000)]
    zipf = 1.0 / np.arange(1, len(words) + 1)
    zipf /= zipf.sum()
    n_test = n_val = max(1, round(images * 5_000 / COCO_IMAGES))
    n_restval = round(images * 30_504 / COCO_IMAGES)
    with path.open("w") as f:
        f.write('{"dataset": "coco", "images": [')
        for i in range(images):
            split = (
                "test"
                if i < n_test
                else "val"
                if i < n_test + n_val
                else "restval"
                if i < n_test + n_val + n_restval
                else "train"
            )
            folder = "val2014" if split != "train" else "train2014"
            counts = rng.integers(*lengths, size=5)
            picks = rng.choice(len(words), size=int(counts.sum()), p=zipf)
            sentences, start = [], 0
            for j, n in enumerate(counts):
                raw = "A " + " ".join(words[k] for k in picks[start : start + n]) + "."
                start += n
                sentences.append({"tokens": raw.lower().split(), "raw": raw, "imgid": i, "sentid": 5 * i + j})
            entry = {
                "filepath": folder,
                "filename": f"COCO_{folder}_{i:012d}.jpg",
                "imgid": i,
                "split": split,
                "cocoid": i + 1,
                "sentids": list(range(5 * i, 5 * i + 5)),
                "sentences": sentences,
            }
            f.write(("," if i else "") + json.dumps(entry))
        f.write("]}")


def generate_jpegs(folder: Path, n: int, seed: int = 0) -> None:
    """Photo-like JPEGs (smooth gradients, some texture) of Flickr8k/COCO size, 500×375."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:375, 0:500].astype(np.float32)
    for i in range(n):
        a, b, c = rng.uniform(0, 1, 3)
        base = np.stack(
            [128 + 100 * np.sin(x / (40 + 60 * a) + k + b) * np.cos(y / (50 + 40 * c)) for k in range(3)], -1
        )
        noise = rng.normal(0, 12, base.shape)
        Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)).save(folder / f"{i:06d}.jpg", quality=90)


def text_reader(split_json: Path):
    """Karpathy records without image files (what the text side measures)."""
    from capattn.data.readers import KarpathyReader

    class TextOnlyKarpathyReader(KarpathyReader):
        def read(self):
            return [dataclasses.replace(r, image_path=None) for r in super().read()]

    return TextOnlyKarpathyReader(split_json=split_json, image_dir=split_json.parent)


def image_reader(folder: Path):
    from capattn.data.readers import CaptionReader
    from capattn.data.records import CaptionRecord

    class JpegFolderReader(CaptionReader):
        def __init__(self, *, image_dir: Path) -> None:
            self.image_dir = image_dir

        def read(self):
            paths = sorted(self.image_dir.glob("*.jpg"))
            split = ["train"] * (len(paths) - 2) + ["val", "test"]
            words = "a dog runs on the grass near a red ball in the park".split()
            return [
                CaptionRecord(p.stem, p, tuple(" ".join(words[j : j + 5 + i % 4]) for j in range(5)), s)
                for i, (p, s) in enumerate(zip(paths, split, strict=True))
            ]

    return JpegFolderReader(image_dir=folder)


# --- phases (each in its own process) ----------------------------------------------------------


def phase_prepare(work: Path) -> dict:
    import capattn  # noqa: F401
    from capattn.data.prepare import PrepareSettings, prepare

    reader = text_reader(work / "dataset_coco.json")
    start = time.perf_counter()
    prepare(reader, settings=PrepareSettings(min_word_count=5), prepared_dir=work / "prepared-text")
    return {"prepare_s": time.perf_counter() - start, "prepare_peak_gb": peak_rss_gb()}


def phase_datamodule(work: Path) -> dict:
    import capattn  # noqa: F401
    from capattn.data.datamodule import CaptionDataModule

    baseline = rss_gb()
    dm = CaptionDataModule(
        reader=text_reader(work / "dataset_coco.json"),
        batch_size=64,
        min_word_count=5,
        prepared_dir=str(work / "prepared-text"),
    )
    dm.setup("fit")
    loader = dm.train_dataloader()
    train = dm.dataset("train")
    start, captions = time.perf_counter(), 0
    for batch in loader.batch_sampler:  # one epoch of the default batches, as __getitems__ reads them
        rows = np.asarray(batch)
        tokens = train.split.tokens(rows)
        train.split.image_rows(train.split.caption_image[rows])  # ids, paths and references of the batch
        captions += len(tokens)
    epoch_s = time.perf_counter() - start
    references = 0
    for split in ("val", "test"):
        images = dm.prepared.split(split).images
        for start_row in range(0, len(images), 1000):
            references += sum(map(len, images[start_row : start_row + 1000]["references"]))
    return {
        "train_captions": captions,
        "eval_references": references,
        "vocab": dm.vocab_size,
        "token_epoch_s": epoch_s,
        "dm_baseline_gb": baseline,
        "dm_peak_gb": peak_rss_gb(),
    }


def phase_loaders(work: Path, batches: int) -> dict:
    import torch
    from torch import nn

    import capattn  # noqa: F401
    from capattn.data.datamodule import CaptionDataModule
    from capattn.models.encoder import EncoderOutput

    class CheapEncoder(nn.Module):
        """ResNet-101's output shape (196 × 2048) at no compute cost: the cache's read speed is what is timed."""

        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(3, 2048).requires_grad_(False)

        def forward(self, images):
            pooled = nn.functional.adaptive_avg_pool2d(images, 14).flatten(2).transpose(1, 2)  # (B, 196, 3)
            grid = self.proj(pooled)  # (B, L=196, D=2048)
            return EncoderOutput(grid=grid, pooled=grid.mean(1))

    reader = image_reader(work / "jpegs")
    common = dict(reader=reader, image_size=224, batch_size=32, num_workers=0, prepared_dir=str(work / "prepared-img"))
    images = CaptionDataModule(**common, bucket_by_length=False)
    loader = images.train_dataloader()
    it = iter(loader)
    next(it)  # warm-up
    start, n = time.perf_counter(), 0
    for _, batch in zip(range(batches), it, strict=False):
        n += len(batch)
    images_per_s = n / (time.perf_counter() - start)

    cached = CaptionDataModule(**common, features="cache", features_dir=str(work / "features"))
    encoder = CheapEncoder()
    cached.prepare_features(encoder, device="cpu")
    cached.use_feature_cache(encoder)
    loader = cached.train_dataloader()
    start, n = time.perf_counter(), 0
    for _ in range(3):
        for batch in loader:
            n += len(batch)
    samples_per_s = n / (time.perf_counter() - start)
    return {
        "image_per_s_per_worker": images_per_s,
        "cache_samples_per_s": samples_per_s,
        "cache_at_gpu_batch": cache_at_gpu_batch(common, work, encoder, quick=batches <= 1),
        "torch": torch.__version__,
    }


def cache_at_gpu_batch(common: dict, work: Path, encoder, *, quick: bool) -> list[dict]:
    """Captions/s the feature-cache loader delivers at a GPU's batch (256 captions), to the device
    (pinned, copied, made float32 as ``on_after_batch_transfer`` does), by number of worker processes
    and of loader threads (``data.loader_threads``): one
    (image, caption) pair per item against whole images with all their captions
    (``data.group_captions``, 51 images ≈ 256 captions), which reads each grid once per image."""
    import torch

    from capattn.data.datamodule import CaptionDataModule

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cpus = len(os.sched_getaffinity(0))
    counts = sorted({1, min(4, cpus), min(8, cpus)})
    loaders = (
        [("workers", 0), ("threads", 2)]
        if quick
        else [("workers", n) for n in counts]
        + [("threads", n) for n in sorted({min(2, cpus), min(4, cpus), min(8, cpus)})]
    )
    batch = 8 if quick else 256
    out = []
    for kind, n in loaders:
        for grouped in (False, True):
            settings = {
                **common,
                "batch_size": max(1, batch // 5) if grouped else batch,
                "num_workers": n if kind == "workers" else 0,
                "loader_threads": n if kind == "threads" else 0,
            }
            dm = CaptionDataModule(
                **settings, features="cache", features_dir=str(work / "features"), group_captions=grouped
            )
            dm.use_feature_cache(encoder)
            loader = dm.train_dataloader()
            captions, start, deadline = 0, None, (0.5 if quick else 5.0)
            while start is None or time.perf_counter() - start < deadline:
                for b in loader:
                    b = dm.on_after_batch_transfer(b.to(device, non_blocking=True), 0)
                    if start is None:  # the first batch starts the workers: not timed
                        start = time.perf_counter()
                        continue
                    captions += len(b)
            if device.type == "cuda":
                torch.cuda.synchronize()
            out.append(
                {
                    "loader": f"{n} {kind}",
                    "grouped": grouped,
                    "batch": settings["batch_size"],
                    "captions_per_s": captions / (time.perf_counter() - start),
                    "device": device.type,
                }
            )
            del loader, dm
    return out


def run_phase(name: str, work: Path, *extra: str, in_process: bool = False) -> dict:
    if in_process:  # --quick: one process, one import of torch; peak RSS is then the whole run's
        return json.loads(_capture(lambda: main(["--phase", name, "--work", str(work), *extra])))
    done = subprocess.run(
        [sys.executable, __file__, "--phase", name, "--work", str(work), *extra],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise SystemExit(f"bench_data: phase {name} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _capture(fn) -> str:
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        fn()
    return out.getvalue().strip().splitlines()[-1]


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (1,000 images, 16 JPEGs), for tests")
    parser.add_argument(
        "--images", type=int, default=None, help=f"images in the Karpathy JSON (default {COCO_IMAGES:,})"
    )
    parser.add_argument("--jpegs", type=int, default=None, help="generated JPEGs for the loader timings")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    parser.add_argument(
        "--loaders-only", action="store_true", help="only the image and feature-cache loaders (no COCO-scale text)"
    )
    parser.add_argument("--phase", choices=["prepare", "datamodule", "loaders"], help=argparse.SUPPRESS)
    parser.add_argument("--batches", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.phase:
        result = {
            "prepare": lambda: phase_prepare(args.work),
            "datamodule": lambda: phase_datamodule(args.work),
            "loaders": lambda: phase_loaders(args.work, args.batches),
        }[args.phase]()
        print(json.dumps(result))
        return 0

    images = args.images or (1_000 if args.quick else COCO_IMAGES)
    jpegs = args.jpegs or (16 if args.quick else 400)
    batches = 1 if args.quick else 10
    work = args.work or Path(tempfile.mkdtemp(prefix="capattn-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        generate_jpegs(work / "jpegs", jpegs)
        result = {}
        if not args.loaders_only:
            generate_karpathy(work / "dataset_coco.json", images)
            result = {
                "json_mb": (work / "dataset_coco.json").stat().st_size / 1e6,
                **run_phase("prepare", work, in_process=args.quick),
                **run_phase("datamodule", work, in_process=args.quick),
            }
        result |= run_phase("loaders", work, "--batches", str(batches), in_process=args.quick)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)

    ok = args.loaders_only or result["dm_peak_gb"] <= LIMIT_GB
    rows = []
    if not args.loaders_only:
        rows += [
            ("images × captions", f"{images:,} × 5 ({result['train_captions']:,} training captions)"),
            ("Karpathy JSON", f"{result['json_mb']:.0f} MB"),
            ("prepare", f"{result['prepare_s']:.1f} s, peak RSS {result['prepare_peak_gb']:.2f} GB"),
            (
                "datamodule (one token epoch + all references)",
                f"peak RSS {result['dm_peak_gb']:.2f} GB ({result['dm_baseline_gb']:.2f} GB is torch & co. "
                f"imported) — {'OK' if ok else 'OVER'} ≤ {LIMIT_GB} GB",
            ),
            ("token epoch (random batches longest first, batch 64, + references)", f"{result['token_epoch_s']:.1f} s"),
        ]
    rows += [
        (
            "image pipeline (Pillow decode, resize 224, crop)",
            f"{result['image_per_s_per_worker']:.0f} images/s per worker",
        ),
        ("feature cache (fp16 196×2048), 1 worker", f"{result['cache_samples_per_s']:.0f} samples/s"),
    ]
    for r in result["cache_at_gpu_batch"]:
        kind = (
            f"{r['batch']} images with all their captions (data.group_captions)"
            if r["grouped"]
            else f"{r['batch']} (image, caption) pairs"
        )
        rows.append(
            (
                f"feature cache → {r['device']}, batches of {kind}, {r['loader']}",
                f"{r['captions_per_s']:,.0f} captions/s",
            )
        )
    table = "\n".join(["| measure | value |", "|---|---|", *(f"| {k} | {v} |" for k, v in rows)])
    print(table)
    machine = f"{platform.machine()} {os.cpu_count()}-CPU {platform.node()}"
    header = (
        f"## {datetime.date.today().isoformat()} — bench_data.py{' --quick' if args.quick else ''}"
        f"{' --loaders-only' if args.loaders_only else ''}, "
        f"{machine}, torch {result['torch']}, device {device_name()}"
    )
    with args.results.open("a") as f:
        f.write(f"\n{header}\n\n{table}\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
