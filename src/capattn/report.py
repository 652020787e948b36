"""``capattn report``: compare finished runs — one table, validation curves, attention figures.

A run is a folder holding the ``metrics_test.json`` that ``capattn test`` (or ``fit`` with
``test_after_fit``) writes, with ``config.yaml`` and, for CSV loggers, ``metrics.csv`` beside it.
The report groups runs by dataset and model; runs that differ only in their seed are one
configuration, shown as mean ± std over seeds, and each model's best configuration (by test
CIDEr-D) is the one in the table. ``runs.csv`` lists every run.

Nothing heavy is imported: no torch, no Lightning; matplotlib only when plots are written.
"""

from __future__ import annotations

import base64
import csv
import html
import json
import logging
import math
import re
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from capattn.errors import DataError

logger = logging.getLogger("capattn.report")

METRICS_FILE = "metrics_test.json"
# The metrics of the table, in the order papers print them; METRIC_KEYS of capattn.metrics, plus SPICE.
METRICS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D", "SPICE")
CURVES = ("CIDEr-D", "BLEU-4")
MODEL_NAMES = {"ShowTellDecoder": "Show and Tell", "ShowAttendTellDecoder": "Show, Attend and Tell"}
# show_tell-shapes-seed0, show_tell-shapes-seed0-lr0.001 (a sweep trial), show_tell-shapes-seed0-2 (a rerun)
_RUN_NAME = re.compile(r"^(?P<config>.+?)-seed(?P<seed>\d+)(?P<rest>.*?)(?:-\d+)?$")
_RERUN = re.compile(r"-\d+$")


@dataclass
class Run:
    """One finished run.

    Args:
        name: the run's name (its folder).
        path: its folder.
        model: the decoder's class name.
        dataset: the dataset's short name (``shapes``, ``flickr8k``, …).
        seed: ``seed_everything`` of its config, if known.
        metrics: test scores keyed by metric name.
        info: the rest of ``metrics_test.json`` (params, train time, decoding …).
        curves: validation metric → [(epoch, value)], from ``metrics.csv``.
        throughput: training captions per second: the median of the run's logged ``speed/captions_per_s``
            (``capattn.callbacks.TrainingSpeed``: all devices, validation left out), else estimated as
            optimizer steps × batch size / train time (one device, validation included), if it can be told.
        figures: the attention figures the run wrote.
        mtime: when its metrics file was written.
    """

    name: str
    path: Path
    model: str
    dataset: str
    seed: int | None
    metrics: dict[str, float]
    info: dict[str, Any]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    throughput: float | None = None
    figures: list[Path] = field(default_factory=list)
    mtime: float = 0.0

    @property
    def config(self) -> str:
        """The run's configuration: its name without the seed, so seeds of one setting group together."""
        match = _RUN_NAME.match(self.name)
        return match.group("config") + match.group("rest") if match else _RERUN.sub("", self.name)

    @property
    def family(self) -> str:
        """The run's name without the rerun counter (``-2``, ``-3``) a fresh ``fit`` of the same experiment adds."""
        return _RERUN.sub("", self.name) if _RUN_NAME.match(self.name) else self.name

    @property
    def model_name(self) -> str:
        """``Show and Tell``, ``Show, Attend and Tell``, or the decoder's class name."""
        return MODEL_NAMES.get(self.model, self.model)


# --- reading ---------------------------------------------------------------------------------


def find_runs(paths: Sequence[Path], *, latest: bool = False) -> list[Run]:
    """Reads every run under ``paths`` (folders searched recursively, or ``metrics_test.json`` files).

    Args:
        paths: folders or metrics files.
        latest: keep only the newest run of each experiment (``make demo`` reruns into new folders ``…-2``).

    Raises:
        DataError: a metrics file cannot be read.
    """
    runs = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob(METRICS_FILE))
        runs.extend(read_run(file) for file in files)
    if latest:
        newest: dict[str, Run] = {}
        for run in runs:
            if run.family not in newest or run.mtime > newest[run.family].mtime:
                newest[run.family] = run
        runs = list(newest.values())
    return sorted(runs, key=lambda r: (r.dataset, r.model_name, r.name))


def read_run(metrics_file: Path) -> Run:
    """One run from its ``metrics_test.json`` and the files beside it.

    Raises:
        DataError: the metrics file is not JSON or lacks its metrics.
    """
    try:
        data = json.loads(metrics_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"cannot read {metrics_file}: {err} — re-run `capattn test` for that run") from None
    if not isinstance(data, dict) or not isinstance(data.get("metrics"), dict):
        raise DataError(f"{metrics_file} has no 'metrics' — it is not from `capattn test`; re-run it")
    folder = metrics_file.parent
    config = _read_config(folder / "config.yaml")
    name = str(data.get("run") or folder.name)
    run = Run(
        name=name,
        path=folder,
        model=str(data.get("model", "?")),
        dataset=_dataset_name(name, config),
        seed=config.get("seed_everything") if isinstance(config.get("seed_everything"), int) else None,
        metrics={k: float(v) for k, v in data["metrics"].items() if isinstance(v, (int, float))},
        info=data,
        curves=_read_curves(folder / "metrics.csv"),
        figures=sorted(folder.glob("attention/*.png")),
        mtime=metrics_file.stat().st_mtime,
    )
    run.throughput = _throughput(run, config)
    return run


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    import yaml

    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        logger.warning("cannot read %s; the run's dataset and seed are taken from its name", path)
        return {}
    return config if isinstance(config, dict) else {}


def _dataset_name(run_name: str, config: dict[str, Any]) -> str:
    reader = ((config.get("data") or {}).get("reader") or {}) if isinstance(config.get("data"), dict) else {}
    class_path = reader.get("class_path", "") if isinstance(reader, dict) else ""
    init_args = reader.get("init_args") or {} if isinstance(reader, dict) else {}
    name = class_path.rpartition(".")[2].removesuffix("Reader").lower()
    if name == "karpathy" and isinstance(init_args, dict) and init_args.get("split_json"):
        # dataset_coco.json → coco, dataset_flickr8k.json → flickr8k
        return Path(str(init_args["split_json"])).stem.removeprefix("dataset_") or name
    if name == "hf" and isinstance(init_args, dict) and init_args.get("path"):
        return f"hf-{Path(str(init_args['path']).rstrip('/')).name}"
    if name:
        return name
    match = _RUN_NAME.match(run_name)  # "<name>-<dataset>-seed<n>", as the CLI names runs
    return match.group("config").rpartition("-")[2] if match and "-" in match.group("config") else "?"


def _read_curves(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Validation metric → [(epoch, value)], the last value logged in each epoch."""
    if not path.is_file():
        return {}
    curves: dict[str, dict[int, float]] = defaultdict(dict)
    with path.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            try:
                epoch = int(float(row.get("epoch") or "nan"))
            except ValueError:
                continue
            for key, value in row.items():
                if key and key.startswith("val/") and value not in (None, ""):
                    curves[key.removeprefix("val/")][epoch] = float(value)
    return {key: sorted(points.items()) for key, points in curves.items()}


def _throughput(run: Run, config: dict[str, Any]) -> float | None:
    """Training captions per second: the median logged speed, else optimizer steps × batch size / train time."""
    logged = [float(v) for v in _column(run.path / "metrics.csv", "speed/captions_per_s")]
    if logged:
        return statistics.median(logged)
    steps = max((int(float(row)) for row in _column(run.path / "metrics.csv", "step")), default=0)
    data = config.get("data") if isinstance(config.get("data"), dict) else {}
    batch_size = data.get("batch_size") if isinstance(data, dict) else None
    seconds = run.info.get("train_time_s")
    if not steps or not isinstance(batch_size, int) or not isinstance(seconds, (int, float)) or seconds <= 0:
        return None
    return steps * batch_size / seconds


def _column(path: Path, name: str) -> list[str]:
    if not path.is_file():
        return []
    with path.open(encoding="utf-8", newline="") as f:
        return [row[name] for row in csv.DictReader(f) if row.get(name) not in (None, "")]


# --- summarising ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Row:
    """One line of the comparison table: the best configuration of one model on one dataset."""

    dataset: str
    model: str
    config: str
    runs: list[Run]

    def values(self, metric: str) -> list[float]:
        """The metric of every seed that has it."""
        return [run.metrics[metric] for run in self.runs if metric in run.metrics]

    def cell(self, metric: str) -> str:
        """``57.9`` for one run, ``57.9 ± 0.4`` over seeds (×100, as papers print them), ``–`` if absent."""
        values = [100 * v for v in self.values(metric)]
        if not values:
            return "–"
        if len(values) == 1:
            return f"{values[0]:.1f}"
        return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def comparison(runs: Sequence[Run]) -> list[Row]:
    """Best configuration per model per dataset, by mean test CIDEr-D over its seeds (else BLEU-4)."""
    configs: dict[tuple[str, str, str], list[Run]] = defaultdict(list)
    for run in runs:
        configs[(run.dataset, run.model_name, run.config)].append(run)
    best: dict[tuple[str, str], Row] = {}
    for (dataset, model, config), members in sorted(configs.items()):
        row = Row(dataset, model, config, sorted(members, key=lambda r: (r.seed is None, r.seed, r.name)))
        key = (dataset, model)
        if key not in best or _rank(row) > _rank(best[key]):
            best[key] = row
    return [best[key] for key in sorted(best)]


def _rank(row: Row) -> tuple[float, float]:
    def mean(metric: str) -> float:
        values = row.values(metric)
        return statistics.mean(values) if values else -math.inf

    return mean("CIDEr-D"), mean("BLEU-4")


def _metrics_present(runs: Sequence[Run]) -> list[str]:
    return [m for m in METRICS if any(m in r.metrics for r in runs)]


def _mean_info(row: Row, key: str) -> float | None:
    values = [r.info[key] for r in row.runs if isinstance(r.info.get(key), (int, float))]
    return statistics.mean(values) if values else None


def comparison_table(runs: Sequence[Run]) -> list[list[str]]:
    """Header + rows of the comparison table, as text cells."""
    metrics = _metrics_present(runs)
    header = ["dataset", "model", "runs", *metrics, "params", "train time", "captions/s"]
    rows = [header]
    for row in comparison(runs):
        params = _mean_info(row, "params")
        seconds = _mean_info(row, "train_time_s")
        speeds = [r.throughput for r in row.runs if r.throughput is not None]
        rows.append(
            [
                row.dataset,
                row.model,
                str(len(row.runs)),
                *(row.cell(m) for m in metrics),
                "–" if params is None else f"{params / 1e6:.2f} M",
                "–" if seconds is None else f"{seconds:.0f} s",
                f"{statistics.mean(speeds):.0f}" if speeds else "–",
            ]
        )
    return rows


def runs_table(runs: Sequence[Run]) -> list[list[str]]:
    """Header + one row per run: run, model, params, every metric (×100), train time."""
    metrics = _metrics_present(runs)
    rows = [["run", "model", "params", *metrics, "train time"]]
    for run in runs:
        params, seconds = run.info.get("params"), run.info.get("train_time_s")
        rows.append(
            [
                run.name,
                run.model,
                "–" if not isinstance(params, (int, float)) else f"{params / 1e6:.2f} M",
                *(f"{100 * run.metrics[m]:.1f}" if m in run.metrics else "–" for m in metrics),
                "–" if not isinstance(seconds, (int, float)) else f"{seconds:.0f} s",
            ]
        )
    return rows


def markdown(rows: list[list[str]]) -> str:
    """A Markdown table from header + rows."""
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows[1:]]
    return "\n".join(lines)


def markdown_table(runs: Sequence[Run]) -> str:
    """The per-run Markdown table (what ``capattn report`` printed before it compared models)."""
    return markdown(runs_table(runs))


# --- writing ---------------------------------------------------------------------------------


def write_runs_csv(runs: Sequence[Run], path: Path) -> Path:
    """``runs.csv``: one line per run, metrics as raw scores (not ×100)."""
    metrics = _metrics_present(runs)
    columns = ["run", "path", "dataset", "model", "encoder", "seed", "params", "trainable_params", "beam_size"]
    columns += ["images", "train_time_s", "throughput_captions_per_s", *metrics]
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for run in runs:
            decoding = run.info.get("decoding") if isinstance(run.info.get("decoding"), dict) else {}
            writer.writerow(
                [
                    run.name,
                    str(run.path),
                    run.dataset,
                    run.model_name,
                    run.info.get("encoder", ""),
                    "" if run.seed is None else run.seed,
                    run.info.get("params", ""),
                    run.info.get("trainable_params", ""),
                    decoding.get("beam_size", run.info.get("beam_size", "")),
                    run.info.get("images", ""),
                    run.info.get("train_time_s", ""),
                    "" if run.throughput is None else round(run.throughput, 1),
                    *(run.metrics.get(m, "") for m in metrics),
                ]
            )
    return path


def plot_curves(runs: Sequence[Run], out: Path) -> list[Path]:
    """One PNG per dataset: validation CIDEr-D and BLEU-4 by epoch, every run a line, one colour per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    by_dataset: dict[str, list[Run]] = defaultdict(list)
    for run in runs:
        if any(run.curves.get(metric) for metric in CURVES):
            by_dataset[run.dataset].append(run)
    for dataset, members in sorted(by_dataset.items()):
        models = sorted({run.model_name for run in members})
        colours = {model: f"C{n}" for n, model in enumerate(models)}
        fig, axes = plt.subplots(1, len(CURVES), figsize=(5.5 * len(CURVES), 3.8), squeeze=False)
        for ax, metric in zip(axes[0], CURVES, strict=True):
            labelled: set[str] = set()
            for run in members:
                points = run.curves.get(metric)
                if not points:
                    continue
                epochs, values = zip(*points, strict=True)
                label = None if run.model_name in labelled else run.model_name
                labelled.add(run.model_name)
                ax.plot(
                    epochs, [100 * v for v in values], marker="o", color=colours[run.model_name], label=label, alpha=0.8
                )
            ax.set_title(f"validation {metric} — {dataset}")
            ax.set_xlabel("epoch")
            ax.set_ylabel(f"{metric} (×100)")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.grid(alpha=0.3)
            if labelled:
                ax.legend()
        fig.tight_layout()
        path = out / f"curves-{re.sub(r'[^A-Za-z0-9_.-]+', '_', dataset)}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def _figures(runs: Sequence[Run], per_run: int) -> list[tuple[Run, Path]]:
    return [(run, figure) for run in runs for figure in run.figures[:per_run]]


def write_markdown(runs: Sequence[Run], curves: list[Path], out: Path, *, per_run: int = 2) -> Path:
    """``report.md``: the comparison table, the runs, and links to the plots and attention figures."""
    lines = ["# capattn report", "", "## Comparison", "", _intro(runs), "", markdown(comparison_table(runs)), ""]
    lines += ["## Runs", "", markdown(runs_table(runs)), ""]
    if curves:
        lines += ["## Validation curves", ""]
        lines += [f"![{path.stem}]({path.name})" for path in curves]
        lines.append("")
    figures = _figures(runs, per_run)
    if figures:
        lines += ["## Attention figures", ""]
        for run, figure in figures:
            lines += [
                f"**{run.name}** ({run.model_name}) — {figure.stem}",
                "",
                f"![{figure.stem}]({_relative(figure, out)})",
                "",
            ]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def write_html(runs: Sequence[Run], curves: list[Path], out: Path, *, per_run: int = 2) -> Path:
    """``report.html``: the same content, self-contained (every image embedded as base64)."""

    def table(rows: list[list[str]], css: str) -> str:
        head = "".join(f"<th>{html.escape(cell)}</th>" for cell in rows[0])
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows[1:])
        return f'<table class="{css}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'

    def image(path: Path, alt: str) -> str:
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'

    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>capattn report</title>',
        "<style>body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px}"
        "table{border-collapse:collapse;margin:1em 0}th,td{border:1px solid #bbb;padding:.3em .6em;text-align:right}"
        "th{background:#eee}td:first-child,td:nth-child(2),th:first-child,th:nth-child(2){text-align:left}"
        "img{max-width:100%;margin:.5em 0}"
        "figure{margin:1em 0}figcaption{font-size:.9em;color:#444}</style></head><body>",
        "<h1>capattn report</h1>",
        "<h2>Comparison</h2>",
        f"<p>{html.escape(_intro(runs))}</p>",
        table(comparison_table(runs), "comparison"),
        "<h2>Runs</h2>",
        table(runs_table(runs), "runs"),
    ]
    if curves:
        parts.append("<h2>Validation curves</h2>")
        parts += [f"<figure>{image(path, path.stem)}</figure>" for path in curves]
    figures = _figures(runs, per_run)
    if figures:
        parts.append("<h2>Attention figures</h2>")
        for run, figure in figures:
            caption = f"{run.name} ({run.model_name}) — {figure.stem}"
            parts.append(f"<figure>{image(figure, caption)}<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


def _intro(runs: Sequence[Run]) -> str:
    return (
        f"{len(runs)} run{'s' * (len(runs) != 1)}. Test scores ×100; per model and dataset the configuration with "
        "the best mean CIDEr-D, as mean ± std over its seeds when there are several. Train time includes validation."
    )


def _relative(path: Path, start: Path) -> str:
    import os

    return Path(os.path.relpath(path.resolve(), start.resolve())).as_posix()


def main(argv: list[str]) -> int:
    """``capattn report RUNS… [--out DIR] [--latest]``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(
        prog="capattn report",
        description="Compare finished runs (folders with metrics_test.json): a table of the best run of each model "
        "per dataset (mean ± std over seeds), validation curves and attention figures, as Markdown and HTML.",
    )
    parser.add_argument("paths", type=str, nargs="+", help="run folders (searched recursively) or metrics files")
    parser.add_argument(
        "--out", type=str | None, default=None, help="folder for report.md, report.html, runs.csv, plots"
    )
    parser.add_argument("--latest", action="store_true", help="only the newest run of each run name")
    parser.add_argument("--figures-per-run", type=int, default=2, help="attention figures shown per run")
    args = parser.parse_args(argv)
    paths = [Path(p) for p in args.paths]
    missing = [p for p in paths if not p.exists()]
    if missing:
        raise DataError(f"no such run folder: {missing[0]} — give the folder a `capattn fit/test` wrote")
    runs = find_runs(paths, latest=args.latest)
    if not runs:
        raise DataError(f"no {METRICS_FILE} under {', '.join(map(str, paths))} — run `capattn test` first")

    print(markdown(comparison_table(runs)))
    print()
    print(markdown_table(runs))
    print()
    for run in runs:
        shown = f" — figures: {run.figures[0].parent}/" if run.figures else ""
        print(f"{run.name}: {run.path}{shown}")
    sys.stdout.flush()  # a reader that left (`| head`) shows here, inside the command, where the CLI ends quietly
    if args.out is not None:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        curves = plot_curves(runs, out)
        written = [
            write_markdown(runs, curves, out, per_run=args.figures_per_run),
            write_html(runs, curves, out, per_run=args.figures_per_run),
            write_runs_csv(runs, out / "runs.csv"),
            *curves,
        ]
        logger.info("wrote %s", ", ".join(str(p) for p in written))
    return 0
