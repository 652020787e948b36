"""``capattn sweep``: a wandb-format sweep file, run locally by wandb's own engine, one trial per free device.

The sweep file is the one ``wandb sweep`` takes (``method``, ``metric``, ``parameters``, ``command``,
``early_terminate``). Proposals come from wandb's ``sweeps`` package (grid, random, bayes; hyperband
stopping), each trial's command line is built the way ``wandb agent`` builds it (``${env}``,
``${interpreter}``, ``${program}``, ``${args}`` … — never through a shell), and finished trials' metrics
are read back from their run folders and fed to the engine, so ``bayes`` and ``hyperband`` work offline.

Layout of a sweep's output folder (default ``runs/sweeps/<sweep name>``)::

    sweep_state.json          every trial: parameters, state, metrics (rewritten atomically; resumes from it)
    results.md, results.csv   trial, status, metric, parameters, run folder
    trials/<trial>/           the trial's logger ``save_dir`` (so its run folder is inside) and trial.log

Each trial runs in its own process group with ``CUDA_VISIBLE_DEVICES`` of its slot (empty for CPU slots,
which also cap ``OMP_NUM_THREADS``), ``CAPATTN_TRIAL_DIR`` (its folder, for programs other than capattn),
``WANDB_MODE=offline`` unless set, and the Python environment of the sweep first on ``PATH``. A ``capattn
fit`` trial also gets ``--trainer.logger.init_args.save_dir=<its folder>`` and ``…name=<trial>`` appended,
so trials never share a run folder.
"""

from __future__ import annotations

import copy
import csv
import fcntl
import io
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from capattn.errors import CapattnError
from capattn.io import write_json_atomic, write_text_atomic

log = logging.getLogger("capattn.sweep")

STATE_FILE = "sweep_state.json"
# what `wandb agent` runs when a sweep file has no `command:`
DEFAULT_COMMAND = ["${env}", "${interpreter}", "${program}", "${args}"]
# how long a stopped trial may take to checkpoint and exit before it is killed
STOP_GRACE_S = 60.0


class SweepError(CapattnError, ValueError):
    """A sweep file or a sweep's output folder cannot be used as given."""


def _import_sweeps():
    # sweeps 0.2.0 declares a pydantic-1 `Config`; pydantic 2 warns about it on import, harmlessly.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        import sweeps
    return sweeps


# --- the sweep file -----------------------------------------------------------------------------


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """Reads a sweep file and checks it against the ``sweeps`` package's schema (the one wandb's server uses).

    Raises:
        SweepError: missing file, not YAML, or a schema violation (all of them, in one line).
    """
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"sweep file not found: {path} — give a wandb-format sweep YAML (experiments/sweeps/*.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise SweepError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(config, dict):
        raise SweepError(f"{path} is not a sweep file: expected a mapping with method, parameters and command")
    violations = schema_violations(config)
    if violations:
        raise SweepError(f"{path} is not a valid wandb sweep file: {'; '.join(violations)}")
    return config


def schema_violations(config: dict[str, Any]) -> list[str]:
    """Every way ``config`` breaks wandb's sweep schema (empty when it is valid)."""
    sweeps = _import_sweeps()
    try:
        return list(sweeps.schema_violations_from_proposed_config(config))
    except ValueError as err:
        return [str(err)]


def _command_vars(config: dict[str, Any], args: dict[str, Any], args_json_file: Path) -> dict[str, list[str]]:
    """The values of the ``${…}`` macros, from wandb's own helper, as ``wandb agent`` fills them in."""
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    macros: dict[str, Any] = sweep_utils.create_sweep_command_args({"args": args})
    macros["interpreter"] = ["python"]
    macros["program"] = [config["program"]] if config.get("program") else []
    macros["args_json_file"] = [str(args_json_file)]
    macros["env"] = ["/usr/bin/env"]
    return macros


def trial_argv(config: dict[str, Any], args: dict[str, Any], *, args_json_file: Path) -> list[str]:
    """A trial's command line, exactly as ``wandb agent`` builds it from the sweep file's ``command``.

    Args:
        config: the sweep file.
        args: the trial's parameters, ``{name: {"value": v}}``; ``${args}`` writes ``--name=str(v)``.
        args_json_file: where ``${args_json_file}`` points (written here when the command uses it).

    Returns:
        The argv list (no shell ever sees it).
    """
    from wandb.sdk.launch.sweeps import utils as sweep_utils

    command = [str(c) for c in (config.get("command") or DEFAULT_COMMAND)]
    if "${program}" in command and not config.get("program"):
        raise SweepError("the sweep's command uses ${program} but the file has no `program:` — add one")
    command = sweep_utils.create_sweep_command(command)  # ${envvar:NAME} macros
    macros = _command_vars(config, args, args_json_file)
    if "${args_json_file}" in command:
        args_json_file.parent.mkdir(parents=True, exist_ok=True)
        args_json_file.write_text(macros["args_json"][0], encoding="utf-8")
    argv: list[str] = []
    for chunk in command:
        if chunk.startswith("${") and chunk.endswith("}"):
            argv += [str(v) for v in macros.get(chunk[2:-1]) or []]
        else:
            argv.append(chunk)
    return argv


def is_capattn_fit(argv: list[str]) -> bool:
    """Whether a trial runs ``capattn fit`` (which then gets its own run folder through logger overrides)."""
    names = [Path(a).name for a in argv]
    return "fit" in argv and any(n == "capattn" or n == "capattn.cli" for n in names)


# --- devices ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One place a trial runs: a GPU (``CUDA_VISIBLE_DEVICES``) or a share of the CPU cores."""

    name: str
    env: dict[str, str]


def parse_devices(spec: str) -> list[Slot]:
    """``"0,1,3"`` → one slot per GPU id; ``"cpu:N"`` → N CPU slots; ``"auto"`` → every visible GPU, else ``cpu:1``.

    Raises:
        SweepError: a spec that is none of these.
    """
    spec = spec.strip()
    if spec == "auto":
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible is not None:
            ids = [d for d in visible.split(",") if d.strip()]
        else:
            import torch

            ids = [str(i) for i in range(torch.cuda.device_count())]
        return parse_devices(",".join(ids) if ids else "cpu:1")
    if spec.startswith("cpu"):
        count = spec.partition(":")[2] or "1"
        if not count.isdigit() or int(count) < 1:
            raise SweepError(f"--devices {spec!r}: write cpu:N with N ≥ 1 trials at a time (e.g. cpu:2)")
        n = int(count)
        # Trials share the cores: without a cap every trial's torch starts one thread per core.
        threads = str(max(1, (os.cpu_count() or 1) // n))
        return [Slot(f"cpu{i}", {"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": threads}) for i in range(n)]
    ids = [d.strip() for d in spec.split(",") if d.strip()]
    if not ids or not all(d.isdigit() for d in ids) or len(set(ids)) != len(ids):
        raise SweepError(f"--devices {spec!r}: give GPU ids like 0,1,2,3 or cpu:N for CPU-only trials")
    return [Slot(f"gpu{d}", {"CUDA_VISIBLE_DEVICES": d}) for d in ids]


# --- trials and their results -------------------------------------------------------------------


@dataclass
class Trial:
    """One proposed set of parameters and what became of it (one row of ``sweep_state.json``)."""

    name: str
    config: dict[str, dict[str, Any]]  # {parameter: {"value": v}}, as wandb's engine proposes
    state: str = "pending"  # a sweeps.RunState value
    stopped: bool = False  # stopped early by hyperband
    exitcode: int | None = None
    device: str | None = None
    argv: list[str] = field(default_factory=list)
    run_dir: str | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    search_info: dict[str, Any] | None = None
    started: float | None = None
    ended: float | None = None

    @property
    def status(self) -> str:
        """What the results table says: finished, failed (exit N), stopped early, running, pending."""
        if self.stopped:
            return "stopped early"
        if self.state == "failed":
            return f"failed (exit {self.exitcode})"
        return self.state

    def sweep_run(self):
        """This trial as the ``sweeps`` engine's ``SweepRun`` (pydantic 2: populated through its aliases)."""
        sweeps = _import_sweeps()
        return sweeps.SweepRun(
            name=self.name,
            state=sweeps.RunState(self.state),
            config=self.config,
            summaryMetrics=self.summary,
            sampledHistory=self.history,
            stopped=self.stopped,
            exitcode=self.exitcode,
        )

    def metric(self, metric: dict[str, Any] | None) -> float | None:
        """The best value of the sweep's metric over the trial's history and summary (None when it has none)."""
        if not metric:
            return None
        kind = "maximum" if metric.get("goal", "minimize") == "maximize" else "minimum"
        try:
            return float(self.sweep_run().metric_extremum(metric["name"], kind))
        except (ValueError, KeyError):
            return None


def _plain(value: Any) -> Any:
    """JSON-ready copy: numpy scalars → Python numbers, non-finite floats → None, tuples → lists."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "shape", None) == ():
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _number(text: str) -> float | None:
    try:
        value = float(text)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def read_run_metrics(trial_dir: Path) -> tuple[str | None, list[dict[str, float]], dict[str, Any]]:
    """Finds a trial's run folder and reads its metrics, for any of capattn's loggers.

    History rows (one per logging step, as wandb's history) come from the CSV logger's ``metrics.csv``,
    else from a wandb run's ``.wandb`` file (offline or online: wandb keeps it locally). The summary
    holds each metric's last value, the best checkpoint's ``best_metrics.json`` and ``metrics_test.json``
    as ``test/<name>``, whichever exist.

    Returns:
        (run folder or None, history, summary).
    """
    run_dir: Path | None = None
    history: list[dict[str, float]] = []
    summary: dict[str, Any] = {}
    for path in sorted(trial_dir.rglob("metrics.csv")):
        run_dir = path.parent
        with path.open(newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                values = {k: _number(v) for k, v in row.items() if k and v not in (None, "")}
                entry = {k: v for k, v in values.items() if v is not None}
                if entry:
                    history.append(entry)
                    summary.update(entry)
    for path in sorted(trial_dir.rglob("*.wandb")):
        wandb_history, wandb_summary = read_wandb_run_file(path)
        if not history:
            history = wandb_history
        summary.update(wandb_summary)
    for path in sorted(trial_dir.rglob("best_metrics.json")):
        run_dir = path.parent
        summary.update(_read_json(path).get("metrics", {}))
    for path in sorted(trial_dir.rglob("metrics_test.json")):
        run_dir = path.parent
        summary.update({f"test/{k}": v for k, v in _read_json(path).get("metrics", {}).items()})
    return (str(run_dir) if run_dir else None), history, _plain(summary)


def read_wandb_run_file(path: Path) -> tuple[list[dict[str, float]], dict[str, float]]:
    """The numeric history and summary a wandb run has written so far into its local ``.wandb`` file.

    The file is a LevelDB-style log of wandb's protobuf records: after a 7-byte header, 32 KiB blocks
    of chunks, each with a 7-byte header (crc, length, type: 1 full, 2 first, 3 middle, 4 last). A run
    still being written ends in a partial record, which is left for the next read.
    """
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    try:
        raw = path.read_bytes()
    except OSError:
        return [], {}
    if raw[:4] != b":W&B":
        return [], {}
    history: list[dict[str, float]] = []
    summary: dict[str, float] = {}
    pos, block, chunks = 7, 32768, b""
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:  # too little room for a chunk header: padding up to the next block
            pos += left
            continue
        length, kind = int.from_bytes(raw[pos + 4 : pos + 6], "little"), raw[pos + 6]
        if pos + 7 + length > len(raw):
            break
        chunks += raw[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind not in (1, 4):
            continue
        record = pb.Record()
        try:
            record.ParseFromString(chunks)
        except DecodeError:
            break
        chunks = b""
        which = record.WhichOneof("record_type")
        if which == "history":
            row = _wandb_numbers(record.history.item)
            if row:
                history.append(row)
        elif which == "summary":
            summary.update(_wandb_numbers(record.summary.update))
    return history, summary


def _wandb_numbers(items) -> dict[str, float]:
    """wandb's key/value-JSON items → the numeric ones, without wandb's own ``_step``/``_runtime``…"""
    out = {}
    for item in items:
        key = item.key or ".".join(item.nested_key)
        if key.startswith("_"):
            continue
        try:
            value = json.loads(item.value_json)
        except json.JSONDecodeError:
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = value
    return out


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}  # a file being written right now: read again at the next poll
    return data if isinstance(data, dict) else {}


# --- the state file -----------------------------------------------------------------------------


def _state_path(out: Path) -> Path:
    return out / STATE_FILE


def load_state(out: Path, config: dict[str, Any]) -> list[Trial]:
    """The trials of an earlier run of this sweep in ``out`` (none if it is new).

    Raises:
        SweepError: ``out`` holds another sweep's state.
    """
    path = _state_path(out)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise SweepError(f"cannot read {path} ({err}): delete it to start the sweep afresh") from None
    if _plain(data.get("sweep")) != _plain(config):
        raise SweepError(
            f"{out} holds a sweep started from a different sweep file: give another --out, or delete {path}"
        )
    return [Trial(**t) for t in data.get("trials", [])]


def save_state(out: Path, config: dict[str, Any], sweep_file: Path, trials: list[Trial]) -> None:
    write_json_atomic(
        _state_path(out),
        {"sweep_file": str(sweep_file), "sweep": _plain(config), "trials": [_plain(asdict(t)) for t in trials]},
    )


def results_table(config: dict[str, Any], trials: list[Trial]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the results table: trial, status, metric, every parameter, run folder."""
    metric = config.get("metric")
    params = list(config.get("parameters", {}))
    header = ["trial", "status", *([metric["name"]] if metric else []), *params, "run folder"]
    rows = []
    for t in trials:
        value = t.metric(metric)
        cells = [t.name, t.status]
        if metric:
            cells.append("" if value is None else f"{value:.4g}")
        cells += [str(t.config.get(p, {}).get("value", "")) for p in params]
        cells.append(t.run_dir or "")
        rows.append(cells)
    return header, rows


def write_results(out: Path, config: dict[str, Any], trials: list[Trial]) -> str:
    """Writes ``results.md`` and ``results.csv``; returns the Markdown table."""
    header, rows = results_table(config, trials)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(c.replace("|", "\\|") or "–" for c in row) + " |" for row in rows]
    markdown = "\n".join(lines)
    write_text_atomic(out / "results.md", markdown + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    write_text_atomic(out / "results.csv", buffer.getvalue())
    return markdown


# --- the controller -----------------------------------------------------------------------------


@dataclass
class _Running:
    trial: Trial
    slot: Slot
    process: subprocess.Popen
    log_file: Any
    stop_sent: float | None = None


class SweepController:
    """Proposes trials with wandb's engine and runs each on a free slot until the sweep is done.

    Args:
        config: the sweep file's contents (already validated).
        sweep_file: its path (recorded in the state file).
        out: the sweep's output folder.
        slots: where trials run, one at a time per slot.
        max_trials: most trials in the sweep, counting those of earlier sessions (None: grid until exhausted).
        poll_s: seconds between looks at the running trials.
    """

    def __init__(
        self,
        *,
        config: dict[str, Any],
        sweep_file: Path,
        out: Path,
        slots: list[Slot],
        max_trials: int | None,
        poll_s: float = 2.0,
    ) -> None:
        if max_trials is None and config["method"] != "grid":
            raise SweepError(
                f"a {config['method']} sweep never runs out of trials: give --max-trials N (wandb's run_cap)"
            )
        self.config = config
        self.sweep_file = sweep_file
        self.out = out
        self.slots = slots
        self.max_trials = max_trials
        self.poll_s = poll_s
        self.trials: list[Trial] = load_state(out, config)
        self.running: dict[str, _Running] = {}  # slot name → trial there
        self.exhausted = False

    # trial bookkeeping

    def _trial_dir(self, trial: Trial) -> Path:
        return self.out / "trials" / trial.name

    def _save(self) -> None:
        save_state(self.out, self.config, self.sweep_file, self.trials)

    def _runs(self) -> list:
        return [t.sweep_run() for t in self.trials]

    def _propose(self) -> Trial | None:
        if self.max_trials is not None and len(self.trials) >= self.max_trials:
            return None
        sweeps = _import_sweeps()
        suggestion = sweeps.next_run(self.config, self._runs(), validate=True)
        if suggestion is None:
            self.exhausted = True
            return None
        trial = Trial(
            name=f"trial-{len(self.trials):03d}",
            config=_plain(suggestion.config),
            search_info=_plain(suggestion.search_info),
        )
        self.trials.append(trial)
        return trial

    def _next_trial(self) -> Trial | None:
        """A trial an earlier session left unfinished, else a new proposal."""
        for trial in self.trials:
            if trial.state in ("pending", "running") and all(r.trial is not trial for r in self.running.values()):
                return trial
        return None if self.exhausted else self._propose()

    def _launch(self, trial: Trial, slot: Slot) -> None:
        trial_dir = self._trial_dir(trial)
        if trial_dir.exists():  # what an interrupted attempt left: the trial starts over
            shutil.rmtree(trial_dir)
        trial_dir.mkdir(parents=True)
        argv = trial_argv(self.config, trial.config, args_json_file=trial_dir / "args.json")
        if is_capattn_fit(argv):
            # Plain LightningCLI overrides: every trial logs into its own folder, under its own name.
            argv += [
                f"--trainer.logger.init_args.save_dir={trial_dir}",
                f"--trainer.logger.init_args.name={trial.name}",
            ]
        env = dict(os.environ)
        env.update(slot.env)
        # `${env} capattn` / `${interpreter}` find the capattn and python this sweep runs with.
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        env["CAPATTN_TRIAL_DIR"] = str(trial_dir)
        sweep_name = str(self.config.get("name") or self.sweep_file.stem)
        env.setdefault("WANDB_RUN_GROUP", sweep_name)  # wandb shows a sweep's trials together
        env["CAPATTN_SWEEP"] = sweep_name  # capattn fit adds the trial's parameters to its run name
        env["CAPATTN_SWEEP_PARAMS"] = ",".join(trial.config)  # which of its arguments those parameters are
        # A local sweep works without a wandb account; WANDB_MODE=online in the environment logs trials to wandb.
        env.setdefault("WANDB_MODE", "offline")
        log_file = (trial_dir / "trial.log").open("w", encoding="utf-8")
        try:
            # Its own session: Ctrl-C reaches the controller, which stops each trial's whole process group.
            process = subprocess.Popen(argv, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        except OSError as err:
            log_file.write(f"cannot start {argv[0]}: {err}\n")
            log_file.close()
            trial.state, trial.exitcode, trial.argv, trial.device = "failed", 127, argv, slot.name
            trial.started = trial.ended = time.time()
            log.info("%s failed to start: %s", trial.name, err)
            return
        trial.state, trial.argv, trial.device = "running", argv, slot.name
        trial.started, trial.ended, trial.exitcode, trial.stopped = time.time(), None, None, False
        trial.summary, trial.history, trial.run_dir = {}, [], None
        self.running[slot.name] = _Running(trial, slot, process, log_file)
        params = " ".join(f"{k}={v['value']}" for k, v in trial.config.items())
        log.info("%s on %s: %s  (log: %s)", trial.name, slot.name, params, trial_dir / "trial.log")

    def _refresh(self, trial: Trial) -> None:
        run_dir, history, summary = read_run_metrics(self._trial_dir(trial))
        trial.run_dir, trial.history, trial.summary = run_dir, history, summary

    def _reap(self) -> bool:
        """Collects the trials that ended; returns whether any did."""
        changed = False
        for slot_name, running in list(self.running.items()):
            code = running.process.poll()
            if code is None:
                continue
            running.log_file.close()
            del self.running[slot_name]
            trial = running.trial
            trial.exitcode, trial.ended = code, time.time()
            self._refresh(trial)
            if trial.stopped:
                trial.state = "finished"  # stopped early: its metrics so far still teach the engine
            else:
                trial.state = "finished" if code == 0 else "failed"
            value = trial.metric(self.config.get("metric"))
            shown = f", {self.config['metric']['name']}={value:.4g}" if value is not None else ""
            took = f"{trial.ended - (trial.started or trial.ended):.0f} s"
            if trial.state == "failed":
                log.info("%s failed (exit %s, %s): %s", trial.name, code, took, _last_line(self._trial_dir(trial)))
            else:
                log.info("%s %s%s in %s", trial.name, trial.status, shown, took)
            changed = True
        return changed

    def _early_terminate(self) -> None:
        """Asks wandb's hyperband which running trials to stop, from their metrics so far."""
        if not self.config.get("early_terminate") or not self.running:
            return
        for running in self.running.values():
            self._refresh(running.trial)
        sweeps = _import_sweeps()
        to_stop = {run.name for run in sweeps.stop_runs(self.config, self._runs())}
        for running in self.running.values():
            if running.trial.name in to_stop and running.stop_sent is None:
                log.info("%s stopped early by hyperband", running.trial.name)
                running.trial.stopped = True
                self._signal(running, signal.SIGTERM)

    @staticmethod
    def _signal(running: _Running, signum: int) -> None:
        if signum == signal.SIGTERM:
            running.stop_sent = time.monotonic()
        try:
            os.killpg(running.process.pid, signum)
        except ProcessLookupError:
            pass

    def _kill_overdue(self) -> None:
        for running in self.running.values():
            if running.stop_sent is not None and time.monotonic() - running.stop_sent > STOP_GRACE_S:
                self._signal(running, signal.SIGKILL)

    def _stop_all(self) -> None:
        """Stops every running trial (SIGTERM, then SIGKILL after a grace period) and marks it to run again."""
        for running in self.running.values():
            self._signal(running, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_S
        for running in self.running.values():
            try:
                running.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self._signal(running, signal.SIGKILL)
                running.process.wait()
            running.log_file.close()
            running.trial.state = "pending"  # the next session reruns it from scratch
        self.running.clear()

    def run(self) -> list[Trial]:
        """Runs the sweep to its end, or until SIGINT/SIGTERM (then raises ``KeyboardInterrupt``)."""
        done = [t for t in self.trials if t.state not in ("pending", "running")]
        if self.trials:
            log.info("resuming %s: %d trials done, %d to rerun", self.out, len(done), len(self.trials) - len(done))
        stop_requested: list[int] = []
        # A flag, not an exception from the handler: a trial is never left half-launched or half-recorded.
        previous = {s: signal.signal(s, lambda signum, _: stop_requested.append(signum)) for s in _STOP_SIGNALS}
        try:
            while not stop_requested:
                changed = self._reap()
                self._early_terminate()
                self._kill_overdue()
                for slot in self.slots:
                    if slot.name in self.running:
                        continue
                    trial = self._next_trial()
                    if trial is None:
                        break
                    self._launch(trial, slot)
                    changed = True
                if changed:
                    self._save()
                    write_results(self.out, self.config, self.trials)
                if not self.running:
                    break
                deadline = time.monotonic() + self.poll_s
                while not stop_requested and time.monotonic() < deadline:
                    time.sleep(0.05)
            if stop_requested:
                log.info(
                    "interrupted: stopping %d running trials; run the same command again to resume", len(self.running)
                )
                self._stop_all()
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            self._save()
            write_results(self.out, self.config, self.trials)
        if stop_requested:
            raise KeyboardInterrupt
        return self.trials


_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _last_line(trial_dir: Path) -> str:
    try:
        text = (trial_dir / "trial.log").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in text.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][:300] if lines else "(no output)"


class _OutLock:
    """An exclusive lock on the sweep's folder: two controllers must not run the same sweep at once."""

    def __init__(self, out: Path) -> None:
        self.path = out / ".lock"
        self.file = None

    def __enter__(self) -> _OutLock:
        self.file = self.path.open("w")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise SweepError(
                f"another `capattn sweep` is running in {self.path.parent}: wait for it or stop it"
            ) from None
        return self

    def __exit__(self, *exc: Any) -> None:
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()


def default_out(config: dict[str, Any], sweep_file: Path) -> Path:
    """``runs/sweeps/<the sweep's name, else the file's stem>``."""
    return Path("runs", "sweeps", str(config.get("name") or sweep_file.stem))


def run_sweep(
    sweep_file: str | Path,
    *,
    devices: str = "auto",
    max_trials: int | None = None,
    out: str | Path | None = None,
    poll_s: float = 2.0,
) -> list[Trial]:
    """Runs (or resumes) a sweep file locally.

    Args:
        sweep_file: a wandb-format sweep YAML.
        devices: ``"0,1,2,3"`` (GPU ids), ``"cpu:N"`` or ``"auto"``; one trial at a time per device.
        max_trials: most trials in all (earlier sessions included); required for random and bayes.
        out: the sweep's output folder (default ``runs/sweeps/<sweep name>``).
        poll_s: seconds between looks at the running trials.

    Returns:
        Every trial of the sweep.
    """
    sweep_file = Path(sweep_file)
    config = load_sweep_file(sweep_file)
    out = Path(out) if out is not None else default_out(config, sweep_file)
    out.mkdir(parents=True, exist_ok=True)
    slots = parse_devices(devices)
    with _OutLock(out):
        controller = SweepController(
            config=copy.deepcopy(config),
            sweep_file=sweep_file,
            out=out,
            slots=slots,
            max_trials=max_trials,
            poll_s=poll_s,
        )
        return controller.run()


def main(argv: list[str]) -> int:
    """``capattn sweep FILE --devices 0,1|cpu:N [--max-trials N] [--out DIR]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="capattn sweep",
        description="Run a wandb-format sweep file locally with wandb's engine, one trial per free device. "
        "Stop it with Ctrl-C and run the same command again to resume.",
    )
    parser.add_argument("sweep_file", type=str, help="wandb-format sweep YAML (experiments/sweeps/*.yaml)")
    parser.add_argument(
        "--devices",
        type=str,
        default="auto",
        help="GPU ids (0,1,2,3), cpu:N for N CPU trials at a time, or auto (every visible GPU, else cpu:1)",
    )
    parser.add_argument(
        "--max-trials",
        "--max_trials",
        dest="max_trials",
        type=int | None,
        default=None,
        help="most trials in all, earlier sessions included (random/bayes need it; grid stops when exhausted)",
    )
    parser.add_argument("--out", type=str | None, default=None, help="output folder (default runs/sweeps/<sweep name>)")
    parser.add_argument("--poll_s", type=float, default=2.0, help="seconds between looks at the running trials")
    args = parser.parse_args(argv)
    if args.max_trials is not None and args.max_trials < 1:
        raise SweepError(f"--max-trials {args.max_trials}: give 1 or more")
    config = load_sweep_file(args.sweep_file)
    out = Path(args.out) if args.out else default_out(config, Path(args.sweep_file))
    trials = run_sweep(args.sweep_file, devices=args.devices, max_trials=args.max_trials, out=out, poll_s=args.poll_s)
    print(write_results(out, config, trials))
    print(f"\nresults: {out / 'results.md'}, {out / 'results.csv'}; trials' run folders under {out / 'trials'}")
    failed = [t.name for t in trials if t.state == "failed"]
    if failed:
        print(f"failed: {', '.join(failed)} — see {out / 'trials'}/<trial>/trial.log")
    return 0
