"""Benchmark 2: many classes in one batched NMF call vs one class at a time.

On this CPU: 1000 classes of n × 512 (n = 490 by default: 10 images × 7×7), p = 3, groups of
``--group`` classes per call (as a fit task does) vs a Python loop over classes. On a GPU the
issue's full problem (1000 × 63,700 × 512 float16, 200 iterations) is the target; this script
runs it with ``--n 63700 --half --tol 0`` when CUDA is present.

    .venv/bin/python benchmarks/nmf_batched_classes.py [--classes 1000] [--n 490] [--group 100]
"""

from __future__ import annotations

import argparse

import torch

from _common import feature_matrix, save, timed
from protonmf.nmf import nmf


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--n", type=int, default=490)
    parser.add_argument("--p", type=int, default=3)
    parser.add_argument("--group", type=int, default=100)
    parser.add_argument("--tol", type=float, default=1e-4)
    parser.add_argument("--half", action="store_true")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.float16 if args.half else torch.float32
    A = torch.stack([feature_matrix(args.n, seed=c, dtype=dtype) for c in range(args.classes)])

    def batched():
        out = []
        for s in range(0, args.classes, args.group):
            out.append(nmf(A[s : s + args.group].to(device), args.p, tol=args.tol).error)
        if device == "cuda":
            torch.cuda.synchronize()
        return torch.cat(out)

    def one_by_one():
        out = [nmf(A[c].to(device), args.p, tol=args.tol).error for c in range(args.classes)]
        if device == "cuda":
            torch.cuda.synchronize()
        return torch.stack(out)

    nmf(A[:2].to(device), args.p, max_iter=2)  # warm up
    err_b, t_b = timed(batched)
    err_1, t_1 = timed(one_by_one)
    result = {
        "device": device, "classes": args.classes, "rows_per_class": args.n, "D": A.shape[2], "p": args.p,
        "dtype": str(dtype), "group": args.group, "tol": args.tol,
        "batched_seconds": round(t_b, 2), "one_by_one_seconds": round(t_1, 2), "speedup": round(t_1 / t_b, 2),
        "max_error_difference": float(((err_b - err_1).abs() / err_1).max()),
    }
    save(f"nmf_batched_classes_{device}", result)


if __name__ == "__main__":
    main()
