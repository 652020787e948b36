"""capattn: image-captioning experiments (Show and Tell, Show, Attend and Tell) on Lightning."""

from capattn import _compat  # noqa: F401  (must run before anything imports torchvision)

__version__ = "0.1.0"
