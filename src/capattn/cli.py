"""The ``capattn`` command: LightningCLI's fit/validate/test/predict, plus capattn's own commands."""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable

from lightning.pytorch.cli import LightningCLI

import capattn  # noqa: F401  (installs the torchvision guard before Lightning is imported)
from capattn.data.datamodule import CaptionDataModule
from capattn.errors import CapattnError
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


def _report(argv: list[str]) -> int:
    from capattn.report import main

    return main(argv)


# capattn's own commands; everything else goes to LightningCLI.
COMMANDS: dict[str, Callable[[list[str]], int]] = {"report": _report}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``capattn`` console script."""
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per epoch: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    argv = sys.argv[1:] if argv is None else list(argv)
    passed = argv if argv != sys.argv[1:] else None  # LightningCLI warns when given sys.argv twice
    try:
        if argv and argv[0] in COMMANDS:
            sys.exit(COMMANDS[argv[0]](argv[1:]))
        CaptioningCLI(
            CaptioningModule,
            CaptionDataModule,
            args=passed,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except CapattnError as err:
        print(f"capattn: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
