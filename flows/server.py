"""Prefect's temporary API server for a local run, started as a process right after the checks.

Without ``PREFECT_API_URL`` Prefect starts a temporary server from inside the first flow call: it
imports Prefect's whole server package into the caller first (~3.6 s on two cores) and then waits
for the server. Here the same server (Prefect's own command and settings, as
``prefect.server.api.server.SubprocessASGIServer`` runs it) is started as soon as the config is
checked, from a process that has imported only ``prefect.settings``; it comes up while the caller
imports the flows and starts Ray, and the flows then run against it as a named API
(``PREFECT_API_URL`` for the block). ``benchmarks/startup.py`` measures the three ways.
"""

from __future__ import annotations

import atexit
import importlib.util
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["STARTUP_LIMIT", "TemporaryServer", "limit_hint"]

#: The start-up limit's setting (Prefect's own); the CLI raises Prefect's default of 20 s.
STARTUP_LIMIT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def limit_hint() -> str:
    """What a user does about a server that did not come up in time."""
    return (f"its start-up limit is {STARTUP_LIMIT}={os.environ.get(STARTUP_LIMIT, '20')} s: raise it on a busy "
            "machine, or point PREFECT_API_URL at a running server")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """Prefect's temporary server as a process of this one: :meth:`start` it, :meth:`serving` the
    flows of a block once it answers, :meth:`stop` it."""

    ATTEMPTS = 3  # a port taken between choosing it and the server binding it: started again on another

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._launch()
        atexit.register(self.stop)  # registered before Prefect's own: runs after they have sent what they hold

    @classmethod
    def start(cls) -> TemporaryServer | None:
        """A server starting now; None where Prefect would not start one (``PREFECT_API_URL`` names
        a server, or the temporary server is turned off)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

        if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
            return None
        return cls()

    def _launch(self) -> None:
        from prefect.settings import get_current_settings

        self.port = _free_port()
        prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
               **get_current_settings().to_environment_variables(exclude_unset=True)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
             "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(self.port),
             "--log-level", "error", "--lifespan", "on"],
            env=env)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, limit_s: float) -> None:
        """Block until the API answers ``/health``; an error naming the limit if it does not in ``limit_s``."""
        deadline, attempts = time.monotonic() + limit_s, 1
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                if attempts == self.ATTEMPTS:
                    raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode} "
                                       f"before it answered, {attempts} times")
                attempts += 1
                self._launch()
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {limit_s:g} s ({limit_hint()})")

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The block's flows against this server (once it answers, within Prefect's start-up limit);
        after it, what Prefect's log and event workers hold is sent before the server stops."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

        self.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10, at_exit=False)
                EventsWorker.drain_all(timeout=10, at_exit=False)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
