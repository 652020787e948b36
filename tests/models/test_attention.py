"""Soft attention: the batched, chunked and hand-differentiated paths against the plain formula."""

from __future__ import annotations

import pytest
import torch

from capattn.models import attention as attention_module
from capattn.models.attention import SoftAttention

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


@pytest.mark.parametrize("chunk", [1 << 20, L * A * 2])  # all rows at once; 2 rows at a time, the last chunk short
def test_shrinking_loop_has_the_gradients_of_plain_slices(att, chunk, monkeypatch):
    """``over_steps``: rows :b per step, keys' and grid's gradients summed in place; same as autograd."""
    monkeypatch.setattr(attention_module, "_CHUNK_ELEMENTS", chunk)
    rows = [5, 5, 3, 2, 2, 1]
    g = torch.Generator().manual_seed(2)
    grid = torch.randn(B, L, D, generator=g, dtype=torch.float64, requires_grad=True)
    hidden = [torch.randn(b, H, generator=g, dtype=torch.float64, requires_grad=True) for b in rows]
    weights = [torch.randn(b, D, generator=g, dtype=torch.float64) for b in rows]
    alpha_weights = [torch.randn(b, L, generator=g, dtype=torch.float64) for b in rows]
    params = [grid, *hidden, *att.parameters()]

    def loss(fast: bool) -> torch.Tensor:
        keys = att.project_keys(grid)
        attend = att.over_steps(keys, grid)
        total = 0.0
        for b, h, w, v in zip(rows, hidden, weights, alpha_weights, strict=True):
            if fast:
                context, alpha = attend(att.query_proj(h), b)
            else:
                context, alpha = plain(att, keys[:b], grid[:b], h)
            total = total + (context * w).sum() + (alpha * v).sum()  # both outputs carry gradient
        return total

    fast = torch.autograd.grad(loss(True), params)
    slow = torch.autograd.grad(loss(False), params)
    for got, expected in zip(fast, slow, strict=True):
        torch.testing.assert_close(got, expected)


def test_over_steps_without_autograd_is_plain_attention(att):
    keys, grid = inputs(att)
    hidden = torch.randn(3, H, dtype=torch.float64)
    with torch.no_grad():
        context, alpha = att.over_steps(keys, grid)(att.query_proj(hidden), 3)
        expected = plain(att, keys[:3], grid[:3], hidden)
    torch.testing.assert_close(context, expected[0])
    torch.testing.assert_close(alpha, expected[1])
