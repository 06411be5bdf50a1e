"""ProtoNMF Table 1 / Figure 5: how well p prototypes rebuild the features and the head, against
real-patch prototypes, and how stable the prototypes are across seeds — from stored features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from protonmf.data.store import FeatureStore
from protonmf.evaluation.baselines import basis_error, patch_prototypes
from protonmf.head import reconstruct_head
from protonmf.prototypes.fit import ClassPrototypes, fit_prototypes_sweep, stack_classes

__all__ = ["matched_cosine", "reconstruction_study"]


def _mean_std(values: list[float]) -> dict[str, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return {"mean": float(t.mean()), "std": float(t.std(unbiased=False)) if len(values) > 1 else 0.0}


def matched_cosine(B1: torch.Tensor, B2: torch.Tensor) -> float:
    """Mean cosine similarity of two prototype sets (p, D) after the best one-to-one matching."""
    from scipy.optimize import linear_sum_assignment

    cos = torch.nn.functional.normalize(B1.double(), dim=1) @ torch.nn.functional.normalize(B2.double(), dim=1).T
    rows, cols = linear_sum_assignment(-cos.numpy())
    return float(cos[rows, cols].mean())


@torch.no_grad()
def reconstruction_study(
    store: FeatureStore,
    p_values: list[int],
    *,
    classes: list[int] | None = None,
    seeds: tuple[int, int] = (0, 1),
    max_iter: int = 200,
    tol: float = 1e-4,
    group_size: int = 16,
    device: torch.device | str | None = None,
    fitted: Mapping[int, ClassPrototypes] | None = None,
) -> dict[int, dict[str, Any]]:
    """ProtoNMF Table 1 / Figure 5 and stability across seeds, from stored features.

    ``fitted`` ({p: ClassPrototypes of all classes}, e.g. a published model's) is the fit from
    ``seeds[0]``: its errors and prototypes are used as they are, and only ``seeds[1]`` is fitted.

    For each p: mean ± std over classes of the feature reconstruction error ||A − EB||²/||A||²
    and the head reconstruction error ||V − CB||²/||V||² of NMF prototypes, the same for the
    real-patch baseline (:mod:`protonmf.evaluation.baselines`), and the matched cosine similarity of the
    prototypes fitted from two seeds. Classes without a usable image are left out.
    """
    ks = list(range(len(store.class_names))) if classes is None else list(classes)
    V, bias = store.head()
    acc: dict[int, dict[str, list[float]]] = {
        p: {"feature_error": [], "head_error": [], "baseline_feature_error": [], "baseline_head_error": [], "stability": []}
        for p in p_values
    }
    for start in range(0, len(ks), group_size):
        group = ks[start : start + group_size]
        feats = [store.read_class(k).reshape(-1, store.dim) for k in group]
        # A class without a usable image has nothing to reconstruct: it is left out of the means.
        group, feats = [k for k, F in zip(group, feats) if len(F)], [F for F in feats if len(F)]
        if not group:
            continue
        fits = _fits_from_two_seeds(feats, V[group], bias[group], group, p_values, seeds, fitted,
                                    max_iter=max_iter, tol=tol, device=device)
        for p, (feature_errors, head_errors, B_first, B_second) in fits.items():
            acc[p]["feature_error"] += feature_errors
            acc[p]["head_error"] += head_errors
            for i, k in enumerate(group):
                acc[p]["stability"].append(matched_cosine(B_first[i].cpu(), B_second[i].cpu()))
                patches = patch_prototypes(feats[i], p, seed=seeds[0])
                acc[p]["baseline_feature_error"].append(basis_error(feats[i], patches))
                acc[p]["baseline_head_error"].append(float(reconstruct_head(V[[k]], patches.unsqueeze(0)).relative_error[0]))
    return {p: {name: _mean_std(values) for name, values in metrics.items()} for p, metrics in acc.items()}


def _fits_from_two_seeds(
    feats: list[torch.Tensor], V: torch.Tensor, bias: torch.Tensor, group: list[int], p_values: list[int],
    seeds: tuple[int, int], fitted: Mapping[int, ClassPrototypes] | None, *, max_iter: int, tol: float,
    device: torch.device | str | None,
) -> dict[int, tuple[list[float], list[float], torch.Tensor, torch.Tensor]]:
    """For each p, the NMF fits of the classes ``group`` (features (n_c, D) each, head rows V (C, D)
    and ``bias`` (C,)) from the two seeds: the first fit's feature and head errors per class and
    prototypes (C, p, D), and the second fit's prototypes. The first fit is ``fitted``'s where it
    has p, else fitted here (``max_iter``, ``tol``, ``device``: the NMF's)."""
    A, rows = stack_classes(feats)

    def fit(ps: list[int], seed: int) -> dict[int, ClassPrototypes]:
        sweep = fit_prototypes_sweep(A, V, bias, ps, n_rows=rows, max_iter=max_iter, tol=tol, seed=seed, device=device)
        return {p: f for p, (f, _) in sweep.items()}

    missing = [p for p in p_values if fitted is None or p not in fitted]
    own = fit(missing, seeds[0]) if missing else {}
    seconds = fit(list(p_values), seeds[1])
    fits = {}
    for p in p_values:
        first = own[p] if p in own else fitted[p]
        index = slice(None) if p in own else group  # a given fit holds every class
        fits[p] = (first.feature_error[index].tolist(), first.head_error[index].tolist(), first.B[index], seconds[p].B)
    return fits
