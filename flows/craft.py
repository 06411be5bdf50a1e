"""``craft_concepts``: CRAFT concepts of every class — plan → concepts per group → publish — on Ray.

It shares the ProtoNMF run's first steps (``prepare`` and ``extract_features`` of
:mod:`flows.build`): the feature store's records say which class the black box predicts for each
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

from flows.shared import progress, retrying, started_run, step  # noqa: E402
from protonmf.config import Config  # noqa: E402
from protonmf.craft.artifact import ConceptSet  # noqa: E402
from protonmf.pipeline.staging import class_groups  # noqa: E402
from tasks.craft import craft_on_ray, plan_on_ray, publish_concepts_on_ray  # noqa: E402


@step
def plan_concept_images(config: Config) -> dict[int, list[dict]]:
    return plan_on_ray(config)


@step
def learn_concepts(config: Config, plan: dict[int, list[dict]], num_classes: int) -> list[dict]:
    groups = class_groups(num_classes, config.craft.classes_per_task)
    with progress("craft-progress", "class groups done", len(groups)) as tick:
        return craft_on_ray(config, groups, plan, on_group=tick)


@step
def publish_concept_set(config: Config) -> str:
    return publish_concepts_on_ray(config)


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
    with started_run(config, overrides, "concepts") as run:
        cfg, class_names = run.config, run.class_names
        with run.timed("concepts"):
            plan = retrying(plan_concept_images, cfg)(cfg)
            groups = retrying(learn_concepts, cfg)(cfg, plan, len(class_names))
        with run.timed("publish"):
            uri = retrying(publish_concept_set, cfg)(cfg)
    summary = ConceptSet.read_manifest(uri, storage_options=cfg.storage.storage_options or None)["summary"]
    get_run_logger().info(_report(cfg, class_names, groups, summary, uri, run.timings))
    return {"concepts": uri, "summary": summary, "timings": run.timings, "classes": len(class_names)}
