"""The README's "Deploy and schedule" runbook against a real Prefect server: `prefect server start`,
a process work pool, `prefect deploy --all` on the repository's own prefect.yaml, one deployment
run by a real process worker, and the published model and artifacts read back.

Every command runs as its own process through ``sys.executable -m prefect``, as a user would run
it, with a PREFECT_HOME of its own (its own SQLite database) and PREFECT_API_URL on that server.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from uuid import UUID

import httpx
import pytest
import yaml

from protonmf import PrototypeModel

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
POOL = "protonmf"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the process group (the server starts uvicorn and services as children), then SIGKILL."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def prefect(env: dict, *args: str) -> str:
    """Run ``prefect ARGS`` from the repository root; its output, or a failure that shows it."""
    done = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, f"prefect {' '.join(args)} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """``prefect server start`` on a free loopback port; yields the environment that points at it."""
    home = tmp_path_factory.mktemp("prefect-home")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        RAY_USAGE_STATS_ENABLED="0",
    )
    log = open(home / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        # Ready when /health answers; a server that exits instead fails here with its log.
        while True:
            if proc.poll() is not None:
                pytest.fail(f"prefect server exited {proc.returncode}:\n{(home / 'server.log').read_text()}")
            try:
                if httpx.get(f"{env['PREFECT_API_URL']}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield env
    finally:
        _stop(proc)
        log.close()


@pytest.fixture(scope="module")
def client(server):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: server["PREFECT_API_URL"]}):
        with get_client(sync_client=True) as c:
            yield c


@pytest.fixture(scope="module")
def deployed(server):
    """The runbook up to `prefect deploy --all`: the pool, then every deployment of prefect.yaml."""
    prefect(server, "work-pool", "create", POOL, "--type", "process")
    # fastapi 0.154 rejected this step's workers/filter request (422, null limit/offset): the pin.
    out = prefect(server, "--no-prompt", "deploy", "--all")
    return yaml.safe_load((ROOT / "prefect.yaml").read_text()), out


def test_deploy_all_registers_every_deployment_with_its_cron_schedule(deployed, client):
    spec, _ = deployed
    assert len(spec["deployments"]) == 3
    for d in spec["deployments"]:
        flow_name = d["entrypoint"].split(":")[1]  # flows are named after their functions (test_deploy.py)
        got = client.read_deployment_by_name(f"{flow_name}/{d['name']}")
        assert got.entrypoint == d["entrypoint"] and got.work_pool_name == POOL
        assert got.parameters == d["parameters"]
        assert got.pull_steps == spec["pull"]  # the checkout is resolved on the worker, at run time
        assert [(s.schedule.cron, s.schedule.timezone, s.active) for s in got.schedules] == [
            (s["cron"], s["timezone"], True) for s in d["schedules"]
        ]
    assert len(client.read_deployments()) == len(spec["deployments"])


def test_a_deployment_run_by_a_process_worker_publishes_the_model_and_its_artifacts(deployed, server, client, tmp_path):
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    out = tmp_path / "demo"
    # The cheapest deployment's parameters replaced by the demo's: a real run of the real flow.
    params = {
        "config": "configs/demo.yaml",
        "overrides": [
            f"storage.features={out}/features", f"storage.model={out}/model", f"storage.concepts={out}/concepts",
            "data.max_images_per_class=20", "data.val_images_per_class=5", "prototypes.p=[3]",
        ],
    }
    created = prefect(server, "deployment", "run", "build_prototype_model/imagenet-resnet34", "--params", json.dumps(params))
    flow_run_id = UUID(re.search(r"UUID: ([0-9a-f-]{36})", created).group(1))

    # The worker runs the flow in a subprocess of its own interpreter, from a directory of its own:
    # only the pull step (flows.steps.enter_checkout) makes flows/build.py and `configs/demo.yaml`
    # resolve, to the checkout that interpreter has installed (no PROTONMF_CHECKOUT, as in the README).
    worker_env = {k: v for k, v in server.items() if k != "PROTONMF_CHECKOUT"}
    worker = subprocess.Popen(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--run-once"],
        cwd=tmp_path, env=worker_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        start_new_session=True,
    )
    try:
        log, _ = worker.communicate()
    finally:
        _stop(worker)
    assert worker.returncode == 0, log

    run = client.read_flow_run(flow_run_id)
    assert run.state.is_completed(), f"{run.state}\n{log}"
    assert run.parameters == params

    model = PrototypeModel.load(str(out / "model"))
    assert model.available_p == [3] and len(model.class_names) == 10

    artifacts = {a.key: a for a in client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))}
    assert {"run-summary", "reconstruction-errors", "model"} <= set(artifacts)
    assert artifacts["run-summary"].type == "markdown" and f"Published at `{out}/model`" in artifacts["run-summary"].data
    # Prefect stores a link artifact as markdown.
    assert artifacts["model"].data == f"[prototype model]({out}/model)"
    table = artifacts["reconstruction-errors"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and sorted(r["class"] for r in rows) == sorted(model.class_names)
