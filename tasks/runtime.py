"""Connecting to Ray: a cluster (``compute.ray_address``, ``RAY_ADDRESS``) or a local one; and
which failures are worth another attempt.

Workers get the S3 endpoint and credentials of the driver through their runtime environment, so
``s3://`` URIs resolve the same way everywhere.

Retries happen at two levels, and both retry only what can heal. Ray re-runs a task whose worker
died (``max_retries`` of the remote functions in ``tasks/``; an exception raised by our code is
not retried there, Ray's ``retry_exceptions`` default). Prefect re-runs a whole step after an
error for which :func:`is_retryable` says yes; a bad config, a damaged store or artifact fail at
once, naming what is wrong.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import contextmanager
from typing import Any

import botocore.exceptions
import ray

from protonmf.pipeline import Run

FORWARDED_ENV = (
    "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
    "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "PROTONMF_CACHE",
)

#: Ray's own failures that another attempt can get past: a lost worker, actor, node or object, a
#: full or lost object store, a timeout.
_RAY_HEALABLE = (
    ray.exceptions.WorkerCrashedError, ray.exceptions.LocalRayletDiedError, ray.exceptions.NodeDiedError,
    ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError,
    ray.exceptions.ObjectStoreFullError, ray.exceptions.RaySystemError, ray.exceptions.GetTimeoutError,
)

#: OSErrors that say the thing is not there or not allowed: the same answer next time.
_OS_FINAL = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError, PermissionError)

#: Errors of the network under s3fs that are no OSError: botocore has its own ConnectionError.
_S3_TRANSPORT = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError)


def is_retryable(exc: BaseException) -> bool:
    """Whether another attempt can succeed where this one failed with ``exc``.

    Yes for a lost worker, actor, node or object (Ray's errors above), the network (connection
    errors, timeouts, other I/O errors) and timeouts. No for everything else: the project's
    errors (``ConfigError``, ``StoreError``, ``ArtifactError``, all ValueErrors), a missing file or
    a refused access, a bug. A group of errors (classes that failed apart) is retryable if each is. An error raised in a Ray task arrives wrapped in a
    ``ray.exceptions.RayTaskError``; the error it carries (``.cause``) decides.
    """
    while isinstance(exc, ray.exceptions.RayTaskError) and isinstance(exc.cause, BaseException) and exc.cause is not exc:
        exc = exc.cause
    if isinstance(exc, BaseExceptionGroup):  # several failures (classes of an extraction): each must heal
        return all(is_retryable(e) for e in exc.exceptions)
    if isinstance(exc, _RAY_HEALABLE):
        return True
    if isinstance(exc, _OS_FINAL):
        return False
    return isinstance(exc, (OSError, TimeoutError, *_S3_TRANSPORT))  # ConnectionError is an OSError


def worker_env() -> dict[str, str]:
    env = {name: os.environ[name] for name in FORWARDED_ENV if name in os.environ}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


@contextmanager
def ray_session(run: Run):
    """Use the Ray that is already initialised, else connect (or start a local one) for the block."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if ray.is_initialized():
        yield
        return
    address = run.config.compute.ray_address or os.environ.get("RAY_ADDRESS")
    kwargs = {"runtime_env": {"env_vars": worker_env()}, "include_dashboard": False, "log_to_driver": False}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # Idle workers are kept (Ray ends idle workers beyond one per CPU after 1 s): each step's tasks would
        # otherwise start new ones, each importing torch again (fit step of 100 small classes on
        # 2 CPUs: 15.8 s -> 12.2 s and 17.1 s -> 10.1 s in two paired runs).
        ray.init(num_cpus=os.cpu_count(), _system_config={"idle_worker_killing_time_threshold_ms": 600_000}, **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


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
