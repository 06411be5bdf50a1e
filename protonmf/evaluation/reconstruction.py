"""ProtoNMF Table 1 / Figure 5: how well p prototypes rebuild the features and the head, against
real-patch prototypes, and how stable the prototypes are across seeds — from stored features."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from protonmf.data.store import FeatureStore
from protonmf.prototypes.fit import ClassPrototypes

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
    from protonmf.evaluation.baselines import basis_error, patch_prototypes
    from protonmf.prototypes.fit import fit_prototypes_sweep, stack_classes
    from protonmf.head import reconstruct_head

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
        A, rows = stack_classes(feats)

        def fit(ps: list[int], seed: int) -> dict[int, ClassPrototypes]:
            sweep = fit_prototypes_sweep(A, V[group], bias[group], ps, n_rows=rows, max_iter=max_iter, tol=tol, seed=seed, device=device)
            return {p: f for p, (f, _) in sweep.items()}

        missing = [p for p in p_values if fitted is None or p not in fitted]
        own = fit(missing, seeds[0]) if missing else {}
        seconds = fit(list(p_values), seeds[1])
        for p in p_values:
            if p in own:
                errors, B_first = (own[p].feature_error.tolist(), own[p].head_error.tolist()), own[p].B
            else:
                first = fitted[p]
                errors = first.feature_error[group].tolist(), first.head_error[group].tolist()
                B_first = first.B[group]
            second = seconds[p]
            acc[p]["feature_error"] += errors[0]
            acc[p]["head_error"] += errors[1]
            for i, k in enumerate(group):
                acc[p]["stability"].append(matched_cosine(B_first[i].cpu(), second.B[i].cpu()))
                patches = patch_prototypes(feats[i], p, seed=seeds[0])
                acc[p]["baseline_feature_error"].append(basis_error(feats[i], patches))
                acc[p]["baseline_head_error"].append(float(reconstruct_head(V[[k]], patches.unsqueeze(0)).relative_error[0]))
    return {p: {name: _mean_std(values) for name, values in metrics.items()} for p, metrics in acc.items()}
