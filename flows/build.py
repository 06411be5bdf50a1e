"""``build_prototype_model``: extract → fit → merge and publish → evaluate, each step on Ray.

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

from flows.shared import progress, retrying, started_run, step  # noqa: E402
from protonmf.config import Config  # noqa: E402
from protonmf.pipeline.staging import class_groups  # noqa: E402
from tasks.fit import fit_on_ray  # noqa: E402
from tasks.publish_and_evaluate import evaluate_on_ray, publish_on_ray  # noqa: E402


@step
def fit_prototype_groups(config: Config, num_classes: int) -> list[dict]:
    groups = class_groups(num_classes, config.prototypes.classes_per_task)
    with progress("fit-progress", "class groups fitted", len(groups)) as tick:
        return fit_on_ray(config, groups, on_group=tick)


@step
def publish_prototype_model(config: Config) -> str:
    return publish_on_ray(config)


@step
def evaluate_prototype_model(config: Config) -> tuple[dict, list[dict]]:
    return evaluate_on_ray(config)


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


def _interpretability_table(evaluation: dict) -> str:
    con, sta = evaluation.get("consistency") or {}, evaluation.get("stability") or {}
    if not con:
        return ""
    rows = "\n".join(
        f"| {p} | {con[p]['presence']:.1f} | {sta[p]['presence']:.1f} | {con[p]['activation']:.1f} | {sta[p]['activation']:.1f} |"
        for p in sorted(con, key=int)
    )
    return (
        "Consistency and stability against part keypoints (Huang et al. 2023, % of prototypes):\n\n"
        "| p | consistency (presence, eq. 9) | stability (presence) | consistency (F·p̃ᵀ) | stability (F·p̃ᵀ) |\n"
        "|---|---|---|---|---|\n" + rows + "\n"
    )


def _no_images_note(names: list[str]) -> str:
    if not names:
        return ""
    return (f"\n**{len(names)} class(es) without a usable image** (every image unreadable): "
            f"{', '.join(names)}. They have no prototypes; their logits come from the residual alone "
            "(C = 0, R = V), so the model is still exact.\n")


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
    no_images = [class_names[k] for group in fits for k in group["no_images"]]
    images = sum(r["n_images"] for r in extraction)
    skipped = sum(r["n_skipped"] for r in extraction)
    resumed = sum(bool(r["resumed"]) for r in extraction)
    table3 = "\n".join(
        f"| {p} | {v['nmf_only']:.3f} | {v['residual_only']:.3f} | {v['augmented']:.3f} |"
        for p, v in sorted(evaluation["table3"].items(), key=lambda kv: int(kv[0]))
    )
    markdown = f"""# Prototype model: {config.backbone.arch}

Published at `{uri}` (p = {p0}; also {', '.join(map(str, config.prototypes.p[1:])) or 'no other p'}; residual {config.prototypes.residual}).
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
{_interpretability_table(evaluation)}
Classes: {len(class_names)} done ({resumed} resumed from an earlier run); images used {images}, skipped {skipped}.
{_no_images_note(no_images)}
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
    with started_run(config, overrides, "model") as run:
        cfg, class_names = run.config, run.class_names
        with run.timed("fit"):
            fits = retrying(fit_prototype_groups, cfg)(cfg, len(class_names))
        with run.timed("publish"):
            uri = retrying(publish_prototype_model, cfg)(cfg)
        with run.timed("evaluate"):
            evaluation, shards = retrying(evaluate_prototype_model, cfg)(cfg)
    summary = _report(cfg, class_names, run.extraction, fits, evaluation, uri, run.timings)
    get_run_logger().info(summary)
    work = {"classes_extracted": sum(not r["resumed"] for r in run.extraction), "groups_fitted": sum(not g["resumed"] for g in fits)}
    no_images = [class_names[k] for g in fits for k in g["no_images"]]
    return {"model": uri, "evaluation": evaluation, "evaluation_shards": shards, "timings": run.timings,
            "classes": len(class_names), "work": work, "classes_without_images": no_images, "summary": summary}
