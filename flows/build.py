"""``build_prototype_model``: prepare → extract → fit → publish → evaluate, each step on Ray.

The flow body reads like the paper's recipe; each step is a Prefect task whose heavy work runs as
Ray tasks (see ``tasks/``), retried up to ``compute.retries`` times after an error that can heal
(:func:`tasks.runtime.is_retryable`), and the run leaves Prefect artifacts behind: a markdown
summary, a table of per-class reconstruction errors, a link to the model, and progress.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402

import tasks.evaluate  # noqa: E402
import tasks.fit  # noqa: E402
import tasks.publish  # noqa: E402
from flows.shared import (  # noqa: E402
    Stopwatch, coerce_config, extract_features, prepare_run, progress, run_owner, step, still_held, with_retries,
)
from protonmf.config import Config  # noqa: E402
from protonmf.data.extract import ClassExtraction  # noqa: E402
from protonmf.pipeline import GroupFit, Run, class_groups, preflight  # noqa: E402
from protonmf.viz.summaries import evaluation_markdown  # noqa: E402
from tasks.runtime import ray_session  # noqa: E402


@step
def fit_prototype_groups(run: Run, num_classes: int) -> list[GroupFit]:
    groups = class_groups(num_classes, run.config.prototypes.classes_per_task)
    with progress("fit-progress", "class groups fitted", len(groups)) as tick:
        return tasks.fit.fit_prototype_groups(run, groups, on_group=tick)


@step
def publish_prototype_model(run: Run) -> str:
    return tasks.publish.publish_prototype_model(run)


@step
def evaluate_prototype_model(run: Run) -> tuple[dict, list[dict]]:
    return tasks.evaluate.evaluate_prototype_model(run)


def _no_images_note(names: list[str]) -> str:
    if not names:
        return ""
    return (f"\n**{len(names)} class(es) without a usable image** (every image unreadable): "
            f"{', '.join(names)}. They have no prototypes; their logits come from the residual alone "
            "(C = 0, R = V), so the model is still exact.\n")


def _report(config: Config, class_names: list[str], extraction: list[ClassExtraction], fits: list[GroupFit],
            evaluation: dict, uri: str, timings: dict[str, float]) -> str:
    p0 = config.prototypes.p[0]
    rows = []
    for group in fits:
        for i, k in enumerate(group.classes):
            row = {"class": class_names[k]}
            for p in config.prototypes.p:
                row[f"feature_error_p{p}"] = round(group.feature_error[p][i], 5)
                row[f"head_error_p{p}"] = round(group.head_error[p][i], 5)
            rows.append(row)
    create_table_artifact(rows, key="reconstruction-errors", description="per-class ||A−EB||²/||A||² and ||V−CB||²/||V||²")
    create_link_artifact(uri, link_text="prototype model", key="model")
    if evaluation.get("report"):
        create_link_artifact(evaluation["report"], link_text="HTML report", key="report")
    no_images = [class_names[k] for group in fits for k in group.no_images]
    images = sum(r.n_images for r in extraction)
    skipped = sum(r.n_skipped for r in extraction)
    resumed = sum(r.resumed for r in extraction)
    retried = [(class_names[r.k], r.retried) for r in extraction if r.retried]
    retries = (f"Reads retried (throttled, reset or timed out, then read): {sum(n for _, n in retried)}, in "
               f"{', '.join(f'{name} ({n})' for name, n in retried[:20])}{' …' if len(retried) > 20 else ''}.\n"
               if retried else "")
    markdown = f"""# Prototype model: {config.backbone.arch}

Published at `{uri}` (p = {p0}; also {', '.join(map(str, config.prototypes.p[1:])) or 'no other p'}; residual {config.prototypes.residual}).
Report: `{evaluation.get('report', 'not written')}`.

{evaluation_markdown(evaluation)}
Classes: {len(class_names)} done ({resumed} up to date from an earlier run); images used {images}, skipped {skipped}.
{retries}{_no_images_note(no_images)}
Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in timings.items())}
"""
    create_markdown_artifact(markdown, key="run-summary", description="build_prototype_model summary")
    return markdown


@flow(name="build_prototype_model", log_prints=True)
def build_prototype_model(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Turn the configured black box into a prototype model and publish it.

    ``config`` is a config tree (as in ``configs/*.yaml``) or the path of a YAML file;
    ``overrides`` are ``key.path=value`` strings.
    """
    run = Run(coerce_config(config, overrides))
    preflight(run)  # unreachable storage fails here, in seconds
    prepare, extract, fit, publish, evaluate = with_retries(
        run, prepare_run, extract_features, fit_prototype_groups, publish_prototype_model, evaluate_prototype_model)
    timed = Stopwatch()
    # one run at a time on the store and the model (the driver takes the leases: they are only storage)
    with run.leases(("model",), owner=run_owner()) as held, ray_session(run):
        with timed("prepare"):
            prepared = prepare(run)
        run, class_names = prepared.run, prepared.class_names
        with timed("extract"):
            extraction = extract(prepared)
        with timed("fit"):
            fits = fit(run, len(class_names))
        with timed("publish"):
            still_held(held)  # a run whose lease was taken over publishes nothing
            uri = publish(run)
        with timed("evaluate"):
            evaluation, shards = evaluate(run)
    summary = _report(run.config, class_names, extraction, fits, evaluation, uri, timed.seconds)
    get_run_logger().info(summary)
    work = {"classes_extracted": sum(not r.resumed for r in extraction), "groups_fitted": sum(not g.resumed for g in fits)}
    retried = {class_names[r.k]: r.retried for r in extraction if r.retried}
    no_images = [class_names[k] for g in fits for k in g.no_images]
    return {"model": uri, "evaluation": evaluation, "evaluation_shards": shards, "timings": timed.seconds,
            "classes": len(class_names), "work": work, "classes_without_images": no_images, "reads_retried": retried,
            "summary": summary}
