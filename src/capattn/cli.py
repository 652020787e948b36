"""The ``capattn`` command: LightningCLI's fit/validate/test/predict, plus capattn's own commands.

Nothing heavy is imported at module level: ``capattn --help`` and the light commands answer
without loading torch or Lightning. Each extra command is one module with ``main(argv) -> int``.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys

# name → (module with ``main(argv) -> int``, one line for ``capattn --help``)
COMMANDS: dict[str, tuple[str, str]] = {
    "prepare": ("capattn.data.prepare", "build the vocabulary, tokenized captions and feature cache of a dataset"),
    "evaluate": ("capattn.evaluate", "score a COCO-format results file with the official caption metrics"),
    "caption": ("capattn.caption", "caption image files with a checkpoint; per-word attention figures"),
    "report": ("capattn.report", "compare finished runs: table, validation curves, attention figures"),
    "sweep": ("capattn.sweep", "run a wandb-format sweep locally, one trial per free device"),
}
# LightningCLI's own subcommands (capattn.lightning_cli)
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (config: --config experiments/<name>.yaml)",
    "validate": "run the validation split through a checkpoint",
    "test": "decode and score the test split with a checkpoint; writes results and metrics",
    "predict": "caption the predict split with a checkpoint; writes predictions.json",
}


def usage() -> str:
    """The text of ``capattn --help``."""
    lines = ["usage: capattn <command> [options]   (capattn <command> --help for its options)", "", "commands:"]
    for name, text in LIGHTNING_COMMANDS.items():
        lines.append(f"  {name:<9} {text}")
    for name, (_, text) in COMMANDS.items():
        lines.append(f"  {name:<9} {text}")
    return "\n".join(lines)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is now (tests and tools swap it), not the one at creation."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def _other_rank() -> bool:
    """True in a DDP/SLURM process other than global rank 0 (Lightning and srun set these variables)."""
    return any(os.environ.get(key, "0") not in ("", "0") for key in ("RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID"))


class _RankZeroNotes(logging.Filter):
    """Notes are printed once per job, by rank 0; warnings and errors by every rank."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.INFO or not _other_rank()


def _setup_logging() -> None:
    """capattn's notes (``logging.getLogger("capattn.…").info``) go to stderr as ``capattn: …`` lines."""
    logger = logging.getLogger("capattn")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("capattn: %(message)s"))
        handler.addFilter(_RankZeroNotes())
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _run(argv: list[str], passed: list[str] | None) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from capattn import __version__

        print(f"capattn {__version__}")
        return 0
    if argv[0] in COMMANDS:
        module = importlib.import_module(COMMANDS[argv[0]][0])
        return int(module.main(argv[1:]) or 0)
    if argv[0] not in LIGHTNING_COMMANDS and not argv[0].startswith("-"):
        print(f"capattn: error: unknown command {argv[0]!r} — see `capattn --help`", file=sys.stderr)
        return 2
    from capattn.lightning_cli import run_lightning

    return run_lightning(passed)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``capattn`` console script.

    Returns 0 on success (so tests can call it in-process); any other status exits the process.
    """
    from_sys = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    passed = None if from_sys else argv  # LightningCLI warns when given sys.argv twice
    from capattn.errors import CapattnError

    _setup_logging()
    try:
        code = _run(argv, passed)
    except CapattnError as err:
        if os.environ.get("CAPATTN_DEBUG") == "1":
            raise
        print(f"capattn: error: {err}", file=sys.stderr)
        code = 2
    except BrokenPipeError:
        # `capattn report … | head`: the reader left; end quietly, as Unix tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        print("capattn: interrupted", file=sys.stderr)
        code = 130
    if code:
        sys.exit(code)
    return 0


if __name__ == "__main__":
    main()
