"""Benchmark 8: the extraction stage against the loop a user would write instead, whole processes.

Both sides get the same 600 JPEGs (224 px, 6 classes × 100, written once by this script; ``--classes``
for more), the same
checkpoint (a torchvision resnet18 at random init, saved once) and the same preprocessing (resize
256, centre crop 224, ImageNet normalisation), and both produce one float16 array of layer4
features per class:

- **loop**: ``torchvision.datasets.ImageFolder`` + ``DataLoader(num_workers=2)`` + the network up to
  layer4 in the main process + ``numpy.save`` of one float16 array per class;
- **stage**: what ``protonmf run`` does before fitting, without Prefect: start Ray on this
  machine, prepare (pin the weights, list the images into the dataset index, open the feature
  store) and extract on Ray (``tasks.extract.extract_features``) into a fresh feature store.

Each side runs as its own process (``--run loop|stage``), alternately, ``--rounds`` times; the table
gives the median wall time of the whole process (interpreter start, imports and Ray's start
included), images per second over it, and the ratio loop time / stage time pair by pair.

    .venv/bin/python benchmarks/extract_vs_dataloader.py [--rounds 5] [--set compute.channels_last=true ...]
        [--join-ray]

``--join-ray`` starts Ray once in this process and has each stage process join it (``compute.ray_address``),
as a run joins its cluster: Ray's own start is then not in the stage's time (it idles beside both sides).

``--set`` goes to the stage's config (e.g. ``compute.precision=bfloat16``); ``--loop-autocast``
puts the loop's forward pass under the same bfloat16 autocast, for an equal comparison.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PER_CLASS, SIZE = 100, 224
MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def prepare(work: Path, n_classes: int) -> None:
    """Write the JPEGs and the checkpoint once."""
    import numpy as np
    import torch
    import torchvision
    from PIL import Image

    from protonmf.demo.synthetic import make_synthetic_parts

    if (work / "resnet18.pt").exists():
        return
    data = make_synthetic_parts(n_classes, PER_CLASS, image_size=SIZE, seed=0)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        folder = work / "train" / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(img)).save(folder / f"{i:06d}.jpg", quality=90)
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=n_classes).state_dict(), work / "resnet18.pt")


def run_loop(work: Path, out: Path, autocast: bool) -> int:
    import numpy as np
    import torch
    import torchvision
    from torchvision import transforms as T

    dataset = torchvision.datasets.ImageFolder(
        str(work / "train"), transform=T.Compose([T.Resize(256), T.CenterCrop(224), T.ToTensor(), T.Normalize(MEAN, STD)]))
    loader = torch.utils.data.DataLoader(dataset, batch_size=64, num_workers=2)
    model = torchvision.models.resnet18(num_classes=len(dataset.classes))
    model.load_state_dict(torch.load(work / "resnet18.pt", weights_only=True))
    body = torch.nn.Sequential(*list(model.children())[:-2]).eval()  # up to layer4
    per_class: dict[int, list] = {k: [] for k in range(len(dataset.classes))}
    with torch.no_grad():
        for x, y in loader:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                F = body(x)
            F = F.float().permute(0, 2, 3, 1).to(torch.float16)
            for k in y.unique().tolist():
                per_class[k].append(F[y == k])
    out.mkdir(parents=True)
    for k, parts in per_class.items():
        np.save(out / f"c{k:05d}.npy", torch.cat(parts).numpy())
    return len(dataset)


def run_stage(work: Path, out: Path, overrides: list[str]) -> int:
    from protonmf.config import parse_config
    from protonmf.pipeline import Run
    from tasks.extract import extract_features
    from tasks.prepare import prepare_run
    from tasks.runtime import ray_session

    run = Run(parse_config({
        "data": {"source": "imagefolder", "train": str(work / "train")},
        "backbone": {"arch": "torchvision:resnet18", "weights": str(work / "resnet18.pt"),
                     "num_classes": len(list((work / "train").iterdir()))},
        "compute": {"batch_size": 64},
        "storage": {"features": str(out / "features"), "model": str(out / "model")},
    }, overrides))
    with ray_session(run):
        rows = extract_features(prepare_run(run))
    return sum(r.n_images for r in rows)


def _child(argv: list[str], work: Path) -> float:
    """Run one side as a whole process; its wall seconds."""
    out = work / f"out-{uuid.uuid4().hex[:8]}"
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, *argv, "--work", str(work), "--out", str(out)], check=True, cwd=ROOT,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    shutil.rmtree(out, ignore_errors=True)
    return wall


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--run", choices=["loop", "stage"], help="run one side (what the benchmark times)")
    parser.add_argument("--classes", type=int, default=6, help="classes of 100 images each (default 6: 600 images)")
    parser.add_argument("--work", help="where the images and the checkpoint are written once (default: a folder in /tmp)")
    parser.add_argument("--out")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a key of the stage's config")
    parser.add_argument("--loop-autocast", action="store_true", help="the loop's forward pass under bfloat16 autocast")
    parser.add_argument("--join-ray", action="store_true", help="start Ray here once; stage processes join it")
    parser.add_argument("--name", default="extract_vs_dataloader", help="results/<name>.json")
    args = parser.parse_args()
    work = Path(args.work or os.path.join(os.environ.get("TMPDIR", "/tmp"), f"protonmf-extract-vs-loop-{args.classes}"))
    if args.run:
        if not (work / "resnet18.pt").exists():
            raise SystemExit(f"{work} has no images yet: run this script without --run once")
        out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="protonmf-evl-")) / "out"
        try:
            n = run_loop(work, out, args.loop_autocast) if args.run == "loop" else run_stage(work, out, args.set)
        finally:
            if not args.out:
                shutil.rmtree(out.parent, ignore_errors=True)
        print(f"{args.run}: {n} images", file=sys.stderr)
        return

    sys.path.insert(0, str(Path(__file__).parent))
    from _common import save

    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.classes)
    settings = list(args.set)
    if args.join_ray:
        import ray

        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
        settings.append(f"compute.ray_address={ray.get_runtime_context().gcs_address}")
    sides = {
        "loop": ["--run", "loop"] + (["--loop-autocast"] if args.loop_autocast else []),
        "stage": ["--run", "stage"] + [a for s in settings for a in ("--set", s)],
    }
    _child(sides["loop"], work)  # warm-up: page cache, compiled kernels on disk
    times: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(args.rounds):
        for name, argv in sides.items():
            times[name].append(_child(argv, work))
    n = args.classes * PER_CLASS
    result: dict = {"images": n, "rounds": args.rounds, "stage_settings": args.set, "loop_autocast": args.loop_autocast,
                    "stage_joins_running_ray": args.join_ray}
    for name, runs in times.items():
        wall = statistics.median(runs)
        result[name] = {"wall_s_median": round(wall, 2), "wall_s_min": round(min(runs), 2),
                        "wall_s_max": round(max(runs), 2), "images_per_s": round(n / wall, 1)}
    ratios = [loop / stage for loop, stage in zip(times["loop"], times["stage"])]
    result["stage_speed_over_loop_median"] = round(statistics.median(ratios), 3)
    save(args.name, result)


if __name__ == "__main__":
    main()
