"""Shared pieces of the model benchmarks: machine description, interleaved timing, FLOP counts,
paper-size inputs, and appending a dated section to RESULTS.md."""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

import capattn  # noqa: F401  (its torchvision guard runs first)
from capattn.models import native
from capattn.models.encoder import EncoderOutput

RESULTS = Path(__file__).with_name("RESULTS.md")
COCO_TRAIN_CAPTIONS = 113_287 * 5  # Karpathy train + restval images × 5 captions: one epoch
PAPER = dict(grid=196, embed_dim=512, hidden_dim=512, attention_dim=512, vocab=10_000)


# --- where it ran ------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    flags = _cpu_flags()
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    if "amx_bf16" in flags:  # bf16 matrix units: bf16-mixed rows run several times faster than fp32 here
        isa += " + AMX"
    elif "avx512_bf16" in flags:  # bf16 dot products: about 2.2× fp32's matmul rate (AMD Zen 4)
        isa += " + BF16"
    kernels = "fused attention kernels on" if native.kernels() is not None else "fused attention kernels off"
    held = [f"{var}={os.environ[var]}" for var in _ISA_LIMITS if os.environ.get(var)]
    if held:  # e.g. an AVX2 laptop emulated on an AVX-512 CPU: say so, or the row reads as AVX-512's
        isa += f" (held by {' '.join(held)})"
    return f"CPU {cpu_name()}, {os.cpu_count()} cores, {isa}, {torch.get_num_threads()} threads, {kernels}"


# Variables that keep torch's kernels, MKL, oneDNN or capattn's kernels below the CPU's instruction set.
_ISA_LIMITS = ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "ONEDNN_MAX_CPU_ISA", "CAPATTN_NATIVE_CFLAGS")


def _cpu_flags() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def load_note() -> str:
    """The 1-minute load average: other work on a shared machine makes absolute times noisy."""
    try:
        return f"load average {os.getloadavg()[0]:.1f} at the start"
    except OSError:
        return "load average unknown"


def results_title(script: str, quick: bool, device: torch.device) -> str:
    """The heading of a benchmark's RESULTS.md section: script, mode, machine, torch version."""
    return f"{script}{' --quick' if quick else ''}, {device_description(device)}, torch {torch.__version__}"


def append_results(path: Path, title: str, body: str) -> None:
    """Appends ``## <date> — <title>`` and ``body`` to the results file (never rewrites it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        if f.tell() == 0:
            f.write("# Benchmark results\n\nAppended by the scripts in this folder; newest last.\n")
        f.write(f"\n## {datetime.date.today().isoformat()} — {title}\n\n{body.rstrip()}\n")


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


@contextlib.contextmanager
def attention_kernels(on: bool):
    """Runs the block with capattn's fused CPU attention kernels on or off (``CAPATTN_NATIVE``)."""
    before = os.environ.get("CAPATTN_NATIVE")
    os.environ["CAPATTN_NATIVE"] = "1" if on else "0"
    native.kernels.cache_clear()
    try:
        yield
    finally:
        if before is None:
            del os.environ["CAPATTN_NATIVE"]
        else:
            os.environ["CAPATTN_NATIVE"] = before
        native.kernels.cache_clear()


def without_attention_kernels(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with attention computed by PyTorch alone: the row that shows what the kernels add."""

    def run() -> object:
        with attention_kernels(False):
            return fn()

    return run


# --- timing ------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(fns: dict[str, Callable[[], object]], repeats: int, device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, run in turn (A B C A B C …) so that load from other
    processes hits all of them alike: their ratios hold even when the absolute times do not."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (allocator, lazy init, compile)
        fn()
    sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - start)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory one call adds: CUDA's allocator peak, or on CPU the process RSS sampled every ms.

    On CPU this first makes glibc give every allocation ≥ 1 MB back to the OS on free (see
    ``return_freed_memory_to_the_os``), for the rest of the process: call it only in a process that
    times nothing (``bench_train.py`` measures memory in a child run of itself).
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    return_freed_memory_to_the_os()
    page = os.sysconf("SC_PAGE_SIZE")

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    before, peak, running = rss(), [0], [True]

    def watch() -> None:
        while running[0]:
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        running[0] = False
        thread.join()
    return max(0, max(peak[0], rss()) - before) / 2**20


def return_freed_memory_to_the_os() -> None:
    """Makes every allocation ≥ 1 MB its own mmap, given back on free (glibc's mallopt), so the
    process RSS follows the live tensors and ``peak_memory_mb`` can tell one step's peak from
    memory an earlier step freed but kept (glibc otherwise raises that threshold as it goes).

    Never before a timing: with it, every large tensor is a fresh mmap whose pages fault in again
    at each step (measured: capattn's SAT training step 409 ms against 355 ms under glibc's
    default, which is what a training run gets), so it would time the page faults, not the model.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def matmul_peak_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048) -> float:
    """Measured GFLOP/s of a square n×n matmul: the machine's practical ceiling for this dtype."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    repeats = 20 if device.type == "cuda" else 5
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - start) / repeats)
    return 2 * n**3 / best / 1e9


# --- inputs ------------------------------------------------------------------------------------


def caption_batch(
    batch: int,
    vocab: int,
    *,
    seed: int = 0,
    device: torch.device | str = "cpu",
    mean_words: float = 10.5,
    longest_first: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, T) and lengths (B,) of COCO-like captions: about 10.5 words (sd 2.5, 6–22) + <bos>/<eos>.

    ``longest_first``: rows sorted by length, longest first, as capattn's batch samplers deliver them.
    """
    g = torch.Generator().manual_seed(seed)
    words = (torch.randn(batch, generator=g) * 2.5 + mean_words).round().clamp(6, 22).long()
    lengths = words + 2
    tokens = torch.randint(4, vocab, (batch, int(lengths.max())), generator=g)
    tokens[:, 0] = 1
    for i, n in enumerate(lengths.tolist()):
        tokens[i, n - 1], tokens[i, n:] = 2, 0
    if longest_first:
        order = lengths.argsort(descending=True, stable=True)
        tokens, lengths = tokens[order], lengths[order]
    return tokens.to(device), lengths.to(device)


def features(batch: int, feature_dim: int, *, seed: int = 0, device: torch.device | str = "cpu") -> EncoderOutput:
    """Cached-feature stand-ins, as the datamodule hands a batch from the feature cache to the model:
    a (B, 196, D) grid of float16 values in float32 and its mean, no gradient (the encoder is frozen),
    and on a CPU the float16 grid itself (``EncoderOutput.cached_grid``, which decoding reads)."""
    g = torch.Generator().manual_seed(seed)
    half = torch.randn(batch, PAPER["grid"], feature_dim, generator=g).relu().half()  # (B, L, D), as cached
    grid = half.float().to(device)
    return EncoderOutput(grid=grid, pooled=grid.mean(dim=1), cached_grid=half if grid.device.type == "cpu" else None)


def encoder_output(enc: EncoderOutput) -> EncoderOutput:
    """``enc`` as an encoder gives it (images, no feature cache): float32 only, no ``cached_grid``."""
    return EncoderOutput(grid=enc.grid, pooled=enc.pooled)


# --- the compute floor -------------------------------------------------------------------------


def sat_train_flops(
    lengths: torch.Tensor,
    feature_dim: int,
    *,
    grid_grad: bool = False,
    keys_every_step: bool = False,
    images: int | None = None,
    **sizes: int,
) -> float:
    """FLOPs of one Show, Attend and Tell training step, forward + backward, at the real positions.

    Per predicted word: attention query, energy and context, the LSTM's input and recurrent
    matmuls, the deep output layer and L_o (forward ×3 for the backward's two matmuls). Per image:
    the keys W_a a_i once (backward: the weight's gradient, and the grid's if the encoder trains), or
    at every word with ``keys_every_step`` (what the tutorial-style baseline computes). ``images``:
    how many different images the captions have (``data.group_captions``; default one per caption).
    Elementwise work is not counted.
    """
    words = float((lengths - 1).sum())
    per_word, keys = _sat_macs(feature_dim, sizes)
    keys *= words if keys_every_step else (images or lengths.shape[0])  # per word: the tutorial-style baseline
    return 2 * (3 * words * per_word + (3 if grid_grad else 2) * keys)


def _sat_macs(feature_dim: int, sizes: dict[str, int]) -> tuple[float, float]:
    """Show, Attend and Tell's multiply-adds per hypothesis and word (the attention query, f_β, energy
    and context, the LSTM's matmuls, the deep output layer and L_o), and those of one image's keys W_a a_i."""
    s = {**PAPER, **sizes}
    d, e, h, a, v, loc = feature_dim, s["embed_dim"], s["hidden_dim"], s["attention_dim"], s["vocab"], s["grid"]
    per_word = h * a + h + loc * a + loc * d + (e + d) * 4 * h + h * 4 * h + h * e + d * e + e * v
    return per_word, loc * d * a


def show_tell_train_flops(lengths: torch.Tensor, feature_dim: int, **sizes: int) -> float:
    """FLOPs of one Show and Tell training step: image embedding, the LSTM over every input, fc at real positions."""
    s = {**PAPER, **sizes}
    e, h, v = s["embed_dim"], s["hidden_dim"], s["vocab"]
    batch, steps = lengths.shape[0], int(lengths.max())  # nn.LSTM runs the padded sequence
    words = float((lengths - 1).sum())
    return 2 * 3 * (batch * feature_dim * e + batch * steps * (e + h) * 4 * h + words * h * v)


def sat_decode_macs(feature_dim: int, steps: int, beams: int, *, keys_every_step: bool, **sizes: int) -> float:
    """Multiply-adds to decode one image with Show, Attend and Tell for ``steps`` words and K beams.

    Per hypothesis and word: the attention query, f_β, energy and context, the LSTM's matmuls, the
    deep output layer and L_o. The keys W_a a_i: once per image (capattn, whose first beam step
    also runs one hypothesis, not K), or per hypothesis at every word (the tutorial-style baseline).
    Assumes no beam ends early (untrained weights).
    """
    per_word, keys = _sat_macs(feature_dim, sizes)
    if keys_every_step:
        return steps * beams * (keys + per_word)
    return keys + (1 + (steps - 1) * beams) * per_word if beams > 1 else keys + steps * per_word
