"""Prefect's temporary server as ``protonmf run`` starts it (:mod:`flows.server`): a real server
process, launched before any of Prefect is imported in the caller, that a flow run in this process
reports to, gone when the block ends; a limit it misses is said with the setting that raises it;
where Prefect's settings name a server (the environment, a profile) the server's process declines
and the flows use that one. Each case runs in a process of its own with its own ``PREFECT_HOME``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flows.server import NOT_NEEDED

ROOT = Path(__file__).resolve().parents[2]

FLOW_ON_IT = """
import asyncio, sys
from flows.server import TemporaryServer
server = TemporaryServer()
from prefect import flow, get_client

@flow
def hello():
    return 42

with server.serving():
    assert hello() == 42
    async def runs():
        async with get_client() as client:
            return str(client.api_url), [r.state_type.value for r in await client.read_flow_runs()]
    url, states = asyncio.run(runs())
    print('same server', url.rstrip('/') == server.api_url, 'runs', states)
print('server package imported', 'prefect.server.api.server' in sys.modules)
server.stop()
print('stopped', server.process.poll() is not None)
"""

TOO_SLOW = """
from flows.server import TemporaryServer
server = TemporaryServer()
try:
    with server.serving():
        print('came up')
except RuntimeError as err:
    print(err)
print('stopped', server.process.poll() is not None)
"""


def python(code: str, tmp_path: Path, **env: str) -> list[str]:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_HOME": str(tmp_path),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", **env}
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()


def test_a_flow_run_reports_to_the_server_started_first_without_prefects_server_package_here(tmp_path):
    assert python(FLOW_ON_IT, tmp_path)[-3:] == ["same server True runs ['COMPLETED']", "server package imported False",
                                                 "stopped True"]


def test_a_missed_start_up_limit_names_the_setting_and_stops_the_server(tmp_path):
    out = python(TOO_SLOW, tmp_path, PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="1")
    assert out == ["Prefect's temporary server did not answer within 1 s (its start-up limit is "
                   "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1 s: raise it on a busy machine, or point "
                   "PREFECT_API_URL at a running server)", "stopped True"]


NAMED = """
import sys
from flows.server import TemporaryServer
server = TemporaryServer()
print('prefect imported by the launch', 'prefect' in sys.modules)
from prefect.settings import PREFECT_API_URL
with server.serving():
    print('flows use', PREFECT_API_URL.value())
print('server exit status', server.process.returncode)
"""


def test_a_limit_set_in_the_active_profile_is_the_one_the_message_names(tmp_path):
    (tmp_path / "profiles.toml").write_text('active = "slow"\n\n[profiles.slow]\n'
                                            'PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS = 0\n')  # 0: missed whatever the machine
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    done = subprocess.run([sys.executable, "-c", TOO_SLOW], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**env, "PREFECT_HOME": str(tmp_path), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"})
    assert done.stdout.strip().splitlines()[0].startswith(
        "Prefect's temporary server did not answer within 0 s (its start-up limit is "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=0 s:"), done.stderr[-2000:]


def test_the_launch_imports_no_prefect_and_the_server_declines_where_the_environment_names_one(tmp_path):
    assert python(NAMED, tmp_path, PREFECT_API_URL="http://127.0.0.1:9/api") == [
        "prefect imported by the launch False", "flows use http://127.0.0.1:9/api", f"server exit status {NOT_NEEDED}"]


def test_the_server_declines_where_the_active_profile_names_one(tmp_path):
    (tmp_path / "profiles.toml").write_text('active = "named"\n\n[profiles.named]\n'
                                            'PREFECT_API_URL = "http://127.0.0.1:9/api"\n')
    assert python(NAMED, tmp_path)[1:] == ["flows use http://127.0.0.1:9/api", f"server exit status {NOT_NEEDED}"]


OWN_SETTINGS = """
from flows.server import TemporaryServer
from prefect.settings import PREFECT_API_URL, temporary_settings
with temporary_settings({PREFECT_API_URL: 'http://127.0.0.1:9/api'}):
    server = TemporaryServer()
    with server.serving():
        print('flows use', PREFECT_API_URL.value())
print('server exit status', server.process.returncode)
"""


def test_the_server_declines_where_this_processs_own_settings_name_one(tmp_path):
    assert python(OWN_SETTINGS, tmp_path) == ["flows use http://127.0.0.1:9/api", f"server exit status {NOT_NEEDED}"]


TAKEN = """
import socket
import flows.server as fs
held = socket.socket()
held.bind(('127.0.0.1', 0))
held.listen()
ports = iter([held.getsockname()[1]])  # the first port chosen is taken by the time the server binds it
choose = fs._free_port
fs._free_port = lambda: next(ports, None) or choose()
server = fs.TemporaryServer()
taken = server.port
with server.serving():
    print('answers on another port', server.port != taken)
server.stop()
"""


def test_a_server_whose_port_was_taken_is_started_again_on_another(tmp_path):
    assert python(TAKEN, tmp_path) == ["answers on another port True"]
