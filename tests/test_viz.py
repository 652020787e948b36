"""Attention figures: the encoder's grid shape, smoothed maps, the spotlight overlay, the PNG."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from capattn.viz import attention_grid, caption_figure, grid_shape, spotlight


@pytest.mark.parametrize(
    ("locations", "height", "width", "expected"),
    [(196, 224, 224, (14, 14)), (768, 256, 192, (32, 24)), (768, 192, 256, (24, 32)), (1, 48, 48, (1, 1))],
)
def test_grid_shape_follows_the_image_aspect(locations, height, width, expected):
    assert grid_shape(locations, height, width) == expected


def test_smoothed_map_keeps_the_peak_where_the_model_looked():
    alphas = torch.full((2, 16), 0.01)
    alphas[0, 5] = 1.0  # row 1, column 1 of a 4×4 grid
    alphas[1, 15] = 1.0  # bottom right
    maps = attention_grid(alphas, 64, 64)
    assert maps.shape == (2, 64, 64) and float(maps.min()) >= 0.0
    peak = divmod(int(maps[0].argmax()), 64)
    assert 16 <= peak[0] < 32 and 16 <= peak[1] < 32
    assert divmod(int(maps[1].argmax()), 64) >= (48, 48)
    sharp = attention_grid(alphas, 64, 64, smooth=False)
    assert float(maps[0].max()) < float(sharp[0].max())  # blurred


def test_spotlight_darkens_where_the_model_did_not_look():
    layer = spotlight(torch.tensor([[0.0, 0.5], [1.0, 0.25]]))
    assert layer.shape == (2, 2, 4) and layer[..., :3].max() == 0.0
    assert layer[1, 0, 3] == 0.0 and layer[0, 0, 3] == pytest.approx(0.8)
    assert spotlight(torch.full((3, 3), 0.1))[..., 3].max() == 0.0  # uniform: nothing hidden


def test_caption_figure_writes_a_panel_per_word(tmp_path):
    image = torch.rand(3, 40, 60)
    words = ["a", "red", "circle", "<eos>"]
    with_attention = caption_figure(image, words, torch.softmax(torch.randn(4, 15), -1), tmp_path / "a.png")
    captions_only = caption_figure(image, words, None, tmp_path / "b.png", references=["a red circle"])
    with Image.open(with_attention) as a, Image.open(captions_only) as b:
        assert a.format == b.format == "PNG"
        assert a.width > 3 * b.width  # five panels side by side against one
