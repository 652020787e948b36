"""Soft (deterministic) attention of Xu et al. §4.2, with keys projected once per image."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftAttention(nn.Module):
    """Additive attention: e_ti = wᵀ tanh(W_a a_i + W_h h_{t−1}), α_t = softmax(e_t), ẑ_t = Σ_i α_ti a_i.

    ``W_a a_i`` does not depend on t, so ``project_keys`` computes it once per image and every
    decoding step (and every beam) reuses it.

    Args:
        feature_dim: D, the size of each annotation vector a_i.
        hidden_dim: H, the decoder's LSTM size.
        attention_dim: A, the size of the joint attention space.
    """

    def __init__(self, *, feature_dim: int, hidden_dim: int, attention_dim: int) -> None:
        super().__init__()
        self.key_proj = nn.Linear(feature_dim, attention_dim)
        self.query_proj = nn.Linear(hidden_dim, attention_dim)
        self.score = nn.Linear(attention_dim, 1)

    def project_keys(self, grid: Tensor) -> Tensor:
        """(B, L, D) annotation vectors → (B, L, A) keys."""
        return self.key_proj(grid)

    def forward(self, keys: Tensor, grid: Tensor, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Attends over the grid.

        Args:
            keys: (B, L, A) from ``project_keys``.
            grid: (B, L, D) annotation vectors.
            hidden: (B, H) the previous hidden state h_{t−1}.

        Returns:
            context (B, D) and attention weights alpha (B, L), which sum to one over L.
        """
        energy = self.score(torch.tanh(keys + self.query_proj(hidden).unsqueeze(1))).squeeze(-1)  # (B, L)
        alpha = energy.softmax(dim=-1)  # (B, L)
        context = torch.bmm(alpha.unsqueeze(1), grid).squeeze(1)  # (B, 1, L) @ (B, L, D) → (B, D)
        return context, alpha
