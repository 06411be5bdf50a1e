"""The fixed start-up of a local run, four ways, each until Prefect's temporary server and a local
Ray both answer and the flow's module (``flows.build``) is imported:

- one after the other, as a flow run starts them by itself: the flow imported, Prefect's server
  (``SubprocessASGIServer``, what Prefect starts at the first flow call), then Ray;
- the server in a thread beside Ray (``SubprocessASGIServer`` imported into the caller), what
  ``protonmf run`` did until 2026-12-03;
- the server's process launched once Prefect's settings are read here, the flow imported, then Ray
  (``protonmf run`` on the morning of 2026-12-03);
- what ``protonmf run`` does now after its checks (``flows.startup.started_together``): the server's
  process launched before any of Prefect is imported here (it reads Prefect's settings itself),
  then the flow imported, then Ray.

Each side is a fresh process, after the checks' imports (``protonmf.pipeline``, torch) as
``protonmf run`` has them; its time runs from its launch (interpreter start included) to "ready",
and "whole" adds stopping both and the interpreter's exit. The sides run in turn, ``--rounds``
times, after the previous one's processes are gone and a pause, each with the same
``PREFECT_HOME`` whose database exists already (as on any machine where Prefect ran once).

    .venv/bin/python benchmarks/startup.py [--rounds 5]
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

CHECKED = """
import time
from protonmf.config import parse_config
from protonmf.pipeline import Run
run = Run(parse_config({}))
def ready():
    print(time.time(), flush=True)
"""

SEQUENTIAL = CHECKED + """
import flows.build
from prefect.server.api.server import SubprocessASGIServer
from tasks.runtime import ray_session
SubprocessASGIServer().start()
with ray_session(run):
    ready()
"""

THREAD = CHECKED + """
import threading
import flows.build
from prefect.server.api.server import SubprocessASGIServer
from tasks.runtime import ray_session
thread = threading.Thread(target=SubprocessASGIServer().start, daemon=True)
thread.start()
with ray_session(run):
    thread.join()
    ready()
"""

SETTINGS_FIRST = CHECKED + """
import prefect.settings
from flows.server import TemporaryServer
server = TemporaryServer()
import flows.build
from tasks.runtime import ray_session
with ray_session(run), server.serving():
    ready()
server.stop()
"""

TOGETHER = CHECKED + """
from flows.startup import started_together
with started_together(run, "flows.build"):
    ready()
"""

SIDES = {"one after the other": SEQUENTIAL, "the server in a thread beside Ray": THREAD,
         "the server's process after Prefect's settings, then Ray": SETTINGS_FIRST,
         "the server's process first, then the flow and Ray (now)": TOGETHER}


def leftovers() -> bool:
    """Whether a process of an earlier side (Ray's, Prefect's server) still runs."""
    found = subprocess.run(["pgrep", "-f", "gcs_server|raylet|ray::|prefect.server.api.server|uvicorn.run"],
                           capture_output=True, text=True)
    return bool(found.stdout.strip())


def timed(code: str, env: dict[str, str]) -> tuple[float, float]:
    """Seconds from launching ``code`` to its ``ready()``, and to its exit."""
    while leftovers():
        time.sleep(0.5)
    time.sleep(3)
    launched = time.time()
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    whole = time.time() - launched
    return float(done.stdout.split()[-1]) - launched, whole


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from _common import save

    home = tempfile.mkdtemp(prefix="protonmf-startup-")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
    env.update(PREFECT_HOME=home, PREFECT_SERVER_ANALYTICS_ENABLED="false", RAY_USAGE_STATS_ENABLED="0",
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    timed(SEQUENTIAL, env)  # the database made, and the page cache warm, before the clock
    ready: dict[str, list[float]] = {name: [] for name in SIDES}
    whole: dict[str, list[float]] = {name: [] for name in SIDES}
    load = []
    for _ in range(args.rounds):
        for name, code in SIDES.items():
            load.append(os.getloadavg()[0])
            r, w = timed(code, env)
            ready[name].append(round(r, 2))
            whole[name].append(round(w, 2))
    result = {"rounds": args.rounds, "load_before": {"min": round(min(load), 2), "max": round(max(load), 2)},
              **{name: {"ready": ready[name], "ready_median": round(statistics.median(ready[name]), 2),
                        "whole": whole[name], "whole_median": round(statistics.median(whole[name]), 2)}
                 for name in SIDES}}
    save("startup", result)
    for name in SIDES:
        print(f"{name:<58} ready {result[name]['ready_median']:5.2f} s   whole {result[name]['whole_median']:5.2f} s")


if __name__ == "__main__":
    main()
