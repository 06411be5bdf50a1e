"""Step 3, fit: the prototypes of a group of classes (every p at once) from their stored features,
staged for the publish (:attr:`~protonmf.pipeline.run.Run.fit`) with the group's gallery.

:func:`fit_prototype_group` fits one group, or reads it back if an earlier attempt staged it;
:func:`published_fits` reads every group from the published model when it comes from this very fit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.devices import step_device
from protonmf.pipeline.run import Run
from protonmf.prototypes.fit import ClassPrototypes, fit_classes_and_codes
from protonmf.prototypes.gallery import GALLERY_SCHEMA, TopCodes, gallery_table, write_gallery
from protonmf.prototypes.model import PrototypeModel

__all__ = ["GroupFit", "fit_prototype_group", "prototypes_by_p", "published_fits"]


@dataclass(frozen=True)
class GroupFit:
    """What fitting one group of classes did (small, returned by workers)."""

    classes: list[int]
    feature_error: dict[int, list[float]]  # p -> per class ||A − EB||² / ||A||²
    head_error: dict[int, list[float]]  # p -> per class ||V − CB||² / ||V||²
    n_iter: dict[int, list[int]]
    resumed: bool
    no_images: list[int]  # classes without a usable image: residual only (fit.residual_only)

    @classmethod
    def of(cls, classes: Sequence[int], by_p: dict[int, ClassPrototypes], resumed: bool) -> GroupFit:
        return cls(
            classes=list(classes),
            feature_error={p: f.feature_error.tolist() for p, f in by_p.items()},
            head_error={p: f.head_error.tolist() for p, f in by_p.items()},
            n_iter={p: f.n_iter.tolist() for p, f in by_p.items()},
            resumed=resumed,
            no_images=[k for k, n in zip(classes, next(iter(by_p.values())).n_rows.tolist()) if n == 0],
        )


def prototypes_by_p(staged: bytes) -> dict[int, ClassPrototypes]:
    """A staged group's prototypes (its ``.safetensors``: ``p<p>.<field>`` tensors) by p."""
    groups: dict[int, dict[str, torch.Tensor]] = {}
    for name, t in load_safetensors(staged).items():
        p, field_name = name.split(".", 1)
        groups.setdefault(int(p[1:]), {})[field_name] = t
    return {p: ClassPrototypes.from_tensors(g) for p, g in groups.items()}


def fit_prototype_group(run: Run, classes: list[int], *, device: str | None = None) -> GroupFit:
    """Fit every p of the config for ``classes`` from stored features; staged, resumable.

    The NMF runs on ``device``, by default CUDA if ``compute.fit_gpus`` > 0, else the CPU
    (:func:`~protonmf.devices.step_device`); the features stream to it from the CPU.
    """
    staged = run.fit.read(classes)  # staged by an earlier attempt
    if staged is not None:
        return GroupFit.of(classes, prototypes_by_p(staged[".safetensors"]), resumed=True)
    # A class whose images were all unreadable has no rows: it keeps its head through the residual
    # alone (fit_classes), and the run goes on; the run summary names it.
    pr, store = run.config.prototypes, run.store
    if pr.gallery:  # the record tables only for the gallery: a request per class fewer without it
        stored, record_tables = map(list, zip(*store.read_classes_with_records(classes)))
    else:
        stored, record_tables = store.read_classes(classes), []
    features = [F.reshape(-1, store.dim) for F in stored]  # (n_k·h·w, D) float16
    V, bias = store.head()
    by_p, codes = fit_classes_and_codes(  # every p in one pass over A per NMF update
        features, V[classes], bias[classes], pr.p, top_k=pr.gallery, max_iter=pr.max_iter, tol=pr.tol,
        seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver, residual=pr.residual,
        device=device or step_device(run.config.compute.fit_gpus, "compute.fit_gpus"),
    )
    tensors = {f"p{p}.{name}": t for p, fit in by_p.items() for name, t in fit.to_tensors().items()}
    run.fit.write(classes, {".gallery.parquet": write_gallery(_group_gallery(run, classes, codes, record_tables)),
                            ".safetensors": save_safetensors(tensors)})
    return GroupFit.of(classes, by_p, resumed=False)


def _group_gallery(run: Run, classes: list[int], codes: dict[int, TopCodes], record_tables: list[pa.Table]) -> pa.Table:
    """The gallery rows of ``classes`` (:mod:`protonmf.prototypes.gallery`): the images the largest
    E entries name are read again (only those), for their size and the patches' pixels.
    ``record_tables``: each class's record table, as read with its features (none without a gallery)."""
    if run.config.prototypes.gallery == 0:
        return GALLERY_SCHEMA.empty_table()
    source = run.source("train", labels=classes)
    by_id = {r.image_id: r for r in source.records}

    def load(image_id: str):
        record = by_id.get(image_id)
        return (None, "no longer in the training data") if record is None else source.load(record)

    return gallery_table(codes, classes, record_tables, load, run.preprocess, run.store.grid)


def published_fits(run: Run, groups: list[list[int]]) -> list[GroupFit] | None:
    """The fits of ``groups`` read from the published model if it comes from this fit key, else None.

    A finished run's rerun needs nothing else: its staging files went when it published.
    """
    if not run.fit.is_published():
        return None
    model = PrototypeModel.load(run.config.storage.model, storage_options=run.storage_options)
    fits = {p: model.with_p(p).prototypes.to_tensors() for p in run.config.prototypes.p}  # per class: (K, ...)

    def group_of(classes: list[int]) -> dict[int, ClassPrototypes]:
        return {p: ClassPrototypes.from_tensors({name: t[classes] for name, t in f.items()}) for p, f in fits.items()}

    return [GroupFit.of(g, group_of(g), resumed=True) for g in groups]

