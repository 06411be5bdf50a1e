"""The GPU smoke script (``benchmarks/gpu_smoke.py``) run as the tests can run it, ``--device cpu``
at tiny sizes: its checks and benchmark rows must all pass, so that the script a GPU machine will
run has not rotted in the meantime."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def _results() -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in (ROOT / "benchmarks" / "results").glob("*.json")}


def test_gpu_smoke_script_runs_every_check_and_row_on_the_cpu(tmp_path):
    measured = _results()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "RAY_USAGE_STATS_ENABLED": "0", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180"}
    env.pop("PREFECT_API_URL", None)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_smoke.py"), "--device", "cpu", "--out", str(tmp_path / "out")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    rows = json.loads((tmp_path / "out" / "results" / "gpu_smoke.json").read_text())["rows"]
    assert [r["step"] for r in rows][:4] == ["run", "api", "evaluate", "craft"] and all(r["ok"] for r in rows), rows
    assert len(rows) == 4 + 2 + 2  # two NMF rows (fixed iterations, the paper's rule), two extraction rows
    assert _results() == measured  # the measured results are left as they are
