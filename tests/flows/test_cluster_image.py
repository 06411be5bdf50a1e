"""The cluster image, checked without a container engine (CI has none): cluster/Dockerfile installs
the locked set the tests pass with and this checkout, in the folder the manifests' entrypoints
name; every manifest runs the image the README says to build; KubeRay's autoscaling is switched on."""

import fnmatch
import re
import shlex
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = sorted((ROOT / "cluster").glob("*.yaml"))


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")]
    text = re.sub(r"\\\n", " ", "\n".join(lines))
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip()) for line in text.splitlines() if line.strip()]


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            out[canonicalize_name(name)] = version
    return out


def pip_installs() -> list[str]:
    """Every `pip install` command of the Dockerfile's RUN steps."""
    commands = [cmd.strip() for instr, args in dockerfile() if instr == "RUN" for cmd in args.split("&&")]
    return [cmd for cmd in commands if cmd.startswith("pip install")]


def image_requirements(tmp_path) -> list[Requirement]:
    """The requirements the Dockerfile derives from pyproject.toml: its own command, run here."""
    (tmp_path / "pyproject.toml").write_bytes((ROOT / "pyproject.toml").read_bytes())
    run = next(args for instr, args in dockerfile() if instr == "RUN" and "tomllib" in args)
    command = run.split("&&")[0].strip()
    assert command.startswith("python -c ") and command.endswith("> /tmp/requirements.txt")
    code = shlex.split(command.removeprefix("python ").removesuffix("> /tmp/requirements.txt"))[1]
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True).stdout
    return [Requirement(line) for line in out.splitlines() if line.strip()]


def closure(requirements: list[Requirement]) -> set[str]:
    """Every distribution ``requirements`` pull in, from the metadata installed here."""
    seen: set[tuple[str, str]] = set()
    todo = list(requirements)
    while todo:
        req = todo.pop()
        for extra in ("", *sorted(req.extras)):
            if (canonicalize_name(req.name), extra) in seen:
                continue
            seen.add((canonicalize_name(req.name), extra))
            for dep in map(Requirement, metadata.requires(req.name) or []):
                if dep.marker is None or dep.marker.evaluate({"extra": extra}):
                    todo.append(dep)
    return {name for name, _ in seen}


def test_the_image_installs_exactly_the_locked_set(tmp_path):
    locked = pins()
    installs = pip_installs()
    assert len(installs) == 2 and all("-c constraints.txt" in cmd for cmd in installs)  # the dependencies, then the project
    requirements = image_requirements(tmp_path)
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert set(requirements) == set(map(Requirement, project["dependencies"] + project["optional-dependencies"]["cluster"]))
    for req in requirements:  # each one pinned, and the pin allowed by pyproject
        assert req.specifier.contains(locked[canonicalize_name(req.name)], prereleases=True), req
    # The whole dependency tree is pinned: pip in the image has nothing left to choose.
    assert closure(requirements) - set(locked) == set()
    # torch and torchvision are the versions the tests run with here (PyPI's CUDA 13.0 build on Linux).
    for name in ("torch", "torchvision"):
        assert metadata.version(name) == locked[name]
    # The interpreter constraints.txt was frozen with, and the tests run with.
    base = next(args for instr, args in dockerfile() if instr == "FROM")
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}-"), base


def test_the_project_is_installed_where_the_manifests_entrypoints_look():
    steps = dockerfile()
    workdir = next(args for instr, args in steps if instr == "WORKDIR")
    assert workdir == "/opt/protonmf"
    copy_all = steps.index(("COPY", ". ."))
    assert [args for instr, args in steps if instr == "WORKDIR"] == [workdir]  # `.` is the WORKDIR for every step
    assert any(instr == "RUN" and re.search(r"pip install .*--no-deps -e \.( |$)", args) for instr, args in steps[copy_all:])

    ignored = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines() if line.strip() and not line.startswith("#")]
    for needed in ("protonmf", "flows", "tasks", "configs", "pyproject.toml", "constraints.txt", "prefect.yaml"):
        assert not any(fnmatch.fnmatch(needed, pattern) for pattern in ignored), needed

    # Every `protonmf run|craft CONFIG` in a manifest (the RayJob's entrypoint, ray job submit)
    # names a config of the image by its absolute path: no working directory is assumed.
    found = []
    for manifest in MANIFESTS:
        for config in re.findall(r"protonmf (?:run|craft) (\S+\.ya?ml)\b", manifest.read_text()):
            assert config.startswith(workdir + "/configs/"), (manifest.name, config)
            assert (ROOT / Path(config).relative_to(workdir)).is_file(), config
            found.append(manifest.name)
    assert set(found) == {m.name for m in MANIFESTS}
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["entrypoint"].startswith(f"protonmf run {workdir}/configs/")


def _images(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k in ("image", "head_image", "worker_image") and isinstance(v, str)] + [
            i for v in node.values() for i in _images(v)
        ]
    if isinstance(node, list):
        return [i for v in node for i in _images(v)]
    return []


def test_every_manifest_runs_the_image_the_readme_builds():
    readme = (ROOT / "docs" / "workflow.md").read_text()  # "Container image", moved out of README.md
    built = set(re.findall(r"docker build -f cluster/Dockerfile -t (\S+) \.", readme))
    pushed = set(re.findall(r"docker push (\S+)", readme))
    assert len(built) == 1 and pushed == built, (built, pushed)
    tag = built.pop()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert tag.endswith(f"/protonmf:{version}")  # a version, not `latest`: nodes pull what was built
    assert tag in (ROOT / "cluster" / "Dockerfile").read_text()
    for manifest in MANIFESTS:
        images = _images(yaml.safe_load(manifest.read_text()))
        assert images and set(images) == {tag}, (manifest.name, images)


def test_kuberay_scales_the_gpu_group_between_its_bounds():
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())["spec"]["rayClusterSpec"]
    # maxReplicas means nothing unless the autoscaler sidecar runs.
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert any(g["maxReplicas"] > g["minReplicas"] for g in spec["workerGroupSpecs"])


def test_both_manifests_start_their_clusters_with_token_authentication():
    """A cluster without it runs code for anyone who reaches its ports, and the job's runtime
    environment carries the S3 credentials (README "On a cluster")."""
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert job["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    major, minor, _ = map(int, job["spec"]["rayClusterSpec"]["rayVersion"].split("."))
    assert (major, minor) >= (2, 52)  # authOptions needs rayVersion 2.52 or newer
    launcher = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands") for c in launcher[key] if "ray start" in c]
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ") for c in starts), starts
    assert launcher["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}  # Ray's default token path
    assert "RAY_AUTH_MODE=token ray get-auth-token --generate" in (ROOT / "cluster" / "ray-cluster.yaml").read_text()
