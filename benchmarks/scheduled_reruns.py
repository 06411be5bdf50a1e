"""What a scheduled rerun costs: the first run, the same run again on unchanged data, after images
were added to one class, and a rerun with ``--verify``, in S3 requests and seconds.

This script starts a moto S3 server (server mode, counting every request by kind) and writes into
one bucket an ImageFolder of ``--classes`` classes (``--per-class`` training JPEGs of 32 px each,
one held-out image per class) and a checkpoint of the demo network (``protonmf:small_cnn``, random
init, seed 0), as ``flow_vs_script_1000.py`` does. Then it runs ``protonmf run CONFIG`` (the CLI,
as ``python -m flows.cli run``: Prefect's temporary server and a local Ray started by the run),
each run a whole process, all on the same feature store and model:

1. **first**: everything extracted, fitted, published and evaluated;
2. **unchanged**: the same data again;
3. **grown**: ``--added`` images added to class 0 first;
4. **verify**: the same data again with ``--verify`` (every class read back against its checksums).

Each run's S3 requests are counted by kind: GETs of feature chunks (``features/c*/``), of training
images (``data/train/``), of held-out images (``data/val/``), other GETs (markers, index, manifests,
leases), LISTs, PUTs, and all of them; with the run's wall time, its own per-step times (its
summary's ``Timings (s):`` line) and its ``work`` (classes extracted, groups fitted).

    .venv/bin/python benchmarks/scheduled_reruns.py [--classes 40] [--per-class 8] [--added 3]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flow_vs_script_1000 import BUCKET, MEAN, SIZE, STD, CountingMotoServer, flow_stages, s3_env  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KINDS = ("GET chunk", "GET train image", "GET val image", "GET other", "LIST", "PUT", "other")


def kind(method: str, path: str, query: str) -> str:
    """A request's kind, of :data:`KINDS`."""
    if method == "GET" and ("list-type" in query or "prefix=" in query):
        return "LIST"
    if method == "GET":
        for part, name in (("/features/c0", "GET chunk"), ("/data/train/", "GET train image"), ("/data/val/", "GET val image")):
            if part in path:
                return name
        return "GET other"
    return "PUT" if method == "PUT" else "other"


def jpeg(rng, colour) -> bytes:
    import numpy as np
    from PIL import Image

    img = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8) // 2
    y, x = rng.integers(0, SIZE // 2, 2)
    img[y:y + SIZE // 2, x:x + SIZE // 2] = colour
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_data(n_classes: int, per_class: int, added: int) -> dict[str, bytes]:
    """The data and the checkpoint written to the bucket; returns the ``added`` images of class 0, not written."""
    import numpy as np
    import s3fs
    import torch

    from protonmf.backbones.nets import SmallCNN

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    rng = np.random.default_rng(0)
    objects: dict[str, bytes] = {}
    later: dict[str, bytes] = {}
    for k in range(n_classes):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", per_class + (added if k == 0 else 0)), ("val", 1)):
            for i in range(n):
                (later if split == "train" and i >= per_class else objects)[f"{BUCKET}/data/{split}/n{k:05d}/{i:02d}.jpg"] = jpeg(rng, colour)
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(SmallCNN(num_classes=n_classes).state_dict(), buf)
    objects[f"{BUCKET}/weights/small_cnn.pt"] = buf.getvalue()
    fs.pipe(objects)
    return later


def config(n_classes: int) -> dict:
    s3 = f"s3://{BUCKET}"
    return {
        "data": {"source": "imagefolder", "train": f"{s3}/data/train", "val": f"{s3}/data/val",
                 "preprocess": {"resize": SIZE, "crop": SIZE, "mean": MEAN, "std": STD}},
        "backbone": {"arch": "protonmf:small_cnn", "weights": f"{s3}/weights/small_cnn.pt", "num_classes": n_classes},
        "prototypes": {"p": [3], "classes_per_task": 8},
        "compute": {"batch_size": 64},
        "storage": {"features": f"{s3}/weekly/features", "model": f"{s3}/weekly/model"},
        "evaluation": {"report": False},
    }


def run(argv: list[str], env: dict[str, str], server: CountingMotoServer) -> dict:
    before = Counter(server.requests)
    start = time.perf_counter()
    proc = subprocess.run(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}")
    requests = {k: server.requests[k] - before.get(k, 0) for k in KINDS}
    requests["all"] = sum(requests.values())
    m = re.search(r"^work: +(\d+) classes extracted, (\d+) groups fitted", proc.stdout, re.M)
    work = {"classes_extracted": int(m.group(1)), "groups_fitted": int(m.group(2))}
    return {"wall_s": round(wall, 2), "stages_s": flow_stages(proc.stdout), "work": work, "s3_requests": requests}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=8)
    parser.add_argument("--added", type=int, default=3, help="training images added to class 0 before the third run")
    parser.add_argument("--name", default="scheduled_reruns", help="results/<name>.json")
    args = parser.parse_args()

    import s3fs
    import yaml

    from _common import save

    work = Path(tempfile.mkdtemp(prefix="protonmf-scheduled-"))
    server = CountingMotoServer(kind)
    runs: dict[str, dict] = {}
    try:
        os.environ.update(s3_env(server.url))
        later = write_data(args.classes, args.per_class, args.added)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
        env.update(s3_env(server.url), PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
        subprocess.run([sys.executable, "-c", "from prefect import flow; flow(name='warm-up')(lambda: 1)()"], cwd=ROOT,
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        path = work / "weekly.yaml"
        path.write_text(yaml.safe_dump(config(args.classes)))
        argv = [sys.executable, "-m", "flows.cli", "run", str(path)]
        for name in ("first", "unchanged", "grown", "verify"):
            if name == "grown":
                s3fs.S3FileSystem(skip_instance_cache=True).pipe(later)
            runs[name] = run(argv + (["--verify"] if name == "verify" else []), env, server)
            print(f"{name}: {json.dumps(runs[name])}", file=sys.stderr)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
    save(args.name, {"classes": args.classes, "train_images_per_class": args.per_class, "added_to_class_0": args.added,
                     "classes_per_group": 8, "runs": runs})


if __name__ == "__main__":
    main()
