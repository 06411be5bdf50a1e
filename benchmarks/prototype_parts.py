"""Prototypes that are parts: ways of finding the prototypes B side by side (issue 24).

Every option keeps the logits exact: B comes from the option, the head is rebuilt from it
(:func:`protonmf.prototypes.fit.head_from_prototypes`, eq. 4–5, 8). For each data set (``demo``:
the creatures of ``protonmf demo``; ``shapes``: the second part set, :mod:`protonmf.demo.shapes`,
with its own network; ``digits``: no parts, errors only) the demo CNN trained on it gives the
features of 60 training images per class (all 1,437 training digits), each option finds B for
every class and p ∈ {1, 3, 5, 10}, the gallery is the top of the one map of
:mod:`protonmf.prototypes.where`, and the model is evaluated on the held-out split as
``protonmf run`` evaluates: consistency and stability (Huang et al.), agreement of the gallery with
the heatmaps, purity and parts covered (part masks), the NMF's and the head's relative errors, the
largest |logit difference| to the black box relative to the largest |logit|, and the time to find
B for all classes and p (one process, this machine).

    .venv/bin/python benchmarks/prototype_parts.py [--sets demo shapes digits] [--options NAME ...]

Prints a markdown table per set and writes ``$PROTONMF_BENCH_RESULTS/prototype_parts.json``
(default ``benchmarks/results/``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

from protonmf.data import iter_batches
from protonmf.data.preprocess import Preprocess
from protonmf.data.sources.in_memory import DigitsSource, ShapesSource, SyntheticSource
from protonmf.demo.backbone import train_demo_backbone
from protonmf.evaluation.held_out import evaluate_model
from protonmf.nmf import nmf_sweep
from protonmf.prototypes.fit import head_from_prototypes, stack_classes
from protonmf.prototypes.gallery import gallery_table, top_codes
from protonmf.prototypes.model import PrototypeModel
from protonmf.prototypes.where import prototype_codes

PS = [3, 1, 5, 10]
GALLERY = 5


def data_set(name: str):
    """(backbone, train source, held-out source, preprocess) of the set ``name``, as its config builds them."""
    if name in ("demo", "shapes"):
        kind = SyntheticSource if name == "demo" else ShapesSource
        train, val = (kind(10, n, split=s, image_size=64, seed=0) for s, n in (("train", 60), ("val", 20)))
        net = train_demo_backbone(n_classes=10, image_size=64, dataset=kind.kind, seed=0)
    elif name == "digits":
        train, val = (DigitsSource(split=s, image_size=64, seed=0) for s in ("train", "val"))
        net = train_demo_backbone(n_classes=10, image_size=64, dataset="digits", seed=0)
    else:
        raise ValueError(f"unknown set {name!r}")
    return net.backbone, train, val, Preprocess(**net.preprocess)


def images_of(source, preprocess, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    xs, ys, ids = [], [], []
    for batch in iter_batches(source, preprocess, batch_size):
        xs.append(batch.images)
        ys.append(batch.labels)
        ids += list(batch.image_ids)
    return torch.cat(xs), torch.cat(ys), ids


def cell_parts(source, image_ids: list[str], grid: tuple[int, int]) -> torch.Tensor | None:
    """(N, h, w) the part under the centre of each feature cell of each image (as a gallery patch's
    part is read, :mod:`protonmf.evaluation.agreement`); None for a source without part masks."""
    if getattr(source, "masks", None) is None:
        return None
    by_id = {r.image_id: r for r in source.records}
    masks = np.stack([source.mask(by_id[i]) for i in image_ids])  # (N, S, S)
    S, (h, w) = masks.shape[1], grid
    rows = ((np.arange(h) + 0.5) * S / h).astype(int)
    cols = ((np.arange(w) + 0.5) * S / w).astype(int)
    return torch.from_numpy(masks[:, rows][:, :, cols].astype(np.int64))


# ---- the options: (A (K, n, D) float32, n_rows (K,), p) -> B (K, p, D) ----

def _mu(max_iter: int = 200, tol: float = 1e-4, restarts: int = 1) -> Callable:
    """The library's multiplicative updates (eq. 2) from its random start; with restarts, the
    seed with the lowest ||A − EB||² per class."""
    def find(A, n_rows, ps):
        best = None
        for seed in range(restarts):
            fits = nmf_sweep(A, ps, max_iter=max_iter, tol=tol, seed=seed, n_rows=n_rows)
            if best is None:
                best = {p: (r.error.clone(), r.B.clone()) for p, r in fits.items()}
                continue
            for p, r in fits.items():
                better = r.error < best[p][0]
                best[p] = (torch.where(better, r.error, best[p][0]), torch.where(better[:, None, None], r.B, best[p][1]))
        return {p: B for p, (_, B) in best.items()}
    return find


def _sklearn(solver: str, init: str, alpha_W: float = 0.0) -> Callable:
    """scikit-learn's NMF, one class at a time (``alpha_W``: L1 on the codes E, as Xplique's CRAFT sets it)."""
    from sklearn.decomposition import NMF

    def find(A, n_rows, ps):
        out = {}
        for p in ps:
            Bs = []
            for k in range(A.shape[0]):
                X = A[k, : int(n_rows[k])].clamp_min(0).double().numpy()
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # ConvergenceWarning at max_iter: B is used as it stands
                    model = NMF(p, solver=solver, init=init, alpha_W=alpha_W, alpha_H=0.0, l1_ratio=1.0,
                                max_iter=400, tol=1e-4, random_state=0).fit(X)
                Bs.append(torch.from_numpy(model.components_).float())
            out[p] = torch.stack(Bs)
        return out
    return find


def _kmeans(A, n_rows, ps):
    """Orthogonal NMF's hard limit, one prototype per position (Ding et al. 2005): B = the centroids
    of k-means on the class's non-zero feature rows."""
    from sklearn.cluster import KMeans

    out = {}
    for p in ps:
        Bs = []
        for k in range(A.shape[0]):
            X = A[k, : int(n_rows[k])].clamp_min(0).double().numpy()
            X = X[np.linalg.norm(X, axis=1) > 0]
            centres = KMeans(p, n_init=4, random_state=0).fit(X).cluster_centers_
            Bs.append(torch.from_numpy(np.maximum(centres, 0)).float())
        out[p] = torch.stack(Bs)
    return out


def _parts_known(A, n_rows, ps, *, parts):
    """An upper bound, not an option: B from the part masks themselves. ``parts`` (K, n) the part of
    each feature row (0 background, −1 padding). p ≤ number of parts: the mean feature of each of
    the first p object parts (p = 1: of the whole object); more: k-means inside each part, the p
    prototypes shared among the parts in turn. If even these prototypes are not consistent parts,
    the backbone's features, not the way B is found, set the limit."""
    from sklearn.cluster import KMeans

    n_parts = int(parts.max())
    out = {}
    for p in ps:
        Bs = []
        for k in range(A.shape[0]):
            X, lab = A[k, : int(n_rows[k])].clamp_min(0).double().numpy(), parts[k, : int(n_rows[k])].numpy()
            if p == 1:
                rows = [X[lab >= 1].mean(0)]
            elif p <= n_parts:
                rows = [X[lab == j].mean(0) for j in range(1, p + 1)]
            else:
                share = [p // n_parts + (j < p % n_parts) for j in range(n_parts)]
                rows = []
                for j, m in enumerate(share, start=1):
                    Xj = X[lab == j]
                    rows += list(KMeans(m, n_init=4, random_state=0).fit(Xj).cluster_centers_)
            Bs.append(torch.from_numpy(np.maximum(np.stack(rows), 0)).float())
        out[p] = torch.stack(Bs)
    return out


_parts_known.needs_parts = True

OPTIONS: dict[str, Callable] = {
    "paper: MU, random start": _mu(),
    "MU, converged (tol 1e-6, 1000 updates)": _mu(max_iter=1000, tol=1e-6),
    "MU, best of 5 starts": _mu(restarts=5),
    "MU, NNDSVDa start (sklearn)": _sklearn("mu", "nndsvda"),
    "HALS/CD, NNDSVDa start (sklearn)": _sklearn("cd", "nndsvda"),
    "HALS/CD, random start (sklearn)": _sklearn("cd", "random"),
    "HALS/CD + L1 on E, alpha_W 0.1": _sklearn("cd", "nndsvda", alpha_W=0.1),
    "HALS/CD + L1 on E, alpha_W 1": _sklearn("cd", "nndsvda", alpha_W=1.0),
    "one prototype per position (k-means)": _kmeans,
    "upper bound: B from the part masks": _parts_known,
}


def _gallery(A, n_rows, fits, train, preprocess, grid) -> pa.Table:
    """The gallery of every p: the top of the codes of :mod:`protonmf.prototypes.where` over the training rows."""
    K = A.shape[0]
    by_class = [train.records_of(k) for k in range(K)]
    records = [pa.table({"row": list(range(len(r))), "image_id": [x.image_id for x in r], "uri": [x.uri for x in r]})
               for r in by_class]
    by_id = {x.image_id: x for r in by_class for x in r}
    codes = {p: top_codes(prototype_codes(A, fit.B), n_rows, GALLERY) for p, fit in fits.items()}
    return gallery_table(codes, list(range(K)), records, lambda iid: train.load(by_id[iid]), preprocess, grid)


def measure(name: str, options: dict[str, Callable]) -> list[dict]:
    backbone, train, val, preprocess = data_set(name)
    images, labels, image_ids = images_of(train, preprocess)
    with torch.no_grad():
        F = torch.cat([backbone(images[i : i + 64]) for i in range(0, len(images), 64)])
    K = backbone.num_classes
    A, n_rows = stack_classes([F[labels == k] for k in range(K)])
    parts = cell_parts(train, image_ids, tuple(F.shape[1:3]))
    rows = []
    for option, find in options.items():
        if getattr(find, "needs_parts", False) and parts is None:
            continue
        start = time.perf_counter()
        if getattr(find, "needs_parts", False):
            row_parts, _ = stack_classes([parts[labels == k].reshape(-1, 1).float() for k in range(K)])
            bases = find(A, n_rows, PS, parts=row_parts[..., 0].long())
        else:
            bases = find(A, n_rows, PS)
        seconds = time.perf_counter() - start
        fits = {p: head_from_prototypes(A, backbone.V, backbone.bias, bases[p], n_rows=n_rows) for p in PS}
        gallery = _gallery(A, n_rows, fits, train, preprocess, tuple(F.shape[1:3]))
        model = PrototypeModel.from_prototypes(backbone, [fits[p] for p in PS], gallery=gallery)
        ev = evaluate_model(model, val, preprocess, train=train)
        for p in sorted(PS):
            row = {"set": name, "option": option, "p": p,
                   "consistency": ev.get("consistency", {}).get(p, {}).get("codes"),
                   "stability": ev.get("stability", {}).get(p, {}).get("codes"),
                   "agreement": ev.get("agreement", {}).get(p, {}).get("score"),
                   "purity": ev.get("localization", {}).get(p, {}).get("purity"),
                   "parts covered": ev.get("localization", {}).get(p, {}).get("coverage"),
                   "NMF error": float(fits[p].feature_error.mean()), "head error": float(fits[p].head_error.mean()),
                   "logit diff (rel.)": ev["max_abs_logit_diff"] / ev["max_abs_logit"], "find B (s)": seconds}
            rows.append(row)
        print(f"{name}: {option} done in {seconds:.1f} s", flush=True)
    return rows


def part_readout(name: str) -> dict | None:
    """How well a cell's features tell its part, whatever B is: a logistic regression (scikit-learn)
    from a feature cell to the part under its centre (object cells only), fitted on the training
    images of all classes and scored on the held-out ones, against always answering the commonest
    part. Prototypes are rows in the same feature space, so no B localizes parts better than the
    features separate them."""
    from sklearn.linear_model import LogisticRegression

    backbone, train, val, preprocess = data_set(name)
    if getattr(train, "masks", None) is None:
        return None
    cells = {}
    for split, source in (("train", train), ("val", val)):
        images, _, ids = images_of(source, preprocess)
        with torch.no_grad():
            F = torch.cat([backbone(images[i : i + 64]) for i in range(0, len(images), 64)])
        parts = cell_parts(source, ids, tuple(F.shape[1:3])).flatten()
        X = F.reshape(-1, F.shape[-1]).double().numpy()
        on = (parts >= 1).numpy()
        cells[split] = (X[on], parts.numpy()[on])
    (X, y), (Xv, yv) = cells["train"], cells["val"]
    probe = LogisticRegression(max_iter=2000).fit(X, y)
    commonest = np.bincount(y).argmax()
    return {"set": name, "grid": list(F.shape[1:3]), "held-out cells": int(len(yv)),
            "part read out (%)": round(100 * float((probe.predict(Xv) == yv).mean()), 1),
            "training cells (%)": round(100 * float((probe.predict(X) == y).mean()), 1),
            "commonest part (%)": round(100 * float((yv == commonest).mean()), 1)}


def _cell(value) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1e}" if abs(value) < 1e-3 and value != 0 else f"{value:.3g}"
    return str(value)


def markdown_of(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "set"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sets", nargs="+", default=["demo", "shapes", "digits"])
    parser.add_argument("--options", nargs="+", default=list(OPTIONS), metavar="NAME")
    args = parser.parse_args()
    unknown = [o for o in args.options if o not in OPTIONS]
    if unknown:
        parser.error(f"unknown option(s) {unknown}; choose from {list(OPTIONS)}")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = []
    for s in args.sets:
        mine = measure(s, {o: OPTIONS[o] for o in args.options})
        print(f"\n### {s}\n\n{markdown(mine)}\n", flush=True)
        rows += mine
    readouts = [r for s in args.sets if (r := part_readout(s)) is not None]
    if readouts:
        print(f"\n### the part a feature cell lies on, read out linearly\n\n{markdown_of(readouts)}\n", flush=True)
    out = Path(os.environ.get("PROTONMF_BENCH_RESULTS", Path(__file__).parent / "results"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "prototype_parts.json").write_text(json.dumps(rows, indent=1))
    if readouts:
        (out / "part_readout.json").write_text(json.dumps(readouts, indent=1))


if __name__ == "__main__":
    main()
