"""What both flows share: reading the config parameter, a progress bar mirrored to a Prefect
progress artifact, and the first two steps (prepare, extract) that every run starts with."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from prefect import task  # noqa: E402
from prefect.artifacts import create_progress_artifact, update_progress_artifact  # noqa: E402
from rich.progress import Progress  # noqa: E402

from protonmf.config import Config, load_config, parse_config  # noqa: E402
from tasks.extract import extract_on_ray  # noqa: E402
from tasks.prepare import prepare_on_ray  # noqa: E402


def coerce_config(config: Config | dict[str, Any] | str | Path, overrides: list[str] | None) -> Config:
    """A flow's ``config`` parameter (a Config, a config tree, or a YAML path) with ``overrides`` applied."""
    if isinstance(config, Config):
        return parse_config(config.model_dump(), overrides or [])
    if isinstance(config, (str, Path)):
        return load_config(config, overrides or [])
    return parse_config(config, overrides or [], origin="flow parameter")


@contextmanager
def progress(key: str, description: str, total: int) -> Iterator[Callable[[Any], None]]:
    """A ``tick`` callback that advances a terminal progress bar and the Prefect progress artifact ``key``."""
    artifact = create_progress_artifact(0.0, key=key, description=description)
    done = 0
    with Progress(transient=True) as bar:
        job = bar.add_task(key, total=total)

        def tick(_result: Any) -> None:
            nonlocal done
            done += 1
            bar.advance(job)
            update_progress_artifact(artifact, 100.0 * done / max(total, 1))

        yield tick


@task(retries=2, retry_delay_seconds=5)
def prepare_run(config: Config) -> tuple[Config, list[str], list[int]]:
    """The config with the black box's weights pinned, the class names, the classes already extracted."""
    return prepare_on_ray(config)


@task(retries=2, retry_delay_seconds=5)
def extract_features(config: Config, num_classes: int) -> list[dict]:
    with progress("extract-progress", "classes extracted", num_classes) as tick:
        return extract_on_ray(config, list(range(num_classes)), on_class=tick)
