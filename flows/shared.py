"""What both flows share: reading the config parameter, a progress bar mirrored to a Prefect
progress artifact, and the first two steps (prepare, extract) that every run starts with."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from prefect import Task, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from rich.progress import Progress  # noqa: E402

from protonmf.config import Config, load_config, parse_config  # noqa: E402
from protonmf.pipeline.prototype_run import preflight  # noqa: E402
from protonmf.pipeline.staging import run_leases  # noqa: E402
from tasks.extract import extract_on_ray  # noqa: E402
from tasks.prepare import PreparedRun, prepare_on_ray  # noqa: E402
from tasks.runtime import is_retryable, ray_session  # noqa: E402


def coerce_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None) -> Config:
    """A flow's ``config`` parameter (a Config, a config tree, or a YAML path) with ``overrides`` applied."""
    if isinstance(config, Config):
        return parse_config(config.model_dump(), overrides or [])
    if isinstance(config, (str, Path)):
        return load_config(config, overrides or [])
    return parse_config(config, overrides or [], origin="flow parameter")


@contextmanager
def progress(key: str, description: str, total: int) -> Iterator[Callable[[Any], None]]:
    """A ``tick`` callback that advances a terminal progress bar and the Prefect progress artifact ``key``.

    The artifact is updated when the whole percentage changes (at most 100 updates): each update
    is a request to the Prefect API, and one per class made 1000 of them in a 1000-class run."""
    artifact = create_progress_artifact(0.0, key=key, description=description)
    done = shown = 0
    with Progress(transient=True) as bar:
        job = bar.add_task(key, total=total)

        def tick(_result: Any) -> None:
            nonlocal done, shown
            done += 1
            bar.advance(job)
            percent = 100 * done // max(total, 1)
            if percent > shown:
                shown = percent
                update_progress_artifact(artifact, 100.0 * done / max(total, 1))

        yield tick


def can_heal(task: Task, task_run: Any, state: Any) -> bool:
    """Prefect's retry condition: retry only an error that another attempt can get past."""
    error = state.data if isinstance(state.data, BaseException) else state.result(raise_on_failure=False)
    return isinstance(error, BaseException) and is_retryable(error)


#: The decorator of every step of both flows; how often it is retried is the run's (:func:`retrying`).
step = partial(task, retry_delay_seconds=5, retry_condition_fn=can_heal)


def retrying(prefect_task: Task, config: Config) -> Task:
    """``prefect_task`` (a :data:`step`) with the run's retries, ``compute.retries``."""
    return prefect_task.with_options(retries=config.compute.retries)


@step
def prepare_run(config: Config) -> PreparedRun:
    """The config with the black box's weights pinned, the class names, the classes already
    extracted, the images of each class."""
    return prepare_on_ray(config)


@step
def extract_features(prepared: PreparedRun) -> list[dict]:
    with progress("extract-progress", "classes extracted", len(prepared.class_names)) as tick:
        return extract_on_ray(prepared, on_class=tick)


@dataclass
class StartedRun:
    """A run after its first two steps: the pinned config, the classes, what extraction did, timings."""

    config: Config
    class_names: list[str]
    extraction: list[dict]
    timings: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def timed(self, step: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.timings[step] = time.perf_counter() - t


@contextmanager
def started_run(config: Config | dict[str, Any] | str, overrides: list[str] | None, output: str) -> Iterator[StartedRun]:
    """Read and check the config (unreachable storage fails here, in seconds), hold the leases of
    the feature store and of ``storage.<output>`` for the block (one run at a time on each; the
    driver takes them, as they are only storage), connect to Ray for the block, prepare the run and
    extract its features (both resume what an earlier run did)."""
    from prefect.runtime import flow_run

    cfg = coerce_config(config, overrides)
    preflight(cfg)
    with run_leases(cfg, (output,), owner=f"{flow_run.get_name() or 'run'}/{flow_run.get_id() or os.getpid()}"), \
            ray_session(cfg):
        run = StartedRun(cfg, [], [])
        with run.timed("prepare"):
            prepared = retrying(prepare_run, cfg)(cfg)
        run.config, run.class_names = prepared.config, prepared.class_names
        get_run_logger().info("%d classes, %d already extracted", len(run.class_names), len(prepared.done))
        with run.timed("extract"):
            run.extraction = retrying(extract_features, run.config)(prepared)
        yield run
