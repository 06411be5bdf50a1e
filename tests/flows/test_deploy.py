"""Deployment files: the Prefect deployment points at the real flow and a valid schedule; the
cluster manifests ask for GPU workers."""

import re
from pathlib import Path

import pytest
import yaml

from protonmf.config import load_config

ROOT = Path(__file__).resolve().parents[2]


def test_prefect_deployments_point_at_the_flow_with_a_cron_schedule():
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.flows import Flow

    spec = yaml.safe_load((ROOT / "prefect.yaml").read_text())
    assert {d["entrypoint"] for d in spec["deployments"]} == {"flows/build.py:build_prototype_model", "flows/craft.py:craft_concepts"}
    for deployment in spec["deployments"]:
        path, name = deployment["entrypoint"].split(":")
        import importlib.util

        module_spec = importlib.util.spec_from_file_location("entry", ROOT / path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        flow = getattr(module, name)
        assert isinstance(flow, Flow) and flow.name in ("build_prototype_model", "craft_concepts")
        assert set(deployment["parameters"]) <= set(flow.parameters.properties)
        load_config(ROOT / deployment["parameters"]["config"])
        for schedule in deployment["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule["timezone"])


def test_cluster_manifests_have_gpu_workers():
    ray_cluster = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    gpu_nodes = [n for n in ray_cluster["available_node_types"].values() if n["resources"].get("GPU", 0) >= 1]
    assert gpu_nodes and ray_cluster["head_node_type"] in ray_cluster["available_node_types"]
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["entrypoint"].startswith("protonmf run ")  # its config: test_cluster_image.py
    workers = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert any(c["resources"]["limits"].get("nvidia.com/gpu") for w in workers for c in w["template"]["spec"]["containers"])


def test_the_pull_step_enters_the_installed_checkout_or_fails_naming_the_variable(tmp_path, monkeypatch):
    from flows.steps import enter_checkout

    monkeypatch.chdir(tmp_path)  # where a process worker starts a flow run: not a checkout
    assert enter_checkout("") == {"directory": str(ROOT)} and Path.cwd() == ROOT
    monkeypatch.chdir(tmp_path)
    assert enter_checkout(str(ROOT)) == {"directory": str(ROOT)} and Path.cwd() == ROOT
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"PROTONMF_CHECKOUT='{tmp_path}' is not a protonmf checkout")):
        enter_checkout(str(tmp_path))
    assert Path.cwd() == tmp_path
