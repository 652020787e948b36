"""Image encoders: a CNN turned into an L×D grid of annotation vectors and a pooled vector."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from collections.abc import Sequence

    from torchvision.transforms import v2

# torchvision normalises ImageNet weights with these statistics; the encoder applies them itself
# so that loaders hand over images in [0, 1] and attention figures can show them unchanged.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def image_transform(image_size: int | None, augmentations: Sequence[v2.Transform] = ()) -> v2.Transform:
    """PIL image → (3, H, W) float in [0, 1]; resized (shorter side) and centre-cropped if ``image_size``.

    ``augmentations`` (training only) run on the resized uint8 image. None by default: a flip
    turns "left of" into a false caption.
    """
    from torchvision.transforms import v2

    steps: list[v2.Transform] = [v2.ToImage()]
    if image_size is not None:
        steps += [v2.Resize(image_size, antialias=True), v2.CenterCrop(image_size)]
    steps += list(augmentations)
    steps.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(steps)


@dataclass(frozen=True)
class EncoderOutput:
    """What an encoder gives the decoder.

    Args:
        grid: (B, L, D) annotation vectors a_i, one per image location (Xu et al.).
        pooled: (B, D) global image vector (Vinyals et al.).
        cached_grid: (B, L, D) float16, the grid as the feature cache stores it, where a batch on a
            CPU came from the cache (``grid`` then holds the same values in float32); None
            otherwise. Show, Attend and Tell's attention on a CPU reads it (decoding's context, the
            training loop's context and α's gradient): half the memory traffic, the same results
            bit for bit. ``to`` leaves it out.
    """

    grid: Tensor
    pooled: Tensor
    cached_grid: Tensor | None = None

    def to(self, *args, **kwargs) -> EncoderOutput:
        return EncoderOutput(self.grid.to(*args, **kwargs), self.pooled.to(*args, **kwargs))


def small_cnn(*, channels: tuple[int, ...] = (32, 64, 128)) -> nn.Sequential:
    """A small conv net for the shapes demo: conv-BN-ReLU-pool stages, then one more conv.

    A 48×48 image with three stages gives a 6×6 grid (L=36) of ``channels[-1]`` features; the
    last conv widens each location's receptive field so it can tell a shape's kind and size.
    """
    layers: list[nn.Module] = []
    in_ch = 3
    for out_ch in channels:
        layers += [
            nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        ]
        in_ch = out_ch
    layers += [nn.Conv2d(in_ch, in_ch, 3, padding=1, bias=False), nn.BatchNorm2d(in_ch), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


def _torchvision_trunk(name: str, weights: str | None) -> tuple[nn.Module, int]:
    """The convolutional trunk of a torchvision classifier, and its channel count."""
    import torchvision

    tv_weights = None
    if weights is not None and not Path(weights).suffix:  # a torchvision weights name, not a file
        enum = torchvision.models.get_model_weights(name)
        try:
            tv_weights = enum.verify(weights)
        except (KeyError, ValueError):
            names = ", ".join(["DEFAULT", *(w.name for w in enum)])
            raise ValueError(
                f"unknown weights {weights!r} for {name}: choose one of {names}, or a local .pt file"
            ) from None
    try:
        model = torchvision.models.get_model(name, weights=tv_weights)
    except OSError as err:  # URLError is an OSError: no network, or a proxy in the way
        raise OSError(
            f"could not download {tv_weights} ({err}); download it where there is internet and pass the file "
            "as model.encoder.init_args.weights"
        ) from None
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        trunk = nn.Sequential(OrderedDict(list(model.named_children())[:-2]))  # drop avgpool + fc; keep names
        dim = model.fc.in_features
    elif name.startswith("vgg"):
        # Xu et al. use VGG's conv5 output before the last max-pool: 14×14×512 for 224 px input.
        trunk = nn.Sequential(*list(model.features.children())[:-1])
        dim = 512
    elif hasattr(model, "features"):  # efficientnet, mobilenet, densenet, convnext …
        trunk = model.features
        with torch.no_grad():
            dim = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    else:
        raise ValueError(f"backbone {name!r} has no known convolutional trunk; use a resnet, vgg or efficientnet")
    return trunk, dim


class ImageEncoder(nn.Module):
    """A CNN backbone that returns the annotation grid and the pooled image vector.

    Args:
        backbone: ``"small_cnn"`` (the demo's net) or any torchvision classification model name
            (``"resnet50"``, ``"vgg19"``, ``"efficientnet_b0"`` …).
        weights: torchvision weights name (``"DEFAULT"``, ``"IMAGENET1K_V2"``) or a local state-dict
            file (``.pt``/``.pth``) for the backbone; None for random initialisation.
        trainable: which part of the backbone learns: ``"all"``, ``"none"`` (frozen), or the name of a
            child module from which on it is fine-tuned (``"layer4"`` for a resnet, say).
        grid_size: if set, adaptive-average-pool the feature map to ``grid_size``² locations
            (the popular 14×14 for a resnet at 224 px).
        small_cnn_channels: channels of each stage of ``small_cnn``.
    """

    def __init__(
        self,
        *,
        backbone: str = "small_cnn",
        weights: str | None = None,
        trainable: str = "all",
        grid_size: int | None = None,
        small_cnn_channels: tuple[int, ...] = (32, 64, 128),
    ) -> None:
        super().__init__()
        if backbone == "small_cnn":
            if weights is not None and not Path(weights).suffix:
                raise ValueError("small_cnn has no torchvision weights; give a local .pt file or None")
            self.trunk = small_cnn(channels=tuple(small_cnn_channels))
            self.out_dim = small_cnn_channels[-1]
        else:
            self.trunk, self.out_dim = _torchvision_trunk(backbone, weights)
        if weights is not None and Path(weights).suffix:
            self._load_local_weights(Path(weights))
        # Channels-last (NHWC) convolutions, pooling and batch norm: oneDNN and cuDNN's fast layout.
        # The demo's small_cnn trained 1.4× faster on a CPU (forward and backward, B=64 at 48 px:
        # 55 against 76 ms), and the (B, L, D) grid comes out contiguous without a copy.
        self.trunk.to(memory_format=torch.channels_last)
        self.backbone = backbone
        self.weights = weights
        self.grid_size = grid_size
        self.pool = nn.AdaptiveAvgPool2d(grid_size) if grid_size else nn.Identity()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self._set_trainable(trainable)

    def _load_local_weights(self, path: Path) -> None:
        if not path.is_file():
            raise FileNotFoundError(f"encoder weights file not found: {path} — give an existing .pt/.pth state dict")
        state = torch.load(path, map_location="cpu", weights_only=True)
        # Accept a whole classifier's state dict (with fc/classifier keys) as well as the trunk's own.
        trunk_keys = set(self.trunk.state_dict())
        if not trunk_keys & set(state):
            state = {k.split(".", 1)[1]: v for k, v in state.items() if "." in k}
        missing, _ = self.trunk.load_state_dict({k: v for k, v in state.items() if k in trunk_keys}, strict=False)
        if missing:
            raise ValueError(f"encoder weights {path} lack {len(missing)} trunk tensors (first: {missing[0]})")

    def _set_trainable(self, trainable: str) -> None:
        names = [name for name, _ in self.trunk.named_children()]
        if trainable == "all":
            return
        if trainable != "none" and trainable not in names:
            raise ValueError(f"trainable={trainable!r}: expected 'all', 'none' or one of {names}")
        learning = False
        for name, child in self.trunk.named_children():
            learning = learning or name == trainable
            child.requires_grad_(learning)

    @property
    def frozen(self) -> bool:
        """Whether no parameter learns (a feature cache needs a frozen encoder)."""
        return not any(p.requires_grad for p in self.parameters())

    def identity(self) -> dict[str, Any]:
        """Everything that decides this encoder's outputs: a feature cache is valid only for an equal identity.

        Besides the configuration it holds a hash of the backbone's weights, so two random
        initialisations, or a weights file changed in place, never share a cache.
        """
        digest = hashlib.sha256()
        for name, tensor in sorted(self.trunk.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        return {
            "class": f"{type(self).__module__}.{type(self).__qualname__}",
            "backbone": self.backbone,
            "weights": self.weights,
            "grid_size": self.grid_size,
            "out_dim": self.out_dim,
            "state_sha256": digest.hexdigest(),
        }

    def forward(self, images: Tensor) -> EncoderOutput:
        """Encodes images.

        Args:
            images: (B, 3, H, W) float in [0, 1].

        Returns:
            EncoderOutput with grid (B, L, D) and pooled (B, D).
        """
        x = ((images - self.mean) / self.std).contiguous(memory_format=torch.channels_last)
        fmap = self.pool(self.trunk(x))  # (B, D, h, w), channels last
        grid = fmap.flatten(2).transpose(1, 2)  # (B, L=h*w, D)
        return EncoderOutput(grid=grid, pooled=grid.mean(dim=1))

    def train(self, mode: bool = True) -> ImageEncoder:
        super().train(mode)
        # Frozen layers keep their BatchNorm statistics: a frozen backbone should not drift.
        for child in self.trunk.children():
            if not any(p.requires_grad for p in child.parameters(recurse=True)) and any(
                True for _ in child.parameters()
            ):
                child.eval()
        return self
