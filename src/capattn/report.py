"""``capattn report``: one table comparing finished runs (their ``metrics_test.json``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from capattn.errors import DataError
from capattn.metrics import METRIC_KEYS

METRICS_FILE = "metrics_test.json"


def find_runs(paths: list[Path], *, latest: bool = False) -> list[dict]:
    """Reads every ``metrics_test.json`` under ``paths``; with ``latest``, the newest per run name."""
    runs = []
    for root in paths:
        files = [root] if root.is_file() else sorted(root.rglob(METRICS_FILE))
        for file in files:
            try:
                data = json.loads(file.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError) as err:
                raise DataError(f"cannot read {file}: {err} — re-run `capattn test` for that run") from None
            runs.append({**data, "path": str(file.parent), "mtime": file.stat().st_mtime})
    if latest:
        newest: dict[str, dict] = {}
        for run in runs:
            if run["run"] not in newest or run["mtime"] > newest[run["run"]]["mtime"]:
                newest[run["run"]] = run
        runs = list(newest.values())
    return sorted(runs, key=lambda r: r["run"])


def markdown_table(runs: list[dict]) -> str:
    """A Markdown table: run, model, params, every metric (×100, as papers print them), train time."""
    metrics = [k for k in METRIC_KEYS if any(k in r["metrics"] for r in runs)]
    header = ["run", "model", "params", *metrics, "train time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in runs:
        cells = [
            r["run"],
            r["model"],
            f"{r['params'] / 1e6:.2f} M",
            *(f"{100 * r['metrics'][k]:.1f}" if k in r["metrics"] else "–" for k in metrics),
            f"{r['train_time_s']:.0f} s",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="capattn report", description=__doc__)
    parser.add_argument("paths", nargs="+", type=Path, help="run folders (searched recursively) or metrics files")
    parser.add_argument("--latest", action="store_true", help="only the newest run of each run name")
    args = parser.parse_args(argv)
    missing = [p for p in args.paths if not p.exists()]
    if missing:
        raise DataError(f"no such run folder: {missing[0]} — give the folder a `capattn fit/test` wrote")
    runs = find_runs(args.paths, latest=args.latest)
    if not runs:
        raise DataError(f"no {METRICS_FILE} under {', '.join(map(str, args.paths))} — run `capattn test` first")
    print(markdown_table(runs))
    print()
    for run in runs:
        figures = sorted(Path(run["path"]).glob("attention/*.png"))
        shown = f" — figures: {figures[0].parent}/" if figures else ""
        print(f"{run['run']}: {run['path']}{shown}")
    return 0
