"""Benchmark 4: the fit stage over many classes through Prefect + Ray on this machine.

Writes a feature store of K classes of synthetic low-rank non-negative features (40 images × 7×7
positions × 512 channels ≈ 2,000 rows per class, float16), then runs the real ``fit_prototype_groups``
Prefect task of ``flows/build.py`` (one Ray task per group of classes) inside a flow, and reports
wall time and peak memory (the whole machine's used memory above the baseline, sampled every
0.2 s, so Ray's worker processes count). Run for K = 100 and 1000 to see how both grow:

    .venv/bin/python benchmarks/end_to_end_1000.py --classes 100 1000 --out benchmarks/results/end_to_end_1000.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import psutil  # noqa: E402
import pyarrow as pa  # noqa: E402
import torch  # noqa: E402

from protonmf.config import parse_config  # noqa: E402
from protonmf.data.store import RECORD_SCHEMA, FeatureStore  # noqa: E402

N_IMAGES, GRID, D, RANK = 40, (7, 7), 512, 8


def write_store(uri: str, K: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    V = 0.05 * torch.randn(K, D, generator=g)
    store = FeatureStore.create(uri, key=f"bench-{K}-{seed}", class_names=[f"c{k}" for k in range(K)], grid=GRID, dim=D, V=V, bias=torch.zeros(K))
    rows = N_IMAGES
    table = pa.table(
        {"image_id": [f"i{i}" for i in range(rows)], "uri": ["synthetic"] * rows, "label": [0] * rows, "row": list(range(rows)),
         "pred": [0] * rows, "top_classes": [[0]] * rows, "top_logits": [[0.0]] * rows, "skipped": [None] * rows},
        schema=RECORD_SCHEMA,
    )
    for k in range(K):
        E = torch.rand(N_IMAGES * GRID[0] * GRID[1], RANK, generator=g)
        B = torch.rand(RANK, D, generator=g) * (torch.rand(RANK, D, generator=g) < 0.3)
        A = (E @ B + 0.05 * torch.rand(E.shape[0], D, generator=g)).half()
        store.write_class(k, A.reshape(N_IMAGES, *GRID, D), table.set_column(2, "label", pa.array([k] * rows, pa.int32())))


class PeakMemory:
    def __init__(self):
        self.base = psutil.virtual_memory().used
        self.peak = self.base
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, psutil.virtual_memory().used)
            time.sleep(0.2)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--p", type=int, nargs="+", default=[3])
    parser.add_argument("--classes-per-task", type=int, default=50)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    import ray
    from prefect import flow

    from flows.build import fit_prototype_groups
    from protonmf.pipeline import Run
    from tasks.runtime import ray_session

    results = []
    for K in args.classes:
        work = tempfile.mkdtemp(prefix=f"protonmf-bench-{K}-")
        try:
            t = time.perf_counter()
            write_store(f"{work}/features", K)
            write_seconds = time.perf_counter() - t
            run = Run(parse_config({
                "prototypes": {"p": args.p, "classes_per_task": args.classes_per_task},
                "storage": {"features": f"{work}/features", "model": f"{work}/model"},
            }))

            @flow(name=f"fit-stage-{K}-classes")
            def fit_stage():
                return fit_prototype_groups(run, K)

            with ray_session(run):
                ray.get(ray.remote(lambda: 0).remote())  # workers up before the clock starts
                with PeakMemory() as mem:
                    t = time.perf_counter()
                    fits = fit_stage()
                    seconds = time.perf_counter() - t
            errors = [e for f in fits for e in f.feature_error[args.p[0]]]
            iters = [i for f in fits for i in f.n_iter[args.p[0]]]
            row = {
                "classes": K, "rows_per_class": N_IMAGES * GRID[0] * GRID[1], "D": D, "p": args.p,
                "classes_per_task": args.classes_per_task, "fit_seconds": round(seconds, 2),
                "seconds_per_class": round(seconds / K, 4), "peak_memory_mib": round((mem.peak - mem.base) / 2**20),
                "mean_relative_error": round(sum(errors) / len(errors), 4), "mean_iterations": round(sum(iters) / len(iters), 1),
                "store_write_seconds": round(write_seconds, 1), "cpus": os.cpu_count(),
            }
            print(json.dumps(row))
            results.append(row)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
