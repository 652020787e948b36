"""Fits the rational tanh of the fused attention kernels and measures its float32 accuracy.

    .venv/bin/python benchmarks/fit_tanh.py          # prints the C #defines and the error table
    .venv/bin/python benchmarks/fit_tanh.py --check  # also compares them with _attention_kernels.c

tanh(x) ≈ x P(x²) / Q(x²) on [0, 10] (odd, so [−10, 10]; beyond, float32 tanh is ±1), P of
degree 6 and Q of degree 3 in x², Q(0) = 1, chosen to minimise the largest relative error: a
Sanathanan–Koerner iteration (weighted linear least squares on x P − tanh·Q, reweighted by the
last Q) with Lawson weights that push the error towards equal ripple. The error is then measured
on 4 M float32 points, evaluating the polynomials as the kernel does (Horner, in float32, one
division), against float64 tanh. The kernel on an AVX-512 CPU replaces the division by a
reciprocal estimate and a Newton step; ``tests/models/test_native.py`` measures that one.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

import numpy as np

CLAMP = 10.0
P_TERMS, Q_TERMS = 7, 4
KERNELS = Path(__file__).resolve().parents[1] / "src" / "capattn" / "models" / "_attention_kernels.c"


def fit(clamp: float = CLAMP, p_terms: int = P_TERMS, q_terms: int = Q_TERMS) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients of P and Q in powers of x², lowest first (Q's first is 1)."""
    x = np.concatenate([np.linspace(1e-4, 1, 4000), np.linspace(1, clamp, 8000)])
    t = np.tanh(x)
    s = (x / clamp) ** 2  # scaled, so the least-squares matrix is well conditioned
    p_basis = np.vander(s, p_terms, increasing=True) * x[:, None]
    q_basis = np.vander(s, q_terms, increasing=True)
    q_prev, lawson = np.ones_like(x), np.ones_like(x)
    best: tuple[float, np.ndarray, np.ndarray] | None = None
    for it in range(200):
        system = np.hstack([p_basis, -t[:, None] * q_basis[:, 1:]])  # x P − t (Q − 1) = t
        weight = lawson / (t * q_prev)  # relative error, linearised by the last Q
        sol, *_ = np.linalg.lstsq(system * weight[:, None], t * weight, rcond=None)
        p, q = sol[:p_terms], np.concatenate([[1.0], sol[p_terms:]])
        q_prev = q_basis @ q
        err = np.abs((p_basis @ p) / q_prev / t - 1)
        if best is None or err.max() < best[0]:
            best = (float(err.max()), p.copy(), q.copy())
        if it >= 20:
            lawson = lawson * (err / err.mean()) ** 0.3
            lawson /= lawson.mean()
    _, p, q = best
    powers = clamp ** (2 * np.arange(max(p_terms, q_terms)))
    return p / powers[:p_terms], q / powers[:q_terms]


def evaluate_float32(x: np.ndarray, p: np.ndarray, q: np.ndarray, clamp: float = CLAMP) -> np.ndarray:
    """The kernel's portable tanh: clamp, Horner in float32, one division."""
    x = np.clip(x.astype(np.float32), -clamp, clamp)
    u = x * x
    num = np.float32(p[-1])
    for c in p[-2::-1]:
        num = num * u + np.float32(c)
    den = np.float32(q[-1])
    for c in q[-2::-1]:
        den = den * u + np.float32(c)
    return (x * num / den).astype(np.float32)


def ulp_errors(approx: np.ndarray, x: np.ndarray) -> np.ndarray:
    """|approx − tanh(x)| in units in the last place of float32 tanh(x) (x ≠ 0)."""
    exact = np.tanh(x.astype(np.float64))
    keep = exact != 0
    spacing = np.spacing(np.abs(exact[keep]).astype(np.float32)).astype(np.float64)
    return np.abs(approx[keep].astype(np.float64) - exact[keep]) / spacing


def c_defines(p: np.ndarray, q: np.ndarray) -> str:
    lines = [f"#define TANH_CLAMP {CLAMP:.1f}f"]
    lines += [f"#define TANH_P{i} {c:.16e}f" for i, c in enumerate(p)]
    lines += [f"#define TANH_Q{i} {c:.16e}f" for i, c in enumerate(q) if i > 0]
    return "\n".join(lines)


def kernel_coefficients() -> tuple[np.ndarray, np.ndarray]:
    """The P and Q coefficients written in the C file."""
    text = KERNELS.read_text()

    def read(name: str) -> float:
        return float(re.search(rf"#define {name} (\S+)f\b", text).group(1))

    p = np.array([read(f"TANH_P{i}") for i in range(P_TERMS)])
    q = np.array([1.0] + [read(f"TANH_Q{i}") for i in range(1, Q_TERMS)])
    return p, q


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare with the coefficients in _attention_kernels.c")
    args = parser.parse_args(argv)
    p, q = fit()
    print(c_defines(p, q))
    x = np.linspace(-CLAMP, CLAMP, 4_000_001).astype(np.float32)
    ulp = ulp_errors(evaluate_float32(x, p, q), x)
    print("\n| float32 tanh over [−10, 10] | largest error | mean error |\n|---|---|---|")
    print(f"| x P(x²)/Q(x²), one division | {ulp.max():.1f} ULP | {ulp.mean():.2f} ULP |")
    if args.check:
        kp, kq = kernel_coefficients()
        if not (np.allclose(kp, p, rtol=1e-6, atol=0) and np.allclose(kq, q, rtol=1e-6, atol=0)):
            print(f"{KERNELS} holds other coefficients: paste the #defines above into it", file=sys.stderr)
            return 1
        print(f"\n{KERNELS.name} holds these coefficients.")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
