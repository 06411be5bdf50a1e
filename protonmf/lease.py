"""One run at a time per location: a lease object ``<uri>/lease.json`` that a run holds while it lives.

The record names its holder (``owner``: the run's id, ``host``, ``pid``) and when it ``expires``
(the holder's wall clock, seconds since the epoch); a background thread renews it every third of
``seconds``. A second run waits for it (``mode="wait"``, polling up to ``timeout`` seconds) or fails
at once naming the holder (``mode="fail"``); a lease whose holder died stops being renewed,
expires, and the next run takes it over.

Taking it must be safe against two runs racing, so each storage does it with the strongest
primitive it has:

- S3: conditional PUTs. Create with ``If-None-Match: *`` (only one of two racing writers gets a
  200, the other a 412); take over an expired lease, renew and release with ``If-Match: <ETag>`` of
  the record read, so a record that changed in between is never overwritten.
- Local disk: create exclusively (``link(2)`` of a written file, which fails like
  ``O_CREAT | O_EXCL`` when the name exists); take over, renew and release under an
  ``fcntl.flock`` of ``lease.json.lock`` (one host: flock over NFS is not to be trusted).
- Anything else fsspec opens: write, wait ``settle`` seconds, read back and compare the owner;
  two writers within the settle delay of each other can still both believe they won.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import Any, Literal

from protonmf.storage import _protocols, join, to_fs

__all__ = ["Lease", "LeaseHeld", "LeaseLost", "acquire_lease", "read_lease", "LEASE_FILE"]

LEASE_FILE = "lease.json"


class LeaseHeld(RuntimeError):
    """Another live run holds the lease; ``holder`` is its record."""

    def __init__(self, message: str, holder: dict[str, Any]):
        super().__init__(message)
        self.holder = holder


class LeaseLost(RuntimeError):
    """The lease was taken over while its run still lived (it was not renewed in time)."""


def describe(record: dict[str, Any]) -> str:
    until = datetime.fromtimestamp(record["expires"], timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    return f"run {record['owner']} (host {record['host']}, pid {record['pid']}; lease until {until} unless renewed)"


# ---------------------------------------------------------------------------------------------
# Storage primitives: read → (record, token); create / replace(token) / delete(token).
# A token names the version of the record that was read; replace and delete refuse another one.
# ---------------------------------------------------------------------------------------------


class _S3:
    def __init__(self, fs, path: str):
        self.fs, self.path = fs, path

    def read(self) -> tuple[dict[str, Any], str] | None:
        try:
            etag = self.fs.info(self.path)["ETag"]
            return json.loads(self.fs.cat_file(self.path)), etag  # newer than etag at worst: replace then fails
        except FileNotFoundError:
            return None

    def _put(self, data: bytes, **condition: str) -> str | None:
        try:
            return self.fs.pipe_file(self.path, data, **condition)["ETag"]
        except FileExistsError:
            return None
        except OSError as err:  # s3fs turns a failed If-Match (412) into EINVAL
            if err.errno == errno.EINVAL and "condition" in str(err).lower():
                return None
            raise

    def create(self, data: bytes) -> str | None:
        return self._put(data, IfNoneMatch="*")

    def replace(self, token: str, data: bytes) -> str | None:
        return self._put(data, IfMatch=token)

    def delete(self, token: str) -> None:
        # S3's conditional DELETE is not in every S3 clone; the record is ours (renewed, unexpired),
        # so no other run replaces it between this check and the delete.
        current = self.read()
        if current is not None and current[1] == token:
            self.fs.rm_file(self.path)


class _Local:
    def __init__(self, fs, path: str):
        self.path = path
        os.makedirs(os.path.dirname(path), exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.path + ".lock", "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def read(self) -> tuple[dict[str, Any], bytes] | None:
        try:
            with open(self.path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        return json.loads(data), data

    def create(self, data: bytes) -> bytes | None:
        # The record is written to a file of our own, then linked to its name: link(2) fails if the
        # name exists, like open(O_CREAT | O_EXCL), but nobody can see the file empty (a run killed
        # between an O_EXCL open and its write would leave an empty record that never expires).
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            return None
        finally:
            os.unlink(tmp)
        return data

    def replace(self, token: bytes, data: bytes) -> bytes | None:
        with self._locked():
            current = self.read()
            if current is None or current[1] != token:
                return None
            tmp = f"{self.path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path)
            return data

    def delete(self, token: bytes) -> None:
        with self._locked():
            current = self.read()
            if current is not None and current[1] == token:
                os.unlink(self.path)


class _ReadBack:
    """Object stores without conditional writes: write, let it settle, read back, compare."""

    def __init__(self, fs, path: str, settle: float):
        self.fs, self.path, self.settle = fs, path, settle

    def read(self) -> tuple[dict[str, Any], bytes] | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        return json.loads(data), data

    def _claim(self, data: bytes) -> bytes | None:
        self.fs.pipe_file(self.path, data)
        time.sleep(self.settle)  # a racing writer's record lands within this delay, or we see ours
        current = self.read()
        return data if current is not None and current[1] == data else None

    def create(self, data: bytes) -> bytes | None:
        return None if self.fs.exists(self.path) else self._claim(data)

    def replace(self, token: bytes, data: bytes) -> bytes | None:
        current = self.read()
        return self._claim(data) if current is not None and current[1] == token else None

    def delete(self, token: bytes) -> None:
        current = self.read()
        if current is not None and current[1] == token:
            self.fs.rm_file(self.path)


def _backend(uri: str, storage_options: dict[str, Any] | None, settle: float):
    fs, root = to_fs(uri, storage_options)
    path = join(root, LEASE_FILE)
    protocols = _protocols(fs)
    if "s3" in protocols or "s3a" in protocols:
        return _S3(fs, path)
    if "file" in protocols or "local" in protocols:
        return _Local(fs, path)
    fs.makedirs(root, exist_ok=True)
    return _ReadBack(fs, path, settle)


# ---------------------------------------------------------------------------------------------


class Lease:
    """A held lease, renewed by a background thread until :meth:`release`."""

    def __init__(self, name: str, uri: str, backend, record: dict[str, Any], token: Any, seconds: float):
        self.name, self.uri, self.record, self.seconds = name, uri, record, seconds
        self._backend, self._token = backend, token
        self._stop = threading.Event()
        self.lost: str | None = None
        self.renewals = 0
        self._reported = False  # a lost lease already raised by check(): release() does not raise it again
        self._thread = threading.Thread(target=self._renew_loop, name=f"lease {uri}", daemon=True)
        self._thread.start()

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.seconds / 3) and not self.lost:
            try:
                self.renew()
            except Exception:  # noqa: BLE001 - a network blip: two more chances before it expires
                continue

    def renew(self) -> bool:
        """Push the expiry ``seconds`` ahead; False (and :attr:`lost` says why) if the lease is no longer ours."""
        record = {**self.record, "expires": time.time() + self.seconds}
        token = self._backend.replace(self._token, _encode(record))
        if token is None:
            now = self._backend.read()
            self.lost = f"taken over by {describe(now[0])}" if now else "deleted by someone else"
            return False
        self.record, self._token = record, token
        self.renewals += 1
        return True

    def check(self) -> None:
        """Renew the lease now and raise :class:`LeaseLost` unless it is still ours: a run calls
        it before it publishes, so a run whose lease was taken over publishes nothing."""
        if not self.lost:
            self.renew()
        if self.lost:
            self._reported = True
            raise LeaseLost(f"{self.name}: the lease on {self.uri} was lost ({self.lost}), so nothing was published: "
                            "another run may be writing there; rerun once it is done (raise storage.lease_seconds "
                            "if this run was too slow to renew it)")

    def release(self) -> None:
        """Stop renewing and delete the record (if it is still ours); raise :class:`LeaseLost` if it
        was not (unless :meth:`check` raised it already)."""
        self._stop.set()
        self._thread.join()
        if self.lost and self._reported:
            return
        if self.lost:
            raise LeaseLost(f"{self.name}: the lease on {self.uri} was lost during the run ({self.lost}): "
                            f"another run may have written there too; raise storage.lease_seconds")
        self._backend.delete(self._token)


def _encode(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True).encode()


def read_lease(uri: str, *, storage_options: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The lease record at ``uri`` (expired or not), or None."""
    current = _backend(uri, storage_options, 0.0).read()
    return current[0] if current else None


def acquire_lease(
    uri: str,
    *,
    name: str = "lease",
    owner: str | None = None,
    mode: Literal["wait", "fail"] = "wait",
    seconds: float = 120.0,
    timeout: float = 86400.0,
    poll: float | None = None,
    settle: float = 2.0,
    storage_options: dict[str, Any] | None = None,
) -> Lease:
    """Hold the lease of ``uri`` (``<uri>/lease.json``), taking it over if its holder let it expire.

    ``name`` (a config key) and the holder's record are in every error; ``poll`` defaults to a
    tenth of ``seconds`` (at most 5 s).
    """
    if mode not in ("wait", "fail"):
        raise ValueError(f"{name}: lease mode must be 'wait' or 'fail', got {mode!r}")
    backend = _backend(uri, storage_options, settle)
    poll = min(5.0, seconds / 10) if poll is None else poll
    record = {"owner": owner or uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid()}
    deadline = time.monotonic() + timeout
    while True:
        mine = {**record, "expires": time.time() + seconds}
        current = backend.read()
        if current is None:
            token = backend.create(_encode(mine))
        elif current[0]["expires"] < time.time():  # its holder stopped renewing: dead or stuck
            token = backend.replace(current[1], _encode(mine))
        else:
            token = None
            holder = current[0]
            if mode == "fail":
                raise LeaseHeld(f"{name}: {uri} is in use by {describe(holder)}; "
                                "set storage.lease=wait to wait for it", holder)
            if time.monotonic() > deadline:
                raise LeaseHeld(f"{name}: {uri} is still in use by {describe(holder)} after waiting "
                                f"{timeout:g} s (storage.lease_timeout)", holder)
        if token is not None:
            return Lease(name, uri, backend, mine, token, seconds)
        if current is None or current[0]["expires"] < time.time():
            continue  # lost a race to create or take over: read who won
        time.sleep(poll)
