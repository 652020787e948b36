"""Soft attention: the batched, chunked and hand-differentiated paths against the plain formula."""

from __future__ import annotations

import pytest
import torch

from capattn.models import attention as attention_module
from capattn.models.attention import LoopAttention, SoftAttention

B, K, L, D, H, A = 5, 3, 7, 6, 4, 8


def plain(att: SoftAttention, keys: torch.Tensor, grid: torch.Tensor, hidden: torch.Tensor):
    """Eq. 4–6 of Xu et al., one hypothesis per row: what every fast path must reproduce."""
    energy = att.score(torch.tanh(keys + att.query_proj(hidden).unsqueeze(1))).squeeze(-1)  # (B, L)
    alpha = energy.softmax(dim=-1)
    return (alpha.unsqueeze(-1) * grid).sum(dim=1), alpha


@pytest.fixture
def att() -> SoftAttention:
    torch.manual_seed(0)
    return SoftAttention(feature_dim=D, hidden_dim=H, attention_dim=A).double()


def inputs(att: SoftAttention, batch: int = B):
    g = torch.Generator().manual_seed(1)
    grid = torch.randn(batch, L, D, generator=g, dtype=torch.float64)
    return att.project_keys(grid), grid


@pytest.mark.parametrize("chunk", [1 << 20, K * L * A * 2])  # one chunk; chunks of 2 images, the last one short
def test_k_hypotheses_per_image_without_autograd_match_the_formula(att, chunk, monkeypatch):
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", chunk)
    keys, grid = inputs(att)
    hidden = torch.randn(B * K, H, dtype=torch.float64)
    with torch.no_grad():
        context, alpha = att(keys, grid, hidden)  # (B*K, D), (B*K, L): K rows per image share its keys
        expected = plain(att, keys.repeat_interleave(K, 0), grid.repeat_interleave(K, 0), hidden)
    torch.testing.assert_close(context, expected[0])
    torch.testing.assert_close(alpha, expected[1])


def test_attend_with_autograd_matches_the_formula(att):
    keys, grid = inputs(att)
    hidden = torch.randn(B, H, dtype=torch.float64)
    context, alpha = att(keys, grid, hidden)
    expected = plain(att, keys, grid, hidden)
    torch.testing.assert_close(context, expected[0])
    torch.testing.assert_close(alpha, expected[1])


def loop_attention(att: SoftAttention, keys, grid, *, grid_grad: bool = False) -> LoopAttention:
    score = att.score
    return LoopAttention(keys.detach(), grid.detach(), score.weight.detach().squeeze(0), grid_grad=grid_grad)


@pytest.mark.parametrize("chunk", [1 << 20, L * A * 2])  # all rows at once; 2 rows at a time, the last chunk short
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["pytorch", "native_kernels"])
def test_loop_attention_has_the_gradients_of_autograd_over_plain_slices(att, chunk, dtype, monkeypatch):
    """``LoopAttention``: rows :b per step, its backward by hand, last step first, with the keys',
    grid's, w's and b's gradients summed over the steps; the same as autograd through eq. 4–6.
    float32 runs the fused CPU kernels where they are built; float64 always the PyTorch path."""
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", chunk)
    att = att.to(dtype)
    rows = [5, 5, 3, 2, 2, 1]
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(B, L, D, generator=g, dtype=dtype, requires_grad=True)
    hidden = [torch.randn(b, H, generator=g, dtype=dtype) for b in rows]
    d_context = [torch.randn(b, D, generator=g, dtype=dtype) for b in rows]
    d_alpha = [torch.randn(b, L, generator=g, dtype=dtype) for b in rows]
    keys = att.project_keys(grid).detach().requires_grad_()  # a leaf: the grid's gradient is the context's only
    queries = [att.query_proj(h).detach().requires_grad_() for h in hidden]
    params = [keys, grid, att.score.weight, att.score.bias, *queries]

    total = 0.0
    for b, q, dz, da in zip(rows, queries, d_context, d_alpha, strict=True):
        energy = att.score(torch.tanh(keys[:b] + q.unsqueeze(1))).squeeze(-1)
        alpha = energy.softmax(dim=-1)
        total = total + (torch.bmm(alpha.unsqueeze(1), grid[:b]).squeeze(1) * dz).sum() + (alpha * da).sum()
    expected = torch.autograd.grad(total, params)

    loop = loop_attention(att, keys, grid, grid_grad=True)
    with torch.no_grad():
        alphas = [torch.empty(b, L, dtype=dtype) for b in rows]
        for b, q, alpha in zip(rows, queries, alphas, strict=True):
            loop.forward(q.detach(), b, alpha, torch.empty(b, D, dtype=dtype))
        d_queries = [torch.empty(b, A, dtype=dtype) for b in rows]
        for t in reversed(range(len(rows))):
            loop.backward(queries[t].detach(), alphas[t], d_alpha[t], d_context[t], rows[t], d_queries[t])
        d_keys, d_grid, d_w = loop.gradients()
    # The score's bias shifts every energy of a row alike: softmax ignores it, so its gradient is
    # zero (autograd's is rounding noise), and LoopAttention leaves it out (test_decoders checks
    # that the loop gives it exactly zero).
    assert expected[3].abs().max() < 1e-6
    tol = {} if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    got = [d_keys, d_grid, d_w.unsqueeze(0), *d_queries]
    for got_i, expected_i in zip(got, expected[:3] + expected[4:], strict=True):
        torch.testing.assert_close(got_i, expected_i, **tol)


def test_loop_attention_forward_is_plain_attention(att):
    keys, grid = inputs(att)
    hidden = torch.randn(3, H, dtype=torch.float64)
    alpha, context = torch.empty(3, L, dtype=torch.float64), torch.empty(3, D, dtype=torch.float64)
    with torch.no_grad():
        loop_attention(att, keys, grid).forward(att.query_proj(hidden), 3, alpha, context)
        expected = plain(att, keys[:3], grid[:3], hidden)
    torch.testing.assert_close(context, expected[0])
    torch.testing.assert_close(alpha, expected[1])
