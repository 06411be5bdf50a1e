"""protonmf/ is the pure core: importing every module of it loads neither Prefect nor Ray."""

import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import protonmf

PACKAGE = Path(protonmf.__file__).parent


def test_no_module_of_protonmf_imports_prefect_or_ray():
    modules = ["protonmf"] + [f"protonmf.{m.name}" for m in pkgutil.walk_packages([str(PACKAGE)])]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray', 'prefect_ray'))\n"
        "print(','.join(leaked))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"protonmf pulled in {out.stdout.strip()}"
    assert len(modules) >= 8


def test_no_source_line_names_prefect_or_ray():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|ray|prefect_ray)\b", re.M)
    offenders = [str(f) for f in PACKAGE.rglob("*.py") if pattern.search(f.read_text())]
    assert offenders == []
