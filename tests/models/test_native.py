"""The fused CPU attention kernels against the formula and against PyTorch's path, and how they are built."""

from __future__ import annotations

import logging
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from capattn.decoding import beam_search, greedy
from capattn.models import native
from capattn.models.attention import SoftAttention
from capattn.models.decoders import ShowAttendTellDecoder, ShowTellDecoder
from capattn.models.encoder import EncoderOutput

from ..conftest import random_captions

# Odd sizes, so that no loop of the kernels ends on a whole vector.
B, K, L, A, D, H = 4, 3, 11, 37, 45, 6


# The kernels have an AVX-512 path, an AVX2 one (8 lanes) and a portable one (plain C the compiler
# vectorises, without the small-matmul kernels): on an x86 CPU the formula tests run against each,
# the others built with AVX-512 (and then AVX2 and FMA) turned off. Where the CPU has no AVX-512,
# "default" and "avx2" are the same build.
X86_FLAGS = {"avx2": "-mno-avx512f", "portable": "-mno-avx512f -mno-avx2 -mno-fma"}
BUILDS = ["default"] + (list(X86_FLAGS) if platform.machine() in ("x86_64", "AMD64") else [])


def _cpu_flags() -> set[str]:
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return set()
    return {flag for line in lines if line.startswith("flags") for flag in line.split(":", 1)[1].split()}


def small_matmuls_built(build: str) -> bool:
    """Whether this build has the small-matmul kernels on this CPU: AVX-512 (the default build), or
    AVX2 with FMA; never the portable build, nor a CPU without either (e.g. ARM)."""
    flags = _cpu_flags()
    if build == "portable":
        return False
    return (build == "default" and "avx512f" in flags) or {"avx2", "fma"} <= flags


@pytest.fixture(params=BUILDS)
def build(request, monkeypatch):
    """The kernels built as on this CPU, and (x86) without AVX-512 and without AVX2; skips where not buildable."""
    monkeypatch.setenv("CAPATTN_NATIVE", "1")
    monkeypatch.setenv("CAPATTN_NATIVE_CFLAGS", X86_FLAGS.get(request.param, ""))
    native.kernels.cache_clear()
    if native.kernels() is None:
        pytest.skip("the fused attention kernels cannot be built here (capattn.models.native logged why)")
    yield request.param
    native.kernels.cache_clear()


@pytest.fixture(autouse=True)
def small_matmuls_at_any_size(monkeypatch):
    """The small-matmul kernels take weights of any size here (in use, only ≥ native.MIN_WEIGHT elements)."""
    monkeypatch.setattr(native, "MIN_WEIGHT", 0)


@pytest.fixture(params=BUILDS)
def kernels(request, monkeypatch):
    """Kernels on (each build, as ``build``), and a function that turns them off; skips, saying why,
    where they cannot be built."""
    monkeypatch.setenv("CAPATTN_NATIVE", "1")
    monkeypatch.setenv("CAPATTN_NATIVE_CFLAGS", X86_FLAGS.get(request.param, ""))
    native.kernels.cache_clear()
    if native.kernels() is None:
        pytest.skip("the fused attention kernels cannot be built here (capattn.models.native logged why)")

    def turn_off() -> None:
        monkeypatch.setenv("CAPATTN_NATIVE", "0")
        native.kernels.cache_clear()

    yield turn_off
    native.kernels.cache_clear()


def formula_energy(keys, query, w, bias):
    """e[b, k, l] = wᵀ tanh(keys[b, l] + query[b, k]) + bias, in float64."""
    return torch.tanh(keys.double().unsqueeze(1) + query.double().unsqueeze(2)) @ w.double() + bias


def test_energy_and_context_match_the_formula(build):
    g = torch.Generator().manual_seed(0)
    keys, query = torch.randn(B, L, A, generator=g), torch.randn(B, K, A, generator=g)
    w, grid = torch.randn(A, generator=g), torch.randn(B, L, D, generator=g)
    energy = native.energy(keys, query, w, 0.25)  # (B, K, L)
    torch.testing.assert_close(energy.double(), formula_energy(keys, query, w, 0.25), rtol=1e-5, atol=1e-5)
    alpha = energy.softmax(-1)
    torch.testing.assert_close(native.context(grid, alpha), torch.bmm(alpha, grid), rtol=1e-5, atol=1e-5)


def test_energy_and_context_take_a_varying_number_of_queries_per_image(build):
    """Beam search without its ended beams: image b's queries are rows starts[b] … starts[b+1]−1."""
    g = torch.Generator().manual_seed(1)
    counts = torch.tensor([3, 0, 1, 2])  # an image with no live hypothesis still in the batch
    starts = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)])
    image = torch.repeat_interleave(torch.arange(B), counts)  # (N,) each row's image
    keys, query = torch.randn(B, L, A, generator=g), torch.randn(int(counts.sum()), A, generator=g)
    w, grid = torch.randn(A, generator=g), torch.randn(B, L, D, generator=g)
    energy = native.energy(keys, query, w, -0.5, starts)  # (N, L)
    expected = formula_energy(keys[image], query.unsqueeze(1), w, -0.5).squeeze(1)  # one query per row's image
    torch.testing.assert_close(energy.double(), expected, rtol=1e-5, atol=1e-5)
    alpha = energy.softmax(-1)
    context = native.context(grid, alpha, starts)  # (N, D)
    torch.testing.assert_close(context, torch.bmm(alpha.unsqueeze(1), grid[image]).squeeze(1), rtol=1e-5, atol=1e-5)
    # the same rows with K per image give the same numbers, bit for bit
    full = torch.randn(B, 3, A, generator=g)
    full[0], full[2, :1], full[3, :2] = query[:3], query[3:4], query[4:]
    kept = torch.tensor([0, 1, 2, 6, 9, 10])
    assert torch.equal(native.energy(keys, full, w, -0.5).view(B * 3, L)[kept], energy)
    full_alpha = torch.rand(B, 3, L, generator=g)
    full_alpha.view(B * 3, L)[kept] = alpha
    assert torch.equal(native.context(grid, full_alpha).view(B * 3, D)[kept], context)
    with pytest.raises(ValueError, match="starts must"):
        native.energy(keys, query, w, 0.0, starts.flip(0))


def test_context_reads_a_float16_grid_to_the_bit(build):
    """A grid of float16 values (as the feature cache stores them) read in float16 gives the float32
    grid's context bit for bit, K per image and with row offsets; the portable build cannot read it."""
    g = torch.Generator().manual_seed(2)
    # D = 45: 16-lane, 8-lane and scalar parts; L = 11: blocks of 4 grid rows and single rows
    half = torch.randn(B, L, D, generator=g).half()
    grid, alpha = half.float(), torch.rand(B, K, L, generator=g).softmax(-1)
    if build == "portable":
        assert not native.context_reads(half) and native.context_reads(grid)
        return
    assert native.context_reads(half)
    context = native.context(half, alpha)  # (B, K, D)
    assert context.dtype == torch.float32 and torch.equal(context, native.context(grid, alpha))
    torch.testing.assert_close(context, torch.bmm(alpha, grid), rtol=1e-5, atol=1e-5)
    starts = torch.tensor([0, 2, 2, 3, 5])  # 2, 0, 1, 2 rows
    rows = torch.rand(5, L, generator=g).softmax(-1)
    assert torch.equal(native.context(half, rows, starts), native.context(grid, rows, starts))


def test_grid_times_matches_the_formula(build):
    g = torch.Generator().manual_seed(6)
    grid, vectors = torch.randn(B, L, D, generator=g), torch.randn(B, D, generator=g)
    expected = torch.einsum("bld,bd->bl", grid.double(), vectors.double())
    torch.testing.assert_close(native.grid_times(grid, vectors).double(), expected, rtol=1e-5, atol=1e-5)


def test_energy_backward_matches_autograd_and_adds_into_the_rows_it_is_given(build):
    rows = 3  # of B: the shrinking batch of a time step
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(B, L, A, generator=g)
    query, w = torch.randn(rows, A, generator=g), torch.randn(A, generator=g)
    d_energy = torch.randn(rows, L, generator=g)
    before = torch.randn(B, L, A, generator=g)  # gradient summed by earlier steps
    keys_grad = before.clone()
    d_query, d_w = native.energy_backward(keys, query, w, d_energy, keys_grad)

    k64, q64, w64 = (t.double().requires_grad_() for t in (keys[:rows], query, w))
    energy = (torch.tanh(k64 + q64.unsqueeze(1)) @ w64).reshape(rows, L)
    dk, dq, dw = torch.autograd.grad(energy, (k64, q64, w64), d_energy.double())
    torch.testing.assert_close(d_query.double(), dq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(d_w.double(), dw, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close((keys_grad[:rows] - before[:rows]).double(), dk, rtol=1e-5, atol=1e-5)
    assert torch.equal(keys_grad[rows:], before[rows:])  # rows that have ended are left alone


def test_energy_backward_is_the_same_on_every_run(build):
    """w's gradient is summed per thread, then over threads in order: no dependence on timing."""
    g = torch.Generator().manual_seed(2)
    keys, query = torch.randn(32, L, A, generator=g), torch.randn(32, A, generator=g)
    w, d_energy = torch.randn(A, generator=g), torch.randn(32, L, generator=g)
    runs = [native.energy_backward(keys, query, w, d_energy, torch.zeros(32, L, A)) for _ in range(3)]
    for d_query, d_w in runs[1:]:
        assert torch.equal(d_query, runs[0][0]) and torch.equal(d_w, runs[0][1])


def _small_matmul_operands(rows: int, n: int, k: int, seed: int):
    """x (rows, k), weight (n, k), a (rows, n), b (n, k) and outputs, each a view into a wider
    matrix (as the loop's slices are), with odd sizes so that no panel or tile is whole."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k + 5, generator=g)[:, 3 : 3 + k]
    weight = torch.randn(n, k + 9, generator=g)[:, 2 : 2 + k]
    a = torch.randn(rows, n + 3, generator=g)[:, :n]
    b = torch.randn(n, k + 7, generator=g)[:, 2 : 2 + k]
    return x, weight, a, b, torch.randn(n, generator=g), torch.randn(rows, n + 4, generator=g)[:, 1 : 1 + n]


def _close_to_float64(got: torch.Tensor, expected: torch.Tensor, k: int) -> None:
    """Within float32 rounding of a k-term sum of products of unit normals."""
    torch.testing.assert_close(got.double(), expected, rtol=0, atol=1e-6 * k)


@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 16, 17, 33, 64, 65, 100])
def test_small_matmuls_match_the_float64_product(build, rows):
    n, k = 101, 70
    x, weight, a, b, bias, out = _small_matmul_operands(rows, n, k, seed=rows)
    if not small_matmuls_built(build):  # not offered: the loop keeps torch's matmul
        assert not native.small_matmuls(x)
        return
    assert native.small_matmuls(x, weight)
    before = out.clone()
    with pytest.MonkeyPatch.context() as mp:  # in use, small weights keep torch's matmul
        mp.setattr(native, "MIN_WEIGHT", weight.numel() + 1)
        assert not native.matmul_nt(x, weight, out, bias=bias)
        assert not native.matmul_nn(a, b, torch.empty(rows, k))
    assert torch.equal(out, before)
    assert native.matmul_nt(x, weight, out, bias=bias)  # at any number of rows
    _close_to_float64(out, bias.double() + x.double() @ weight.double().t(), k)
    out.copy_(before)
    assert native.matmul_nt(x, weight, out, accumulate=True)
    _close_to_float64(out, before.double() + x.double() @ weight.double().t(), k)
    c = torch.randn(rows, k)
    before = c.clone()
    assert native.matmul_nn(a, b, c)
    _close_to_float64(c, a.double() @ b.double(), n)
    c.copy_(before)
    assert native.matmul_nn(a, b, c, accumulate=True)
    _close_to_float64(c, before.double() + a.double() @ b.double(), n)


@pytest.mark.parametrize(("rows", "k"), [(65, 1101), (80, 1101), (100, 1101), (150, 1101), (1100, 1024), (2100, 1000)])
def test_matmul_nt_goes_through_x_in_parts(build, rows, k):
    """Many rows go through in parts whose packing stays in cache, W read once per part: of 64 rows
    past 1,024 columns (the last part of 1, 16, 36 or 22 rows here), else of up to 4 MB (1,024 rows
    of 1,024; 1,024 + 1,024 + 52 of 1,000). Every part's sums match float64, with bias and accumulate."""
    if not small_matmuls_built(build):
        pytest.skip("this build has no small-matmul kernels on this CPU (neither AVX-512 nor AVX2 with FMA)")
    x, weight, _, _, bias, out = _small_matmul_operands(rows, 29, k, seed=rows)
    before = out.clone()
    assert native.matmul_nt(x, weight, out, bias=bias)
    _close_to_float64(out, bias.double() + x.double() @ weight.double().t(), k)
    out.copy_(before)
    assert native.matmul_nt(x, weight, out, accumulate=True)
    _close_to_float64(out, before.double() + x.double() @ weight.double().t(), k)


@pytest.mark.parametrize(("rows", "depth", "width"), [(2, 128, 70), (7, 129, 130), (33, 300, 64), (64, 2561, 150)])
def test_matmul_nn_sums_over_blocks_of_b_rows(build, rows, depth, width):
    """A B goes through B's rows in blocks of 128, each block adding to C: one whole block, a block
    and one row, 2 blocks and 44 rows, W_r's 2,561 rows (20 blocks and 1); B a view of a wider
    matrix, as W_z is of the LSTM's W_ih. Sums match float64, with and without accumulate."""
    if not small_matmuls_built(build):
        pytest.skip("this build has no small-matmul kernels on this CPU (neither AVX-512 nor AVX2 with FMA)")
    _, _, a, b, _, _ = _small_matmul_operands(rows, depth, width, seed=depth)
    c = torch.randn(rows, width + 2)[:, 1 : 1 + width]
    before = c.clone()
    assert native.matmul_nn(a, b, c, accumulate=True)
    _close_to_float64(c, before.double() + a.double() @ b.double(), depth)
    assert native.matmul_nn(a, b, c)
    _close_to_float64(c, a.double() @ b.double(), depth)


def test_small_matmuls_give_the_same_result_on_any_number_of_threads(build):
    """Each output is summed in one fixed order by one thread: a run is repeatable bit for bit."""
    if not small_matmuls_built(build):
        pytest.skip("this build has no small-matmul kernels on this CPU (neither AVX-512 nor AVX2 with FMA)")
    x, weight, a, b, bias, out = _small_matmul_operands(32, 301, 130, seed=0)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            o, c = out.clone(), torch.empty(32, 130)
            native.matmul_nt(x, weight, o, bias=bias)
            native.matmul_nn(a, b, c)
            results.append((o, c))
    finally:
        torch.set_num_threads(threads)
    for o, c in results[1:]:
        assert torch.equal(o, results[0][0]) and torch.equal(c, results[0][1])


def test_small_matmuls_refuse_operands_that_do_not_fit(kernels):
    if not native.small_matmuls(torch.zeros(1)):
        pytest.skip("built without AVX2 here: the small-matmul kernels are not offered")
    x, weight = torch.randn(8, 16), torch.randn(10, 16)
    with pytest.raises(ValueError, match="do not fit"):
        native.matmul_nt(x, weight, torch.empty(8, 11))
    with pytest.raises(ValueError, match="contiguous rows"):
        native.matmul_nt(x, torch.randn(16, 10).t(), torch.empty(8, 10))
    with pytest.raises(ValueError, match="CPU float32"):
        native.matmul_nn(x.double(), weight.t(), torch.empty(8, 10))
    # in use: at any number of rows (one image's greedy search, decoding's 100-500, the keys'
    # projection), for weights of 2 MB or more
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(native, "MIN_WEIGHT", 1 << 19)
        big, small = torch.empty(512, 1024), torch.empty(512, 1023)
        assert native.takes(1, big) and native.takes(19600, big) and not native.takes(1, small)
    # the loop asks first, and keeps torch's matmul for a layout the kernels do not take
    assert native.small_matmuls(x, weight) and not native.small_matmuls(x, weight.t())


def test_capattn_small_matmuls_0_turns_them_alone_off(kernels, monkeypatch):
    monkeypatch.setenv("CAPATTN_SMALL_MATMULS", "0")
    assert native.usable(torch.zeros(2)) and not native.small_matmuls(torch.zeros(2))


def test_nan_and_infinity_propagate_as_in_pytorch(build):
    keys, query, w = torch.zeros(1, 3, A), torch.zeros(1, 1, A), torch.ones(A)
    keys[0, 0, 5], keys[0, 1, 5] = float("nan"), float("inf")
    energy = native.energy(keys, query, w, 0.0)[0, 0]
    assert energy[0].isnan() and abs(float(energy[1]) - 1.0) < 1e-6 and energy[2] == 0.0  # tanh(inf) = 1
    y = native.tanh(torch.tensor([float("nan"), float("inf"), -float("inf")] * 7))  # 16-wide and scalar code
    assert y[0::3].isnan().all()
    assert torch.allclose(y[1::3], torch.ones(7)) and torch.allclose(y[2::3], -torch.ones(7))


def test_tanh_is_within_a_few_ulp_of_the_exact_value(build):
    """The kernels' rational tanh against float64 tanh, in units in the last place of float32."""
    x = torch.linspace(-12.0, 12.0, 2_000_003)  # not a multiple of 16: the vector code and the scalar tail
    y = native.tanh(x).double().numpy()
    exact = np.tanh(x.double().numpy())
    nonzero = exact != 0
    ulp = np.abs(y - exact)[nonzero] / np.spacing(np.abs(exact[nonzero]).astype(np.float32))
    assert ulp.max() <= 8 and ulp.mean() < 1.5, (ulp.max(), ulp.mean())
    assert np.abs(y).max() <= 1 + 2 * 2**-23  # at most two ULP above 1
    assert torch.equal(native.tanh(-x), -native.tanh(x))  # odd


def test_topk_matches_torch(build):
    g = torch.Generator().manual_seed(5)
    for rows, width, k in [(7, 37, 3), (3, 5, 5), (2, 40, 1), (11, 1000, 17)]:
        x = torch.randn(rows, width, generator=g)
        x[0, 3] = float("-inf")  # ruled-out words
        values, indices = native.topk(x, k)
        expected = x.topk(k, dim=-1)
        assert torch.equal(values, expected.values) and torch.equal(indices, expected.indices)


def test_topk_keeps_the_lower_index_first_on_ties_and_ranks_nan_first(build):
    x = torch.tensor([[1.0, float("nan"), 3.0, 3.0, float("-inf"), float("nan"), 3.0] + [0.0] * 20])
    values, indices = native.topk(x, 5)
    assert indices.tolist() == [[1, 5, 2, 3, 6]]
    assert values[0, :2].isnan().all() and values[0, 2:].tolist() == [3.0, 3.0, 3.0]
    with pytest.raises(ValueError, match="k=28"):
        native.topk(x, 28)


def attention_pair(seed: int = 0):
    torch.manual_seed(seed)
    att = SoftAttention(feature_dim=D, hidden_dim=H, attention_dim=A)
    grid = torch.randn(B, L, D)
    return att, grid


def test_decoding_attention_is_the_same_with_and_without_kernels(kernels):
    att, grid = attention_pair()
    hidden = torch.randn(B * K, H)
    with torch.no_grad():
        keys = att.project_keys(grid)
        fused = att(keys, grid, hidden)
        kernels()
        plain = att(keys, grid, hidden)
    for got, expected in zip(fused, plain, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("grid_grad", [False, True], ids=["cached_features", "encoder_trains"])
@pytest.mark.parametrize("captions", [5, 40])
def test_training_gradients_are_the_same_with_and_without_kernels(kernels, grid_grad, captions):
    """Show, Attend and Tell's teacher-forced loss and every gradient, fused kernels against PyTorch's
    path. 40 captions: the per-word matmuls take the small-matmul kernels' tiles of 16, 32 and 64 rows
    (where built with AVX-512; with AVX2, tiles of 8 and 16) as the batch shrinks."""
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(vocab_size=20, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A, dropout=0.0)
    tokens, lengths = random_captions(captions, 9, vocab=20, seed=4)  # unsorted lengths
    grid = torch.randn(captions, L, D, requires_grad=grid_grad)
    params = [*dec.parameters()] + ([grid] if grid_grad else [])

    def loss_and_grads():
        out = dec(EncoderOutput(grid=grid, pooled=grid.mean(1)), tokens, lengths)
        loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
        return loss, torch.autograd.grad(loss, params, allow_unused=True)

    fused_loss, fused = loss_and_grads()
    kernels()
    plain_loss, plain = loss_and_grads()
    torch.testing.assert_close(fused_loss, plain_loss)
    for (name, _), got, expected in zip([*dec.named_parameters(), ("grid", grid)], fused, plain, strict=False):
        if name == "attention.score.bias":  # softmax ignores a shift: its gradient is rounding noise around 0
            continue
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("grouped", [False, True], ids=["pairs", "grouped"])
def test_training_on_the_cached_float16_grid_gives_the_same_loss_and_gradients(build, grouped, monkeypatch):
    """With ``EncoderOutput.cached_grid`` the training loop's attention reads the float16 grid (the
    context and α's gradient): the loss and every gradient are the float32 grid's, bit for bit."""
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(vocab_size=20, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A, dropout=0.0)
    tokens, lengths = random_captions(40, 9, vocab=20, seed=4)  # unsorted lengths
    images = 8 if grouped else 40
    half = torch.randn(images, L, D).half()
    grid = half.float()
    image_index = torch.arange(40) % images if grouped else None
    read: list[torch.dtype] = []
    for name in ("context", "grid_times"):
        fn = getattr(native, name)
        monkeypatch.setattr(native, name, lambda g, *a, fn=fn, **k: read.append(g.dtype) or fn(g, *a, **k))

    def loss_and_grads(cached):
        enc = EncoderOutput(grid=grid, pooled=grid.mean(1), cached_grid=cached)
        out = dec(enc, tokens, lengths, image_index=image_index)
        loss = torch.nn.functional.cross_entropy(out.logits, out.targets) + out.aux_loss
        return loss, torch.autograd.grad(loss, list(dec.parameters()))

    plain_loss, plain = loss_and_grads(None)
    assert torch.float16 not in read
    cached_loss, cached = loss_and_grads(half)
    assert (torch.float16 in read) == (build != "portable")  # the portable build reads the float32 grid
    assert torch.equal(cached_loss, plain_loss)
    for (name, _), got, expected in zip(dec.named_parameters(), cached, plain, strict=True):
        assert torch.equal(got, expected), name


@pytest.mark.parametrize("beam_size", [1, 3])
@pytest.mark.parametrize("images", [6, 40])
@pytest.mark.parametrize("decoder", ["show_attend_tell", "show_tell"])
def test_searches_give_the_same_captions_with_and_without_kernels(kernels, beam_size, images, decoder):
    """The kernels on (the decoding step's matmuls too: 6-120 rows here) against PyTorch's path."""
    torch.manual_seed(0)
    if decoder == "show_tell":
        dec = ShowTellDecoder(vocab_size=30, feature_dim=D, embed_dim=8, hidden_dim=H).eval()
    else:
        dec = ShowAttendTellDecoder(vocab_size=30, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A).eval()
    grid = torch.randn(images, L, D)
    enc = EncoderOutput(grid=grid, pooled=grid.mean(1))

    def search():
        with torch.no_grad():
            if beam_size == 1:
                return greedy(dec, enc, bos=1, eos=2, pad=0, max_len=12)
            return beam_search(dec, enc, bos=1, eos=2, pad=0, beam_size=beam_size, max_len=12)

    fused = search()
    kernels()
    plain = search()
    assert torch.equal(fused.tokens, plain.tokens)
    torch.testing.assert_close(fused.scores, plain.scores, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("beam_size", [1, 3])
def test_searches_that_read_the_cached_float16_grid_give_the_same_captions_and_scores(build, beam_size):
    """With ``EncoderOutput.cached_grid`` (a batch from the feature cache), decoding on a CPU reads the
    float16 grid for its context: the same tokens and scores, bit for bit, as from the float32 grid,
    through greedy's compaction and beam search's ragged rows."""
    torch.manual_seed(0)
    dec = ShowAttendTellDecoder(vocab_size=30, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A).eval()
    half = torch.randn(40, L, D).half()
    plain = EncoderOutput(grid=half.float(), pooled=half.float().mean(1))
    cached = EncoderOutput(grid=plain.grid, pooled=plain.pooled, cached_grid=half)
    with torch.no_grad():
        assert (dec.prepare(cached).half_grid is half) == (build != "portable")  # else the float32 grid
        if beam_size == 1:
            a, b = (greedy(dec, enc, bos=1, eos=2, pad=0, max_len=12) for enc in (plain, cached))
        else:
            a, b = (beam_search(dec, enc, bos=1, eos=2, pad=0, beam_size=3, max_len=12) for enc in (plain, cached))
    assert (a.tokens == 2).any(), "some captions must end, so that rows leave the batch"
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.scores, b.scores)


def test_the_cached_grid_is_left_alone_with_autograd_autocast_or_without_kernels(kernels):
    dec = ShowAttendTellDecoder(vocab_size=30, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A).eval()
    half = torch.randn(2, L, D).half()
    enc = EncoderOutput(grid=half.float(), pooled=half.float().mean(1), cached_grid=half)
    assert dec.prepare(enc).half_grid is None  # autograd on: the training path
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert dec.prepare(enc).half_grid is None
    kernels()
    with torch.no_grad():
        assert dec.prepare(enc).half_grid is None


def test_only_the_kernels_let_show_attend_tell_leave_ended_beams_out(kernels):
    """``ragged_memory`` shares the grid (offsets only) where the kernels run, and is None elsewhere."""
    dec = ShowAttendTellDecoder(vocab_size=30, feature_dim=D, embed_dim=8, hidden_dim=H, attention_dim=A).eval()
    grid = torch.randn(3, L, D)
    with torch.no_grad():
        mem = dec.prepare(EncoderOutput(grid=grid, pooled=grid.mean(1)))
        ragged = dec.ragged_memory(mem, torch.tensor([2, 0, 1]))
        assert ragged.grid is mem.grid and ragged.starts.tolist() == [0, 2, 2, 3]
        doubled = dec.double().prepare(EncoderOutput(grid=grid.double(), pooled=grid.mean(1).double()))
        assert dec.ragged_memory(doubled, torch.tensor([1, 1, 1])) is None  # float32 only
        dec.compile_step = True  # a compiled step keeps K rows per image (its shapes would change every word)
        assert dec.ragged_memory(mem, torch.tensor([2, 0, 1])) is None
        dec.compile_step = False
        kernels()
        assert dec.ragged_memory(mem, torch.tensor([2, 0, 1])) is None


# --- how the kernels are built ---------------------------------------------------------------------


def test_kernels_are_built_once_per_cpu_into_the_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("CAPATTN_NATIVE", "1")
    monkeypatch.setenv("CAPATTN_CACHE_DIR", str(tmp_path))
    native.kernels.cache_clear()
    try:
        if native.kernels() is None:
            pytest.skip("the fused attention kernels cannot be built here")
        (built,) = (tmp_path / "native").glob("attention-*.so")
        native.kernels.cache_clear()
        monkeypatch.setattr(native, "_build", lambda *a: pytest.fail("rebuilt a library already in the cache"))
        assert native.kernels() is not None
        native.kernels.cache_clear()
        monkeypatch.setattr(native, "_cpu_signature", lambda: "another CPU")
        monkeypatch.setattr(native, "_build", lambda compiler, target: target.write_bytes(b""))
        native.kernels()  # an empty file does not load: the failure is only logged
        assert {p.name for p in (tmp_path / "native").glob("attention-*.so")} - {built.name}  # a new name
    finally:
        native.kernels.cache_clear()


def test_without_a_compiler_attention_runs_in_pytorch_after_one_warning(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CAPATTN_NATIVE", "1")
    monkeypatch.setenv("CAPATTN_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "no-such-compiler-capattn")
    native.kernels.cache_clear()
    att, grid = attention_pair()
    try:
        with caplog.at_level(logging.WARNING, logger="capattn.models.native"), torch.no_grad():
            keys = att.project_keys(grid)
            att(keys, grid, torch.randn(B * K, H))
            att(keys, grid, torch.randn(B * K, H))
        warnings = [r.getMessage() for r in caplog.records if r.name == "capattn.models.native"]
        assert len(warnings) == 1 and "no-such-compiler-capattn" in warnings[0] and "CAPATTN_NATIVE=0" in warnings[0]
        assert not native.usable(grid)
    finally:
        native.kernels.cache_clear()


def test_capattn_native_0_turns_them_off_silently(monkeypatch, caplog):
    monkeypatch.setenv("CAPATTN_NATIVE", "0")
    native.kernels.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="capattn.models.native"):
            assert native.kernels() is None and not native.usable(torch.zeros(1))
        assert not caplog.records
    finally:
        native.kernels.cache_clear()


def test_only_cpu_float32_tensors_take_the_kernels(kernels):
    assert native.usable(torch.zeros(2))
    assert not native.usable(torch.zeros(2), torch.zeros(2, dtype=torch.float64))
    assert not native.usable(torch.zeros(2, dtype=torch.bfloat16))
