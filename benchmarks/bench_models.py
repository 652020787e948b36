"""Speed of the two baselines at demo size: training step and batched beam search.

    .venv/bin/python benchmarks/bench_models.py [--device cpu|cuda] [--batch 64] [--repeats 10] [--quick]

Prints a Markdown table and appends it, with the machine and versions, to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import capattn  # noqa: F401  (torchvision guard first)
from capattn.decoding import beam_search
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import ImageEncoder

RESULTS = Path(__file__).with_name("RESULTS.md")
V, T = 40, 18  # the shapes vocabulary and a typical padded caption length


def build(kind: str, device: torch.device) -> tuple[ImageEncoder, torch.nn.Module]:
    encoder = ImageEncoder(backbone="small_cnn", small_cnn_channels=(16, 32, 64))
    common = dict(vocab_size=V, feature_dim=64, embed_dim=128, hidden_dim=256, dropout=0.2)
    if kind == "show_tell":
        decoder = ShowTellDecoder(**common)
    else:
        decoder = ShowAttendTellDecoder(attention_dim=128, **common)
    return encoder.to(device), decoder.to(device)


def timed(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="batch 4, one repeat, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.repeats = 4, 1
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.rand(args.batch, 3, 48, 48, device=device)
    tokens = torch.randint(4, V, (args.batch, T), device=device)
    tokens[:, 0] = 1
    lengths = torch.full((args.batch,), T, device=device)
    rows = []
    for kind in ("show_tell", "show_attend_tell"):
        encoder, decoder = build(kind, device)
        params = list(encoder.parameters()) + list(decoder.parameters())
        optimizer = torch.optim.Adam(params)

        def train_step(encoder=encoder, decoder=decoder, optimizer=optimizer):
            out = decoder(encoder(images), tokens, lengths)
            loss = F.cross_entropy(out.logits, out.targets) + out.aux_loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

        encoder.train(), decoder.train()
        step_s = timed(train_step, args.repeats, device)
        encoder.eval(), decoder.eval()
        beams = {}
        for k in (1, 3, 5):
            with torch.no_grad():
                enc = encoder(images)
                beams[k] = timed(
                    lambda enc=enc, k=k, decoder=decoder: beam_search(
                        decoder, enc, bos=1, eos=2, pad=0, beam_size=k, max_len=20
                    ),
                    args.repeats,
                    device,
                )
        rows.append((kind, sum(p.numel() for p in params), step_s, beams))
    header = "| model | params | train step (ms) | train captions/s | beam 1 img/s | beam 3 img/s | beam 5 img/s |"
    lines = [header, "|---|---|---|---|---|---|---|"]
    for kind, n, step_s, beams in rows:
        lines.append(
            f"| {kind} | {n / 1e6:.2f} M | {1000 * step_s:.0f} | {args.batch / step_s:.0f} | "
            + " | ".join(f"{args.batch / beams[k]:.0f}" for k in (1, 3, 5))
            + " |"
        )
    table = "\n".join(lines)
    print(table)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{platform.processor() or 'cpu'}"
    quick = " --quick" if args.quick else ""
    note = (
        f"\n## {datetime.date.today()} — bench_models.py{quick}, {where}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}, batch {args.batch}, fp32, untrained weights (beam search runs max_len=20)\n\n"
    )
    with args.results.open("a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n")
        f.write(note + table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
