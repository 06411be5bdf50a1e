"""Benchmark 7: the GPU smoke test and the GPU rows, on a machine with CUDA (issue #12).

Checks (the script exits 1 if one fails):

1. ``run``: ``protonmf run configs/demo.yaml --set compute.extract_gpus=1 --set compute.fit_gpus=1``:
   the whole flow with extraction, fit, evaluation and report on the GPU.
2. ``api``: the published model loaded with ``map_location="cuda"``: every model derived from it
   (``with_p``, ``with_mode``, ``intervene``, chains) has every tensor on CUDA; its logits of CPU
   images come back on the CPU and equal the black box's on the GPU (≤ 1e-4 × max |logit|);
   ``explain`` works and its heatmaps come back on the CPU.
3. ``evaluate``: ``protonmf evaluate MODEL --config configs/demo.yaml --device cuda --json OUT``:
   max |logit difference| ≤ 1e-4 × max |logit| and the model's top-1 is the black box's.
4. ``craft``: ``protonmf craft configs/demo.yaml --set compute.extract_gpus=1``.

Rows measured (each by its own benchmark script, whose JSON lands in ``results/`` as usual):

5. NMF of 1000 classes × 63,700 × 512 float16 (ImageNet's shape: 1,300 images × 7 × 7 per class),
   p ∈ {1, 3, 5, 10} in one pass vs one call per p (``nmf_sweep.py --device cuda --classes 1000
   --rows 63700 --group 50``).
6. Extraction images/s of torchvision resnet34 (random init) at 224 px, float32 and bfloat16 +
   channels_last (``extract_throughput.py``): forward alone and the whole stage.

A table is printed at the end and written to ``results/gpu_smoke.json``. Without CUDA the script
stops at once with exit status 2 and says so.

``--device cpu`` runs the same checks and benchmarks on the CPU at tiny sizes (the demo at 20
images per class and p = 3, NMF of 4 classes × 490 rows, extraction of 16 images by resnet18), its results
in the output folder, not ``results/``: the tests run it so, so that it cannot rot while no GPU
machine is at hand.

    .venv/bin/python benchmarks/gpu_smoke.py [--out DIR] [--nmf-classes 1000] [--images 2048] [--skip-bench]
    .venv/bin/python benchmarks/gpu_smoke.py --device cpu
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo.yaml")
DEVICE = "cuda"  # --device
#: The demo at tiny sizes, for --device cpu
QUICK = ["data.max_images_per_class=20", "data.val_images_per_class=5", "prototypes.p=[3]"]


def cli(*args: str) -> None:
    """``protonmf ARGS`` in a child process; raises with the tail of its output if it fails."""
    done = subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"protonmf {' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")


def script(name: str, *args: str) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / name), *args], cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{name} {' '.join(args)} exited {done.returncode}:\n{(done.stdout + done.stderr)[-3000:]}")


def storage(out: Path) -> list[str]:
    quick = QUICK if DEVICE == "cpu" else []
    return [a for s in [f"storage.features={out}/features", f"storage.model={out}/model",
                        f"storage.concepts={out}/concepts", *quick] for a in ("--set", s)]


def gpus() -> str:
    return "1" if DEVICE == "cuda" else "0"


def check_run(out: Path) -> str:
    from protonmf.artifact import current_manifest

    cli("run", CONFIG, *storage(out), "--set", f"compute.extract_gpus={gpus()}", "--set", f"compute.fit_gpus={gpus()}")
    version = (current_manifest(str(out / "model")) or {}).get("version")
    if version is None or not (out / "model" / "versions" / version / "report" / "index.html").is_file():
        raise RuntimeError("the flow published no model with its report")
    return f"flow done on the {DEVICE}: model and report written"


@torch.no_grad()
def check_api(out: Path) -> str:
    from protonmf import PrototypeModel
    from protonmf.config import load_config
    from protonmf.data import load_images
    from protonmf.pipeline import Run

    run = Run(load_config(CONFIG, storage(out)[1::2]))
    model = PrototypeModel.load(str(out / "model"), map_location=DEVICE)
    variants = {"model": model}
    for p in model.available_p:
        variants[f"with_p({p})"] = model.with_p(p)
        variants[f"with_p({p}).with_mode(nmf_only).intervene"] = model.with_p(p).with_mode("nmf_only").intervene({0: [0]})
    first = model.available_p[0]
    variants[f"with_mode(residual_only).with_p({first})"] = model.with_mode("residual_only").with_p(first)
    for name, m in variants.items():
        off = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.device.type != DEVICE]
        if off:
            raise RuntimeError(f"{name}: not on {DEVICE}: {off[:5]}")
    val = run.source("val")
    images, _ = load_images(val, run.preprocess, val.records[:64], workers=0)  # CPU images
    black_box = model.backbone.head_logits(model.backbone(images.to(DEVICE)))
    worst = 0.0
    for p in model.available_p:
        logits = model.with_p(p)(images)
        if logits.device.type != "cpu":
            raise RuntimeError(f"p = {p}: logits of CPU images came back on {logits.device}")
        worst = max(worst, float((logits - black_box.cpu()).abs().max()) / float(black_box.abs().max()))
    if worst > 1e-4:
        raise RuntimeError(f"logits differ from the black box's by {worst:.2e} of max |logit|")
    exp = model.explain(images[:8])
    if exp.heatmaps.device.type != "cpu" or not torch.isfinite(exp.residual_heatmap).all():
        raise RuntimeError("explain: heatmaps not on the CPU or not finite")
    return f"{len(variants)} derived models on {DEVICE}; max |logit diff| {worst:.1e} of max |logit|, every p"


def check_evaluate(out: Path) -> str:
    path = out / "evaluation.json"
    cli("evaluate", str(out / "model"), "--config", CONFIG, *storage(out), "--device", DEVICE, "--json", str(path))
    ev = json.loads(path.read_text())
    if ev["max_abs_logit_diff"] > 1e-4 * ev["max_abs_logit"] or ev["top1_prototype"] != ev["top1_black_box"]:
        raise RuntimeError(f"evaluation disagrees with the black box: {ev['max_abs_logit_diff']:.2e}, "
                           f"top-1 {ev['top1_prototype']} vs {ev['top1_black_box']}")
    return (f"{ev['n_images']} images: top-1 {ev['top1_prototype']:.4f} = black box, "
            f"max |logit diff| {ev['max_abs_logit_diff']:.1e}")


def check_craft(out: Path) -> str:
    from protonmf.craft.artifact import ConceptSet

    cli("craft", CONFIG, *storage(out), "--set", f"compute.extract_gpus={gpus()}")
    manifest = ConceptSet.read_manifest(str(out / "concepts"))
    return f"concepts published ({len(manifest.get('files', {}))} files)"


def bench_nmf(classes: int, n_rows: int) -> list[tuple[str, str]]:
    from _common import RESULTS

    script("nmf_sweep.py", "--device", DEVICE, "--classes", str(classes), "--rows", str(n_rows), "--group", "50", "--repeat", "1")
    r = json.loads((RESULTS / f"nmf_sweep_{DEVICE}.json").read_text())
    rows = []
    for mode in ("fixed_iterations", "paper_stopping_rule"):
        m = r[mode]
        per_p = ", ".join(f"p={p} {t:.1f}" for p, t in m["separate_seconds_per_p"].items())
        rows.append((f"NMF {classes} × {n_rows:,} × 512 fp16, {mode.replace('_', ' ')}",
                     f"sweep {m['sweep_seconds']:.1f} s vs separate {m['separate_seconds']:.1f} s ({per_p}): {m['speedup']}×"))
    return rows


def bench_extract(images: int) -> list[tuple[str, str]]:
    from _common import RESULTS

    arch = "torchvision:resnet34" if DEVICE == "cuda" else "torchvision:resnet18"  # tiny on the CPU
    rows = []
    for flags, name in (([], f"extract_throughput_{DEVICE}"),
                        (["--precision", "bfloat16", "--channels-last"], f"extract_throughput_{DEVICE}_bfloat16_nhwc")):
        script("extract_throughput.py", "--arch", arch, "--images", str(images), "--batch", "128", "--workers", "8", *flags)
        r = json.loads((RESULTS / f"{name}.json").read_text())
        label = "bfloat16 + channels_last" if flags else "float32"
        rows.append((f"extraction {arch.split(':')[1]} 224 px, {label}",
                     f"forward {r['forward_images_per_s']} img/s, whole stage {r['pipeline_images_per_s']} img/s "
                     f"(decode {r['decode_images_per_s']} img/s, {r['bound']}-bound)"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="where the demo's store, model and concepts go (default: a new temporary folder)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                        help="cpu: the same checks at tiny sizes, results in the output folder")
    parser.add_argument("--nmf-classes", type=int)
    parser.add_argument("--nmf-rows", type=int)
    parser.add_argument("--images", type=int, help="images of the extraction benchmark")
    parser.add_argument("--skip-bench", action="store_true", help="only the checks")
    args = parser.parse_args()
    global DEVICE
    DEVICE = args.device
    small = DEVICE == "cpu"
    nmf_classes = args.nmf_classes or (4 if small else 1000)
    nmf_rows = args.nmf_rows or (490 if small else 63700)
    images = args.images or (16 if small else 2048)
    if DEVICE == "cuda" and not torch.cuda.is_available():
        print(f"gpu_smoke: no CUDA device here (torch {torch.__version__}, CUDA build {torch.version.cuda}, "
              f"device count {torch.cuda.device_count()}): this script needs a GPU machine", file=sys.stderr)
        return 2
    out = Path(args.out or tempfile.mkdtemp(prefix="protonmf-gpu-smoke-")).resolve()
    if small:  # the child scripts' results too
        os.environ["PROTONMF_BENCH_RESULTS"] = str(out / "results")
    from _common import save
    rows: list[dict] = []
    failed = False
    checks = [("run", check_run), ("api", check_api), ("evaluate", check_evaluate), ("craft", check_craft)]
    for name, check in checks:
        start = time.perf_counter()
        try:
            result, ok = check(out), True
        except Exception as err:  # noqa: BLE001 - every check is reported, then the exit status says
            result, ok = f"{type(err).__name__}: {err}", False
            failed = True
        rows.append({"step": name, "ok": ok, "result": result, "seconds": round(time.perf_counter() - start, 1)})
    if not args.skip_bench:
        for bench, bench_args in ((bench_nmf, (nmf_classes, nmf_rows)), (bench_extract, (images,))):
            start = time.perf_counter()
            try:
                measured, ok = bench(*bench_args), True
            except Exception as err:  # noqa: BLE001
                measured, ok = [(bench.__name__, f"{type(err).__name__}: {err}")], False
                failed = True
            seconds = round(time.perf_counter() - start, 1)
            rows += [{"step": step, "ok": ok, "result": text, "seconds": seconds} for step, text in measured]
    save("gpu_smoke", {"out": str(out), "rows": rows})
    width = max(len(r["step"]) for r in rows)
    print(f"\n{'step':<{width}}  ok    seconds  result")
    for r in rows:
        print(f"{r['step']:<{width}}  {'yes' if r['ok'] else 'NO ':<4}  {r['seconds']:>7}  {r['result'].splitlines()[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
