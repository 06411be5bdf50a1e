"""The flow on a Ray cluster that an operator started outside the project, as the README's "On a
cluster" says: a head that takes no task (``--num-cpus 0``), one worker node, token authentication,
and no S3 credentials on either node; the flow is run by ``protonmf run`` (``python -m flows.cli
run``) with only the cluster's address, its token and the S3 variables set.

Both nodes run on this machine (distinct ports, one temp dir of their own) and are stopped by
killing exactly the processes that carry this cluster's marker in their environment: ``ray stop``
would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from protonmf import BackboneSpec, PrototypeModel, build_backbone
from tests.small_run import N_CLASSES, assert_gives_the_black_box_logits, tree

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RAY = [sys.executable, "-m", "ray.scripts.scripts"]  # the `ray` command of this interpreter
MARKER = "PROTONMF_TEST_RAY_CLUSTER"
# Ray Data's actors that schedule and count (num_cpus=0, placed on the driver's node by Ray Data)
RAY_DATA_BOOKKEEPING = {"_StatsActor", "_AutoscalingCoordinatorActor", "ActorLocationTracker"}


@dataclass
class Cluster:
    address: str
    token: str
    marker: str  # the value of MARKER in every process of this cluster
    home: Path  # where the flow's driver keeps its files (HOME, PREFECT_HOME)

    def driver_env(self, **extra: str) -> dict[str, str]:
        """What the machine that runs the flow needs: the cluster's address and its token, nothing else of Ray."""
        return {
            "PATH": os.environ["PATH"], "HOME": str(self.home), "PREFECT_HOME": str(self.home / "prefect"),
            "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token, **extra,
        }

    def ray(self, *args: str) -> str:
        """``ray <args>`` run from the flow's machine; its stdout."""
        return _check(RAY + list(args), self.driver_env())

    def processes(self) -> list[psutil.Process]:
        found = []
        for proc in psutil.process_iter():
            try:
                if proc.environ().get(MARKER) == self.marker:
                    found.append(proc)
            except psutil.Error:  # gone, or another user's
                pass
        return found


def _check(cmd: list[str], env: dict[str, str], timeout: float = 120) -> str:
    done = subprocess.run(cmd, check=False, env=env, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(cmd[2:])} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    return done.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[psutil.Process]) -> None:
    for proc in procs:
        try:
            proc.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=10)
    for proc in alive:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    """A head (no CPUs: no task can land there) and a worker node with 2 CPUs, token auth on both."""
    base = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths live under it
    home = base / "home"
    home.mkdir()
    # The nodes inherit nothing from this process: no AWS_* variables reach them.
    node_env = {
        "PATH": os.environ["PATH"], "HOME": str(home), "PYTHONPATH": str(ROOT),  # workers import this checkout
        "RAY_AUTH_MODE": "token", MARKER: base.name,
    }
    port = _free_port()
    address = f"127.0.0.1:{port}"
    local = ["--node-ip-address", "127.0.0.1", "--temp-dir", str(base / "ray"), "--object-store-memory", str(200 << 20),
             "--disable-usage-stats"]  # two nodes on one machine: one temp dir, distinct ports
    c = Cluster(address, "", base.name, base / "driver")
    c.home.mkdir()
    try:
        # On the head machine: a token, saved in ~/.ray/auth_token, which `ray start --head` reads.
        c.token = _check(RAY + ["get-auth-token", "--generate"], node_env).strip()
        assert (home / ".ray" / "auth_token").read_text() == c.token
        _check(RAY + ["start", "--head", "--num-cpus", "0", "--port", str(port), *local,
                      "--ray-client-server-port", str(_free_port()), "--dashboard-port", str(_free_port()),
                      "--dashboard-agent-listen-port", str(_free_port())], node_env)
        # On a worker machine: the same token, passed in the environment.
        _check(RAY + ["start", "--address", address, "--num-cpus", "2", *local,
                      "--dashboard-agent-listen-port", str(_free_port())], {**node_env, "RAY_AUTH_TOKEN": c.token})
        yield c
    finally:
        _stop(c.processes())
        shutil.rmtree(base, ignore_errors=True)


def test_flow_runs_every_task_on_the_worker_node_of_an_authenticated_cluster(cluster, s3_server, s3, s3_bucket, tmp_path):
    nodes = json.loads(cluster.ray("list", "nodes", "--format", "json"))
    assert len(nodes) == 2 and all(n["state"] == "ALIVE" for n in nodes)
    head = next(n["node_id"] for n in nodes if n["is_head_node"])
    worker = next(n["node_id"] for n in nodes if not n["is_head_node"])
    assert "CPU" not in next(n for n in nodes if n["is_head_node"])["resources_total"]

    # A driver without the token is refused.
    refused = subprocess.run([sys.executable, "-c", "import ray; ray.init()"], check=False, cwd=ROOT, capture_output=True, text=True,
                             env={k: v for k, v in cluster.driver_env().items() if k != "RAY_AUTH_TOKEN"}, timeout=120)
    assert refused.returncode != 0 and "AuthenticationError" in refused.stderr

    # Workers import this checkout, on the worker node.
    probe = ("import json, ray, protonmf\nray.init()\n"
             "@ray.remote\ndef where():\n    import os, protonmf\n"
             "    return protonmf.__file__, ray.get_runtime_context().get_node_id(), sorted(k for k in os.environ if k.startswith('AWS_'))\n"
             "print(json.dumps(ray.get(where.remote())))")
    file, node, aws = json.loads(_check([sys.executable, "-c", probe], cluster.driver_env()).splitlines()[-1])
    assert (file, node, aws) == (str(ROOT / "protonmf" / "__init__.py"), worker, [])

    # Neither node has S3 credentials: Ray's own processes were started without them.
    procs = cluster.processes()
    assert any(p.name() == "raylet" for p in procs) and any(p.name() == "gcs_server" for p in procs)
    for proc in procs:
        assert not [k for k in proc.environ() if k.startswith("AWS_")], proc.cmdline()

    # The operator's command, on the head machine, with the S3 variables of the run.
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(tree(s3_bucket, "cluster")))
    aws_env = {"AWS_ENDPOINT_URL": s3_server, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1"}
    out = _check([sys.executable, "-m", "flows.cli", "run", str(tmp_path / "cluster.yaml")], cluster.driver_env(**aws_env),
                 timeout=600)
    uri = f"s3://{s3_bucket}/cluster/model"
    assert f"model:            {uri}" in out and f"classes:          {N_CLASSES}" in out

    # Every task and actor of the run ran on the worker node. The head holds only Ray Data's
    # bookkeeping actors: they ask for no resources and Ray Data pins them to the driver's node.
    tasks = json.loads(cluster.ray("list", "tasks", "--format", "json", "--detail", "--limit", "10000"))
    actors = json.loads(cluster.ray("list", "actors", "--format", "json", "--detail", "--limit", "10000"))
    # (an actor the autoscaling pool asked for but never placed has no node: it ran nowhere)
    working = {a["actor_id"] for a in actors if a["required_resources"] and a["node_id"] is not None}
    ran = [(a["class_name"], a["node_id"]) for a in actors if a["actor_id"] in working]
    ran += [(t["func_or_class_name"].split(".")[0], t["node_id"]) for t in tasks
            if t["type"] == "NORMAL_TASK" or (t["type"] == "ACTOR_TASK" and t["actor_id"] in working)]
    assert {name for name, node in ran if node != worker} == set(), ran
    assert {"_prepare_run", "_fit_prototype_group", "_publish_prototype_model", "HeldOutEvaluator", "_finish",
            "MapWorker(MapBatches(_decode)->MapBatches(FeatureExtractor))"} <= {name for name, _ in ran}
    bookkeeping = {(a["class_name"], a["node_id"]) for a in actors if not a["required_resources"]}
    assert bookkeeping <= {(name, head) for name in RAY_DATA_BOOKKEEPING}, bookkeeping

    # The S3 endpoint and credentials reached the workers through the run's runtime environment.
    jobs = json.loads(cluster.ray("list", "jobs", "--format", "json", "--detail"))
    env_vars = next(j["runtime_env"]["env_vars"] for j in jobs if "flows.cli run" in j["entrypoint"])
    assert env_vars["AWS_ENDPOINT_URL"] == s3_server and env_vars["AWS_ACCESS_KEY_ID"] == "testing"

    # The model the workers wrote loads from S3 and gives the black box's logits.
    model = PrototypeModel.load(uri)
    assert model.available_p == [1, 3] and len(model.class_names) == N_CLASSES
    black_box = build_backbone(BackboneSpec("torchvision:resnet18", weights=model.backbone.spec.weights, num_classes=N_CLASSES))
    assert_gives_the_black_box_logits(model, black_box)
