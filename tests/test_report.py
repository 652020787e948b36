"""`capattn report` on tiny finished runs of both models, two seeds each: table, plots, runs.csv, HTML in a browser."""

from __future__ import annotations

import csv
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from capattn.cli import main
from capattn.report import read_run

from .conftest import REPO_ROOT

TINY = [
    "--data.reader.init_args.num_train=16",
    "--data.reader.init_args.num_val=4",
    "--data.reader.init_args.num_test=4",
    "--data.batch_size=8",
    "--data.num_workers=0",
    "--model.val_scorers=[bleu,cider]",
    "--model.test_scorers=[bleu,cider]",
    "--model.tokenizer=simple",
    "--model.max_len=6",  # untrained models ramble; short captions keep the figures quick
    "--trainer.max_epochs=2",
    "--trainer.limit_train_batches=1",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=true",
]
MODELS = {"show_tell": "Show and Tell", "show_attend_tell": "Show, Attend and Tell"}
BROWSERS = ("chromium", "chromium-browser", "google-chrome", "chrome")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four finished runs: Show and Tell and Show, Attend and Tell, seeds 0 and 1 (2 epochs each)."""
    root = tmp_path_factory.mktemp("report")
    cwd = Path.cwd()
    os.chdir(root)  # prepared data and run folders land here
    try:
        for name in MODELS:
            for seed in (0, 1):
                config = REPO_ROOT / "experiments" / f"demo_{name}.yaml"
                main(["fit", "--config", str(config), *TINY, f"--seed_everything={seed}"])
    finally:
        os.chdir(cwd)
    return root / "runs"


def test_report_compares_both_models_over_seeds(runs, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    # One comparison row per model, mean ± std over the two seeds.
    for model in MODELS.values():
        (row,) = [line for line in printed.splitlines() if line.startswith(f"| shapes | {model} |")]
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[2] == "2" and all(re.fullmatch(r"\d+\.\d ± \d+\.\d", c) for c in cells[3:8]), row
    assert "| run | model | params |" in printed  # and the per-run table, as before

    markdown = (out / "report.md").read_text()
    assert "| dataset | model | runs | BLEU-1 |" in markdown and "![curves-shapes](curves-shapes.png)" in markdown
    with Image.open(out / "curves-shapes.png") as plot:
        assert plot.format == "PNG" and plot.width > plot.height
    # Attention figures of the runs are linked relative to the report.
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+/attention/[^)]+\.png)\)", markdown)
    assert len(linked) == 8 and all((out / link).is_file() for link in linked)

    with (out / "runs.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4
    assert sorted((r["model"], r["seed"]) for r in rows) == sorted((m, s) for m in MODELS.values() for s in "01")
    for row in rows:
        assert 0 <= float(row["CIDEr-D"]) <= 10 and int(row["params"]) > 0 and float(row["train_time_s"]) > 0
        assert float(row["throughput_captions_per_s"]) > 0 and Path(row["path"]).is_dir()

    page = (out / "report.html").read_text()
    assert page.count('<img src="data:image/png;base64,') == 1 + 8  # the curves and every attention figure
    assert 'src="file:' not in page and 'src="/' not in page  # self-contained


def test_report_html_shows_table_and_images_in_a_real_browser(runs, tmp_path):
    browser = next((shutil.which(name) for name in BROWSERS if shutil.which(name)), None)
    if browser is None:
        pytest.skip(f"no headless browser ({', '.join(BROWSERS)}) on PATH: install one, e.g. apt-get install chromium")
    out = tmp_path / "report"
    assert main(["report", str(runs), "--out", str(out)]) == 0
    # The page as written, plus a probe that reports what the browser rendered once everything loaded.
    probe = (
        "<script>window.addEventListener('load', () => {"
        "const imgs = [...document.images];"
        "const shown = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.getBoundingClientRect().width > 0);"
        "const rows = document.querySelectorAll('table.comparison tbody tr');"
        "const models = [...rows].map(r => r.cells[1].textContent).join(';');"
        "document.body.insertAdjacentHTML('beforeend', `<pre id=probe>images ${shown.length}/${imgs.length} "
        "rows ${rows.length} models ${models}</pre>`);});</script>"
    )
    page = tmp_path / "probed.html"
    page.write_text((out / "report.html").read_text().replace("</body>", probe + "</body>"))
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=10000", "--dump-dom"]
    done = subprocess.run([*command, page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    (found,) = re.findall(r"<pre id=\"probe\">([^<]*)</pre>", done.stdout)
    assert found == "images 9/9 rows 2 models Show and Tell;Show, Attend and Tell", found


def test_report_piped_into_a_closed_reader_ends_quietly(runs):
    reader_gone = subprocess.Popen(
        [sys.executable, "-m", "capattn.cli", "report", str(runs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=REPO_ROOT,
    )
    reader_gone.stdout.close()  # as `| head -1` does once it has its line
    _, err = reader_gone.communicate(timeout=120)
    assert reader_gone.returncode == 0 and b"Traceback" not in err and b"BrokenPipe" not in err, err


def test_latest_keeps_the_newest_run_of_each_name(runs, capsys):
    assert main(["report", "--latest", str(runs), str(runs)]) == 0
    table = capsys.readouterr().out
    assert table.count("| show_tell-shapes-seed0 |") == 1


def test_no_runs_is_one_clear_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["report", str(tmp_path)])
    assert exit_.value.code == 2
    assert (
        capsys.readouterr().err.strip()
        == f"capattn: error: no metrics_test.json under {tmp_path} — run `capattn test` first"
    )
    (tmp_path / "metrics_test.json").write_text("{not json")
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path)])
    assert "re-run `capattn test` for that run" in capsys.readouterr().err


def test_speed_is_the_median_of_the_logged_speed_where_the_run_logged_it(runs, tmp_path):
    (metrics_file, *_) = sorted(runs.rglob("metrics_test.json"))
    estimated = read_run(metrics_file).throughput  # no speed logged (1 step an epoch): steps × batch / time
    assert estimated is not None and estimated > 0
    run = tmp_path / "run"
    shutil.copytree(metrics_file.parent, run)
    with (run / "metrics.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    speeds = ["10", "", "40"]  # as TrainingSpeed logs it, on some rows only
    for i, row in enumerate(rows):
        row["speed/captions_per_s"] = speeds[i] if i < len(speeds) else ""
    with (run / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*rows[0].keys()])
        writer.writeheader()
        writer.writerows(rows)
    assert len(rows) >= 3
    assert read_run(run / "metrics_test.json").throughput == 25.0
