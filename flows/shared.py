"""What both flows share: reading the config parameter, a progress bar mirrored to a Prefect
progress artifact, the steps' decorator and retries, and the first two steps (prepare, extract)
that every run starts with."""

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

import tasks.extract  # noqa: E402
import tasks.prepare  # noqa: E402
from protonmf.config import Config, load_config, parse_config  # noqa: E402
from protonmf.data.extract import ClassExtraction  # noqa: E402
from protonmf.lease import Lease  # noqa: E402
from protonmf.pipeline import Prepared, Run  # noqa: E402
from tasks.runtime import is_retryable  # noqa: E402


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


#: The decorator of every step of both flows; how often it is retried is the run's (:func:`with_retries`).
step = partial(task, retry_delay_seconds=5, retry_condition_fn=can_heal)


def with_retries(run: Run, *steps: Task) -> tuple[Task, ...]:
    """``steps`` (each a :data:`step`) with the run's retries, ``compute.retries``."""
    return tuple(s.with_options(retries=run.config.compute.retries) for s in steps)


def still_held(leases: dict[str, Lease]) -> None:
    """Raise :class:`~protonmf.lease.LeaseLost` unless every lease of ``leases`` is still this run's
    (each renewed now): called before a publish."""
    for lease in leases.values():
        lease.check()


def run_owner() -> str:
    """Who holds a run's leases: the flow run's name and id (the process id outside Prefect)."""
    from prefect.runtime import flow_run

    return f"{flow_run.get_name() or 'run'}/{flow_run.get_id() or os.getpid()}"


@dataclass
class Stopwatch:
    """Seconds spent in each named part of a flow."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = time.perf_counter() - t


@step
def prepare_run(run: Run) -> Prepared:
    """The run with the black box's weights and the dataset index pinned, the class names, the
    images of each class."""
    prepared = tasks.prepare.prepare_run(run)
    get_run_logger().info("%d classes, %d images", len(prepared.class_names), sum(prepared.sizes))
    return prepared


@step
def extract_features(prepared: Prepared) -> list[ClassExtraction]:
    with progress("extract-progress", "classes extracted", len(prepared.class_names)) as tick:
        return tasks.extract.extract_features(prepared, on_class=tick)
