"""The per-word matmuls of training and decoding: torch's matmul (MKL) against capattn's kernels.

    .venv/bin/python benchmarks/bench_matmul.py            # paper sizes: 1-64 rows (training), 100-500 (decoding)
    .venv/bin/python benchmarks/bench_matmul.py --quick    # a few row counts, for the test suite

At each word, Show, Attend and Tell's teacher-forced loop multiplies the b captions still running
(b ≤ the batch, shrinking) by the same weights: forward z W_zᵀ (W_z 4H × D) and h W_rᵀ (W_r
(A + 1 + 4H) × H), backward their transposes. A decoding step multiplies its hypotheses (100-500
rows for 100 images) by W_r, W_z and the deep output layer's L_z (E × D) and L_o (V × E); a search
(or a training batch) first projects the grid's rows to attention keys (W_a, A × D); a training
step also multiplies all its positions (368 at B=32) by the gates' word part W_e (4H × E) and, in
backward, by L_z and L_o (the deep output layer's input gradients). This times
each product alone at the paper's sizes (H = A = E = 512, D = 2048 and 512, V = 10,000), in torch's
matmul and in ``native.matmul_nt`` / ``matmul_nn`` (CPU, built with AVX-512 or AVX2), interleaved in one
process. The last column says whether capattn takes the kernel for that product (``native.takes``).
Prints a table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from _common import (  # noqa: E402
    RESULTS,
    append_results,
    interleaved,
    load_note,
    markdown_table,
    matmul_peak_gflops,
    median,
    results_title,
)

from capattn.models import native  # noqa: E402

HIDDEN = 512  # H = A = E, the paper's sizes
VOCAB = 10_000
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)  # training: the captions still running
DECODING_ROWS = (100, 300, 500)  # decoding 100 images: greedy, beam 3, beam 5
KEY_ROWS = (1_960, 19_600)  # 196 grid locations of 10 and 100 images
POSITIONS = (368,)  # a training batch's real positions: 32 COCO-like captions (bench_train.py)
CALLS = 10  # products per timed call: one takes 0.05-35 ms
# A decoding step's products at the paper's sizes (label, N, K of W): 51 MB of weights a word, more
# than the CPU's last-level cache, so each weight comes from memory when the step reaches it.
STEP_PRODUCTS = (
    ("output layer x L_oᵀ", VOCAB, HIDDEN),
    ("z W_zᵀ", 4 * HIDDEN, 2048),
    ("h W_rᵀ", HIDDEN + 1 + 4 * HIDDEN, HIDDEN),
    ("new words' gates E y W_eᵀ", 4 * HIDDEN, HIDDEN),
    ("deep output z L_zᵀ", HIDDEN, 2048),
)
FEW_ROWS = (1, 2, 3, 4)  # one image's greedy search and beams 2-4, or the last images of a batch


def products(feature_dim: int) -> list[tuple[str, str, int, int, tuple[int, ...]]]:
    """(label, kind, N, K, row counts): the per-word products at grid 196 × feature_dim. kind "nt":
    x (b, K) times Wᵀ, W (N, K); "nn": a (b, K) times B (K, N)."""
    gates, rec = 4 * HIDDEN, HIDDEN + 1 + 4 * HIDDEN
    out = [
        (f"training, forward z W_zᵀ, D={feature_dim}", "nt", gates, feature_dim, ROWS),
        (f"training, backward dG W_z, D={feature_dim}", "nn", feature_dim, gates, ROWS),
    ]
    if feature_dim == 2048:
        out += [
            ("training, forward h W_rᵀ", "nt", rec, HIDDEN, ROWS),
            ("training, backward dF W_r", "nn", HIDDEN, rec, ROWS),
            ("decoding, h W_rᵀ", "nt", rec, HIDDEN, DECODING_ROWS),
            ("decoding, z W_zᵀ", "nt", gates, feature_dim, DECODING_ROWS),
            ("decoding, deep output z L_zᵀ", "nt", HIDDEN, feature_dim, DECODING_ROWS),
            ("decoding, output layer x L_oᵀ", "nt", VOCAB, HIDDEN, DECODING_ROWS),
            # once per search (and per training batch: 6,272 rows at B=32), the grid's rows by W_a
            ("attention keys' projection, grid W_aᵀ (10 and 100 images)", "nt", HIDDEN, feature_dim, KEY_ROWS),
            # once per training step, over the batch's positions: before the loop, and the input's
            # gradient of the deep output layer (native.linear's backward)
            ("training, the gates' word part E y W_eᵀ", "nt", gates, HIDDEN, POSITIONS),
            ("training, backward dY L_z (deep output's input gradient)", "nn", feature_dim, HIDDEN, POSITIONS),
            ("training, backward dY L_o (output layer's input gradient)", "nn", HIDDEN, VOCAB, POSITIONS),
        ]
    return out


def quick_rows(rows: tuple[int, ...]) -> tuple[int, ...]:
    """--quick: the third and the last training row counts, the first decoding one."""
    return (rows[2], rows[-1]) if len(rows) > 3 else rows[:1]


@contextlib.contextmanager
def every_size():
    """The kernels take any row count and weight size (to time them where capattn would not)."""
    saved = native.MIN_WEIGHT
    native.MIN_WEIGHT = 0
    try:
        yield
    finally:
        native.MIN_WEIGHT = saved


def timed_pair(kind: str, rows: int, n: int, k: int):
    """The product in torch and in the kernel, each CALLS times, and whether capattn takes the kernel."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    if kind == "nt":
        weight, out = torch.randn(n, k, generator=g), torch.randn(rows, n, generator=g)

        def mkl():
            for _ in range(CALLS):
                out.addmm_(x, weight.t())

        def kernel():
            with every_size():
                for _ in range(CALLS):
                    native.matmul_nt(x, weight, out, accumulate=True)

        taken = native.takes(rows, weight)
    else:
        weight, out = torch.randn(k, n, generator=g), torch.empty(rows, n)

        def mkl():
            for _ in range(CALLS):
                torch.mm(x, weight, out=out)

        def kernel():
            with every_size():
                for _ in range(CALLS):
                    native.matmul_nn(x, weight, out)

        taken = native.takes(rows, weight)
    return mkl, kernel, taken


def step_from_memory(rows: int, repeats: int, built: bool) -> dict[tuple[str, str], float]:
    """Median seconds of each of a decoding step's products at ``rows`` rows, torch's and the kernel's,
    run one after the other as a step runs them (each weight evicted by the others since its last use)."""
    g = torch.Generator().manual_seed(rows)
    ops = [(label, torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)) for label, n, k in STEP_PRODUCTS]
    outs = [torch.empty(rows, w.shape[0]) for _, _, w in ops]
    impls = ("mkl", "kernel") if built else ("mkl",)
    times: dict[tuple[str, str], list[float]] = {(impl, label): [] for impl in impls for label, _, _ in ops}
    with every_size():
        for _ in range(repeats + 1):  # the first round warms up, untimed
            for impl in impls:
                for (label, x, w), out in zip(ops, outs, strict=True):
                    start = time.perf_counter()
                    if impl == "mkl":
                        torch.mm(x, w.t(), out=out)
                    else:
                        native.matmul_nt(x, w, out)
                    times[(impl, label)].append(time.perf_counter() - start)
    return {key: median(ts[1:]) for key, ts in times.items()}


def step_table(repeats: int, built: bool) -> str:
    """A decoding step's products at 1-4 rows, weights from memory: ms each and for the step."""
    rows_out = []
    for rows in FEW_ROWS:
        t = step_from_memory(rows, repeats, built)
        for label, n, k in (*STEP_PRODUCTS, ("all five (one step)", 0, 0)):
            pick = [lb for lb, _, _ in STEP_PRODUCTS] if n == 0 else [label]
            mkl = sum(t[("mkl", lb)] for lb in pick)
            cells = ["not built (no AVX-512 or AVX2)", ""]
            if built:
                kern = sum(t[("kernel", lb)] for lb in pick)
                cells = [f"{1e3 * kern:.3f}", f"{mkl / kern:.2f}×"]
            rows_out.append([label, f"{n}×{k}" if n else "", str(rows), f"{1e3 * mkl:.3f}", *cells])
    return markdown_table(["product", "weight", "rows", "torch ms", "kernel ms", "speed-up"], rows_out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="a few row counts and one repeat, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    repeats = 1 if args.quick else args.repeats
    built = native.small_matmuls(torch.zeros(1))
    table_rows = []
    for d in (2048, 512):
        for label, kind, n, k, rows_list in products(d):
            for rows in quick_rows(rows_list) if args.quick else rows_list:
                mkl, kernel, taken = timed_pair(kind, rows, n, k)
                fns = {"mkl": mkl} | ({"kernel": kernel} if built else {})
                times = {name: median(ts) / CALLS for name, ts in interleaved(fns, repeats, device).items()}
                flop = 2 * rows * n * k
                kernel_cells = ["not built (no AVX-512 or AVX2)", "", ""]
                if built:
                    t = times["kernel"]
                    kernel_cells = [f"{1e3 * t:.3f}", f"{flop / t / 1e9:.0f}", f"{times['mkl'] / t:.2f}×"]
                shape = f"{n}×{k}" if kind == "nt" else f"{k}×{n}"  # the weight as stored
                mkl_cells = [f"{1e3 * times['mkl']:.3f}", f"{flop / times['mkl'] / 1e9:.0f}"]
                table_rows.append(
                    [label, shape, str(rows), *mkl_cells] + kernel_cells + ["yes" if built and taken else "no"]
                )
    header = [
        "product",
        "weight",
        "rows",
        "torch ms",
        "torch GFLOP/s",
        "kernel ms",
        "kernel GFLOP/s",
        "speed-up",
        "capattn takes the kernel",
    ]
    table = markdown_table(header, table_rows)
    print(table)
    few = step_table(repeats, built)
    print(few)
    peak = matmul_peak_gflops(device, n=2048)
    body = (
        f"The per-word products of Show, Attend and Tell's training loop and decoding step at the paper's sizes "
        f"(H = A = E = {HIDDEN}, V = {VOCAB:,}), alone: torch's matmul (MKL) against capattn's kernels "
        f"(native.matmul_nt / matmul_nn), median of {repeats} interleaved repeats of {CALLS} products; "
        f"{load_note()}; measured matmul peak {peak:.0f} GFLOP/s (2048² fp32). capattn takes the kernel "
        f"(native.takes) at any number of rows, for weights of {native.MIN_WEIGHT:,} elements or more. Timed "
        f"here at every row count, each product alone (its weight warm in cache); the second table times a "
        f"decoding step's products at 1-4 rows one after the other, each weight read from memory as in "
        f"a step.\n\n{table}\n\n{few}\n"
    )
    append_results(args.results, results_title("bench_matmul.py", args.quick, device), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
