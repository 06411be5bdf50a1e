"""Connecting to Ray: a cluster (``compute.ray_address``, ``RAY_ADDRESS``) or a local one.

Workers get the S3 endpoint and credentials of the driver through their runtime environment, so
``s3://`` URIs resolve the same way everywhere.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import ray

from protonmf.config import Config

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "PROTONMF_CACHE", "PROTONMF_FAULT_KILL_ONCE",
)


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@contextmanager
def ray_session(config: Config):
    """Use the Ray that is already initialised, else connect (or start a local one) for the block."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    address = config.compute.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": worker_env()}, "include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


def maybe_fail_for_test() -> None:
    """Fault injection for tests: if ``PROTONMF_FAULT_KILL_ONCE`` names a file that does not exist,
    create it and kill this worker process (as a lost node or OOM kill would)."""
    marker = os.environ.get("PROTONMF_FAULT_KILL_ONCE")
    if marker and not os.path.exists(marker):
        with open(marker, "w") as f:
            f.write(str(os.getpid()))
        os._exit(137)


def gather(refs: list, on_result: Callable[[Any], None] | None = None) -> list:
    """Results of ``refs`` in their order, calling ``on_result`` as each one finishes (progress)."""
    pending = {ref: i for i, ref in enumerate(refs)}
    results: list = [None] * len(refs)
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for ref in ready:
            i = pending.pop(ref)
            results[i] = ray.get(ref)
            if on_result is not None:
                on_result(results[i])
    return results
