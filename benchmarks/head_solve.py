"""Benchmark 6: the head reconstruction (eq. 4) of 1000 classes in one batched closed-form solve
(:func:`protonmf.head.solve_coefficients_closed_form`) vs cvxpy, one problem per class
(:func:`protonmf.head.solve_coefficients_cvxpy`, compiled once per call, re-solved per class).

D = 512, p = 3, random non-negative prototypes B and a random head V. cvxpy is timed on
``--cvxpy-classes`` classes (one call, its compile included) and extrapolated linearly to all
classes; the closed form is timed on all of them (best of ``--repeat``). Agreement: the largest
difference of the coefficients C on the classes both solved, relative to max |C|.

    .venv/bin/python benchmarks/head_solve.py [--classes 1000] [--cvxpy-classes 50]
"""

from __future__ import annotations

import argparse

import torch

from _common import save, timed
from protonmf.head import solve_coefficients_closed_form, solve_coefficients_cvxpy


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--cvxpy-classes", type=int, default=50)
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--p", type=int, default=3)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    g = torch.Generator().manual_seed(0)
    B = torch.rand(args.classes, args.p, args.D, generator=g)  # NMF prototypes are non-negative
    V = 0.05 * torch.randn(args.classes, args.D, generator=g, dtype=torch.float64)
    m = args.cvxpy_classes

    solve_coefficients_closed_form(V[:2], B[:2])  # warm up
    solve_coefficients_cvxpy(V[:1], B[:1])
    t_closed = min(timed(solve_coefficients_closed_form, V, B)[1] for _ in range(args.repeat))
    C_closed = solve_coefficients_closed_form(V, B)
    C_cvxpy, t_cvxpy = timed(solve_coefficients_cvxpy, V[:m], B[:m])
    _, t_cvxpy_one = timed(solve_coefficients_cvxpy, V[:1], B[:1])
    per_class = t_cvxpy / m
    result = {
        "classes": args.classes, "D": args.D, "p": args.p,
        "closed_form_seconds_all_classes": round(t_closed, 4),
        "cvxpy_classes_measured": m,
        "cvxpy_seconds_measured": round(t_cvxpy, 3),
        "cvxpy_seconds_one_class_call": round(t_cvxpy_one, 4),
        "cvxpy_seconds_per_class": round(per_class, 5),
        "cvxpy_seconds_all_classes_extrapolated": round(per_class * args.classes, 2),
        "speedup_extrapolated": round(per_class * args.classes / t_closed, 1),
        "max_relative_C_difference": float((C_closed[:m] - C_cvxpy).abs().max() / C_closed[:m].abs().max()),
    }
    save("head_solve", result)


if __name__ == "__main__":
    main()
