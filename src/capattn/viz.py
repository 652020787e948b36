"""Figures a person looks at: an image with its caption and, per word, where the model looked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402


def attention_grid(alphas: Tensor, height: int, width: int) -> Tensor:
    """(T, L) attention weights over a square h×w grid → (T, height, width) maps, bilinearly upsampled."""
    steps, locations = alphas.shape
    side = math.isqrt(locations)
    if side * side != locations:
        raise ValueError(f"cannot draw attention over {locations} locations: the grid is not square")
    maps = alphas.reshape(steps, 1, side, side).float()  # (T, 1, h, w)
    return F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False).squeeze(1)


def caption_figure(
    image: Tensor,
    words: Sequence[str],
    alphas: Tensor | None,
    path: str | Path,
    *,
    title: str = "",
    references: Sequence[str] = (),
    columns: int = 6,
) -> Path:
    """Writes a PNG: the image with its caption, then one panel per word with its attention.

    Args:
        image: (3, H, W) float in [0, 1].
        words: the decoded words (``<eos>`` may be included as the last one).
        alphas: (T, L) attention weights of those words, or None for a model without attention.
        path: PNG file to write.
        title: shown above the image (the model's name, say).
        references: reference captions, printed under the image.
        columns: panels per row.

    Returns:
        The path written.
    """
    picture = image.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()  # (H, W, 3)
    panels = 1 + (len(words) if alphas is not None else 0)
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.9 * rows + 0.3 * len(references)), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(picture)
    axes[0, 0].set_title(title or "caption", fontsize=9)
    caption = " ".join(w for w in words if w != "<eos>")
    text = "\n".join([f"» {caption}", *(f"ref: {r}" for r in references)])
    fig.text(0.01, 0.01, text, fontsize=8, va="bottom", ha="left", wrap=True)
    if alphas is not None:
        maps = attention_grid(alphas[: len(words)].cpu(), picture.shape[0], picture.shape[1])
        for t, word in enumerate(words):
            ax = axes.flat[t + 1]
            ax.imshow(picture)
            ax.imshow(maps[t].numpy(), cmap="gray", alpha=0.6, vmin=0, vmax=float(maps[t].max()) or 1.0)
            ax.set_title(word, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * len(references), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def words_of(tokens: Tensor, itos: Sequence[str], *, eos: int, pad: int) -> list[str]:
    """Decoded words up to and including ``<eos>`` (each has an attention map), pads dropped."""
    words = []
    for i in tokens.tolist():
        if i == pad:
            break
        words.append(itos[i])
        if i == eos:
            break
    return words
