"""capattn: image-captioning experiments (Show and Tell, Show, Attend and Tell) on Lightning."""

from capattn import _compat

# The torchvision guard runs just before torchvision is first imported (by capattn, Lightning or
# torchmetrics), not here: `capattn --help` and the light commands must not pay for importing torch.
_compat.install_import_hook()

__version__ = "0.1.0"
