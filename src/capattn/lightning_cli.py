"""``capattn fit/validate/test/predict``: a ``LightningCLI`` over ``CaptioningModule`` and ``CaptionDataModule``.

Beyond LightningCLI, this front end owns three policies (see the README's "Runs, resuming and preemption"):

* **Run folders.** Every run writes its config, checkpoints, logs, results and figures into one folder,
  ``<save_dir>/<name>/<run>``, for any logger (CSV by default, TensorBoard, wandb). ``<run>`` is
  ``--run_name`` if given, else named from the experiment (``show_tell-shapes-seed7``; under SLURM
  ``…-job<id>``; in a wandb sweep the trial's parameters are added); a fresh run never reuses a folder
  (``…-2``, ``…-3``). A relative logger ``save_dir`` is taken inside ``trainer.default_root_dir``.
* **Resuming.** ``--ckpt_path last`` continues the newest run of the same experiment (or the named
  run) from its newest ``last.ckpt``/``hpc_ckpt_N.ckpt``, in the same folder; with none yet it trains
  from scratch, so a requeued job's command never changes. A requeued SLURM job resumes by itself.
* **Checkpoints.** Every fit writes ``last.ckpt`` atomically every ``--checkpoint_every_n_steps``
  steps, after every epoch and on SIGTERM (exit code ``PREEMPTED_EXIT_CODE``); checkpoints are read
  with ``weights_only=True``; the model stored in a checkpoint wins over the config's (named in one
  line), decoding settings from the config and command line apply.
"""

from __future__ import annotations

import csv
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Literal

import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback

import capattn  # noqa: F401  (installs the torchvision guard before Lightning is imported)
from capattn.checkpointing import (
    LAST,
    PREEMPTED_EXIT_CODE,
    AtomicCheckpointIO,
    ExactResume,
    LastCheckpoint,
    StopOnNonFinite,
    find_last_checkpoint,
    resumable,
)
from capattn.data.datamodule import CaptionDataModule
from capattn.errors import ConfigError
from capattn.io import load_checkpoint, run_dir
from capattn.module import CaptioningModule

log = logging.getLogger("capattn.cli")

# Settings that change how a trained model decodes or is scored, not its weights: the config's and
# the command line's values apply even when the rest of the model comes from a checkpoint.
DECODING_KEYS = (
    "beam_size",
    "max_len",
    "length_alpha",
    "val_scorers",
    "test_scorers",
    "tokenizer",
    "output_dir",
    "nonfinite_loss",
)
# Decoder arguments that choose how it runs, not what it computes: from a checkpoint too, the
# config's and the command line's values apply (a model trained with compile_step on a GPU must not
# compile on the CPU that tests it).
DECODER_RUNTIME_KEYS = ("compile_step",)
_CSV = "lightning.pytorch.loggers.CSVLogger"
_LOGGER_DEFAULT_NAME = "lightning_logs"


# --- the command line as wandb's agent writes it ----------------------------------------------

_PY_FLOAT = re.compile(r"^([+-]?\d+)([eE][+-]?\d+)$")  # 1e-05: YAML 1.1 reads it as a string
_PY_WORDS = {"None": "null", "True": "true", "False": "false"}


def _yaml_value(value: str) -> str:
    if value in _PY_WORDS:
        return _PY_WORDS[value]
    if m := _PY_FLOAT.match(value):
        return f"{m[1]}.0{m[2]}"
    if value[:1] in "[{(":
        value = re.sub(r"(?<![\w.'\"])(None|True|False)(?![\w.'\"])", lambda m: _PY_WORDS[m[1]], value)
        value = re.sub(r"(?<![\w.])([+-]?\d+)([eE][+-]?\d+)(?![\w.])", r"\1.0\2", value)
        if value.startswith("("):  # a Python tuple
            value = "[" + value[1:-1].rstrip(", ") + "]" if value.endswith(")") else value
    return value


def check_config_files(argv: list[str]) -> None:
    """``--config FILE`` that does not exist: jsonargparse would read the name itself as (empty) YAML."""
    for i, arg in enumerate(argv):
        if arg in ("-c", "--config") and i + 1 < len(argv):
            value = argv[i + 1]
        elif arg.startswith("--config="):
            value = arg.split("=", 1)[1]
        else:
            continue
        looks_inline = any(ch in value for ch in ":{}\n")
        if not looks_inline and not Path(value).is_file():
            raise ConfigError(f"config file not found: {value} — give an experiment YAML, e.g. experiments/<name>.yaml")


def normalize_argv(argv: list[str]) -> list[str]:
    """``--key=value`` with Python's ``str()`` of the value (wandb's ``${args}``) → values YAML reads.

    ``--key=None`` → ``null``, ``True``/``False`` → ``true``/``false``, ``1e-05`` → ``1.0e-05``,
    also inside ``[1, None]``. Other arguments are unchanged.
    """
    out = []
    for arg in argv:
        if arg.startswith("--") and "=" in arg:
            key, value = arg.split("=", 1)
            arg = f"{key}={_yaml_value(value)}"
        out.append(arg)
    return out


# --- one-line parse errors --------------------------------------------------------------------


class _Parser(LightningArgumentParser):
    """Reports a bad argument or config value as one ``ConfigError`` line instead of usage + exit."""

    def error(self, message: str, ex: Exception | None = None) -> None:
        text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
        text = re.sub(r"\s+", " ", text)
        if len(text) > 400:
            text = text[:400] + " …"
        command = " ".join(["capattn", *self.prog.replace(" [options]", "").split()[1:]])
        raise ConfigError(f"{text} — see `{command} --help`")


# --- run folders ------------------------------------------------------------------------------


def _snake(name: str, suffix: str) -> str:
    name = name.removesuffix(suffix)
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


def _class_name(spec: Any) -> str:
    path = spec.get("class_path") if isinstance(spec, (dict, Namespace)) else None
    return str(path or type(spec).__name__).rsplit(".", 1)[-1]


def _slurm_job() -> str | None:
    """The SLURM job's id (``<array job>_<task>`` in a job array), when running as a batch job."""
    if "SLURM_JOB_ID" not in os.environ or os.environ.get("SLURM_JOB_NAME") in ("bash", "interactive"):
        return None
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def _sweep_parameters() -> set[str] | None:
    """The dotted keys a sweep varies: ``capattn sweep`` lists them, ``wandb agent`` writes them to a YAML file."""
    listed = os.environ.get("CAPATTN_SWEEP_PARAMS")
    if listed:
        return {key for key in listed.split(",") if key}
    path = os.environ.get("WANDB_SWEEP_PARAM_PATH")
    if path and Path(path).is_file():
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        return {key for key in data if not key.startswith("_") and key != "wandb_version"}
    return None


def _trial_suffix(argv: list[str]) -> str:
    """In a sweep, the trial's parameters (``--model.optimizer.init_args.lr=0.001`` → ``lr0.001``).

    Only the keys the sweep varies count, not the fixed settings of its command; a class path
    contributes its class name (``ShowAttendTellDecoder``).
    """
    if not (os.environ.get("WANDB_SWEEP_ID") or os.environ.get("CAPATTN_SWEEP")):
        return ""
    varied = _sweep_parameters()
    parts = []
    for arg in argv:
        if not (arg.startswith("--") and "=" in arg):
            continue
        key, value = arg[2:].split("=", 1)
        if (varied is not None and key not in varied) or key == "seed_everything":  # the seed is in the name already
            continue
        if varied is None and not key.startswith(("model.", "data.")):
            continue
        if key.endswith("class_path"):
            parts.append(value.rsplit(".", 1)[-1])
        else:
            parts.append(key.rsplit(".", 1)[-1] + re.sub(r"[^\w.+-]", "", value)[:16])
    return "-" + "-".join(parts) if parts else ""


def _run_folders(base_dir: Path, base: str) -> list[Path]:
    pattern = re.compile(rf"^{re.escape(base)}(-\d+)?$")
    return [p for p in base_dir.glob(f"{base}*") if p.is_dir() and pattern.match(p.name)]


def _fresh_run_name(base_dir: Path, base: str) -> str:
    name, n = base, 1
    while (base_dir / name).exists() and any((base_dir / name).iterdir()):
        n += 1
        name = f"{base}-{n}"
    return name


def _devices_count(devices: Any, accelerator: Any) -> int | None:
    if isinstance(devices, int):
        return devices if devices > 0 else None
    if isinstance(devices, (list, tuple)):
        return len(devices)
    text = str(devices).strip()
    if text.isdigit():
        return int(text)
    if "," in text:
        return len([d for d in text.split(",") if d.strip()])
    if text in ("auto", "-1"):
        import torch

        if str(accelerator) in ("cpu",) or not torch.cuda.is_available():
            return 1
        return torch.cuda.device_count()
    return None


def check_slurm_layout(trainer_cfg: Any) -> None:
    """Under SLURM, one task per device: a layout that disagrees hangs at "Initializing distributed"."""
    if _slurm_job() is None or "SLURM_NTASKS" not in os.environ:
        return
    per_node_text = os.environ.get("SLURM_NTASKS_PER_NODE", "")
    nodes_text = os.environ.get("SLURM_NNODES", "1")
    m = re.match(r"^(\d+)", per_node_text)
    per_node = int(m[1]) if m else None
    nodes = int(nodes_text) if nodes_text.isdigit() else None
    devices = _devices_count(trainer_cfg.get("devices", "auto"), trainer_cfg.get("accelerator", "auto"))
    num_nodes = int(trainer_cfg.get("num_nodes", 1) or 1)
    problems = []
    if per_node is not None and devices is not None and per_node != devices:
        problems.append(f"--ntasks-per-node={per_node} but trainer.devices={devices}")
    if nodes is not None and nodes != num_nodes:
        problems.append(f"--nodes={nodes} but trainer.num_nodes={num_nodes}")
    if problems:
        raise ConfigError(
            f"SLURM layout does not match the trainer ({'; '.join(problems)}): it would hang at "
            "'Initializing distributed' — request one task per device (#SBATCH --ntasks-per-node=<devices per "
            "node> --nodes=<trainer.num_nodes>) or set trainer.devices/num_nodes to match"
        )


class _LoggerPlace:
    """Where a logger config puts its run: ``save_dir/name/version`` (wandb: ``save_dir/project/version``)."""

    def __init__(self, spec: Namespace) -> None:
        self.spec = spec
        self.class_path = str(spec.get("class_path", ""))
        self.wandb = self.class_path.endswith("WandbLogger")
        self.known = self.wandb or self.class_path.endswith(("CSVLogger", "TensorBoardLogger"))
        if spec.get("init_args") is None:
            spec.init_args = Namespace()
        self.args = spec.init_args

    def get(self, key: str) -> Any:
        return self.args.get(key) if key in self.args else None

    @property
    def save_dir(self) -> str:
        return str(self.get("save_dir") or (self.get("dir") if self.wandb else None) or ".")

    @property
    def name(self) -> str | None:
        name = self.get("project") if self.wandb else self.get("name")
        return None if name in (None, _LOGGER_DEFAULT_NAME) else str(name)

    @property
    def version(self) -> str | None:
        version = self.get("version") or (self.get("id") if self.wandb else None)
        if version is None:
            return None
        return version if isinstance(version, str) else f"version_{version}"

    def place(self, save_dir: Path, name: str, version: str) -> None:
        self.args.save_dir = str(save_dir)
        if self.wandb:
            self.args.project = name
            self.args.version = version
            if not self.get("name"):
                self.args.name = version  # the run's name in wandb's UI
        else:
            self.args.name = name
            self.args.version = version


# --- the CLI ----------------------------------------------------------------------------------


class _SaveConfig(SaveConfigCallback):
    """Saves the resolved config as ``config.yaml`` in the run's own folder (for any logger, wandb too)."""

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.already_saved:
            return
        folder = Path(trainer.strategy.broadcast(str(run_dir(trainer))))
        if trainer.is_global_zero:
            folder.mkdir(parents=True, exist_ok=True)
            # A resumed or requeued run rewrites it: the same command gives the same config.
            self.parser.save(
                self.config, str(folder / self.config_filename), skip_none=False, overwrite=True, multifile=False
            )
            self.save_config(trainer, pl_module, stage)
        self.already_saved = trainer.strategy.broadcast(True)

    def save_config(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import yaml

                config = yaml.safe_load(self.parser.dump(self.config, skip_none=False))
                logger.experiment.config.update(config, allow_val_change=True)


class _KeepCSVMetrics(Callback):
    """Puts back the rows of a resumed run's ``metrics.csv`` that Lightning's CSVLogger deletes when it starts.

    Rows logged after the checkpoint's step (by the interrupted process) are dropped: the resumed
    run logs those steps again.
    """

    def __init__(self, *, path: Path, header: list[str], rows: list[dict[str, str]]) -> None:
        self.path, self.header, self.rows = path, header, rows

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        from lightning.pytorch.loggers import CSVLogger

        logger = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
        if logger is None or not trainer.is_global_zero or not self.rows:
            return
        writer = logger.experiment  # created (and the old file deleted) before callbacks are set up
        writer.metrics_keys = list(self.header)
        with open(writer.metrics_file_path, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=self.header)
            out.writeheader()
            out.writerows(self.rows)
        self.rows = []


class CaptioningCLI(LightningCLI):
    """LightningCLI over ``CaptioningModule`` and ``CaptionDataModule`` with capattn's run and checkpoint policy.

    The decoder's ``vocab_size`` is linked from the datamodule's vocabulary, so it is never typed.
    ``--test_after_fit true`` tests the best checkpoint as soon as ``fit`` ends.
    """

    def __init__(self, *args: Any, argv: list[str] | None = None, **kwargs: Any) -> None:
        self._argv = list(argv if argv is not None else sys.argv[1:])
        self.preempted = False
        self._kept_metrics: _KeepCSVMetrics | None = None
        super().__init__(*args, **kwargs)

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        kwargs.setdefault("dump_header", ["capattn (lightning)"])
        parser = _Parser(**kwargs)
        from jsonargparse import ActionConfigFile

        parser.add_argument("-c", "--config", action=ActionConfigFile, help="Path to a configuration file (YAML).")
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.vocab_size", "model.decoder.init_args.vocab_size", apply_on="instantiate")
        parser.add_argument(
            "--test_after_fit", type=bool, default=False, help="after fit, test the best checkpoint (fit only)"
        )
        parser.add_argument(
            "--run_name",
            type=str | None,
            default=None,
            help="the run's folder name (default: from model, dataset and seed); the same name continues that run",
        )
        parser.add_argument(
            "--checkpoint_every_n_steps",
            type=int,
            default=100,
            help="write the run's last.ckpt every this many training steps as well as every epoch (0: epochs only)",
        )
        parser.add_argument(
            "--float32_matmul_precision",
            type=Literal["highest", "high", "medium"] | None,
            default=None,
            help=(
                "torch.set_float32_matmul_precision for the run: 'high' lets an Ampere-or-newer GPU run "
                "fp32 matmuls on its TF32 tensor cores (the GPU figures in benchmarks/RESULTS.md), "
                "'medium' in bf16; default: torch's own ('highest', full fp32)"
            ),
        )
        parser.add_argument(
            "--allow_untrained",
            type=bool,
            default=False,
            help="validate/test/predict without --ckpt_path (an untrained model; results are marked untrained)",
        )

    def _parse_ckpt_path(self) -> None:
        # Lightning merges the checkpoint's hyperparameters here, unchecked; capattn does it in
        # before_instantiate_classes, once `last` is resolved and the file is known to be safe.
        return

    # --- before anything is built -------------------------------------------------------------

    def before_instantiate_classes(self) -> None:
        sub = self.subcommand
        cfg = self.config[sub]
        check_slurm_layout(cfg.trainer)
        if cfg.checkpoint_every_n_steps < 0:
            raise ConfigError(f"checkpoint_every_n_steps must be ≥ 0, got {cfg.checkpoint_every_n_steps}")
        if "weights_only" in cfg:
            cfg.weights_only = True  # never unpickle code from a checkpoint, Lightning's own loads included
        ckpt = cfg.get("ckpt_path")
        if sub != "fit" and not ckpt and not cfg.allow_untrained:
            raise ConfigError(
                f"`capattn {sub}` needs --ckpt_path (a checkpoint of `capattn fit`, or `last` for the newest run "
                f"of this experiment); pass --allow_untrained=true to {sub} an untrained model on purpose"
            )
        if cfg.get("float32_matmul_precision"):
            torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
        self._place_run(sub, cfg)
        if cfg.get("ckpt_path"):
            self._model_from_checkpoint(sub, cfg, Path(cfg.ckpt_path))

    def _place_run(self, sub: str, cfg: Namespace) -> None:
        """Chooses the run folder, points the logger at it and resolves ``--ckpt_path last``."""
        trainer = cfg.trainer
        root = Path(trainer.default_root_dir) if trainer.get("default_root_dir") else Path(".")
        logger = trainer.get("logger")
        if logger is False:
            place = None
        else:
            if logger in (None, True):
                trainer.logger = Namespace(class_path=_CSV, init_args=Namespace(save_dir=str(root)))
                logger = trainer.logger
            first = logger[0] if isinstance(logger, list) else logger
            place = _LoggerPlace(first) if isinstance(first, Namespace) else None
            if place is not None and not place.known:
                place = None  # another logger: it places its own files
        model = _snake(_class_name(cfg.model.decoder), "Decoder")
        dataset = _snake(_class_name(cfg.data.reader), "Reader")
        base = f"{model}-{dataset}-seed{cfg.seed_everything}{_trial_suffix(self._argv)}"

        if place is None:  # no logger (or one capattn does not know): Lightning's folders
            if cfg.get("ckpt_path") == LAST:
                found = find_last_checkpoint(root)
                log.info(f"resuming from {found}" if found else f"no checkpoint yet in {root}: training from scratch")
                cfg.ckpt_path = str(found) if found else None
            return
        save_dir = Path(place.save_dir)
        if not save_dir.is_absolute() and trainer.get("default_root_dir"):
            save_dir = root / save_dir
        name = place.name or model
        base_dir = save_dir / name
        ckpt = cfg.get("ckpt_path")
        explicit = os.environ.get("CAPATTN_RUN_NAME") or cfg.get("run_name") or place.version
        job = _slurm_job()
        run = explicit or (f"{base}-job{job}" if job else None)
        if ckpt is None and job and int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0 and sub == "fit":
            ckpt = LAST  # a requeued job continues its run with the same command
        if ckpt == LAST:
            if run is None:
                folders = [(p, find_last_checkpoint(p)) for p in _run_folders(base_dir, base)]
                folders = [(p, c) for p, c in folders if c is not None]
                if folders:
                    run = max(folders, key=lambda pc: pc[1].stat().st_mtime_ns)[0].name
            found = find_last_checkpoint(base_dir / run) if run else None
            if found is None:
                where = base_dir / run if run else base_dir / f"{base}*"
                log.info(f"no checkpoint of this run yet ({where}): training from scratch")
                ckpt = None
            else:
                ckpt = str(found)
        elif ckpt and ckpt not in ("best", "hpc") and not explicit:
            path = Path(ckpt)
            if path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
                # A run's checkpoint: resuming continues that run, evaluating writes its results there.
                run_folder = path.parent.parent
                save_dir, name, run = run_folder.parent.parent, run_folder.parent.name, run_folder.name
                base_dir = save_dir / name
        if run is None:
            run = _fresh_run_name(base_dir, base)
        elif sub == "fit" and not ckpt and find_last_checkpoint(base_dir / run) is not None:
            raise ConfigError(
                f"run folder {base_dir / run} already holds checkpoints: add --ckpt_path last to continue that run, "
                "or give another --run_name"
            )
        cfg.ckpt_path = ckpt
        place.place(save_dir, name, run)
        trainer.default_root_dir = str(base_dir / run)  # SLURM's hpc_ckpt_N.ckpt lands in the run folder too
        os.environ["CAPATTN_RUN_NAME"] = run  # DDP processes started from this one join the same run
        log.info(f"run folder: {base_dir / run}")

    def _model_from_checkpoint(self, sub: str, cfg: Namespace, path: Path) -> None:
        """The checkpoint's model replaces the config's; decoding settings stay the config's."""
        if str(path) in ("best", "hpc"):
            return
        checkpoint = load_checkpoint(path)  # one clear line for missing, text, truncated, unsafe, foreign
        if sub == "fit":
            step = checkpoint.get("global_step")
            log.info(f"resuming from {path} (epoch {checkpoint.get('epoch')}, step {step})")
            self._keep_csv_metrics(Path(cfg.trainer.default_root_dir) / "metrics.csv", int(step or 0))
        else:  # test/validate/predict write into the checkpoint's run folder: keep the fit's history there
            self._keep_csv_metrics(Path(cfg.trainer.default_root_dir) / "metrics.csv", sys.maxsize)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        mine = cfg.model.as_dict() if isinstance(cfg.model, Namespace) else dict(cfg.model)
        saved_class, my_class = _class_name(hparams.get("decoder", {})), _class_name(mine.get("decoder", {}))
        if saved_class != my_class:
            backbone = (hparams.get("encoder") or {}).get("init_args", {}).get("backbone", "?")
            log.info(
                f"{path} holds a {saved_class} model ({backbone} encoder); the config's model ({my_class}) is "
                "ignored — the checkpoint's model is tested, with the config's decoding settings"
            )
        else:
            ignored = [
                f"{key}={mine_value!r} (checkpoint: {saved_value!r})"
                for key, mine_value, saved_value in _differences(mine, hparams)
                if key.split(".")[0] not in DECODING_KEYS
                and not key.endswith("vocab_size")
                and key not in {f"decoder.init_args.{k}" for k in DECODER_RUNTIME_KEYS}
            ]
            if ignored:
                shown = ", ".join(ignored[:4]) + (", …" if len(ignored) > 4 else "")
                log.info(f"the checkpoint fixes the model; ignored from the config: model.{shown}")
        for key in DECODING_KEYS:
            if key in mine:
                hparams[key] = mine[key]
        saved_args = (hparams.get("decoder") or {}).get("init_args")
        mine_args = (mine.get("decoder") or {}).get("init_args") or {}
        if isinstance(saved_args, dict):
            for key in DECODER_RUNTIME_KEYS:
                if key in saved_args:  # the config's value, else the argument's default (off)
                    saved_args[key] = mine_args.get(key, False) if saved_class == my_class else False
        self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)

    def _keep_csv_metrics(self, path: Path, step: int) -> None:
        if not path.is_file():
            return
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            rows = [row for row in reader if not row.get("step") or int(float(row["step"])) <= step]
            header = list(reader.fieldnames or [])
        self._kept_metrics = _KeepCSVMetrics(path=path, header=header, rows=rows)

    # --- after everything is built ------------------------------------------------------------

    def after_instantiate_classes(self) -> None:
        trainer, cfg = self.trainer, self.config[self.subcommand]
        # A checkpoint is written whole or not at all.
        if type(trainer.strategy.checkpoint_io).__name__ == "TorchCheckpointIO":
            trainer.strategy.checkpoint_io = AtomicCheckpointIO()
        # Each run has its own folder, so a file of the same name is this run's own older one: replace it.
        kept, checkpointing = [], False
        for callback in trainer.callbacks:
            checkpointing |= isinstance(callback, ModelCheckpoint)
            if isinstance(callback, ModelCheckpoint) and not isinstance(callback, LastCheckpoint):
                callback._enable_version_counter = False
                if callback.monitor is None and str(callback.filename) == LAST:
                    continue  # capattn's LastCheckpoint writes last.ckpt (more often, and on SIGTERM)
            kept.append(callback)
        trainer.callbacks = kept
        if self.subcommand == "fit" and checkpointing:
            last = LastCheckpoint(every_n_train_steps=cfg.checkpoint_every_n_steps)
            # ExactResume counts each trained batch before any checkpoint callback saves (they run in list order).
            exact = ExactResume()
            trainer.callbacks.insert(0, exact)
            trainer.callbacks.insert(0, StopOnNonFinite())
            trainer.callbacks.append(last)
            self._last = last
            # Any train loader the datamodule gives starts where a checkpoint left off.
            datamodule, make = self.datamodule, self.datamodule.train_dataloader
            datamodule.train_dataloader = lambda: exact.adopt(resumable(make()))
        if self._kept_metrics is not None:
            trainer.callbacks.insert(0, self._kept_metrics)
        self.model.untrained = self.subcommand != "fit" and not cfg.get("ckpt_path")
        # An optimizer that refuses its settings (lr < 0, …) says so before data is prepared.
        if self.subcommand == "fit":
            import torch

            try:
                self.model.optimizer_factory([torch.nn.Parameter(torch.zeros(1))])
            except (ValueError, TypeError) as err:
                raise ConfigError(f"model.optimizer: {err} — fix model.optimizer.init_args") from None

    def fit(self, model: Any, **kwargs: Any) -> None:
        from lightning.pytorch.utilities.exceptions import SIGTERMException

        try:
            self.trainer.fit(model, **kwargs)
        except SIGTERMException:
            self.preempted = True
            return
        if self.trainer.received_sigterm:
            self.preempted = True

    def after_fit(self) -> None:
        if self.preempted:
            last = getattr(self, "_last", None)
            saved = last.last_model_path if last is not None else None
            log.info(
                f"stopped by SIGTERM at step {self.trainer.global_step}; saved {saved or 'nothing'} — rerun the same "
                f"command with --ckpt_path last to continue (exit code {PREEMPTED_EXIT_CODE})"
            )
            return
        if not self.config[self.subcommand].get("test_after_fit"):
            return
        best = self.trainer.checkpoint_callback and self.trainer.checkpoint_callback.best_model_path
        self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path="best" if best else None)


def _differences(mine: dict, saved: dict, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """Dotted keys whose values differ between two nested dicts (keys missing on one side are skipped)."""
    out = []
    for key in mine.keys() & saved.keys():
        a, b = mine[key], saved[key]
        if isinstance(a, dict) and isinstance(b, dict):
            out += _differences(a, b, f"{prefix}{key}.")
        elif _plain(a) != _plain(b):
            out.append((f"{prefix}{key}", a, b))
    return sorted(out)


def _plain(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def run_lightning(args: list[str] | None) -> int:
    """Runs one LightningCLI subcommand; ``args`` None reads ``sys.argv``.

    Returns:
        0, or ``PREEMPTED_EXIT_CODE`` when ``fit`` stopped on SIGTERM after saving ``last.ckpt``.
    """
    # lightning 2.6 calls a torch pytree API that torch 2.13 deprecates, once per epoch: noise, not news.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    if args is None:
        sys.argv[1:] = normalize_argv(sys.argv[1:])
        argv = sys.argv[1:]
    else:
        args = argv = normalize_argv(list(args))
    check_config_files(argv)
    inherited = os.environ.get("CAPATTN_RUN_NAME")
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    try:
        cli = CaptioningCLI(
            CaptioningModule,
            CaptionDataModule,
            args=args,
            argv=argv,
            save_config_callback=_SaveConfig,
            save_config_kwargs={"overwrite": True},
            auto_configure_optimizers=False,
        )
    except MisconfigurationException as err:
        # Lightning's own configuration checks (a monitored metric that is never logged, …): one line.
        if os.environ.get("CAPATTN_DEBUG") == "1":
            raise
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ConfigError(f"{first} — check the trainer and callback settings of the config") from None
    finally:
        # One wandb run per command, also when commands run in one process (tests, notebooks).
        wandb = sys.modules.get("wandb")
        if wandb is not None and getattr(wandb, "run", None) is not None:
            wandb.finish()
        # The run's name is passed to the DDP processes this one starts, not to later runs in this process.
        if inherited is None:
            os.environ.pop("CAPATTN_RUN_NAME", None)
        else:
            os.environ["CAPATTN_RUN_NAME"] = inherited
    return PREEMPTED_EXIT_CODE if cli.preempted else 0
