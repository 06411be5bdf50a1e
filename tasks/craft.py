"""CRAFT on Ray: a task plans the images, one task per group of classes learns their concepts
(batched NMF inside), a task merges and publishes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import ray

from protonmf import pipeline
from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.data import ImageSource
from protonmf.devices import step_device
from protonmf.pipeline import Plan, Run
from tasks.runtime import gather


def _open(run: Run, gpus: float, train_labels: list[int] | None = None,
          val_labels: list[int] | None = None) -> tuple[FeatureBackbone, ImageSource, ImageSource]:
    """The black box on the task's device (CUDA if it was given ``gpus`` > 0) and the two splits
    (only the index rows of the labels given, if any)."""
    device = step_device(gpus, "compute.extract_gpus")  # before any I/O: a worker without CUDA fails at once
    _ = run.store  # opened first: a missing store is named before the network loads
    return run.backbone.to(device), run.source("train", labels=train_labels), run.source("val", labels=val_labels)


@ray.remote(max_retries=2)
def _plan_concept_images(run: Run) -> Plan:
    return pipeline.plan_concept_images(run)


@ray.remote(max_retries=3)
def _learn_concept_group(run: Run, plan: Plan, classes: list[int]) -> dict[str, Any]:
    # the images predicted as these classes carry their own (true) labels; the GPUs are the ones learn_concept_groups asks Ray for
    labels = sorted({w["label"] for k in classes for w in plan.get(k, [])})
    backbone, train, val = _open(run, run.config.compute.extract_gpus, labels, classes)
    return pipeline.learn_concept_group(run, backbone, plan, classes, train, val)


@ray.remote(max_retries=2)
def _publish_concept_set(run: Run) -> str:
    backbone, train, val = _open(run, 0)  # figures of a few classes: no GPU asked for
    return pipeline.publish_concept_set(run, backbone, train, val)


def plan_concept_images(run: Run) -> Plan:
    """Per class, the training images the black box predicts as it (see ``plan_concept_images``)."""
    return ray.get(_plan_concept_images.remote(run))


def publish_concept_set(run: Run) -> str:
    """Merge the staged groups, draw the figures, publish the concept set; its URI."""
    return ray.get(_publish_concept_set.remote(run))


def learn_concept_groups(run: Run, groups: list[list[int]], plan: Plan,
                         on_group: Callable[[dict], None] | None = None) -> list[dict[str, Any]]:
    """Every group in parallel (GPU tasks when ``compute.extract_gpus`` > 0); results in group order."""
    task = _learn_concept_group.options(num_gpus=run.config.compute.extract_gpus, num_cpus=1)
    ref = ray.put(run)
    return gather([task.remote(ref, {k: plan.get(k, []) for k in g}, g) for g in groups], on_group)
