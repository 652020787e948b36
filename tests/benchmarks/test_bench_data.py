"""benchmarks/bench_data.py --quick: the data benchmark runs end to end and records a dated table."""

from __future__ import annotations

import importlib.util
import re

from ..conftest import REPO_ROOT


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_data", REPO_ROOT / "benchmarks" / "bench_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quick_run_measures_memory_and_throughput_and_appends_a_dated_table(tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n")
    assert load_bench().main(["--quick", "--results", str(results), "--work", str(tmp_path / "work")]) == 0
    printed = capsys.readouterr().out
    text = results.read_text()
    assert re.search(r"^## \d{4}-\d\d-\d\d — bench_data.py --quick, .+, torch \S+, device \S+", text, flags=re.M)
    assert "| images × captions | 1,000 × 5 (" in text and printed.strip() in text
    peak = float(re.search(r"peak RSS (\d+\.\d+) GB \(", text).group(1))
    assert 0.05 < peak <= 1.5
    assert float(re.search(r"\| (\d+) images/s per worker", text).group(1)) > 0
    assert float(re.search(r"\| (\d+) samples/s", text).group(1)) > 0
    assert (tmp_path / "work" / "prepared-text" / "manifest.json").is_file()  # the real prepare ran
