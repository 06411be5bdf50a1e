"""Step 5, evaluate: the published model against its black box on held-out images, and its report.

On Ray the held-out records are cut into :func:`evaluation_shards`, measured apart by
:func:`evaluate_shard`, merged exactly, and finished by :func:`evaluate_prototype_model`; in one
process, :func:`evaluate_prototype_model` alone does it all.
"""

from __future__ import annotations

from typing import Any

from protonmf.artifact import attach_file
from protonmf.data import ImageSource
from protonmf.devices import step_device
from protonmf.evaluation.held_out import HeldOutStats, accumulate_held_out, held_out_shards, summarize_held_out
from protonmf.evaluation.published import finish_evaluation
from protonmf.pipeline.run import Run
from protonmf.prototypes.model import PrototypeModel

__all__ = ["evaluate_prototype_model", "evaluate_shard", "evaluation_shards", "load_published_model"]


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
    result = finish_evaluation(model, summarize_held_out(stats, repr(source)), source,
                               store=run.store if ev.reconstruction_classes else None,
                               study_classes=ev.reconstruction_classes)
    if ev.report:
        page = render_report(model, result, source, reconstruction=result.get("reconstruction"),
                             classes=list(range(min(ev.report_classes, model.num_classes))),
                             title=f"Prototype model: {config.backbone.arch}")
        result["report"] = attach_file(config.storage.model, model.version, "report/index.html", page.encode(),
                                       storage_options=run.storage_options)
    return result
