"""``craft_concepts``: CRAFT concepts of every class — plan → concepts per group → publish — on Ray.

It shares the ProtoNMF run's first steps (``prepare_run`` and ``extract_features`` of
:mod:`flows.shared`): the feature store's records say which class the black box predicts for each
training image, and CRAFT learns a class's concepts from the images predicted as it. A store that
a ``protonmf run`` already filled is reused as it is.
"""

from __future__ import annotations

import os
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact  # noqa: E402

import tasks.craft  # noqa: E402
from flows.shared import (  # noqa: E402
    Stopwatch, coerce_config, extract_features, prepare_run, progress, run_owner, step, still_held, with_retries,
)
from protonmf.config import Config  # noqa: E402
from protonmf.craft.artifact import ConceptSet  # noqa: E402
from protonmf.pipeline import Plan, Run, class_groups, preflight  # noqa: E402
from tasks.runtime import ray_session  # noqa: E402


@step
def plan_concept_images(run: Run) -> Plan:
    return tasks.craft.plan_concept_images(run)


@step
def learn_concept_groups(run: Run, plan: Plan, num_classes: int) -> list[dict]:
    groups = class_groups(num_classes, run.config.craft.classes_per_task)
    with progress("craft-progress", "class groups done", len(groups)) as tick:
        return tasks.craft.learn_concept_groups(run, groups, plan, on_group=tick)


@step
def publish_concept_set(run: Run) -> str:
    return tasks.craft.publish_concept_set(run)


def _report(config: Config, class_names: list[str], groups: list[dict], summary: dict, uri: str, timings: dict) -> str:
    rows = []
    for g in groups:
        for k, v in sorted(g["info"].items(), key=lambda kv: int(kv[0])):
            row: dict[str, Any] = {"class": class_names[int(k)], "images": len(v.get("images", []))}
            if "skipped" in v:
                row["skipped"] = v["skipped"]
            else:
                row["sub_banks"] = len(v["banks"]) - 1
                for r in ("sobol", "tcav"):
                    if "fidelity" in v:
                        row[f"{r}_deletion_auc"] = round(v["fidelity"][r]["deletion_auc"], 4)
            rows.append(row)
    create_table_artifact(rows, key="craft-classes", description="per class: images used, sub-concept banks, deletion AUC")
    create_link_artifact(uri, link_text="CRAFT concepts", key="concepts")
    fid, loc = summary.get("fidelity"), summary.get("localization")
    levels = [(summary[key], what) for key, what in (("fidelity", "root"), ("sub_fidelity", "sub-concept")) if key in summary]
    fidelity = (
        "| banks | ranking | deletion AUC (lower is better) | insertion AUC (higher is better) | deletion lower in |\n|---|---|---|---|---|\n"
        + "\n".join(f"| {what} | {r} | {f[r]['deletion_auc']:.4f} | {f[r]['insertion_auc']:.4f} | "
                    f"{100 * f[f'{r}_deletion_lower']:.0f}% of {f.get('classes', f.get('banks'))} |"
                    for f, what in levels for r in ("sobol", "tcav")) + "\n"
        if fid else "No held-out images: fidelity not measured.\n"
    )
    localization = (
        "| map | peak on object | purity | parts covered | IoU |\n|---|---|---|---|---|\n"
        + "\n".join(f"| {m} | {v['on_object']:.3f} | {v['purity']:.3f} | {v['coverage']:.2f} | {v['iou']:.3f} |" for m, v in loc.items())
        if loc else "No part masks in the data: localization not measured."
    )
    markdown = f"""# CRAFT concepts: {config.backbone.arch}

Published at `{uri}`: {summary['classes']} classes, {summary['sub_banks']} sub-concept banks
(layers {', '.join(config.craft.sub_layers) or 'none'}), {len(summary['skipped_classes'])} classes without predicted images.

Fidelity in concept space on held-out images (mean over classes):

{fidelity}
Concept localization against part masks:

{localization}

Timings (s): {', '.join(f'{k} {v:.1f}' for k, v in timings.items())}
"""
    create_markdown_artifact(markdown, key="craft-summary", description="craft_concepts summary")
    return markdown


@flow(name="craft_concepts", log_prints=True)
def craft_concepts(config: dict[str, Any] | str, overrides: list[str] | None = None) -> dict[str, Any]:
    """Extract, rank and decompose the CRAFT concepts of every class and publish them.

    ``config`` is a config tree (as in ``configs/*.yaml``) or the path of a YAML file;
    ``overrides`` are ``key.path=value`` strings.
    """
    run = Run(coerce_config(config, overrides))
    preflight(run)  # unreachable storage fails here, in seconds
    prepare, extract, plan_images, learn, publish = with_retries(
        run, prepare_run, extract_features, plan_concept_images, learn_concept_groups, publish_concept_set)
    timed = Stopwatch()
    with run.leases(("concepts",), owner=run_owner()) as held, ray_session(run):
        with timed("prepare"):
            prepared = prepare(run)
        run, class_names = prepared.run, prepared.class_names
        with timed("extract"):
            extract(prepared)
        with timed("concepts"):
            plan = plan_images(run)
            groups = learn(run, plan, len(class_names))
        with timed("publish"):
            still_held(held)  # a run whose lease was taken over publishes nothing
            uri = publish(run)
    summary = ConceptSet.read_manifest(uri, storage_options=run.storage_options)["summary"]
    get_run_logger().info(_report(run.config, class_names, groups, summary, uri, timed.seconds))
    return {"concepts": uri, "summary": summary, "timings": timed.seconds, "classes": len(class_names)}
