"""The pull step of ``prefect.yaml``: where a worker runs a deployment's flow run.

A process worker starts each flow run in a temporary directory; the deployments' entrypoints
(``flows/build.py``) and their ``config`` parameters (``configs/...``) are paths inside a
checkout, so the run must move into one first, and into the one whose code the worker's
interpreter has installed, or the flow and its Ray tasks would come from two different trees.
"""

from __future__ import annotations

import os
from pathlib import Path

INSTALLED_CHECKOUT = Path(__file__).resolve().parents[1]


def enter_checkout(directory: str = "") -> dict[str, str]:
    """Make ``directory`` (``$PROTONMF_CHECKOUT`` in prefect.yaml; empty when unset) the working
    directory of the flow run, or by default the checkout this package is installed from
    (``pip install -e .``). Returns ``{"directory": <absolute path>}`` for later steps."""
    path = Path(directory).expanduser().resolve() if directory else INSTALLED_CHECKOUT
    if not (path / "flows" / "build.py").is_file() or not (path / "configs").is_dir():
        origin = f"PROTONMF_CHECKOUT={directory!r}" if directory else f"the installed package's folder {str(path)!r}"
        raise ValueError(
            f"{origin} is not a protonmf checkout (no flows/build.py and configs/): set PROTONMF_CHECKOUT "
            "on the worker to the checkout its interpreter has installed (`pip install -e .`)"
        )
    os.chdir(path)
    return {"directory": str(path)}
