"""A published model measured as a whole: held-out accuracy and exactness (Tables 3–4, part
localization) and, from the feature store, the reconstruction study (Table 1 / Figure 5).

``protonmf evaluate`` calls :func:`evaluate_published_model`; the flow's evaluation step measures
shards of the held-out images apart, merges them, and calls :func:`finish_evaluation` on the result.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from protonmf.data import ImageSource
from protonmf.data.store import FeatureStore
from protonmf.evaluation.held_out import evaluate_model
from protonmf.evaluation.reconstruction import reconstruction_study
from protonmf.prototypes.model import PrototypeModel

__all__ = ["evaluate_published_model", "finish_evaluation"]


def evaluate_published_model(
    model: PrototypeModel,
    source: ImageSource,
    preprocess: Callable,
    *,
    batch_size: int = 64,
    store: FeatureStore | None = None,
    study_classes: int = 50,
) -> dict[str, Any]:
    """:func:`evaluate_model` on ``source``, plus ``result["reconstruction"]`` when a ``store`` is given.

    ``n_skipped_unknown_class`` and ``unknown_classes`` ({name: images}) count the held-out images
    left out because the model does not know their class (a source from ``relabel_by_name`` with
    ``unknown="skip"``; 0 and {} otherwise).

    The study refits the first ``study_classes`` classes of ``store`` with the model's own fit
    settings from a second seed; if the model was fitted on that very store, its prototypes serve
    as the first seed's fit (nothing is fitted twice).
    """
    result = evaluate_model(model, source, preprocess, batch_size=batch_size)
    return finish_evaluation(model, result, source, store=store, study_classes=study_classes)


def finish_evaluation(
    model: PrototypeModel, result: dict[str, Any], source: ImageSource, *, store: FeatureStore | None = None,
    study_classes: int = 50,
) -> dict[str, Any]:
    """``result`` (the held-out evaluation of ``model`` on ``source``) with the unknown classes'
    counts and, when a ``store`` is given, the reconstruction study (see :func:`evaluate_published_model`)."""
    # held-out images of classes the model does not know, left out by data.unknown_val_classes: skip
    unknown = dict(getattr(source, "unknown_classes", {}))
    result["n_skipped_unknown_class"] = sum(unknown.values())
    result["unknown_classes"] = unknown
    if store is not None and study_classes:
        s = model.settings
        seed = int(s.get("seed", 0))
        fitted_here = store.uri == s.get("features")
        result["reconstruction"] = reconstruction_study(
            store, model.available_p, classes=list(range(min(study_classes, len(store.class_names)))),
            seeds=(seed, seed + 1), max_iter=int(s.get("max_iter", 200)), tol=float(s.get("tol", 1e-4)), device=model.device,
            fitted={p: model.with_p(p).prototypes for p in model.available_p} if fitted_here else None,
        )
    return result
