"""Benchmark 9: the whole flow at ImageNet's class count on S3, against a plain one-process script.

This script starts a moto S3 server (server mode, as ``tests/conftest.py`` does; it counts every
request) and writes into one bucket 1000 classes of small JPEGs (``--classes``, ``--per-class``
training images of 32 px and one held-out image per class) and a checkpoint of the demo network
(``protonmf:small_cnn``, 1000 classes, random init, seed 0). Then it times, each as a whole
process (interpreter start, imports, Ray's and Prefect's start included), run in turn:

- **flow**: ``protonmf run CONFIG`` (the CLI, as ``python -m flows.cli run CONFIG``; Prefect's default set-up: no ``PREFECT_API_URL``, so
  the flow runs against Prefect's ephemeral API, a temporary local server, with a ``PREFECT_HOME``
  of this benchmark's own; Ray started locally by the run), storage on the moto bucket: prepare
  (pin the weights, list both splits into the dataset index, open the feature store), extract,
  fit (p = 3, no prototype gallery: the script makes none), publish, evaluate (on: the held-out images, report and reconstruction study off);
- **script**: what a user would write instead, in one process: list the bucket with s3fs, read
  every image (``fs.cat``), decode and crop with PIL and the same transform, forward with torch up
  to ``layer4`` in batches of 256, per-class NMF with ``protonmf.nmf.nmf`` (all classes in one
  batched call, p = 3, the same stopping rule and seed), the head by least squares
  (``torch.linalg.lstsq``: C_c = argmin ‖V_c − C B_c‖², R_c = V_c − C_c B_c, b'_i = b_i + R_c/Σa),
  the same evaluation on the held-out images (black box and prototype logits, top-1), and the
  prototypes written back to the bucket as one safetensors file.

Both sides read the same objects with the same settings; each flow round writes a fresh feature
store and model (nothing is resumed). Reported per side: median wall time over the rounds, the
peak resident memory of the process tree (RSS of the process and all its descendants summed,
sampled every 0.2 s: Ray's and Prefect's processes count; shared pages count once per process,
so it over-counts), the S3 requests it sent by method, and the machine's load average when it
started. The flow's per-stage times are its own (the ``Timings (s):`` line of its run summary);
the script prints its own.

    .venv/bin/python benchmarks/flow_vs_script_1000.py [--rounds 3] [--classes 1000] [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "bench1000"
SIZE = 32
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]
P, MAX_ITER, TOL, SEED, BATCH = 3, 200, 1e-4, 0, 256


# ---------------------------------------------------------------------------------------------
# the S3 endpoint and the data
# ---------------------------------------------------------------------------------------------


def method_kind(method: str, path: str, query: str) -> str:
    """A request's kind: LIST for a listing, else its method."""
    return "LIST" if method == "GET" and ("list-type" in query or "prefix=" in query) else method


class CountingMotoServer:
    """moto in server mode on 127.0.0.1 (a free port), counting requests by ``kind(method, path,
    query)`` (default :func:`method_kind`)."""

    def __init__(self, kind=method_kind):
        from moto.moto_server.threaded_moto_server import ThreadedMotoServer
        from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
        from werkzeug.serving import make_server
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        self.requests: Counter = Counter()
        counts = self.requests

        class Server(ThreadedMotoServer):
            def _server_entry(self) -> None:
                app = DomainDispatcherApplication(create_backend_app)

                def counted(environ, start_response):
                    counts[kind(environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""))] += 1
                    return app(environ, start_response)

                self._server = make_server(self._ip_address, self._port, counted, True, request_handler=MotoRequestHandler)
                self._server_ready_event.set()
                self._server.serve_forever()

        self._server = Server(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        self.url = f"http://127.0.0.1:{self._server._server.server_port}"

    def stop(self) -> None:
        self._server.stop()


def s3_env(url: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": url, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1"}


def write_data(n_classes: int, per_class: int) -> int:
    """The JPEGs (train: ``per_class`` per class, val: 1 per class) and the checkpoint; objects written."""
    import numpy as np
    import s3fs
    import torch
    from PIL import Image

    from protonmf.backbones.nets import SmallCNN

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(BUCKET)
    rng = np.random.default_rng(0)
    objects: dict[str, bytes] = {}
    for k in range(n_classes):
        colour = rng.integers(0, 256, 3)
        for split, n in (("train", per_class), ("val", 1)):
            for i in range(n):
                # a class colour in a random square on noise: small files, distinct classes
                img = rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8) // 2
                y, x = rng.integers(0, SIZE // 2, 2)
                img[y:y + SIZE // 2, x:x + SIZE // 2] = colour
                buf = io.BytesIO()
                Image.fromarray(img).save(buf, format="JPEG", quality=90)
                objects[f"{BUCKET}/data/{split}/n{k:05d}/{i:02d}.jpg"] = buf.getvalue()
    torch.manual_seed(0)
    buf = io.BytesIO()
    torch.save(SmallCNN(num_classes=n_classes).state_dict(), buf)
    objects[f"{BUCKET}/weights/small_cnn.pt"] = buf.getvalue()
    fs.pipe(objects)  # concurrent PUTs
    return len(objects)


def flow_config(run: str, n_classes: int) -> dict:
    s3 = f"s3://{BUCKET}"
    return {
        "data": {"source": "imagefolder", "train": f"{s3}/data/train", "val": f"{s3}/data/val",
                 "preprocess": {"resize": SIZE, "crop": SIZE, "mean": MEAN, "std": STD}},
        "backbone": {"arch": "protonmf:small_cnn", "weights": f"{s3}/weights/small_cnn.pt", "num_classes": n_classes},
        # no gallery (on by default: the images of each prototype's largest E entries read again), as
        # the script makes none
        "prototypes": {"p": [P], "max_iter": MAX_ITER, "tol": TOL, "seed": SEED, "gallery": 0},
        "compute": {"batch_size": BATCH},
        "storage": {"features": f"{s3}/runs/{run}/features", "model": f"{s3}/runs/{run}/model"},
        "evaluation": {"report": False, "reconstruction_classes": 0},
    }


# ---------------------------------------------------------------------------------------------
# the plain script (run as its own process with --run script)
# ---------------------------------------------------------------------------------------------


def run_script(out_prefix: str) -> dict:
    """What a user would write: list, read, decode, forward, NMF, least squares head, evaluate, save."""
    clock: dict[str, float] = {}
    t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        clock[name] = round(now - t, 2)
        t = now

    import s3fs
    import torch
    from PIL import Image
    from safetensors.torch import save as save_safetensors
    from torchvision.transforms import InterpolationMode, v2

    from protonmf.backbones.nets import SmallCNN
    from protonmf.nmf import nmf

    lap("imports")
    fs = s3fs.S3FileSystem()
    splits = {}
    for split in ("train", "val"):
        paths = sorted(p for p in fs.find(f"{BUCKET}/data/{split}") if p.endswith(".jpg"))
        classes = sorted({p.split("/")[-2] for p in paths})
        label = {c: k for k, c in enumerate(classes)}
        splits[split] = (paths, [label[p.split("/")[-2]] for p in paths], classes)
    lap("list")
    model = SmallCNN(num_classes=len(splits["train"][2]))
    model.load_state_dict(torch.load(io.BytesIO(fs.cat_file(f"{BUCKET}/weights/small_cnn.pt")), weights_only=True))
    model.eval()
    body = torch.nn.Sequential(model.stem, model.layer1, model.layer2, model.layer3, model.layer4)
    V, bias = model.fc.weight.detach().double(), model.fc.bias.detach().double()
    crop = v2.Compose([v2.Resize(SIZE, interpolation=InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(SIZE),
                       v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(MEAN, STD)])
    images = {}
    for split, (paths, _, _) in splits.items():
        blobs = fs.cat(paths)  # concurrent GETs
        images[split] = torch.stack([crop(Image.open(io.BytesIO(blobs[p])).convert("RGB")) for p in paths])
    lap("read_decode")

    def features(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.cat([body(b) for b in x.split(BATCH)]).permute(0, 2, 3, 1)  # (n, h, w, D)

    F = features(images["train"]).to(torch.float16)
    lap("forward")
    labels = torch.tensor(splits["train"][1])
    K, (n, _, _, D) = len(splits["train"][2]), F.shape
    per_class = [F[labels == k].reshape(-1, D) for k in range(K)]
    rows = torch.tensor([a.shape[0] for a in per_class])
    A = torch.zeros(K, int(rows.max()), D, dtype=torch.float16)
    for k, a in enumerate(per_class):
        A[k, : a.shape[0]] = a
    res = nmf(A, P, max_iter=MAX_ITER, tol=TOL, seed=SEED, n_rows=rows)
    lap("nmf")
    B = res.B.double()  # (K, p, D)
    C = torch.linalg.lstsq(B.transpose(1, 2), V.unsqueeze(2)).solution.squeeze(2)  # (K, p): eq. 4
    R = V - (C.unsqueeze(1) @ B).squeeze(1)  # eq. 5
    B_aug = B + (R / C.sum(1, keepdim=True)).unsqueeze(1)  # eq. 8
    lap("head")
    Fv = features(images["val"]).double().mean((1, 2))  # mean_hw(F), (m, D)
    black_box = Fv @ V.T + bias
    # Σ_i a_i mean_hw(F) b'_iᵀ + bias for every class (eq. 7–8)
    prototype = torch.einsum("md,kpd,kp->mk", Fv, B_aug, C) + bias
    y = torch.tensor(splits["val"][1])
    result = {"top1_black_box": float((black_box.argmax(1) == y).double().mean()),
              "top1_prototype": float((prototype.argmax(1) == y).double().mean()),
              "max_abs_logit_diff": float((prototype - black_box).abs().max()),
              "mean_relative_error": float(res.error.mean()), "mean_iterations": float(res.n_iter.double().mean())}
    lap("evaluate")
    fs.pipe_file(f"{out_prefix}/prototypes_p{P}.safetensors", save_safetensors(
        {"B": res.B.float().contiguous(), "C": C.contiguous(), "R": R.contiguous(), "B_aug": B_aug.contiguous()}))
    lap("save")
    return {"timings": clock, "images": int(n), "classes": K, **result}


# ---------------------------------------------------------------------------------------------
# timing whole processes
# ---------------------------------------------------------------------------------------------


def _tree_rss(proc) -> int:
    import psutil

    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def timed_process(argv: list[str], env: dict[str, str], server: CountingMotoServer) -> dict:
    """Run ``argv`` to its end; wall seconds, peak RSS of its process tree, S3 requests, its output."""
    import psutil

    before = Counter(server.requests)
    load = os.getloadavg()
    start = time.perf_counter()
    proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps = psutil.Process(proc.pid)
    peak = 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        try:
            peak = max(peak, _tree_rss(ps))
        except psutil.Error:
            pass
        time.sleep(0.2)
    wall = time.perf_counter() - start
    reader.join()
    text = "".join(output)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{text[-6000:]}")
    requests = {k: v - before.get(k, 0) for k, v in server.requests.items() if v - before.get(k, 0)}
    return {"wall_s": round(wall, 2), "peak_rss_mib": round(peak / 2**20), "s3_requests": requests,
            "load_before": [round(x, 2) for x in load], "output": text}


def flow_stages(output: str) -> dict[str, float]:
    """The flow's own per-step seconds, from the ``Timings (s): prepare 1.0, extract 2.0, ...`` line of its summary."""
    m = re.search(r"Timings \(s\): ([^\n]*)", output)
    if not m:
        return {}
    return {name: float(v) for name, v in (part.strip().rsplit(" ", 1) for part in m.group(1).split(","))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", choices=["script"], help="run the plain script (what the benchmark times)")
    parser.add_argument("--out-prefix")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--per-class", type=int, default=3, help="training images per class (default 3)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a key of the flow's config")
    parser.add_argument("--name", default="flow_vs_script_1000", help="results/<name>.json")
    parser.add_argument("--no-warm-up", action="store_true", help="skip the untimed first run of each side")
    args = parser.parse_args()
    if args.run:
        print("SCRIPT_RESULT " + json.dumps(run_script(args.out_prefix)))
        return

    sys.path.insert(0, str(Path(__file__).parent))
    import yaml

    from _common import save

    work = Path(tempfile.mkdtemp(prefix="protonmf-flow-vs-script-"))
    server = CountingMotoServer()
    try:
        os.environ.update(s3_env(server.url))
        t = time.perf_counter()
        n_objects = write_data(args.classes, args.per_class)
        print(f"wrote {n_objects} objects in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "RAY_ADDRESS"))}
        env.update(s3_env(server.url), PREFECT_HOME=str(work / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false",
                   RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")  # a fresh database under load
        # the CLI's entry point (``protonmf = flows.cli:main``) run from this checkout: an installed
        # ``protonmf`` script may belong to another checkout
        protonmf = [sys.executable, "-m", "flows.cli"]

        def flow_argv() -> list[str]:
            path = work / f"config-{uuid.uuid4().hex[:8]}.yaml"
            path.write_text(yaml.safe_dump(flow_config(path.stem, args.classes)))
            return [*protonmf, "run", str(path), *[a for s in args.set for a in ("--set", s)]]

        def script_argv() -> list[str]:
            return [sys.executable, __file__, "--run", "script", "--out-prefix", f"{BUCKET}/script/{uuid.uuid4().hex[:8]}"]

        sides = {"flow": flow_argv, "script": script_argv}
        # Prefect's database made before the clock, as on any machine where Prefect ran before
        subprocess.run([sys.executable, "-c", "from prefect import flow; flow(name='warm-up')(lambda: 1)()"], cwd=ROOT,
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not args.no_warm_up:  # page cache, compiled kernels on disk
            timed_process(script_argv(), env, server)
            timed_process(flow_argv(), env, server)
        runs: dict[str, list[dict]] = {name: [] for name in sides}
        for r in range(args.rounds):
            for name, argv in sides.items():
                run = timed_process(argv(), env, server)
                out = run.pop("output")
                if name == "flow":
                    run["stages_s"] = flow_stages(out)
                else:
                    line = next(x for x in out.splitlines() if x.startswith("SCRIPT_RESULT "))
                    run["script"] = json.loads(line.split(" ", 1)[1])
                print(f"round {r + 1} {name}: {json.dumps(run)}", file=sys.stderr)
                runs[name].append(run)
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)

    result: dict = {"classes": args.classes, "train_images_per_class": args.per_class, "val_images_per_class": 1,
                    "image_px": SIZE, "backbone": "protonmf:small_cnn (random init, seed 0)", "p": P,
                    "rounds": args.rounds, "flow_settings": args.set,
                    "prefect": "ephemeral API (no PREFECT_API_URL), PREFECT_HOME of the benchmark's own",
                    "evaluation": "on (held-out top-1, Table 3 at p=3, interventions; report and reconstruction study off)"}
    for name, rs in runs.items():
        walls = [r["wall_s"] for r in rs]
        result[name] = {"wall_s_median": round(statistics.median(walls), 2), "wall_s_min": min(walls), "wall_s_max": max(walls),
                        "peak_rss_mib_max": max(r["peak_rss_mib"] for r in rs), "runs": rs}
    stages = [r["stages_s"] for r in runs["flow"] if r.get("stages_s")]
    if stages:
        result["flow"]["stages_s_median"] = {k: round(statistics.median(s[k] for s in stages), 2) for k in stages[0]}
    ratios = [f["wall_s"] / s["wall_s"] for f, s in zip(runs["flow"], runs["script"])]
    result["flow_over_script_median"] = round(statistics.median(ratios), 2)
    save(args.name, result)


if __name__ == "__main__":
    main()
