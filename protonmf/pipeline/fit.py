"""Step 3, fit: the prototypes of a group of classes (every p at once) from their stored features,
staged for the publish (:attr:`~protonmf.pipeline.run.Run.fit`) with the group's gallery.

:func:`fit_prototype_group` fits one group, or reads it back if an earlier attempt staged it;
:func:`published_fits` reads from the published model the groups it holds as this fit would make
them (same settings, same classes made from the same images), and :func:`published_group_files`
hands those to the publish: a rerun on grown data refits only the groups whose classes changed,
and the others' prototypes stay bit-identical.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.artifact import current_manifest
from protonmf.data.store import StoreError
from protonmf.devices import step_device
from protonmf.pipeline.run import Run
from protonmf.pipeline.staging import group_stem
from protonmf.prototypes.fit import ClassPrototypes, fit_classes_and_codes
from protonmf.prototypes.gallery import GALLERY_SCHEMA, TopCodes, gallery_table, write_gallery
from protonmf.prototypes.model import PrototypeModel

__all__ = ["GroupFit", "fit_prototype_group", "prototypes_by_p", "published_fits", "published_group_files"]


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
    (:func:`~protonmf.devices.step_device`); the group's features are moved to it once, as they
    are read, and iterated on there.
    """
    staged = run.fit.read(classes)  # staged by an earlier attempt
    if staged is not None:
        return GroupFit.of(classes, prototypes_by_p(staged[".safetensors"]), resumed=True)
    # A class whose images were all unreadable has no rows: it keeps its head through the residual
    # alone (fit_classes), and the run goes on; the run summary names it.
    pr, store = run.config.prototypes, run.store
    made_from = [run.images_sha256[k] for k in classes]  # the features must be of the images the key says
    try:
        if pr.gallery:  # the record tables only for the gallery: a request per class fewer without it
            stored, record_tables = map(list, zip(*store.read_classes_with_records(classes, made_from=made_from)))
        else:
            stored, record_tables = store.read_classes(classes, made_from=made_from), []
    except StoreError as err:  # found where the features are read: a rerun trusts the markers
        raise StoreError(f"{err}; `protonmf run --verify` (storage.verify: true) extracts damaged classes again") from None
    # On the fit's device once (the host copies go): every NMF pass reads A where it runs.
    device = torch.device(device or step_device(run.config.compute.fit_gpus, "compute.fit_gpus"))
    features = [F.reshape(-1, store.dim).to(device) for F in stored]  # (n_k·h·w, D) float16
    del stored
    V, bias = store.head()
    by_p, codes = fit_classes_and_codes(  # every p in one pass over A per NMF update
        features, V[classes], bias[classes], pr.p, top_k=pr.gallery, max_iter=pr.max_iter, tol=pr.tol,
        seed=pr.seed, nonneg=pr.nonneg, solver=pr.solver, residual=pr.residual, device=device,
    )
    tensors = {f"p{p}.{name}": t for p, fit in by_p.items() for name, t in fit.to_tensors().items()}
    run.fit.write(classes, {".gallery.parquet": write_gallery(_group_gallery(run, classes, codes, record_tables)),
                            ".safetensors": save_safetensors(tensors)})
    return GroupFit.of(classes, by_p, resumed=False)


def _group_gallery(run: Run, classes: list[int], codes: dict[int, TopCodes], record_tables: list[pa.Table]) -> pa.Table:
    """The gallery rows of ``classes`` (:mod:`protonmf.prototypes.gallery`): the images the largest
    codes name (:mod:`protonmf.prototypes.where`) are read again (only those), for their size and the patches' pixels.
    ``record_tables``: each class's record table, as read with its features (none without a gallery)."""
    if run.config.prototypes.gallery == 0:
        return GALLERY_SCHEMA.empty_table()
    source = run.source("train", labels=classes)
    by_id = {r.image_id: r for r in source.records}

    def load(image_id: str):
        record = by_id.get(image_id)
        return (None, "no longer in the training data") if record is None else source.load(record)

    return gallery_table(codes, classes, record_tables, load, run.preprocess, run.store.grid)


def _reusable(run: Run, groups: list[list[int]]) -> tuple[list[list[int]], PrototypeModel | None]:
    """The groups of ``groups`` that the published model holds as this fit makes them (its
    manifest records each group's key), and the model (None if there is no such group)."""
    manifest = current_manifest(run.config.storage.model, storage_options=run.storage_options)
    published = (manifest or {}).get("settings", {}).get("group_keys", {})
    same = [g for g in groups if published.get(group_stem(g)) == run.fit_group_keys[group_stem(g)]]
    if not same:
        return [], None
    return same, PrototypeModel.load(run.config.storage.model, storage_options=run.storage_options)


def _group_of(model: PrototypeModel, ps: Sequence[int], classes: list[int]) -> dict[int, ClassPrototypes]:
    fits = {p: model.with_p(p).prototypes.to_tensors() for p in ps}  # per class: (K, ...)
    return {p: ClassPrototypes.from_tensors({name: t[classes] for name, t in f.items()}) for p, f in fits.items()}


def published_fits(run: Run, groups: list[list[int]]) -> list[GroupFit | None]:
    """For each group, its fit read from the published model if the model holds it as this fit
    makes it (same key), else None: those groups are fitted. Nothing of the features is read.

    A finished run's rerun needs nothing else: its staging files went when it published."""
    same, model = _reusable(run, groups)
    if model is None:
        return [None] * len(groups)
    kept = {group_stem(g) for g in same}
    return [GroupFit.of(g, _group_of(model, run.config.prototypes.p, g), resumed=True) if group_stem(g) in kept else None
            for g in groups]


def published_group_files(run: Run, groups: list[list[int]]) -> dict[str, dict[str, bytes]]:
    """The staged files (:data:`~protonmf.pipeline.run.FIT_FILES`) of the groups the published
    model holds as this fit makes them, cut from the model (by group stem): the publish takes
    them instead of staged ones, so their prototypes and gallery rows are the published ones."""
    same, model = _reusable(run, groups)
    if model is None:
        return {}
    ps = run.config.prototypes.p
    gallery = model.gallery_table() if model.has_gallery and run.config.prototypes.gallery else GALLERY_SCHEMA.empty_table()
    files = {}
    for g in same:
        tensors = {f"p{p}.{name}": t.contiguous() for p, fit in _group_of(model, ps, g).items()
                   for name, t in fit.to_tensors().items()}
        rows = gallery.filter(pc.is_in(gallery["class_idx"], pa.array(g, pa.int32()))) if gallery.num_rows else gallery
        files[group_stem(g)] = {".safetensors": save_safetensors(tensors), ".gallery.parquet": write_gallery(rows)}
    return files
