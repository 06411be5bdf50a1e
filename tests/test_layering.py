"""The layout's promises, checked on the source: protonmf/ is the pure core (no Prefect, no Ray),
the math modules stand alone, only pipeline/ reads a run's Config, and only tasks/ calls Ray."""

import ast
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import protonmf

PACKAGE = Path(protonmf.__file__).parent
ROOT = PACKAGE.parent
MATH = ("nmf", "nnls", "head", "sobol")


def _imports(path: Path) -> set[str]:
    """Every module a file imports (at any depth of the file: function-level imports count)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_every_module_imports_and_none_loads_prefect_or_ray():
    modules = ["protonmf"] + [m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="protonmf.")]
    assert {"protonmf.pipeline.staging", "protonmf.data.sources.imagefolder", "protonmf.craft.settings"} <= set(modules)
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        "leaked = sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'ray', 'prefect_ray'))\n"
        "print(','.join(leaked))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"protonmf pulled in {out.stdout.strip()}"


def test_no_source_line_names_prefect_or_ray():
    pattern = re.compile(r"^\s*(import|from)\s+(prefect|ray|prefect_ray)\b", re.M)
    offenders = [str(f) for f in PACKAGE.rglob("*.py") if pattern.search(f.read_text())]
    assert offenders == []


def test_the_math_modules_import_nothing_else_of_protonmf():
    for name in MATH:
        ours = {m for m in _imports(PACKAGE / f"{name}.py") if m.split(".")[0] == "protonmf"}
        assert ours == set(), f"protonmf/{name}.py imports {sorted(ours)}"


def test_only_pipeline_reads_the_run_config():
    readers = sorted(
        str(f.relative_to(PACKAGE)) for f in PACKAGE.rglob("*.py")
        if any(m == "protonmf.config" or m.startswith("protonmf.config.") for m in _imports(f))
    )
    assert readers and all(r.startswith("pipeline/") for r in readers), readers


def _ray_uses(path: Path) -> list[str]:
    """Every use of Ray in a file: an import of ray (or of a module under it) and any ``ray.<name>``."""
    tree = ast.parse(path.read_text())
    uses = [f"import {m}" for m in _imports(path) if m == "ray" or m.startswith("ray.")]
    uses += [f"ray.{node.attr}" for node in ast.walk(tree)
             if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "ray"]
    return uses


def test_only_tasks_use_ray_and_flows_do_not():
    for folder in ("flows", "protonmf"):
        for f in (ROOT / folder).rglob("*.py"):
            assert _ray_uses(f) == [], f"{f.relative_to(ROOT)} uses Ray: {_ray_uses(f)}"
    assert any("ray.get" in _ray_uses(f) for f in (ROOT / "tasks").rglob("*.py"))


def test_the_ray_check_sees_every_kind_of_use(tmp_path):
    for line, use in (("import ray", "import ray"), ("from ray import data", "import ray"),
                      ("from ray.util import ActorPool", "import ray.util"), ("x = ray.cluster_resources()", "ray.cluster_resources")):
        (tmp_path / "m.py").write_text(line + "\n")
        assert use in _ray_uses(tmp_path / "m.py"), line
