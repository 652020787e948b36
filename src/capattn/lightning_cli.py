"""``capattn fit/validate/test/predict``: a ``LightningCLI`` over ``CaptioningModule`` and ``CaptionDataModule``."""

from __future__ import annotations

import warnings

from lightning.pytorch.cli import LightningCLI

import capattn  # noqa: F401  (installs the torchvision guard before Lightning is imported)
from capattn.data.datamodule import CaptionDataModule
from capattn.module import CaptioningModule


class CaptioningCLI(LightningCLI):
    """LightningCLI over ``CaptioningModule`` and ``CaptionDataModule``.

    The decoder's ``vocab_size`` is linked from the datamodule's vocabulary, so it is never typed.
    ``--test_after_fit true`` tests the best checkpoint as soon as ``fit`` ends.
    """

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.decoder.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, test the best checkpoint (fit only)"
        )

    def after_fit(self) -> None:
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        best = self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)


def run_lightning(args: list[str] | None) -> int:
    """Runs one LightningCLI subcommand; ``args`` None reads ``sys.argv``."""
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per epoch: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    CaptioningCLI(
        CaptioningModule,
        CaptionDataModule,
        args=args,
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0
