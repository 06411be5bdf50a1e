"""``craft_concepts``: CRAFT concepts of every class — plan → concepts per group → publish — on Ray.

It shares the ProtoNMF run's first steps (``prepare`` and ``extract_features`` of
:mod:`flows.build`): the feature store's records say which class the black box predicts for each
training image, and CRAFT learns a class's concepts from the images predicted as it. A store that
a ``protonmf run`` already filled is reused as it is.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from prefect import flow, get_run_logger  # noqa: E402
from prefect.artifacts import (  # noqa: E402
    create_link_artifact,
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)
from rich.progress import Progress  # noqa: E402

from flows.build import _config, extract_features, prepared_config, retrying, step  # noqa: E402
from protonmf.config import Config  # noqa: E402
from protonmf.craft.artifact import ConceptSet  # noqa: E402
from protonmf.pipeline.prototype_run import class_groups, preflight  # noqa: E402
from tasks.craft import craft_all, plan_task, publish_concepts_task  # noqa: E402
from tasks.runtime import ray_session  # noqa: E402


@step
def plan_images(config: Config) -> dict[int, list[dict]]:
    return {int(k): v for k, v in json.loads(ray.get(plan_task.remote(config.model_dump_json()))).items()}


@step
def extract_concepts(config: Config, plan: dict[int, list[dict]], num_classes: int) -> list[dict]:
    groups = class_groups(num_classes, config.craft.classes_per_task)
    progress_id = create_progress_artifact(0.0, key="craft-progress", description="class groups done")
    done = 0
    with Progress(transient=True) as bar:
        job = bar.add_task("craft", total=len(groups))

        def tick(_result: dict) -> None:
            nonlocal done
            done += 1
            bar.advance(job)
            update_progress_artifact(progress_id, 100.0 * done / len(groups))

        return craft_all(config, groups, plan, on_group=tick)


@step
def publish_concepts(config: Config) -> str:
    return ray.get(publish_concepts_task.remote(config.model_dump_json()))


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
    fidelity = (
        "| ranking | deletion AUC (lower is better) | insertion AUC (higher is better) |\n|---|---|---|\n"
        + "\n".join(f"| {r} | {fid[r]['deletion_auc']:.4f} | {fid[r]['insertion_auc']:.4f} |" for r in ("sobol", "tcav"))
        + f"\n\nSobol deletion AUC below TCAV's in {100 * fid['sobol_deletion_lower']:.0f}% of {fid['classes']} classes.\n"
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
    logger = get_run_logger()
    cfg = _config(config, overrides)
    preflight(cfg)
    timings: dict[str, float] = {}
    with ray_session(cfg):
        t = time.perf_counter()
        cfg, class_names, _ = prepared_config(cfg)
        retrying(extract_features, cfg)(cfg, len(class_names))
        timings["prepare+extract"] = time.perf_counter() - t

        t = time.perf_counter()
        plan = retrying(plan_images, cfg)(cfg)
        groups = retrying(extract_concepts, cfg)(cfg, plan, len(class_names))
        timings["concepts"] = time.perf_counter() - t

        t = time.perf_counter()
        uri = retrying(publish_concepts, cfg)(cfg)
        timings["publish"] = time.perf_counter() - t
    summary = ConceptSet.read_manifest(uri, storage_options=cfg.storage.storage_options or None)["summary"]
    logger.info(_report(cfg, class_names, groups, summary, uri, timings))
    return {"concepts": uri, "summary": summary, "timings": timings, "classes": len(class_names)}
