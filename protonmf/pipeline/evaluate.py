"""Step 5, evaluate: the published model against its black box on held-out images, and its report.

On Ray the held-out records are cut into :func:`evaluation_shards`, measured apart by
:func:`evaluate_shard`, merged exactly, and finished by :func:`evaluate_prototype_model`; in one
process, :func:`evaluate_prototype_model` alone does it all. What it gives is kept beside the
model's version (:func:`keep_evaluation`) and taken from there by a rerun whose inputs are the
same (:func:`published_evaluation`): the model (its fit key), the held-out data and the settings.
"""

from __future__ import annotations

import json
from typing import Any

from protonmf.artifact import VERSIONS, attach_file, current_manifest, read_attached
from protonmf.data import ImageSource
from protonmf.devices import step_device
from protonmf.evaluation.held_out import HeldOutStats, accumulate_held_out, gallery_parts, held_out_shards, summarize_held_out
from protonmf.evaluation.published import finish_evaluation
from protonmf.pipeline.publish import held_out_data
from protonmf.pipeline.run import Run
from protonmf.pipeline.staging import run_key
from protonmf.storage import join
from protonmf.prototypes.model import PrototypeModel

__all__ = ["evaluate_prototype_model", "evaluate_shard", "evaluation_shards", "keep_evaluation", "load_published_model",
           "published_evaluation"]


def _evaluation_file(run: Run) -> str:
    """Where the evaluation of the run's inputs is kept beside the model's version: named by their key."""
    config = run.config
    key = run_key(fit=run.fit.key, data=held_out_data(config), val_index=config.data.val_index,
                  evaluation=config.evaluation.model_dump())
    return f"evaluation/{key[:16]}.json"


def _current_version(run: Run) -> str | None:
    manifest = current_manifest(run.config.storage.model, storage_options=run.storage_options)
    return None if manifest is None or manifest.get("settings", {}).get("fit_key") != run.fit.key else manifest.get("version")


def published_evaluation(run: Run) -> tuple[dict[str, Any], list[dict]] | None:
    """(the evaluation, its shards' rows) kept beside the published model for these very inputs,
    or None: the model was published from another fit, or evaluated with other data or settings."""
    version = _current_version(run)
    data = None if version is None else read_attached(run.config.storage.model, version, _evaluation_file(run),
                                                      storage_options=run.storage_options)
    if data is None:
        return None
    kept = json.loads(data, object_hook=_untagged)
    return kept["evaluation"], kept["shards"]


def _tagged(value: Any) -> Any:
    """``value`` for JSON, a dict with keys other than strings (p → numbers) as its items, tagged."""
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value):
            return {k: _tagged(v) for k, v in value.items()}
        return {"__items__": [[k, _tagged(v)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return [_tagged(v) for v in value]
    return value


def _untagged(obj: dict) -> Any:
    return {k: v for k, v in obj["__items__"]} if set(obj) == {"__items__"} else obj


def keep_evaluation(run: Run, evaluation: dict[str, Any], shards: list[dict]) -> None:
    """Keep ``evaluation`` beside the published model's version, for :func:`published_evaluation`."""
    version = _current_version(run)
    if version is not None:
        attach_file(run.config.storage.model, version, _evaluation_file(run),
                    json.dumps(_tagged({"evaluation": evaluation, "shards": shards})).encode(),
                    storage_options=run.storage_options)


def load_published_model(run: Run) -> PrototypeModel:
    """The run's published model, where the run's forward passes over images go (like the
    extraction): CUDA if ``compute.extract_gpus`` > 0 (the Ray task asks for as many), else the CPU."""
    device = step_device(run.config.compute.extract_gpus, "compute.extract_gpus")
    return PrototypeModel.load(run.config.storage.model, storage_options=run.storage_options, map_location=device)


def evaluation_shards(run: Run, n_records: int) -> list[tuple[int, int]]:
    """The held-out records ``[start, stop)`` of each evaluation shard: ``evaluation.shard_images``
    records, rounded up to a multiple of ``compute.batch_size`` (so merged shards give one pass's numbers)."""
    return held_out_shards(n_records, run.config.evaluation.shard_images, run.config.compute.batch_size)


def evaluate_shard(run: Run, model: PrototypeModel, source: ImageSource, start: int, stop: int) -> HeldOutStats:
    """The held-out statistics of ``source.records[start:stop]`` (merge them with
    :func:`~protonmf.evaluation.held_out.merge_held_out`)."""
    return accumulate_held_out(model, source, run.preprocess, records=source.records[start:stop],
                               batch_size=run.config.compute.batch_size)


def _masked_train(run: Run) -> ImageSource | None:
    """The run's training source if it is made in memory with part masks (the gallery's agreement),
    else None (a stored source is not listed again for it)."""
    if not run.in_memory:
        return None
    train = run.source("train")
    return train if getattr(train, "masks", None) is not None else None


def evaluate_prototype_model(run: Run, source: ImageSource, stats: HeldOutStats | None = None) -> dict[str, Any]:
    """Evaluate the run's published model on held-out images; write the HTML report beside it.

    ``stats``: the merged statistics of every held-out image when shards of them were measured
    elsewhere (:func:`evaluate_shard`); without them every image is measured here. Then the
    reconstruction study and the report, on the device of :func:`load_published_model`.
    """
    from protonmf.viz.report import render_report

    config = run.config
    model = load_published_model(run)
    if stats is None:
        stats = evaluate_shard(run, model, source, 0, len(source.records))
    ev = config.evaluation
    summary = summarize_held_out(stats, repr(source), parts_of_gallery=gallery_parts(model, _masked_train(run)))
    result = finish_evaluation(model, summary, source,
                               store=run.store if ev.reconstruction_classes else None,
                               study_classes=ev.reconstruction_classes)
    if ev.atlas:
        from protonmf.viz.atlas import write_atlas

        folder = join(config.storage.model, VERSIONS, model.version, "atlas") if model.version else join(config.storage.model, "atlas")
        result["atlas"] = write_atlas(model, folder, source=source, preprocess=run.preprocess, images_per_class=ev.atlas_images,
                                      storage_options=run.storage_options, evaluation=result)
    if ev.report:
        page = render_report(model, result, source, reconstruction=result.get("reconstruction"),
                             classes=list(range(min(ev.report_classes, model.num_classes))),
                             title=f"Prototype model: {config.backbone.arch}",
                             atlas="../atlas/index.html" if ev.atlas else None)
        result["report"] = attach_file(config.storage.model, model.version, "report/index.html", page.encode(),
                                       storage_options=run.storage_options)
    return result
