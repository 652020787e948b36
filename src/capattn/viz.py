"""Figures a person looks at: an image with its caption and, per word, where the model looked."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are written to files; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import Tensor  # noqa: E402
from torchvision.transforms.v2.functional import gaussian_blur  # noqa: E402


def grid_shape(locations: int, height: int, width: int) -> tuple[int, int]:
    """The h×w grid of ``locations`` cells whose shape is closest to the image's (a CNN keeps the aspect ratio).

    Raises:
        ValueError: ``locations`` is not positive.
    """
    if locations < 1:
        raise ValueError(f"cannot draw attention over {locations} locations")
    shapes = [(rows, locations // rows) for rows in range(1, locations + 1) if locations % rows == 0]
    return min(shapes, key=lambda shape: abs(math.log(shape[0] / shape[1]) - math.log(height / width)))


def attention_grid(alphas: Tensor, height: int, width: int, *, smooth: bool = True) -> Tensor:
    """(T, L) attention weights over the encoder's h×w grid → (T, height, width) maps for drawing.

    Each map is upsampled bilinearly and, with ``smooth``, blurred with a Gaussian of half a grid
    cell, as Xu et al. drew theirs (``pyramid_expand``), so the blocky grid reads as a soft spotlight.
    """
    steps, locations = alphas.shape
    rows, cols = grid_shape(locations, height, width)
    maps = alphas.reshape(steps, 1, rows, cols).float()  # (T, 1, h, w)
    maps = F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)  # (T, 1, H, W)
    if smooth and locations > 1:
        sigma = 0.5 * min(height / rows, width / cols)
        # An odd kernel of ±3σ, short enough for the reflection padding of a small image.
        kernel = min(2 * math.ceil(3 * sigma) + 1, (min(height, width) - 1) | 1)
        if kernel >= 3:
            maps = gaussian_blur(maps, kernel_size=[kernel, kernel], sigma=[sigma, sigma])
    return maps.squeeze(1)


def spotlight(attention: Tensor, *, darkness: float = 0.8) -> np.ndarray:
    """An (H, W, 4) black RGBA layer that darkens the image where the model did not look (Xu et al.'s figures).

    Each map is stretched to its own min..max, so a nearly uniform map of an untrained model still
    shows its faint preference rather than a flat grey.
    """
    m = attention.detach().cpu().float()
    span = float(m.max() - m.min())
    m = (m - m.min()) / span if span > 0 else torch.ones_like(m)
    layer = np.zeros((*m.shape, 4), dtype=np.float32)
    layer[..., 3] = darkness * (1.0 - m.numpy())
    return layer


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
    axes[0, 0].set_title(title or "caption", fontsize=8)
    caption = " ".join(w for w in words if w != "<eos>")
    text = "\n".join([f"» {caption}", *(f"ref: {r}" for r in references)])
    fig.text(0.01, 0.01, text, fontsize=8, va="bottom", ha="left", wrap=True)
    if alphas is not None:
        maps = attention_grid(alphas[: len(words)].cpu(), picture.shape[0], picture.shape[1])
        for t, word in enumerate(words):
            ax = axes.flat[t + 1]
            ax.imshow(picture)
            ax.imshow(spotlight(maps[t]))
            ax.set_title(word, fontsize=10)
    fig.tight_layout(rect=(0, 0.04 + 0.03 * len(references), 1, 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
