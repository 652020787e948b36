"""Every benchmark runs end to end in its ``--quick`` mode, so none of them rots (no timing asserted)."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from ..conftest import REPO_ROOT

BENCHMARKS = REPO_ROOT / "benchmarks"
# bench_data.py has its own test (test_bench_data.py), which checks its numbers too.
SCRIPTS = sorted(p.stem for p in BENCHMARKS.glob("bench_*.py") if p.stem != "bench_data")


def load(name: str):
    sys.path.insert(0, str(BENCHMARKS))  # the scripts import their shared helpers by file name
    try:
        spec = importlib.util.spec_from_file_location(f"capattn_benchmark_{name}", BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_every_benchmark_is_covered():
    assert {"bench_train", "bench_decode", "bench_e2e", "bench_gpu"} <= set(SCRIPTS)


# bench_e2e.py trains both demo configs for an epoch through Lightning: a slow test.
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n == "bench_e2e" else n for n in SCRIPTS])
def test_quick_mode_prints_and_appends_a_dated_table(name, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert load(name).main(["--quick", "--results", str(results)]) == 0
    text = results.read_text()
    assert f"— {name}.py --quick" in text, text[:500]
    assert "torch " in text and "|---|" in text  # machine/versions and at least one table
    assert "|---|" in capsys.readouterr().out
