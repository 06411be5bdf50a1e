"""The fixed start-up of a local run, three ways: Prefect's temporary server and a local Ray one
after the other (as a flow run starts them by itself); the server started in a thread while Ray
starts (``SubprocessASGIServer`` imported into the caller, what ``protonmf run`` did until
2026-12-03); and what ``protonmf run`` does now, right after its checks: Prefect's server command as
a process of its own (``flows.server.TemporaryServer``) that comes up while the caller imports the
flows and starts Ray (``flows.shared.started_together``). Each side is a fresh process (interpreter
start and imports included, up to both answering), run in turn ``--rounds`` times, with its own
``PREFECT_HOME`` whose database exists already (as on any machine where Prefect ran once).

    .venv/bin/python benchmarks/startup.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SEQUENTIAL = """
from protonmf.config import parse_config
from protonmf.pipeline import Run
from prefect.server.api.server import SubprocessASGIServer
from tasks.runtime import ray_session
SubprocessASGIServer().start()
with ray_session(Run(parse_config({}))):
    pass
"""

THREAD = """
import threading
from protonmf.config import parse_config
from protonmf.pipeline import Run
from prefect.server.api.server import SubprocessASGIServer
from tasks.runtime import ray_session
thread = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
thread.start()
with ray_session(Run(parse_config({}))):
    thread.join()
"""

TOGETHER = """
from protonmf.config import parse_config
from protonmf.pipeline import Run
from flows.server import TemporaryServer
run = Run(parse_config({}))
server = TemporaryServer.start()
from flows.shared import started_together
with started_together(run, server):
    pass
"""


def timed(code: str, env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import save

    home = tempfile.mkdtemp(prefix="protonmf-startup-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    timed(SEQUENTIAL, env)  # the database made, and the page cache warm, before the clock
    runs: dict[str, list[float]] = {"one after the other": [], "in a thread beside Ray": [], "at once": []}
    for _ in range(args.rounds):
        runs["one after the other"].append(round(timed(SEQUENTIAL, env), 2))
        runs["in a thread beside Ray"].append(round(timed(THREAD, env), 2))
        runs["at once"].append(round(timed(TOGETHER, env), 2))
    result = {"rounds": args.rounds, "load_before": os.getloadavg()[0],
              **{name: {"seconds": s, "median": round(statistics.median(s), 2)} for name, s in runs.items()}}
    save("startup", result)


if __name__ == "__main__":
    main()
