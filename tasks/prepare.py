"""Preparing a run on Ray: the black box's weights pinned, the data listed once into its dataset
index, and the feature store opened, where the storage is (a worker, not the machine that runs
the flow)."""

from __future__ import annotations

from dataclasses import dataclass

import ray

from protonmf.config import Config
from protonmf.pipeline.datasets import images_per_class
from protonmf.pipeline.prototype_run import index_data, make_split_source, prepare_store, resolve_backbone


@dataclass(frozen=True)
class PreparedRun:
    """What a run's prepare step found, and what extraction starts from.

    config: the config with the black box's weights and the dataset index pinned (see
        ``resolve_backbone`` and ``index_data``).
    class_names: the store's class names, in logit order.
    done: the classes that had a completion marker when prepare listed the store.
    sizes: the training images of each class, in label order.
    """

    config: Config
    class_names: list[str]
    done: list[int]
    sizes: list[int]


@ray.remote(max_retries=2)
def _prepare(config_json: str) -> dict:
    config, backbone = resolve_backbone(Config.model_validate_json(config_json))
    config = index_data(config)  # the only listing of the data in a run
    store = prepare_store(config, backbone, make_split_source(config, "train", labels=[]))
    return {"config_json": config.model_dump_json(), "class_names": store.class_names, "done": store.done_classes(),
            "sizes": images_per_class(config)}


def prepare_on_ray(config: Config) -> PreparedRun:
    """Prepare the run of ``config`` in a Ray task (see :class:`PreparedRun`)."""
    out = ray.get(_prepare.remote(config.model_dump_json()))
    return PreparedRun(Config.model_validate_json(out["config_json"]), out["class_names"], out["done"], out["sizes"])
