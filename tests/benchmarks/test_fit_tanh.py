"""The rational tanh in the C kernels is the one benchmarks/fit_tanh.py fits, to the digits written there."""

from __future__ import annotations

from .test_quick import load


def test_the_kernels_hold_the_fitted_coefficients(capsys):
    assert load("fit_tanh").main(["--check"]) == 0
    out = capsys.readouterr().out
    assert "#define TANH_P6" in out and "holds these coefficients" in out


def test_a_kernel_with_other_coefficients_is_reported(tmp_path, capsys):
    fit_tanh = load("fit_tanh")
    changed = tmp_path / "kernels.c"
    changed.write_text(fit_tanh.KERNELS.read_text().replace("#define TANH_Q1 4.", "#define TANH_Q1 5."))
    fit_tanh.KERNELS = changed
    assert fit_tanh.main(["--check"]) == 1
    assert "holds other coefficients" in capsys.readouterr().err
