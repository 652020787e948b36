"""Training step of each decoder at the paper's sizes, against a tutorial-style implementation.

    .venv/bin/python benchmarks/bench_train.py              # B=32, 196×2048 and 196×512 grids, V=10,000
    .venv/bin/python benchmarks/bench_train.py --quick      # tiny sizes, for the test suite

Show, Attend and Tell (capattn) and the tutorial-style baseline (benchmarks/tutorial.py, the same
parameters computed the way tutorials do) run interleaved in one process, so their ratio holds
on a busy machine; Show and Tell is reported beside them (absolute, and relative to SAT). A step
is forward, loss, backward and an Adam update, on cached features (the encoder frozen), with
COCO-like caption lengths. GFLOP/s counts the model's matmul work (``_common.sat_train_flops``)
against the machine's measured matmul peak. On a CPU, peak memory is measured by a child run of
this script (``--peak-memory``): measuring it changes how glibc allocates, which would slow the
timed steps. Prints a table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    PAPER,
    RESULTS,
    append_results,
    caption_batch,
    encoder_output,
    features,
    interleaved,
    load_note,
    markdown_table,
    matmul_peak_gflops,
    median,
    peak_memory_mb,
    results_title,
    return_freed_memory_to_the_os,
    sat_train_flops,
    show_tell_train_flops,
    without_attention_kernels,
)
from tutorial import tutorial_loss  # noqa: E402

from capattn.models import native  # noqa: E402
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder  # noqa: E402
from capattn.models.native import bf16_in_hardware  # noqa: E402
from capattn.module import with_fused_cpu_kernel  # noqa: E402


def train_step(optimizer, loss_fn, bf16_on: torch.device | None = None):
    """Forward, backward and the optimizer's update. With ``bf16_on`` (a device), as Lightning's
    ``bf16-mixed`` runs a step: the forward under bf16 autocast, backward and the update after it."""

    def step() -> None:
        amp = torch.autocast(bf16_on.type, dtype=torch.bfloat16) if bf16_on else contextlib.nullcontext()
        with amp:
            loss = loss_fn()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def capattn_loss(decoder, enc, tokens, lengths, image_index=None):
    """``CaptioningModule._losses``: cross-entropy over the real positions + the decoder's aux term."""
    kwargs = {} if image_index is None else {"image_index": image_index}

    def loss() -> torch.Tensor:
        out = decoder(enc, tokens, lengths, **kwargs)
        return F.cross_entropy(out.logits, out.targets) + out.aux_loss

    return loss


CAPTIONS_PER_IMAGE = 5  # COCO's and Flickr8k's: the grouped row's batch (``data.group_captions``)


def grouped_rows(batch: int, device: torch.device) -> torch.Tensor:
    """(B,) the image of each caption when the batch's B captions come 5 per image (the last image fewer)."""
    return torch.arange(batch, device=device) // CAPTIONS_PER_IMAGE


def grouped_images(batch: int) -> int:
    """How many images the grouped row's B captions come from."""
    return -(-batch // CAPTIONS_PER_IMAGE)


def capattn_adam(model, precision: str = "32-true"):
    """Adam as ``CaptioningModule.configure_optimizers`` builds it: torch's fused kernel on a CPU."""
    return with_fused_cpu_kernel(torch.optim.Adam(model.parameters()), precision=precision)


def without_small_matmuls(fn):
    """``fn`` with the loop's per-word matmuls in torch's matmul (MKL) instead of capattn's kernels,
    through the users' own switch (``CAPATTN_SMALL_MATMULS=0``)."""

    def run() -> None:
        with mock.patch.dict(os.environ, {"CAPATTN_SMALL_MATMULS": "0"}):
            fn()

    return run


def step_fns(
    d: int, batch: int, s: dict, sizes: dict, device: torch.device, tokens, lengths, bf16: bool = False
) -> dict:
    """The timed steps at grid 196×d, after checking that capattn and the baseline agree on the loss.
    With ``bf16``, each also under bf16-mixed."""
    common = dict(vocab_size=s["vocab"], embed_dim=s["embed_dim"], hidden_dim=s["hidden_dim"], dropout=0.5)
    torch.manual_seed(0)
    enc = features(batch, d, device=device)
    sat = ShowAttendTellDecoder(feature_dim=d, attention_dim=s["attention_dim"], **common).to(device)
    st = ShowTellDecoder(feature_dim=d, **common).to(device)
    image_index = grouped_rows(batch, device)
    grouped = features(grouped_images(batch), d, seed=1, device=device)  # the grouped row's images
    # Same parameters, same loss: check it (dropout off) before timing anything.
    sat.eval()
    with torch.no_grad():
        ours = capattn_loss(sat, enc, tokens, lengths)()
        theirs = tutorial_loss(sat, enc.grid, tokens, lengths)
        ours_grouped = capattn_loss(sat, grouped, tokens, lengths, image_index)()
        theirs_grouped = tutorial_loss(sat, grouped.grid.index_select(0, image_index), tokens, lengths)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ours_grouped, theirs_grouped, rtol=1e-4, atol=1e-4)
    sat.train(), st.train()

    def tutorial(bf16_on=None):  # torch's default Adam, as tutorials use it
        loss = lambda: tutorial_loss(sat, enc.grid, tokens, lengths)  # noqa: E731
        return train_step(torch.optim.Adam(sat.parameters()), loss, bf16_on)

    def ours(decoder, bf16_on=None, grouped_batch=False, feats=enc):  # Adam as configure_optimizers builds it
        adam = capattn_adam(decoder, "bf16-mixed" if bf16_on else "32-true")
        if grouped_batch:  # the same captions, 5 per image
            loss = capattn_loss(decoder, grouped, tokens, lengths, image_index)
        else:
            loss = capattn_loss(decoder, feats, tokens, lengths)
        return train_step(adam, loss, bf16_on)

    fns = {
        "tutorial": tutorial(),
        "capattn": ours(sat),
        "capattn_grouped": ours(sat, grouped_batch=True),
        "capattn_torch": without_attention_kernels(ours(sat)),
        **({"capattn_mkl": without_small_matmuls(ours(sat))} if native.small_matmuls(enc.grid) else {}),
        # an encoder's float32 output, without the cache's float16 grid beside it (which a CPU reads)
        **({"capattn_fp32": ours(sat, feats=encoder_output(enc))} if enc.cached_grid is not None else {}),
        "show_tell": ours(st),
    }
    if bf16:
        fns |= {
            "tutorial_bf16": tutorial(bf16_on=device),
            "capattn_bf16": ours(sat, bf16_on=device),
            "show_tell_bf16": ours(st, bf16_on=device),
        }
    return fns


def measure_peaks(device: torch.device, dims, build) -> dict[int, dict[str, float]]:
    """MB each step adds at its peak, measured in this process."""
    return {d: {name: peak_memory_mb(fn, device) for name, fn in build(d).items()} for d in dims}


def peak_memory(argv: list[str], device: torch.device, dims, build) -> dict[int, dict[str, float]]:
    """MB each step adds at its peak. On a CPU, from a child process (``--peak-memory``) that times nothing."""
    if device.type == "cuda":
        return measure_peaks(device, dims, build)
    child = [sys.executable, __file__, *argv, "--peak-memory"]
    out = subprocess.run(child, check=True, capture_output=True, text=True).stdout
    return {int(d): m for d, m in json.loads(out.strip().splitlines()[-1]).items()}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and one repeat, for the test suite")
    parser.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time each step under bf16-mixed (default: where the device multiplies bf16 natively)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    parser.add_argument("--peak-memory", action="store_true", help=argparse.SUPPRESS)  # the child run, see above
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sizes = dict(embed_dim=16, hidden_dim=16, attention_dim=16, vocab=50) if args.quick else {}
    dims = (32, 8) if args.quick else (2048, 512)
    batch, repeats = (4, 1) if args.quick else (args.batch, args.repeats)
    s = {**PAPER, **sizes}
    tokens, lengths = caption_batch(batch, s["vocab"], device=device, longest_first=True)
    bf16 = bf16_in_hardware(device) if args.bf16 is None else args.bf16

    def build(d: int) -> dict:
        return step_fns(d, batch, s, sizes, device, tokens, lengths, bf16=bf16)

    if args.peak_memory:
        return_freed_memory_to_the_os()  # before the warm-up, or its freed blocks would hide the peak
        for fn in (f for d in dims for f in build(d).values()):
            fn()  # warm-up: lazy initialisation and the optimizer state are not a step's peak
        print(json.dumps(measure_peaks(device, dims, build)))
        return 0
    peak = matmul_peak_gflops(device, n=512 if args.quick else 2048)
    peak_bf16 = matmul_peak_gflops(device, torch.bfloat16, n=512 if args.quick else 2048) if bf16 else None
    note = load_note()
    raw = {d: interleaved(build(d), repeats, device) for d in dims}
    t_all = {d: {name: median(xs) for name, xs in raw[d].items()} for d in dims}
    mems = peak_memory(argv, device, dims, build)
    rows = []
    images = grouped_images(batch)
    for d in dims:
        t, mem = t_all[d], mems[d]
        flops = {
            "tutorial": sat_train_flops(lengths, d, keys_every_step=True, **sizes),
            "capattn": sat_train_flops(lengths, d, **sizes),
            "capattn_grouped": sat_train_flops(lengths, d, images=images, **sizes),
            "capattn_torch": sat_train_flops(lengths, d, **sizes),
            "capattn_mkl": sat_train_flops(lengths, d, **sizes),
            "capattn_fp32": sat_train_flops(lengths, d, **sizes),
            "show_tell": show_tell_train_flops(lengths, d, **sizes),
        }
        labels = {
            "tutorial": "SAT, tutorial-style",
            "capattn": "SAT, capattn",
            "capattn_grouped": (
                f"SAT, capattn, {CAPTIONS_PER_IMAGE} captions per image "
                f"(data.group_captions: {images} image{'s' if images > 1 else ''})"
            ),
            "capattn_torch": "SAT, capattn, no C kernels (CAPATTN_NATIVE=0)",
            "capattn_mkl": "SAT, capattn, per-word matmuls in MKL",
            "capattn_fp32": "SAT, capattn, float32 features only (no cache)",
            "show_tell": "Show and Tell, capattn",
        }
        for name in ("tutorial", "capattn", "show_tell"):
            flops[f"{name}_bf16"] = flops[name]
            labels[f"{name}_bf16"] = f"{labels[name]}, bf16-mixed"
        for name in t:
            gflops = flops[name] / t[name] / 1e9
            bf16_row = name.endswith("_bf16")
            if name == "tutorial":
                ratio = "1× tutorial"
            elif name.startswith("show_tell"):
                ratio = f"{t[name] / t[name.replace('show_tell', 'capattn')]:.2f}× SAT"
            else:
                # each repeat ran the two one after the other: the spread of their ratios shows the noise
                paired = sorted(a / b for a, b in zip(raw[d][name], raw[d]["tutorial"], strict=True))
                ratio = (
                    f"{t[name] / t['tutorial']:.3f}× tutorial (repeats {paired[0]:.3f}–{paired[-1]:.3f}; "
                    f"FLOPs: {flops[name] / flops['tutorial']:.3f}×)"
                )
                if name == "capattn_bf16":
                    ratio += f"; {t[name] / t['tutorial_bf16']:.3f}× tutorial bf16-mixed"
                    ratio += f"; {t[name] / t['capattn']:.2f}× capattn fp32"
            rows.append(
                [
                    labels[name],
                    f"196×{d}",
                    f"{1000 * t[name]:.0f}",
                    f"{batch / t[name]:.0f}",
                    f"{flops[name] / 1e9:.1f}",
                    f"{gflops:.0f} ({100 * gflops / (peak_bf16 if bf16_row else peak):.0f}%)",
                    f"{mem[name]:.0f}",
                    ratio,
                ]
            )
    header = [
        "step",
        "grid",
        "median ms/step",
        "captions/s",
        "model GFLOP",
        "GFLOP/s (% of peak)",
        "peak MB",
        "ratio",
    ]
    table = markdown_table(header, rows)
    print(table)
    words = float((lengths - 1).sum())
    title = results_title("bench_train.py", args.quick, device)
    body = (
        f"B={batch}, V={s['vocab']}, {s['embed_dim']} dims, {int(words)} predicted words (COCO-like lengths), "
        f"fp32"
        + (" and bf16-mixed (forward under bf16 autocast, as Lightning's precision=bf16-mixed)" if bf16 else "")
        + f", cached features, batch rows longest first; Adam (capattn: torch's fused CPU kernel, as "
        f"configure_optimizers picks it; tutorial: torch's default); median of {repeats} interleaved repeats; {note}; "
        f"measured matmul peak {peak:.0f} GFLOP/s (2048² fp32)"
        + (f", {peak_bf16:.0f} in bf16 (the bf16-mixed rows' %)" if bf16 else "")
        + ". Model GFLOP counts each implementation's own "
        f"matmul work (the baseline projects the keys again at every word). The tutorial-style baseline is "
        f"benchmarks/tutorial.py, same parameters, same loss (checked). 'No C kernels': capattn's step "
        f"with its fused CPU attention kernels and small-matmul kernels off; 'per-word matmuls in MKL': the "
        f"small-matmul kernels alone off (the loop's matmuls of the captions still running, in torch's "
        f"matmul). The features are as the feature cache hands them to the model (float16 values, with the "
        f"float16 grid beside them, which capattn's loop reads for the attention on a CPU); 'float32 features "
        f"only': an encoder's output, without the cache. '{CAPTIONS_PER_IMAGE} captions per image': the same "
        f"{batch} captions from fewer images, {CAPTIONS_PER_IMAGE} each (data.group_captions; as COCO and "
        f"Flickr8k have them): capattn projects each image's keys once for its captions, and its ratio is to "
        f"the same tutorial step (whose work does not depend on which images the rows show; its loss on "
        f"those rows is the same, checked).\n\n{table}\n"
    )
    append_results(args.results, title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
