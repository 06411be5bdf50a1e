"""The front door: what is wrong with a command's input is said in one line, exit status 2, before
Prefect or Ray start. Each case runs the CLI in a process of its own, which reports at its end
whether Prefect or Ray were imported (neither can have started a server or a cluster without)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEMO = str(ROOT / "configs" / "demo.yaml")
#: the CLI's main, then whether this process imported Prefect or Ray
WRAPPED = ("import sys; from flows.cli import main; rc = main(sys.argv[1:]); "
           "print('imported prefect', 'prefect' in sys.modules, 'ray', 'ray' in sys.modules); sys.exit(rc)")


def cli(*args: str, cwd: Path = ROOT) -> tuple[int, str, str]:
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0"}
    done = subprocess.run([sys.executable, "-c", WRAPPED, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120)
    return done.returncode, done.stdout, done.stderr


def assert_said_before_anything_started(rc: int, out: str, err: str, line: str) -> None:
    assert (rc, err.strip().splitlines()) == (2, [line]), err
    assert out.strip().splitlines()[-1] == "imported prefect False ray False"


def config_file(tmp_path: Path, **changes) -> str:
    tree = yaml.safe_load(Path(DEMO).read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        tree.setdefault(section, {})[key] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(tree))
    return str(path)


def test_a_config_that_does_not_exist(tmp_path):
    rc, out, err = cli("run", str(tmp_path / "nope.yaml"))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: config file '{tmp_path / 'nope.yaml'}' does not exist")


def test_a_mistyped_key_gets_a_did_you_mean(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(Path(DEMO).read_text().replace("prototypes:", "prototype:", 1))
    rc, out, err = cli("run", str(path))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: prototype: unknown key (did you mean 'prototypes'?) (in {path})")


def test_a_bad_value_is_blamed_on_the_set_that_gave_it():
    rc, out, err = cli("run", DEMO, "--set", "prototypes.p=[0]")
    assert_said_before_anything_started(rc, out, err, "protonmf: error: prototypes.p: prototype counts must be >= 1, got [0] "
                                                      "(--set prototypes.p=[0])")


def test_weights_that_are_not_a_checkpoint_or_not_there(tmp_path):
    text = tmp_path / "weights.pt"
    text.write_text("not a checkpoint\n")
    rc, out, err = cli("run", config_file(tmp_path, backbone__weights=str(text)))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: backbone.weights: '{text}' is not a checkpoint: 17 bytes "
                                                      "that torch.load cannot read (UnpicklingError)")
    rc, out, err = cli("run", config_file(tmp_path, backbone__weights=str(tmp_path / "gone.pt")))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: backbone.weights: '{tmp_path / 'gone.pt'}' does not exist")


def test_weights_of_another_network_name_the_layers(tmp_path):
    import torch

    from protonmf.backbones.nets import SmallCNN

    other = tmp_path / "other.pt"
    torch.save(SmallCNN(num_classes=7).state_dict(), other)  # the demo's network has 10 classes
    rc, out, err = cli("run", config_file(tmp_path, backbone__weights=str(other)))
    assert rc == 2 and err.startswith(f"protonmf: error: backbone.weights '{other}' do not fit protonmf:small_cnn: layers "
                                      "2 with another shape: fc.weight (7, "), err
    assert out.strip().splitlines()[-1] == "imported prefect False ray False"


def test_data_that_does_not_exist(tmp_path):
    path = config_file(tmp_path, data__source="imagefolder", data__train=str(tmp_path / "no-such-folder"),
                       backbone__weights=None)
    rc, out, err = cli("run", path)
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: data.train: '{tmp_path / 'no-such-folder'}' does not exist")


def test_explain_names_a_missing_input_and_fails_on_one_that_is_not_an_image(tmp_path):
    rc, out, err = cli("explain", str(tmp_path / "model"), str(tmp_path / "gone.jpg"))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: explain: '{tmp_path / 'gone.jpg'}' does not exist")
    rc, out, err = cli("evaluate", str(tmp_path / "no-model"))
    assert_said_before_anything_started(rc, out, err, f"protonmf: error: no model at '{tmp_path / 'no-model'}': it does not exist")


def test_debug_lets_the_traceback_through(tmp_path):
    rc, _, err = cli("--debug", "run", str(tmp_path / "nope.yaml"))
    assert rc == 1 and "Traceback (most recent call last)" in err and "ConfigError: config file" in err


@pytest.mark.slow
def test_an_error_raised_in_a_ray_task_is_the_same_one_line(tmp_path):
    """p above the feature dimension is found by the prepare step, in a Ray task: the terminal's
    last line is the task's own error, without Ray's remote traceback or colour codes."""
    import re

    out = tmp_path / "out"
    rc, _, err = cli("run", DEMO, "--set", "prototypes.p=[1000]", "--set", f"storage.features={out}/features",
                     "--set", f"storage.model={out}/model", cwd=ROOT)
    (line,) = [x for x in err.splitlines() if x.startswith("protonmf: error:")]  # Prefect's own log lines around it
    assert rc == 2 and re.fullmatch(r"protonmf: error: prototypes.p: \[1000\] larger than the feature dimension D = \d+ "
                                    r"of protonmf:small_cnn's features \(NMF needs p <= D\)", line), err[-3000:]
    assert "\x1b" not in line


def test_a_temporary_server_that_misses_its_start_up_limit_is_one_line_naming_the_setting(tmp_path):
    """After the checks: Prefect's temporary server (a fresh database here) given 1 s to answer."""
    import time

    path = config_file(tmp_path, storage__features=str(tmp_path / "f"), storage__model=str(tmp_path / "m"))
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}, "PREFECT_HOME": str(tmp_path / "prefect"),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "RAY_USAGE_STATS_ENABLED": "0",
           "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "flows.cli", "run", path], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert done.returncode == 2 and done.stderr.strip().splitlines()[-1] == (
        "protonmf: error: Prefect's temporary server did not answer within 1 s (its start-up limit is "
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=1 s: raise it on a busy machine, or point PREFECT_API_URL "
        "at a running server)"), done.stderr[-2000:]
    assert time.monotonic() - start < 90  # Ray's start and the limit, not a flow run
    assert not (tmp_path / "m").exists()
