"""The training loop's per-word matmuls of a few rows: torch's matmul (MKL) against capattn's kernels.

    .venv/bin/python benchmarks/bench_matmul.py            # paper sizes, 1-64 rows
    .venv/bin/python benchmarks/bench_matmul.py --quick    # two row counts, for the test suite

At each word, Show, Attend and Tell's teacher-forced loop multiplies the b captions still running
(b ≤ the batch, shrinking) by the same weights: forward z W_zᵀ (W_z 4H × D) and h W_rᵀ (W_r
(A + 1 + 4H) × H), backward their transposes. This times each product alone at the paper's sizes
(H = A = 512, D = 2048 and 512), for row counts from 1 to 64, in torch's matmul and in
``native.matmul_nt`` / ``matmul_nn`` (CPU, built with AVX-512), interleaved in one process. The last
column says whether the loop takes the kernel for that product (``native.NT_ROWS``, ``NN_ROWS``,
``MIN_WEIGHT``). Prints a table and appends it to RESULTS.md.
"""

from __future__ import annotations

import argparse
import sys
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
ROWS = (1, 2, 4, 8, 16, 24, 32, 48, 64)
CALLS = 10  # products per timed call: one takes 0.05-3 ms
# Where the loop takes the kernels (read before main() lifts the limits, to time them everywhere).
LOOP_TAKES = {"nt": native.NT_ROWS, "nn": native.NN_ROWS, "min_weight": native.MIN_WEIGHT}


def products(feature_dim: int) -> list[tuple[str, str, int, int]]:
    """(label, kind, N, K): the loop's per-word products at grid 196 × feature_dim. kind "nt": x (b, K)
    times Wᵀ, W (N, K); "nn": a (b, K) times B (K, N)."""
    gates, rec = 4 * HIDDEN, HIDDEN + 1 + 4 * HIDDEN
    return [
        (f"forward z W_zᵀ, D={feature_dim}", "nt", gates, feature_dim),
        (f"backward dG W_z, D={feature_dim}", "nn", feature_dim, gates),
    ] + ([("forward h W_rᵀ", "nt", rec, HIDDEN), ("backward dF W_r", "nn", HIDDEN, rec)] if feature_dim == 2048 else [])


def timed_pair(kind: str, rows: int, n: int, k: int):
    """The product in torch and in the kernel (None where the kernel does not take it), each CALLS times."""
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, k, generator=g)
    if kind == "nt":
        weight, out = torch.randn(n, k, generator=g), torch.randn(rows, n, generator=g)

        def mkl():
            for _ in range(CALLS):
                out.addmm_(x, weight.t())

        def kernel():
            for _ in range(CALLS):
                native.matmul_nt(x, weight, out, accumulate=True)

        taken = rows in LOOP_TAKES["nt"] and weight.numel() >= LOOP_TAKES["min_weight"]
    else:
        weight, out = torch.randn(k, n, generator=g), torch.empty(rows, n)

        def mkl():
            for _ in range(CALLS):
                torch.mm(x, weight, out=out)

        def kernel():
            for _ in range(CALLS):
                native.matmul_nn(x, weight, out)

        taken = rows in LOOP_TAKES["nn"] and weight.numel() >= LOOP_TAKES["min_weight"]
    return mkl, kernel, taken


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--quick", action="store_true", help="two row counts and one repeat, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    rows_list, repeats = ((4, 32), 1) if args.quick else (ROWS, args.repeats)
    built = native.small_matmuls(torch.zeros(1))
    # Time the kernels at every row count and size; the last column says whether the loop takes them.
    native.NT_ROWS = native.NN_ROWS = range(1, 65)
    native.MIN_WEIGHT = 0
    try:
        table_rows = []
        for d in (2048, 512):
            for label, kind, n, k in products(d):
                for rows in rows_list:
                    mkl, kernel, taken = timed_pair(kind, rows, n, k)
                    fns = {"mkl": mkl} | ({"kernel": kernel} if built else {})
                    times = {name: median(ts) / CALLS for name, ts in interleaved(fns, repeats, device).items()}
                    flop = 2 * rows * n * k
                    kernel_cells = ["not built (no AVX-512)", "", ""]
                    if built:
                        t = times["kernel"]
                        kernel_cells = [f"{1e3 * t:.3f}", f"{flop / t / 1e9:.0f}", f"{times['mkl'] / t:.2f}×"]
                    shape = f"{n}×{k}" if kind == "nt" else f"{k}×{n}"  # the weight as stored
                    mkl_cells = [f"{1e3 * times['mkl']:.3f}", f"{flop / times['mkl'] / 1e9:.0f}"]
                    table_rows.append(
                        [label, shape, str(rows), *mkl_cells] + kernel_cells + ["yes" if built and taken else "no"]
                    )
    finally:
        native.NT_ROWS, native.NN_ROWS, native.MIN_WEIGHT = LOOP_TAKES.values()
    header = [
        "product",
        "weight",
        "rows",
        "torch ms",
        "torch GFLOP/s",
        "kernel ms",
        "kernel GFLOP/s",
        "speed-up",
        "the loop takes the kernel",
    ]
    table = markdown_table(header, table_rows)
    print(table)
    peak = matmul_peak_gflops(device, n=2048)
    body = (
        f"The per-word products of Show, Attend and Tell's training loop at the paper's sizes (H = A = {HIDDEN}), "
        f"alone: torch's matmul (MKL) against capattn's kernels (native.matmul_nt / matmul_nn), median of "
        f"{repeats} interleaved repeats of {CALLS} products; {load_note()}; measured matmul peak {peak:.0f} GFLOP/s "
        f"(2048² fp32). The loop takes the kernel for {native.NT_ROWS.start}–{native.NT_ROWS.stop - 1} rows "
        f"(forward), {native.NN_ROWS.start}–{native.NN_ROWS.stop - 1} (backward), weights of "
        f"{native.MIN_WEIGHT:,} elements or more; timed here at every row count.\n\n{table}\n"
    )
    append_results(args.results, results_title("bench_matmul.py", args.quick, device), body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
