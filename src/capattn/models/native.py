"""Fused CPU kernels for soft attention and beam search, compiled from ``_attention_kernels.c`` on first use.

Soft attention's energy wᵀ tanh(k + q) is elementwise work over (B, K, L, A) values that
PyTorch runs as several passes over memory; the C kernels do it in one, forward and backward,
with a rational tanh (at most 6 float32 ULP from the exact value). The beams' context Σ α·grid
streams each image's grid once for its K hypotheses, and beam search's top-k over (B·K, V)
log-probabilities is one pass per row. Measured on a 2-core AVX-512 CPU at the paper's sizes,
per word of a beam-5 search over 100 images, against PyTorch: the energy 15 → 7.6 ms, the
context 10.3 → 8 ms, the top-k 3.1 → 0.9 ms (README, "Speed"). And where built with AVX-512 or
with AVX2 and FMA (8-lane versions of the same kernels, for most laptops' CPUs), the per-word
matmuls where MKL runs far below its peak (``matmul_nt``, ``matmul_nn``; ``takes`` says where):
the training loop's products of the captions still running, by the same weights at every
word; a decoding step's W_r, W_z, L_z and output layer at any number of hypotheses; the attention
keys' projection; and, over a training batch's positions, the gates' word part, and L_z's and the
output layer's forward and input gradient.

The first process that needs them compiles the C file with the system compiler (``$CC``, else
``cc``; about a second) into ``$CAPATTN_CACHE_DIR`` (default ``~/.cache/capattn``), under a name
that hashes the source, the flags and this CPU: a cache shared by machines with different CPUs
(``-march=native``) never loads a library built for another one. ``CAPATTN_NATIVE_CFLAGS`` adds
compiler flags (e.g. ``-mno-avx512f`` builds the portable code, as the tests do on x86).
Where no compiler or OpenMP is found, one warning says so and attention runs in PyTorch: the same
results to float rounding, slower. ``CAPATTN_NATIVE=0`` turns the kernels off.

Used only on CPU float32 tensors (the context also reads a float16 grid: the feature cache's, at half
the memory traffic); GPUs, autocast and other dtypes take the PyTorch path.
``bf16_in_hardware`` says whether a device multiplies bf16 natively (bf16-mixed's warning, Show and
Tell's LSTM under CPU autocast).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("_attention_kernels.c")
_LONG, _FLOAT, _PTR = ctypes.c_long, ctypes.c_float, ctypes.c_void_p


def cache_dir() -> Path:
    """Where built kernels are kept: ``$CAPATTN_CACHE_DIR``, else ``$XDG_CACHE_HOME/capattn`` (``~/.cache/capattn``)."""
    if os.environ.get("CAPATTN_CACHE_DIR"):
        return Path(os.environ["CAPATTN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "capattn"


def _flags() -> list[str]:
    # -fno-trapping-math lets the compiler turn the tanh's clamps into vector selects (nothing here
    # reads floating-point exception flags): without it the portable code did not vectorise, and
    # its energy took 49 ms for a beam-5 word over 100 images on AVX2 instead of 11.
    flags = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fopenmp", "-fPIC", "-shared"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags.append("-mprefer-vector-width=512")  # 16 lanes where the CPU has AVX-512
    return flags + shlex.split(os.environ.get("CAPATTN_NATIVE_CFLAGS", ""))


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor() or platform.machine()
    keep = ("model name", "flags", "Features", "CPU part")
    return "\n".join(sorted({line for line in lines if line.split(":", 1)[0].strip() in keep}))


def _build(compiler: str, target: Path) -> None:
    """Compiles the kernels to ``target`` atomically (concurrent DDP ranks may race to build it)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        cmd = [compiler, *_flags(), str(SOURCE), "-o", tmp, "-lm"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"`{' '.join(cmd)}` failed: {last}")
        os.replace(tmp, target)
    finally:
        Path(tmp).unlink(missing_ok=True)


@functools.cache
def kernels() -> ctypes.CDLL | None:
    """The loaded kernel library, built first if needed; None where it is off or cannot be built."""
    if os.environ.get("CAPATTN_NATIVE", "1") == "0":
        return None
    try:
        if sys.platform != "linux":
            raise RuntimeError(f"built only on Linux, not {sys.platform}")
        compiler = shutil.which(os.environ.get("CC") or "cc")
        if compiler is None:
            raise RuntimeError(f"no C compiler: `{os.environ.get('CC') or 'cc'}` is not on PATH")
        digest = hashlib.sha256(
            b"\0".join([SOURCE.read_bytes(), compiler.encode(), " ".join(_flags()).encode(), _cpu_signature().encode()])
        ).hexdigest()[:16]
        target = cache_dir() / "native" / f"attention-{digest}.so"
        if not target.exists():
            _build(compiler, target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        log.warning(
            "capattn: fused CPU attention kernels are off (%s); attention runs in PyTorch, slower. "
            "Set CAPATTN_NATIVE=0 to skip this build.",
            err,
        )
        return None
    lib.capattn_energy.argtypes = [_PTR, _PTR, _PTR, _FLOAT, _PTR] + [_LONG] * 4 + [_PTR]
    lib.capattn_energy.restype = None
    lib.capattn_energy_backward.argtypes = [_PTR] * 7 + [_LONG] * 3
    lib.capattn_energy_backward.restype = ctypes.c_int
    lib.capattn_context.argtypes = [_PTR] * 3 + [_LONG] * 4 + [_PTR]
    lib.capattn_context.restype = None
    lib.capattn_context_half.argtypes = [_PTR] * 3 + [_LONG] * 4 + [_PTR]
    lib.capattn_context_half.restype = ctypes.c_int
    lib.capattn_half_available.argtypes = []
    lib.capattn_half_available.restype = ctypes.c_int
    lib.capattn_topk.argtypes = [_PTR] * 3 + [_LONG] * 3
    lib.capattn_topk.restype = None
    lib.capattn_grid_times.argtypes = [_PTR] * 3 + [_LONG] * 3
    lib.capattn_grid_times.restype = None
    lib.capattn_grid_times_half.argtypes = [_PTR] * 3 + [_LONG] * 3
    lib.capattn_grid_times_half.restype = ctypes.c_int
    lib.capattn_tanh.argtypes = [_PTR, _PTR, _LONG]
    lib.capattn_tanh.restype = None
    lib.capattn_small_matmul_available.argtypes = []
    lib.capattn_small_matmul_available.restype = ctypes.c_int
    for name in ("capattn_matmul_nn", "capattn_matmul_nt"):
        getattr(lib, name).argtypes = [_PTR, _LONG, _PTR, _LONG, _PTR, _LONG, _PTR, _LONG, _LONG, _LONG, ctypes.c_int]
        getattr(lib, name).restype = ctypes.c_int
    return lib


def usable(*tensors: Tensor) -> bool:
    """Whether the kernels can take these tensors: CPU float32, not under torch.compile, kernels built."""
    if torch.compiler.is_compiling() or any(t.device.type != "cpu" or t.dtype != torch.float32 for t in tensors):
        return False
    return kernels() is not None


def _ptr(t: Tensor) -> int:
    return t.data_ptr()


# The small-matmul kernels beat torch's (MKL's) matmul at any number of rows, measured at the paper's
# sizes on the 2-core AMD EPYC (benchmarks/RESULTS.md, sixteenth to eighteenth sessions;
# bench_matmul.py), for weights of at least this many elements (2 MB in float32), which come from
# memory at every word: x Wᵀ at the training loop's 4-64 rows, decoding's 100-500 (W_z 1.1-1.6×, the
# output layer 1.2-1.8×, L_z 0.9-1.3× MKL's speed), the keys' projection (19,600 rows for 100 images:
# 215 against 300 ms) and, with the weights read from memory as a decoding step reads them, 1-3 rows
# (2.5-3.5× at 2-3 rows, where MKL's product by a transposed weight ran at 4-10 GB/s; at 1 row 0.9× on
# W_z to 1.5× on the output layer: one image's greedy search 1.3× faster, its beam 3 3×); A B at any
# number of rows (1.2-2.4× at 1 row, 1.1-1.6× at 64-256). At the demo's sizes (64 K–300 K elements,
# one thread) MKL was as fast or faster.
MIN_WEIGHT = 1 << 19


def takes(rows: int, weight: Tensor) -> bool:
    """Whether ``matmul_nt`` and ``matmul_nn`` compute ``rows`` rows times ``weight`` (or its
    transpose) in the kernel."""
    return rows >= 1 and weight.numel() >= MIN_WEIGHT


def small_matmuls(*tensors: Tensor) -> bool:
    """Whether ``matmul_nt`` and ``matmul_nn`` can take these tensors: ``usable``, each with its last
    dimension contiguous, and the kernels built with AVX-512 or AVX2 and FMA (elsewhere they are not
    built, and torch's matmul is the one to use). ``CAPATTN_SMALL_MATMULS=0`` turns them alone off: their row
    ranges were measured on one CPU (an AMD EPYC); ``benchmarks/bench_matmul.py`` shows whether they
    pay on yours."""
    if os.environ.get("CAPATTN_SMALL_MATMULS", "1") == "0":
        return False
    if any(t.dim() and t.stride(-1) != 1 and t.shape[-1] > 1 for t in tensors):
        return False
    return usable(*tensors) and bool(kernels().capattn_small_matmul_available())


def _matrix(t: Tensor, name: str) -> None:
    if t.device.type != "cpu" or t.dtype != torch.float32:
        raise ValueError(f"{name} must be a CPU float32 matrix, got {t.dtype} on {t.device}")
    if t.dim() != 2 or (t.stride(1) != 1 and t.shape[1] > 1) or t.stride(0) < t.shape[1]:
        shape, strides = tuple(t.shape), t.stride()
        raise ValueError(f"{name} must be a 2-D matrix with contiguous rows, got shape {shape}, strides {strides}")


def _mode(out: Tensor, bias: Tensor | None, accumulate: bool) -> int:
    if bias is not None:
        if accumulate or bias.shape != (out.shape[1],) or not bias.is_contiguous():
            raise ValueError(f"bias must be a contiguous ({out.shape[1]},) vector, without accumulate")
        return 2
    return 1 if accumulate else 0


def _run(fn, a: Tensor, b: Tensor, out: Tensor, bias: Tensor | None, mode: int, m: int, n: int, k: int) -> None:
    status = fn(
        _ptr(a), a.stride(0), _ptr(b), b.stride(0), _ptr(out), out.stride(0),
        None if bias is None else _ptr(bias), m, n, k, mode,
    )  # fmt: skip
    if status == 1:
        raise MemoryError("capattn's small-matmul kernel could not allocate its packing buffer")
    if status != 0:
        raise RuntimeError(f"capattn's small-matmul kernel refused its arguments (status {status})")


def matmul_nt(x: Tensor, weight: Tensor, out: Tensor, *, bias: Tensor | None = None, accumulate: bool = False) -> bool:
    """``out = x weightᵀ`` (``+ bias``; or ``out += x weightᵀ`` with ``accumulate``) in the kernel where
    it pays (``takes``); False otherwise (nothing written: the caller uses torch's matmul).

    x (M, K), weight (N, K), out (M, N): CPU float32 matrices whose rows are contiguous (views of
    wider matrices are fine). Check ``small_matmuls`` first. No autograd.
    """
    (m, k), n = x.shape, weight.shape[0]
    if not takes(m, weight):
        return False
    for t, name in ((x, "x"), (weight, "weight"), (out, "out")):
        _matrix(t, name)
    if weight.shape[1] != k or out.shape != (m, n):
        shapes = f"x {tuple(x.shape)}, weight {tuple(weight.shape)}, out {tuple(out.shape)}"
        raise ValueError(f"matmul_nt: {shapes} do not fit")
    _run(kernels().capattn_matmul_nt, x, weight, out, bias, _mode(out, bias, accumulate), m, n, k)
    return True


def matmul_nn(a: Tensor, b: Tensor, out: Tensor, *, accumulate: bool = False) -> bool:
    """``out = a b`` (or ``out += a b``) in the kernel where it pays (``takes``); False otherwise
    (nothing written). a (M, K), b (K, N), out (M, N), as in ``matmul_nt``."""
    (m, k), n = a.shape, b.shape[1]
    if not takes(m, b):
        return False
    for t, name in ((a, "a"), (b, "b"), (out, "out")):
        _matrix(t, name)
    if b.shape[0] != k or out.shape != (m, n):
        raise ValueError(f"matmul_nn: a {tuple(a.shape)}, b {tuple(b.shape)}, out {tuple(out.shape)} do not fit")
    _run(kernels().capattn_matmul_nn, a, b, out, None, _mode(out, None, accumulate), m, n, k)
    return True


def _linear_takes(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether x (…, K) weightᵀ + bias runs in ``matmul_nt``: CPU float32, no autocast or compile,
    the kernels built with AVX-512 or AVX2, and where the kernel pays (``takes``)."""
    if bias is None or torch.is_autocast_enabled(x.device.type) or not small_matmuls(x, weight, bias):
        return False
    return takes(x.numel() // max(x.shape[-1], 1), weight)


def _addmm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    out = x.new_empty(x.shape[0], weight.shape[0])
    matmul_nt(x, weight, out, bias=bias)
    return out


class _Linear(torch.autograd.Function):
    """``x weightᵀ + bias``, its forward in ``matmul_nt`` and its backward as ``nn.Linear``'s: x's
    gradient in ``matmul_nn`` where it takes it (the output layer's at the paper's sizes, 368 × 10,000
    by 10,000 × 512: 20.7 against 24.1 ms in MKL; a training step 12-20 ms faster, eighteenth
    session), the weight's and bias's in torch."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        return _addmm(x, weight, bias)

    @staticmethod
    def backward(ctx, d_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        x, weight = ctx.saved_tensors
        d_x = None
        if ctx.needs_input_grad[0]:
            d_x = d_out.new_empty(d_out.shape[0], weight.shape[1])
            if not (small_matmuls(d_out, weight) and matmul_nn(d_out, weight, d_x)):
                d_x = d_out @ weight
        d_weight = d_out.t() @ x if ctx.needs_input_grad[1] else None
        d_bias = d_out.sum(0) if ctx.needs_input_grad[2] else None
        return d_x, d_weight, d_bias


def linear(layer: torch.nn.Linear, x: Tensor) -> Tensor:
    """``layer(x)`` for x (…, in), its forward in ``matmul_nt`` where it pays, with or without autograd
    (the backward is ``_Linear``'s); elsewhere ``layer(x)``. The attention keys' projection (100 images,
    19,600 × 2048 by 2048 × 512: 215 against 300 ms; a training batch of 32, 6,272 rows: 201 against
    166 GFLOP/s), L_z ẑ_t and the output layer over a batch's positions (RESULTS.md, seventeenth session)."""
    weight, bias = layer.weight, layer.bias
    if not _linear_takes(x, weight, bias):
        return layer(x)
    rows = x.reshape(-1, x.shape[-1])
    out = _Linear.apply(rows, weight, bias) if torch.is_grad_enabled() else _addmm(rows, weight, bias)
    return out.view(*x.shape[:-1], weight.shape[0])


def addmm(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor | None:
    """``x weightᵀ + bias`` for a matrix x, in ``matmul_nt`` where it pays, without autograd (a decoding
    step's products, e.g. the output layer's 10,000 × 512 weight at 100–500 rows: 6.7 against 9.1 ms,
    28 against 35; RESULTS.md, sixteenth session); None elsewhere (use torch's)."""
    if torch.is_grad_enabled() or x.dim() != 2 or not _linear_takes(x, weight, bias):
        return None
    return _addmm(x, weight, bias)


def _per_image(
    memory: Tensor, rows: Tensor, starts: Tensor | None, width: int, out: Tensor | None = None
) -> tuple[int, Tensor, int | None]:
    """K, the output (``out``, else a new one) and the offsets' pointer for the kernels, after
    checking ``starts`` and ``out``.

    ``rows`` are (B, K, ·), K per image of ``memory`` (B, L, ·): the output is (B, K, width), in
    ``rows``' dtype (a float16 grid's context is float32, as its α). With
    ``starts`` (B + 1 offsets) they are (N, ·) image-major and the output (N, width); K is then 0.
    """
    batch = memory.shape[0]
    if starts is None:
        k, shape, ptr = rows.shape[1], (batch, rows.shape[1], width), None
    else:
        n = rows.shape[0]
        if starts.dtype != torch.long or starts.device.type != "cpu" or starts.shape != (batch + 1,):
            raise ValueError(f"starts must be a CPU int64 tensor of {batch + 1} row offsets, got {tuple(starts.shape)}")
        if not starts.is_contiguous() or int(starts[0]) != 0 or int(starts[-1]) != n or bool((starts.diff() < 0).any()):
            raise ValueError(f"starts must rise from 0 to the {n} rows, one offset per image and one past the last")
        k, shape, ptr = 0, (n, width), _ptr(starts)
    if out is None:
        return k, memory.new_empty(shape, dtype=rows.dtype), ptr
    if out.shape != shape or out.dtype != rows.dtype or out.device.type != "cpu" or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous CPU {rows.dtype} tensor of shape {shape}, got {tuple(out.shape)}")
    return k, out, ptr


def energy(keys: Tensor, query: Tensor, weight: Tensor, bias: float, starts: Tensor | None = None) -> Tensor:
    """wᵀ tanh(keys + query) + bias for the queries of each image, without autograd.

    Args:
        keys: (B, L, A) projected keys.
        query: (B, K, A) projected queries, K per image; or, with ``starts``, (N, A) rows image-major.
        weight: (A,) the score vector w.
        bias: the score's bias.
        starts: (B + 1,) int64: image b's queries are rows starts[b] … starts[b+1]−1 of ``query``
            (beam search with its ended beams left out). None: K per image.

    Returns:
        (B, K, L) energies, or (N, L) with ``starts``.
    """
    keys, query, weight = keys.contiguous(), query.contiguous(), weight.contiguous()
    (batch, locations, width) = keys.shape
    k, out, ptr = _per_image(keys, query, starts, locations)
    kernels().capattn_energy(_ptr(keys), _ptr(query), _ptr(weight), bias, _ptr(out), batch, k, locations, width, ptr)
    return out


def energy_backward(
    keys: Tensor, query: Tensor, weight: Tensor, d_energy: Tensor, keys_grad: Tensor
) -> tuple[Tensor, Tensor]:
    """Backward of ``energy`` with one query per image, for the first b rows of the keys.

    Args:
        keys: (B, L, A) projected keys; rows :b are used.
        query: (b, A) the queries.
        weight: (A,) the score vector w.
        d_energy: (b, L) gradient of the energies.
        keys_grad: (B, L, A) buffer the keys' gradient of rows :b is added into, in place.

    Returns:
        the queries' gradient (b, A) and w's (A,).
    """
    query, weight, d_energy = query.contiguous(), weight.contiguous(), d_energy.contiguous()
    if not (keys.is_contiguous() and keys_grad.is_contiguous()):
        raise ValueError("energy_backward needs contiguous keys and keys_grad (it adds into keys_grad in place)")
    (rows, width), locations = query.shape, keys.shape[1]
    d_query, d_weight = query.new_empty(rows, width), query.new_empty(width)
    status = kernels().capattn_energy_backward(
        _ptr(keys), _ptr(query), _ptr(weight), _ptr(d_energy), _ptr(keys_grad), _ptr(d_query), _ptr(d_weight),
        rows, locations, width,
    )  # fmt: skip
    if status != 0:
        raise MemoryError("capattn's attention backward kernel could not allocate its per-thread sums")
    return d_query, d_weight


def context_reads(grid: Tensor) -> bool:
    """Whether ``context`` and ``grid_times`` take this grid: CPU float32, or CPU float16 where the
    kernels convert it (built with AVX2 and F16C, or AVX-512)."""
    if grid.dtype == torch.float16 and grid.device.type == "cpu" and not torch.compiler.is_compiling():
        return kernels() is not None and bool(kernels().capattn_half_available())
    return usable(grid)


def context(grid: Tensor, alpha: Tensor, starts: Tensor | None = None, *, out: Tensor | None = None) -> Tensor:
    """Σ_l α_l grid_l for each image's attention maps, without autograd.

    (B, L, D), (B, K, L) → (B, K, D); with ``starts`` (see ``energy``), (B, L, D), (N, L) → (N, D);
    written into ``out`` where given (contiguous). The grid is float32, or float16
    (``context_reads``): a float16 grid holding the same values as a float32 one gives the same
    sums, to the bit, read at half the memory traffic.
    """
    grid, alpha = grid.contiguous(), alpha.contiguous()
    (batch, locations, dim) = grid.shape
    k, out, ptr = _per_image(grid, alpha, starts, dim, out)
    args = (_ptr(grid), _ptr(alpha), _ptr(out), batch, k, locations, dim, ptr)
    if grid.dtype != torch.float16:
        kernels().capattn_context(*args)
    elif kernels().capattn_context_half(*args) != 0:
        raise RuntimeError("capattn's kernels were built without float16 conversions (see context_reads)")
    return out


def grid_times(grid: Tensor, vectors: Tensor) -> Tensor:
    """Each image's grid times its own vector, without autograd: (b, L, D), (b, D) → (b, L).

    The grid is float32, or float16 (``context_reads``), with the same results for the same values.
    """
    grid, vectors = grid.contiguous(), vectors.contiguous()
    (batch, locations, dim) = grid.shape
    out = vectors.new_empty(batch, locations)
    args = (_ptr(grid), _ptr(vectors), _ptr(out), batch, locations, dim)
    if grid.dtype != torch.float16:
        kernels().capattn_grid_times(*args)
    elif kernels().capattn_grid_times_half(*args) != 0:
        raise RuntimeError("capattn's kernels were built without float16 conversions (see context_reads)")
    return out


def topk(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """``x.topk(k, dim=-1)`` of a (R, V) matrix without autograd, k ≤ V: values and indices, largest first.

    Ties keep the lower index first (torch.topk leaves their order unspecified); NaN ranks above
    every number, as in torch.topk.
    """
    x = x.contiguous()
    rows, width = x.shape
    if not 0 < k <= width:
        raise ValueError(f"topk: k={k} must be in 1…{width}")
    values, indices = x.new_empty(rows, k), torch.empty(rows, k, dtype=torch.long)
    kernels().capattn_topk(_ptr(x), _ptr(values), _ptr(indices), rows, width, k)
    return values, indices


def tanh(x: Tensor) -> Tensor:
    """tanh as the kernels compute it (a rational function; see ``_attention_kernels.c``), for tests."""
    x = x.contiguous()
    out = torch.empty_like(x)
    kernels().capattn_tanh(_ptr(x), _ptr(out), x.numel())
    return out


@functools.cache
def bf16_in_hardware(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 matrices in hardware, where ``bf16-mixed`` can pay.

    A GPU from Ampere on; a CPU whose oneDNN takes bf16 natively: on x86, AVX-512 BF16 (AMD Zen 4,
    Intel Cooper Lake and later) or AMX (Intel Sapphire Rapids and later); on Arm, its BF16
    extension. Elsewhere torch emulates bf16. Measured on a Zen 4 CPU with oneDNN held back by
    ``ONEDNN_MAX_CPU_ISA``, a Show, Attend and Tell step (B=32, 196×512 grid) under bf16-mixed
    took 15–18× the fp32 step as on an AVX2 CPU (5,436–5,503 against 306–359 ms; a bf16 matmul
    ran at 0.4–1.7 GFLOP/s) and 1.7× as on AVX-512 without BF16 (503–629 against 294–342 ms);
    with the instructions, 0.85× (252–264 against 294–310 ms). Other devices (MPS, …) are not
    judged: True. The answer is cached per device.
    """
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type != "cpu":
        return True
    # torch's private probes: where one is missing (another torch), nothing is judged.
    try:
        # oneDNN's own check honours ONEDNN_MAX_CPU_ISA; on x86 it also accepts plain AVX-512,
        # which only converts bf16 to fp32 (a 2048² bf16 matmul: 49 against 186 GFLOP/s in fp32).
        if not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()):
            return False
        if platform.machine().lower() in ("x86_64", "amd64", "x86", "i686"):
            return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except (AttributeError, RuntimeError):
        return True
    return True
