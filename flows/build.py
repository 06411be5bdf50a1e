"""``build_prototype_model``: extract → fit → merge and publish → evaluate, each step on Ray.

The flow body reads like the paper's recipe; each step is a Prefect task whose heavy work runs as
Ray tasks (see ``tasks/``), retried up to ``compute.retries`` times after an error that can heal
(:func:`tasks.runtime.is_retryable`), and the run leaves Prefect artifacts behind: a markdown
summary, a table of per-class reconstruction errors, a link to the model, and progress.
"""

from __future__ import annotations

import os
import time
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from prefect import Task, flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from rich.progress import Progress  # noqa: E402

from protonmf.config import Config, load_config, parse_config  # noqa: E402
from protonmf.pipeline.prototype_run import class_groups, preflight  # noqa: E402
from tasks.extract import extract_features as ray_extract_features  # noqa: E402
from tasks.fit import fit_all  # noqa: E402
from tasks.publish import evaluate_task, prepare_task, publish_task  # noqa: E402
from tasks.runtime import is_retryable, ray_session  # noqa: E402


def _config(config: Config | dict[str, Any] | str, overrides: list[str] | None) -> Config:
    if isinstance(config, Config):
        return parse_config(config.model_dump(), overrides or [])
    if isinstance(config, (str, Path)):
        return load_config(config, overrides or [])
    return parse_config(config, overrides or [], origin="flow parameter")


def can_heal(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only an error that another attempt can get past."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_retryable(error)


#: The decorator of every step; how often it is retried is the run's (see :func:`retrying`).
step = partial(task, retry_delay_seconds=5, retry_condition_fn=can_heal)


def retrying(prefect_task: Task, config: Config) -> Task:
    """``prefect_task`` (a :data:`step`) with the run's retries, ``compute.retries``."""
    return prefect_task.with_options(retries=config.compute.retries)


@step
def prepare(config: Config) -> dict:
    return ray.get(prepare_task.remote(config.model_dump_json()))


def prepared_config(config: Config) -> tuple[Config, list[str], dict]:
    """Run ``prepare``: the config with the black box's weights pinned, the class names, and what
    ``prepare`` reported (classes already extracted)."""
    prepared = retrying(prepare, config)(config)
    return Config.model_validate_json(prepared["config_json"]), prepared["class_names"], prepared


@step
def extract_features(config: Config, num_classes: int) -> list[dict]:
    progress_id = create_progress_artifact(0.0, key="extract-progress", description="classes extracted")
    done = 0
    with Progress(transient=True) as bar:
        job = bar.add_task("extract", total=num_classes)

        def tick(_row: dict) -> None:
            nonlocal done
            done += 1
            bar.advance(job)
            update_progress_artifact(progress_id, 100.0 * done / num_classes)

        return ray_extract_features(config, list(range(num_classes)), on_class=tick)


@step
def fit_prototypes(config: Config, num_classes: int) -> list[dict]:
    groups = class_groups(num_classes, config.prototypes.classes_per_task)
    progress_id = create_progress_artifact(0.0, key="fit-progress", description="class groups fitted")
    done = 0
    with Progress(transient=True) as bar:
        job = bar.add_task("fit", total=len(groups))

        def tick(_result: dict) -> None:
            nonlocal done
            done += 1
            bar.advance(job)
            update_progress_artifact(progress_id, 100.0 * done / len(groups))

        return fit_all(config, groups, on_group=tick)


@step
def publish_model(config: Config) -> str:
    return ray.get(publish_task.remote(config.model_dump_json()))


@step
def evaluate(config: Config) -> dict:
    return ray.get(evaluate_task.remote(config.model_dump_json()))


def _localization_table(evaluation: dict) -> str:
    loc = evaluation.get("localization") or {}
    if not loc:
        return ""
    rows = "\n".join(
        f"| {p} | {m['on_object']:.3f} | {m['purity']:.3f} | {m['coverage']:.2f} | {m['iou']:.3f} |"
        for p, m in sorted(loc.items(), key=lambda kv: int(kv[0]))
    )
    return (
        "Part localization against the ground-truth part masks (peaks of each prototype's heatmap):\n\n"
        "| p | peak on object | purity | parts covered | IoU |\n|---|---|---|---|---|\n" + rows + "\n"
    )


def _report(config: Config, class_names, extraction, fits, evaluation, uri, timings) -> str:
    p0 = config.prototypes.p[0]
    rows = []
    for group in fits:
        for i, k in enumerate(group["classes"]):
            row = {"class": class_names[k]}
            for p in config.prototypes.p:
                row[f"feature_error_p{p}"] = round(group["feature_error"][p][i], 5)
                row[f"head_error_p{p}"] = round(group["head_error"][p][i], 5)
            rows.append(row)
    create_table_artifact(rows, key="reconstruction-errors", description="per-class ||A−EB||²/||A||² and ||V−CB||²/||V||²")
    create_link_artifact(uri, link_text="prototype model", key="model")
    if evaluation.get("report"):
        create_link_artifact(evaluation["report"], link_text="HTML report", key="report")
    images = sum(r["n_images"] for r in extraction)
    skipped = sum(r["n_skipped"] for r in extraction)
    resumed = sum(bool(r["resumed"]) for r in extraction)
    table3 = "\n".join(
        f"| {p} | {v['nmf_only']:.3f} | {v['residual_only']:.3f} | {v['augmented']:.3f} |"
        for p, v in sorted(evaluation["table3"].items(), key=lambda kv: int(kv[0]))
    )
    markdown = f"""# Prototype model: {config.backbone.arch}

Published at `{uri}` (p = {p0}; also {', '.join(map(str, config.prototypes.p[1:])) or 'no other p'}).
Report: `{evaluation.get('report', 'not written')}`.

| | top-1 (held-out, {evaluation['n_images']} images) |
|---|---|
| black box | {evaluation['top1_black_box']:.4f} |
| prototype model | {evaluation['top1_prototype']:.4f} |

Max |logit difference| prototype model vs black box: {evaluation['max_abs_logit_diff']:.2e}
(max |logit| {evaluation['max_abs_logit']:.2f}).

| p | NMF only | residual only | NMF + residual |
|---|---|---|---|
{table3}

{_localization_table(evaluation)}
Classes: {len(class_names)} done ({resumed} resumed from an earlier run); images used {images}, skipped {skipped}.

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
    logger = get_run_logger()
    cfg = _config(config, overrides)
    preflight(cfg)
    timings: dict[str, float] = {}
    with ray_session(cfg):
        t = time.perf_counter()
        cfg, class_names, prepared = prepared_config(cfg)
        timings["prepare"] = time.perf_counter() - t
        logger.info("%d classes, %d already extracted", len(class_names), len(prepared["done"]))

        t = time.perf_counter()
        extraction = retrying(extract_features, cfg)(cfg, len(class_names))
        timings["extract"] = time.perf_counter() - t

        t = time.perf_counter()
        fits = retrying(fit_prototypes, cfg)(cfg, len(class_names))
        timings["fit"] = time.perf_counter() - t

        t = time.perf_counter()
        uri = retrying(publish_model, cfg)(cfg)
        timings["publish"] = time.perf_counter() - t

        t = time.perf_counter()
        evaluation = retrying(evaluate, cfg)(cfg)
        timings["evaluate"] = time.perf_counter() - t
    summary = _report(cfg, class_names, extraction, fits, evaluation, uri, timings)
    logger.info(summary)
    work = {"classes_extracted": sum(not r["resumed"] for r in extraction), "groups_fitted": sum(not g["resumed"] for g in fits)}
    return {"model": uri, "evaluation": evaluation, "timings": timings, "classes": len(class_names), "work": work}
