"""Prefect's temporary API server for a local run, started as a process right after the checks.

Without ``PREFECT_API_URL`` Prefect starts a temporary server from inside the first flow call: it
imports Prefect's whole server package into the caller first (~3.6 s on two cores) and then waits
for the server. Here the same server (Prefect's ``create_app`` under uvicorn, with the environment
``prefect.server.api.server.SubprocessASGIServer`` gives it) is launched as soon as the config is
checked, before this process has imported any of Prefect: the server's process reads Prefect's
settings itself (with this process's own, where it holds some) and serves, or exits with
:data:`NOT_NEEDED` where Prefect would start no temporary server (``PREFECT_API_URL`` names one,
or it is turned off). It comes up while the caller imports the flows and starts Ray
(:mod:`flows.startup`), and the flows then run against it as a named API (``PREFECT_API_URL`` for
the block). ``benchmarks/startup.py`` measures the ways.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["NOT_NEEDED", "STARTUP_LIMIT", "TemporaryServer"]

#: The start-up limit's setting (Prefect's own); the CLI raises Prefect's default of 20 s.
STARTUP_LIMIT = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"

#: The server's exit status where Prefect would start no temporary server (not uvicorn's 3, which
#: says it could not start, e.g. on a port taken in the meantime; not Python's 1 or 2).
NOT_NEEDED = 10

#: The server's process: Prefect's own decision whether a temporary server is wanted, then Prefect's app.
_SERVE = f"""
import sys
from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED
if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
    sys.exit({NOT_NEEDED})
import uvicorn
uvicorn.run("prefect.server.api.server:create_app", factory=True, host="127.0.0.1", port=int(sys.argv[1]),
            log_level="error", lifespan="on")
"""

#: What ``SubprocessASGIServer`` sets for its server: no UI, a temporary server's lifespan.
_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TemporaryServer:
    """Prefect's temporary server as a process of this one, launched when made (it exits at once
    where Prefect would start none): run the flows of a block in :meth:`serving` once it answers,
    :meth:`stop` it."""

    ATTEMPTS = 3  # a port taken between choosing it and the server binding it: started again on another

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self._stopping = False
        self._launch()
        atexit.register(self.stop)  # registered before Prefect's own: runs after they have sent what they hold

    def _launch(self) -> None:
        self.port = _free_port()
        env = {**os.environ, **_SERVER_ENV}
        if "prefect.settings" in sys.modules:  # settings this process may hold itself (temporary_settings) go along
            from prefect.settings import get_current_settings

            env.update(get_current_settings().to_environment_variables(exclude_unset=True))
        self.process = subprocess.Popen([sys.executable, "-c", _SERVE, str(self.port)], env=env)

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def wait(self, limit_s: float) -> bool:
        """Block until the API answers ``/health`` (True) or the process says no server is needed
        (False); an error naming the limit if neither happens in ``limit_s``."""
        deadline, attempts = time.monotonic() + limit_s, 1
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code == NOT_NEEDED:
                return False
            if code is not None:
                if attempts == self.ATTEMPTS:
                    raise RuntimeError(f"Prefect's temporary server exited with code {code} before it answered, "
                                       f"{attempts} times")
                attempts += 1
                self._launch()
            try:
                with urllib.request.urlopen(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return True
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"Prefect's temporary server did not answer within {limit_s:g} s (its start-up limit is "
                           f"{STARTUP_LIMIT}={limit_s:g} s: raise it on a busy machine, or point PREFECT_API_URL at a "
                           "running server)")

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The block's flows against this server, once it answers (within Prefect's start-up limit),
        or against the one Prefect's settings name; after the block, what Prefect's log and event
        workers hold is sent, and the server is told to stop (:meth:`stop` waits for it)."""
        from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, temporary_settings

        if not self.wait(float(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())):
            yield
            return
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            try:
                yield
            finally:
                from prefect.events.worker import EventsWorker
                from prefect.logging.handlers import APILogWorker

                APILogWorker.drain_all(timeout=10, at_exit=False)
                EventsWorker.drain_all(timeout=10, at_exit=False)
                self._terminate()  # it stops while the caller stops Ray

    def _terminate(self) -> None:
        """SIGTERM, once: a second one makes uvicorn skip its shutdown."""
        if not self._stopping:
            self._stopping = True
            self.process.terminate()

    def stop(self) -> None:
        """Stop the server, and wait for it."""
        if self.process is not None and self.process.poll() is None:
            self._terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
