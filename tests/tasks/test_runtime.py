"""Which failures are retried (tasks/runtime.py): what can heal, and nothing else."""

import errno

import pytest
import ray
from botocore.exceptions import EndpointConnectionError, ReadTimeoutError

from protonmf.artifact import ArtifactError
from protonmf.config import ConfigError
from protonmf.data import ImageReadError
from protonmf.data.store import StoreError
from tasks.extract import ClassesFailed
from tasks.runtime import is_retryable


def from_ray_task(error: BaseException) -> BaseException:
    """``error`` as ``ray.get`` raises it when a Ray task raised it: a RayTaskError that is also an instance of it."""
    return ray.exceptions.RayTaskError("fit_group_task", "Traceback (most recent call last): ...", error).as_instanceof_cause()


HEALS = {
    "a worker died": ray.exceptions.WorkerCrashedError(),
    "a node died": ray.exceptions.NodeDiedError("node 3 is dead"),
    "an actor died": ray.exceptions.ActorDiedError(),
    "an object was lost": ray.exceptions.ObjectLostError("ab" * 14, "owner", "call site"),
    "ray.get timed out": ray.exceptions.GetTimeoutError(),
    "a connection was reset": ConnectionResetError(errno.ECONNRESET, "connection reset by peer"),
    "a timeout": TimeoutError("timed out"),
    "S3 answered 503 (s3fs: OSError EIO)": OSError(errno.EIO, "Service Unavailable"),
    "the S3 endpoint is down": EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    "an S3 read timed out": ReadTimeoutError(endpoint_url="http://127.0.0.1:9"),
    "a reset connection, raised in a Ray task": from_ray_task(ConnectionResetError("reset")),
    "a Ray task's worker died inside another Ray task": from_ray_task(ray.exceptions.WorkerCrashedError()),
    "an image read that failed every attempt": ImageReadError("read error: s3://b/x.png: SlowDown (after 6 attempt(s))"),
    "classes of an extraction that failed on the network": ClassesFailed.of(
        {2: ConnectionResetError("reset"), 5: ImageReadError("read error")}, [f"c{k}" for k in range(8)], 8),
}

FINAL = {
    "a bad config": ConfigError("prototypes.pp: unknown key"),
    "a damaged store": StoreError("class 3 ('c003') of the feature store at 's3://b/f' is damaged: chunk 0 is missing"),
    "a changed artifact": ArtifactError("prototypes_p3.safetensors does not match its sha256"),
    "any ValueError": ValueError("classes ['a'] have no usable images"),
    "a missing file": FileNotFoundError("s3://b/no/such/dataset"),
    "a refused access": PermissionError("Access Denied"),
    "a bug": TypeError("unsupported operand"),
    "a damaged store, raised in a Ray task": from_ray_task(StoreError("class 0 is damaged")),
    "a bad config, raised in a Ray task in a Ray task": from_ray_task(from_ray_task(ConfigError("compute.retries: bad"))),
    "a missing file, raised in a Ray task": from_ray_task(FileNotFoundError("gone")),
    "an error of a Ray Data UDF (its cause is lost on the way)": from_ray_task(ray.exceptions.UserCodeException("UDF failed")),
    "a cancelled task": ray.exceptions.TaskCancelledError(),
    "classes of an extraction, one of them damaged": ClassesFailed.of(
        {2: ConnectionResetError("reset"), 5: StoreError("class 5 is damaged")}, [f"c{k}" for k in range(8)], 8),
}


@pytest.mark.parametrize("what", HEALS)
def test_what_can_heal_is_retried(what):
    assert is_retryable(HEALS[what])


@pytest.mark.parametrize("what", FINAL)
def test_what_cannot_heal_is_not(what):
    assert not is_retryable(FINAL[what])


def test_a_wrapped_error_is_still_itself():
    """The flows and the CLI catch the project's errors by type; Ray's wrapping keeps it."""
    wrapped = from_ray_task(StoreError("class 0 is damaged"))
    assert isinstance(wrapped, StoreError) and isinstance(wrapped, ray.exceptions.RayTaskError)
