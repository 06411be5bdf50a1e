"""What the gallery costs the fit: one fit group (50 classes of 1,960 × 512 non-negative feature rows,
the shape of ``end_to_end_1000.py``'s, p ∈ {3, 1, 5, 10}) by ``fit_classes_and_codes`` with and
without its gallery (``top_k`` 5 and 0), in turn, twice each, in one process.

The gallery is the top of :mod:`protonmf.prototypes.where`'s codes over every training row, solved
from the NMF's own E (:func:`protonmf.nnls.nnls`, ``method="cd"``).

    .venv/bin/python benchmarks/gallery_cost.py
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from protonmf.prototypes.fit import fit_classes_and_codes


def main() -> None:
    torch.manual_seed(0)
    K, n, D = 50, 1960, 512
    feats = [(torch.rand(n, 8) @ torch.rand(8, D)).relu() for _ in range(K)]
    V, bias = torch.randn(K, D), torch.randn(K)
    seconds: dict[str, list[float]] = {"without gallery": [], "with gallery": []}
    for top_k in (0, 5, 0, 5):
        start = time.perf_counter()
        fit_classes_and_codes(feats, V, bias, [3, 1, 5, 10], top_k=top_k)
        seconds["with gallery" if top_k else "without gallery"].append(round(time.perf_counter() - start, 2))
    ratio = min(seconds["with gallery"]) / min(seconds["without gallery"])
    print(f"fit of {K} classes: without gallery {seconds['without gallery']} s, with {seconds['with gallery']} s "
          f"(best of each: {ratio:.2f}x)")
    out = Path(os.environ.get("PROTONMF_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "gallery_cost.json").write_text(json.dumps({"seconds": seconds, "ratio": ratio, "cores": os.cpu_count()}, indent=1))


if __name__ == "__main__":
    main()
