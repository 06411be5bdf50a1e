"""Helpers shared by the benchmarks: synthetic feature-like matrices, timing, JSON results."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

#: Where results go: ``benchmarks/results/``, or ``$PROTONMF_BENCH_RESULTS`` (the CPU run of the
#: GPU smoke script in the tests writes there, not over the measured files).
RESULTS = Path(os.environ.get("PROTONMF_BENCH_RESULTS") or Path(__file__).resolve().parent / "results")


def feature_matrix(n: int, D: int = 512, rank: int = 24, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """A non-negative n × D matrix shaped like ReLU features: sparse low-rank parts plus sparse noise."""
    g = torch.Generator().manual_seed(seed)
    E = torch.rand(n, rank, generator=g) * (torch.rand(n, rank, generator=g) < 0.2)
    B = torch.rand(rank, D, generator=g) * (torch.rand(rank, D, generator=g) < 0.15)
    noise = 0.05 * torch.rand(n, D, generator=g) * (torch.rand(n, D, generator=g) < 0.1)
    return (E @ B + noise).to(dtype)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def machine() -> dict:
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
    }


def save(name: str, result: dict) -> Path:
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"machine": machine(), **result}, indent=2))
    print(json.dumps(result, indent=2))
    return path
