"""Benchmark 5: a sweep p ∈ {1, 3, 5, 10} in one NMF pass (nmf_sweep) vs one nmf call per p.

Same float16 features for both, measured side by side in one run (best of ``--repeat`` rounds of
all calls), twice: with a fixed number of updates (``tol=0``: every p runs ``--max-iter``) and
with the paper's stopping rule (``--tol``, default 1e-4). The sweep reads each row block of A
once per iteration for all p; the separate calls read A once per iteration per p. Classes are
fitted ``--group`` at a time, as a fit task does; a group's features are made before its timings.
Agreement is printed too: the (class, p) blocks with the same ``n_iter`` both ways, and the largest
difference of B relative to max |B| of its class.

On this CPU (defaults: 100 classes × 490 × 512 float16, i.e. 10 images × 7×7 per class):

    .venv/bin/python benchmarks/nmf_sweep.py

On a GPU, the issue's full problem (63,700 rows per class), A on the GPU or streamed from the CPU:

    .venv/bin/python benchmarks/nmf_sweep.py --device cuda --classes 1000 --rows 63700 --group 50 [--stream]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from _common import feature_matrix, save
from protonmf.nmf import nmf, nmf_sweep


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--rows", type=int, default=490, help="feature rows per class (images × h × w)")
    parser.add_argument("--D", type=int, default=512)
    parser.add_argument("--ps", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--group", type=int, default=100, help="classes per call")
    parser.add_argument("--max-iter", type=int, default=200)
    parser.add_argument("--tol", type=float, default=1e-4, help="the paper's stopping rule")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--stream", action="store_true", help="keep A on the CPU and stream it to --device")
    parser.add_argument("--repeat", type=int, default=3, help="best time of this many runs of each call")
    return parser.parse_args()


def sync(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_call(args: argparse.Namespace, fn, *fn_args, **kwargs):
    sync(args.device)
    start = time.perf_counter()
    out = fn(*fn_args, **kwargs)
    sync(args.device)
    return out, time.perf_counter() - start


def make_group(start: int, size: int, args: argparse.Namespace) -> torch.Tensor:
    A = torch.stack([feature_matrix(args.rows, args.D, seed=c, dtype=torch.float16) for c in range(start, start + size)])
    if args.stream:
        return A.pin_memory() if torch.device(args.device).type == "cuda" else A
    return A.to(args.device)


def compare(A: torch.Tensor, args: argparse.Namespace, tol: float, tally: dict) -> None:
    """Time both ways on one group of classes; add times and agreement to ``tally``."""
    kwargs = {"max_iter": args.max_iter, "tol": tol, "device": args.device}
    best = dict.fromkeys(["sweep", *args.ps], float("inf"))
    for _ in range(args.repeat):  # rounds of all calls, so that a busy spell of a shared machine hits all
        sweep, t = timed_call(args, nmf_sweep, A, args.ps, **kwargs)
        best["sweep"] = min(best["sweep"], t)
        separate = {}
        for p in args.ps:
            separate[p], t = timed_call(args, nmf, A, p, **kwargs)
            best[p] = min(best[p], t)
    tally["sweep"] += best["sweep"]
    for p, alone in separate.items():
        tally["per_p"][p] += best[p]
        tally["same_n_iter"] += int((sweep[p].n_iter == alone.n_iter).sum())
        tally["blocks"] += alone.n_iter.numel()
        diff = (sweep[p].B - alone.B).abs().amax((1, 2)) / alone.B.abs().amax((1, 2))
        tally["max_diff"] = max(tally["max_diff"], float(diff.max()))
        tally["n_iter"][p] += alone.n_iter.tolist()


def summary(tally: dict, tol: float) -> dict:
    separate = sum(tally["per_p"].values())
    return {
        "tol": tol,
        "sweep_seconds": round(tally["sweep"], 2),
        "separate_seconds": round(separate, 2),
        "separate_seconds_per_p": {p: round(t, 2) for p, t in tally["per_p"].items()},
        "speedup": round(separate / tally["sweep"], 2),
        "mean_n_iter_per_p": {p: round(sum(v) / len(v), 1) for p, v in tally["n_iter"].items()},
        "same_n_iter": f"{tally['same_n_iter']} of {tally['blocks']} (class, p) blocks",
        "max_relative_B_difference": tally["max_diff"],
    }


def main() -> None:
    args = parse_args()
    warm = make_group(0, 2, args)
    nmf_sweep(warm, args.ps, max_iter=2, device=args.device)
    nmf(warm, args.ps[0], max_iter=2, device=args.device)
    modes = {"fixed_iterations": 0.0, "paper_stopping_rule": args.tol}
    tallies = {
        mode: {"sweep": 0.0, "per_p": dict.fromkeys(args.ps, 0.0), "same_n_iter": 0, "blocks": 0, "max_diff": 0.0,
               "n_iter": {p: [] for p in args.ps}}
        for mode in modes
    }
    load_before = os.getloadavg()[0]
    for start in range(0, args.classes, args.group):
        A = make_group(start, min(args.group, args.classes - start), args)  # made once, for both modes
        for mode, tol in modes.items():
            compare(A, args, tol, tallies[mode])
        del A
    result = {
        "device": args.device, "streamed": args.stream, "classes": args.classes, "rows_per_class": args.rows,
        "D": args.D, "ps": args.ps, "dtype": "torch.float16", "group": args.group, "max_iter": args.max_iter,
        "repeat": args.repeat, "load_average_1min_before_after": [load_before, os.getloadavg()[0]],
        **{mode: summary(tallies[mode], tol) for mode, tol in modes.items()},
    }
    save(f"nmf_sweep_{torch.device(args.device).type}", result)


if __name__ == "__main__":
    main()
