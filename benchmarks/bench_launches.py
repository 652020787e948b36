"""Kernel launches of Show, Attend and Tell's training step, counted on any machine.

    .venv/bin/python benchmarks/bench_launches.py
    .venv/bin/python benchmarks/bench_launches.py --quick     # a small batch, for the test suite

On a GPU at B=256 the step is bound by launches, not by maths (RESULTS.md, sixth session: 1,766
kernels a step, the GPU idle 40-70% of it), so the number of ops a word dispatches is a speed figure
in its own right. This script counts them without a GPU: it runs the decoder's teacher-forced
forward and backward (the loss included, no optimizer) on CPU tensors under a dispatch counter, with
the attention's GPU branches forced on (whole batches and batched matmuls, the fused C kernels off),
so every op it counts is one a GPU would launch, in fp32 and under bf16 autocast (bf16-mixed, whose
casts launch kernels too). The CPU's own paths are counted too. Views,
allocations and other metadata ops launch nothing and are counted apart, as are reads of a value
back to the host (``.item()``). (A step reads two values back, each a synchronisation on a GPU:
the rows still running at each word, and whether the batch came sorted.)

It also times the step at negligible sizes (8 dims, 4 locations), where what is left is the host's
cost of issuing the ops: the part of a GPU step that launches cost. Prints a table and appends it
to RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).parent))

from _common import RESULTS, append_results, caption_batch, load_note, markdown_table, median, results_title  # noqa: E402

from capattn.models import attention, native  # noqa: E402
from capattn.models.decoders import ShowAttendTellDecoder  # noqa: E402
from capattn.models.encoder import EncoderOutput  # noqa: E402

# aten ops that launch no kernel: views, allocations, metadata
NO_KERNEL = {
    "aten.alias", "aten.as_strided", "aten.chunk", "aten.detach", "aten.empty", "aten.empty_like",
    "aten.empty_strided", "aten.expand", "aten.lift_fresh", "aten.narrow", "aten.new_empty",
    "aten.new_empty_strided", "aten.permute", "aten.reshape", "aten.select", "aten.slice", "aten.split",
    "aten.split_with_sizes", "aten.squeeze", "aten.t", "aten.transpose", "aten.unbind", "aten.unflatten",
    "aten.unsqueeze", "aten.view", "aten._unsafe_view", "aten._reshape_alias",
}  # fmt: skip
HOST_READS = {"aten._local_scalar_dense", "aten.item"}


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while it is active, by overload packet."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def gpu_branches(bf16: bool = False) -> contextlib.ExitStack:
    """The attention's GPU branches forced on, the C kernels off; with ``bf16``, under bf16 autocast
    (``--trainer.precision=bf16-mixed``), whose casts are ops a GPU launches too."""
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(attention, "_whole_batch", lambda x: True))
    stack.enter_context(mock.patch.object(native, "usable", lambda *tensors: False))
    if bf16:
        stack.enter_context(torch.autocast("cpu", dtype=torch.bfloat16))
    return stack


def paths() -> dict[str, Callable[[], contextlib.AbstractContextManager]]:
    """The ways the loop's attention can run, each a context to enter: a GPU's branches (in fp32 and
    under bf16-mixed), and the CPU's two."""
    out: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
        "GPU branches (attention in PyTorch)": gpu_branches,
        "GPU branches, bf16-mixed": functools.partial(gpu_branches, bf16=True),
    }
    if native.kernels() is not None:
        out["CPU, fused attention kernels"] = contextlib.nullcontext
    out["CPU, attention in PyTorch"] = functools.partial(mock.patch.object, native, "usable", lambda *tensors: False)
    return out


def step_fn(batch: int, dims: dict, grid: int):
    tokens, lengths = caption_batch(batch, dims["vocab"], longest_first=True)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(batch, grid, dims["feature"], generator=g).relu()
    enc = EncoderOutput(grid=features, pooled=features.mean(dim=1))
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(
        vocab_size=dims["vocab"], feature_dim=dims["feature"], embed_dim=dims["hidden"],
        hidden_dim=dims["hidden"], attention_dim=dims["hidden"], dropout=0.5,
    )  # fmt: skip

    def step() -> None:
        out = dec(enc, tokens, lengths)
        (F.cross_entropy(out.logits, out.targets) + out.aux_loss).backward()
        dec.zero_grad(set_to_none=True)

    return step, int(lengths.max()) - 1


def measure(batch: int, repeats: int) -> list[list[str]]:
    """One table row per path: ops counted in one step, host time at negligible sizes."""
    tiny = dict(vocab=100, feature=8, hidden=8)
    rows = []
    for name, context in paths().items():
        with context():
            step, words = step_fn(batch, tiny, grid=4)
            step()  # first call: builds the kernels, warms the allocator
            with OpCounter() as counter:
                step()
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                step()
                times.append(time.perf_counter() - start)
        ops = counter.ops
        launches = sum(n for op, n in ops.items() if op not in NO_KERNEL | HOST_READS)
        metadata = sum(n for op, n in ops.items() if op in NO_KERNEL)
        ms = median(times) * 1000
        rows.append(
            [
                name, str(words), str(launches), f"{launches / words:.1f}", f"{metadata / words:.1f}",
                f"{ms:.1f}", f"{ms * 1000 / words:.0f}",
            ]
        )  # fmt: skip
        top = ", ".join(f"{op.removeprefix('aten.')} {n}" for op, n in ops.most_common() if op not in NO_KERNEL)
        print(f"{name}: {top}")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="a small batch and few repeats, for the test suite")
    parser.add_argument("--results", type=Path, default=RESULTS, help="Markdown file the results are appended to")
    args = parser.parse_args(argv)
    batch, repeats = (8, 2) if args.quick else (args.batch, args.repeats)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the host issues ops from one thread; tiny ops gain nothing from more
    try:
        rows = measure(batch, repeats)
        title = results_title("bench_launches.py", args.quick, torch.device("cpu"))  # says "1 threads"
    finally:
        torch.set_num_threads(threads)  # the test suite calls main in its own process
    table = markdown_table(
        [
            "path", "words (steps)", "kernel ops a step", "per word", "views/metadata per word",
            "host ms a step (8 dims)", "host µs per word",
        ],
        rows,
    )  # fmt: skip
    lengths = "COCO-like caption lengths (about 10.5 words), longest first"
    body = (
        f"Show, Attend and Tell, teacher-forced forward and backward with the loss, no optimizer; B={batch}, "
        f"{lengths}; ops counted under a dispatch counter on CPU tensors; host time at 8 dims, 4 locations, "
        f"V=100, one thread, median of {repeats}; {load_note()}.\n\n{table}\n"
    )
    print(table)
    append_results(args.results, title, body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
