"""Prefect's temporary API server for a local run, started as early as a run can start it.

Prefect starts its temporary server (when no ``PREFECT_API_URL`` names a server) from inside the
first flow call, after the process has imported the flows, Ray and torch, and it imports Prefect's
whole server package into the caller first (~6 s on two cores). Here the same server process
(Prefect's own command and settings, as ``prefect.server.api.server.SubprocessASGIServer`` runs it)
is started right after the checks, from a process that has imported only ``prefect.settings``: it
comes up while the caller imports the rest and starts Ray, and Prefect's client then takes it as
the temporary server it would have started.
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
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

__all__ = ["TemporaryServer", "limit_hint", "pointed_at", "start_temporary_server"]

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


@dataclass
class TemporaryServer:
    """A running temporary server: its process and where its API answers."""

    process: subprocess.Popen
    port: int

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, limit_s: float) -> None:
        """Block until the API answers ``/health``; a clear error naming the limit if it does not in ``limit_s``."""
        deadline = time.monotonic() + limit_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"Prefect's temporary server exited with code {self.process.returncode} "
                                   "before it answered")
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {limit_s:g} s ({limit_hint()})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()


def start_temporary_server() -> TemporaryServer | None:
    """Start Prefect's temporary server now and return it without waiting; None where Prefect would
    not start one (``PREFECT_API_URL`` names a server, or the temporary server is turned off)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED, get_current_settings

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        return None
    port = _free_port()
    prefect_dir = Path(importlib.util.find_spec("prefect").origin).parent
    env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1",
           **get_current_settings().to_environment_variables(exclude_unset=True)}
    process = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "--app-dir", str(prefect_dir.parent), "--factory",
         "prefect.server.api.server:create_app", "--host", "127.0.0.1", "--port", str(port),
         "--log-level", "error", "--lifespan", "on"],
        env=env)
    server = TemporaryServer(process, port)
    atexit.register(server.stop)
    return server


@contextmanager
def pointed_at(server: TemporaryServer | None) -> Iterator[None]:
    """Prefect's client using ``server`` (once it answers) as its temporary server for the rest of
    the process; with None, Prefect as configured.

    The process is handed to Prefect's own ``SubprocessASGIServer`` (the instance its client
    starts when no API URL is set), marked running: the client uses it as the temporary server it
    would have started, and it is stopped as Prefect stops its own, when the process exits, after
    Prefect's log and event workers have sent what they hold."""
    if server is not None:
        from prefect.server.api.server import SubprocessASGIServer
        from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

        server.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value()))
        prefects = SubprocessASGIServer()
        if not prefects.running:
            prefects.port, prefects.server_process, prefects.running = server.port, server.process, True
    yield
