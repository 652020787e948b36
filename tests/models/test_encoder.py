"""Image encoders: grid and pooled outputs, torchvision backbones, weights, freezing."""

from __future__ import annotations

import pytest
import torch

from capattn.models.encoder import ImageEncoder


def test_small_cnn_gives_grid_and_pooled_vector():
    enc = ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 16, 32))
    out = enc(torch.rand(2, 3, 48, 48))
    assert out.grid.shape == (2, 36, 32)  # 48 / 2³ = 6 → L = 36
    assert out.pooled.shape == (2, 32)
    torch.testing.assert_close(out.pooled, out.grid.mean(1))
    assert enc.out_dim == 32


@pytest.mark.parametrize(("name", "dim", "side"), [("resnet18", 512, 7), ("vgg11", 512, 14)])
def test_torchvision_backbones(name, dim, side):
    """resnet: layer4 (7×7 at 224 px); vgg: conv5 before the last pool (14×14), as Xu et al."""
    enc = ImageEncoder(backbone=name).eval()
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 224, 224))
    assert out.grid.shape == (1, side * side, dim)
    assert enc.out_dim == dim


def test_grid_size_pools_to_a_fixed_grid():
    enc = ImageEncoder(backbone="small_cnn", small_cnn_channels=(8, 16), grid_size=3)
    assert enc(torch.rand(1, 3, 48, 48)).grid.shape == (1, 9, 16)


def test_frozen_and_partly_trainable_backbones():
    frozen = ImageEncoder(backbone="resnet18", trainable="none")
    assert not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert not frozen.trunk.bn1.training  # frozen BatchNorm keeps its statistics
    partly = ImageEncoder(backbone="resnet18", trainable="layer4")
    trainable = {n.split(".")[0] for n, p in partly.trunk.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"}
    with pytest.raises(ValueError, match="trainable"):
        ImageEncoder(backbone="resnet18", trainable="layer9")


def test_weights_from_a_local_file(tmp_path):
    source = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8))
    path = tmp_path / "cnn.pt"
    torch.save(source.trunk.state_dict(), path)
    loaded = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), weights=str(path))
    for a, b in zip(source.trunk.state_dict().values(), loaded.trunk.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        ImageEncoder(backbone="small_cnn", weights=str(tmp_path / "missing.pt"))


def test_unknown_torchvision_weights_name_is_rejected():
    with pytest.raises(ValueError):
        ImageEncoder(backbone="resnet18", weights="NOT_A_WEIGHT")


def test_resnet101_by_name_gives_the_papers_14x14x2048_grid():
    """The real configs' encoder: ResNet-101 (random init here: no downloads offline), pooled to 14×14."""
    enc = ImageEncoder(backbone="resnet101", weights=None, trainable="none", grid_size=14).eval()
    with torch.no_grad():
        out = enc(torch.rand(1, 3, 224, 224))
    assert out.grid.shape == (1, 196, 2048) and out.pooled.shape == (1, 2048)
    assert enc.frozen


def test_identity_tells_encoders_apart_by_config_and_weights(tmp_path):
    torch.manual_seed(0)
    a = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), trainable="none")
    torch.manual_seed(0)
    same = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), trainable="none")
    other_init = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), trainable="none")
    pooled = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), trainable="none", grid_size=2)
    pooled.load_state_dict(a.state_dict())
    assert a.identity() == same.identity()
    assert a.identity()["state_sha256"] != other_init.identity()["state_sha256"]
    assert a.identity() != pooled.identity() and a.identity()["state_sha256"] == pooled.identity()["state_sha256"]
    path = tmp_path / "w.pt"
    torch.save(a.trunk.state_dict(), path)
    loaded = ImageEncoder(backbone="small_cnn", small_cnn_channels=(4, 8), weights=str(path))
    assert (
        loaded.identity()["weights"] == str(path) and loaded.identity()["state_sha256"] == a.identity()["state_sha256"]
    )
    assert not loaded.frozen and a.frozen


def test_imagenet_weights_by_torchvision_name_are_resolved_before_any_download(monkeypatch):
    """`weights: IMAGENET1K_V2` names torchvision's enum; offline the download fails with a clear OSError."""
    import torchvision

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models._api.WeightsEnum, "get_state_dict", offline)
    with pytest.raises(OSError, match="could not download ResNet101_Weights.IMAGENET1K_V2.*model.encoder.init_args"):
        ImageEncoder(backbone="resnet101", weights="IMAGENET1K_V2")
