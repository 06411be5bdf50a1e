"""Benchmark 3: images/s of the extraction stage vs its parts.

Writes an ImageFolder of JPEGs (synthetic scenes at 320 px, ImageNet-like sizes), then measures
on the same images: decode + preprocess alone (per worker thread), the backbone's forward pass
alone on pre-decoded tensors, and the whole stage (decode + preprocess + forward + Zarr write,
``protonmf.extract.extract_classes``). The pipeline is decode-bound when its rate is close to the
decode rate and well below the forward rate.

    .venv/bin/python benchmarks/extract_throughput.py [--arch torchvision:resnet18] [--images 256]
        [--precision bfloat16] [--channels-last]     # the GPU worker's settings (compute.precision, ...)
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from PIL import Image

from _common import save, timed
from protonmf import BackboneSpec, build_backbone
from protonmf.data import Preprocess, iter_batches, make_source
from protonmf.data.extract import extract_classes
from protonmf.pipeline.staging import run_key
from protonmf.data.store import FeatureStore
from protonmf.demo.synthetic import make_synthetic_parts


def write_jpegs(root: Path, n: int, classes: int = 4) -> None:
    data = make_synthetic_parts(classes, n // classes, image_size=320, seed=0)
    for i, (img, label) in enumerate(zip(data.images, data.labels)):
        folder = root / f"class{int(label)}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(folder / f"{i:06d}.jpg", quality=90)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="torchvision:resnet18")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--channels-last", action="store_true")
    args = parser.parse_args()
    layout = torch.channels_last if args.channels_last else torch.contiguous_format
    device = "cuda" if torch.cuda.is_available() else "cpu"
    work = Path(tempfile.mkdtemp(prefix="protonmf-extract-"))
    write_jpegs(work / "train", args.images)
    source = make_source("imagefolder", root=str(work / "train"))
    pre = Preprocess()  # ImageNet defaults: resize 256, crop 224
    backbone = build_backbone(BackboneSpec(args.arch, num_classes=len(source.classes))).to(device).eval()

    def decode_only():
        return sum(len(b) for b in iter_batches(source, pre, args.batch, workers=args.workers))

    n, t_decode = timed(decode_only)
    batch = torch.randn(args.batch, 3, 224, 224, device=device).to(memory_format=layout)
    if args.channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)

    @torch.no_grad()
    def forward_only():
        for _ in range(0, n, args.batch):
            with torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bfloat16"):
                backbone(batch)
        if device == "cuda":
            torch.cuda.synchronize()

    forward_only()  # warm up
    _, t_forward = timed(forward_only)
    with torch.no_grad():
        F = backbone(batch[:1])
    store = FeatureStore.create(str(work / "features"), key=run_key(b="bench"), class_names=source.classes,
                                grid=tuple(F.shape[1:3]), dim=F.shape[3], V=backbone.V.cpu(), bias=backbone.bias.cpu())
    _, t_pipeline = timed(extract_classes, backbone, source, pre, store, range(len(source.classes)),
                          batch_size=args.batch, workers=args.workers, device=device,
                          precision=args.precision, channels_last=args.channels_last)
    result = {
        "device": device, "arch": args.arch, "images": n, "batch": args.batch, "decode_workers": args.workers,
        "precision": args.precision, "channels_last": args.channels_last,
        "decode_images_per_s": round(n / t_decode, 1),
        "decode_images_per_s_per_worker": round(n / t_decode / args.workers, 1),
        "forward_images_per_s": round(n / t_forward, 1),
        "pipeline_images_per_s": round(n / t_pipeline, 1),
        "bound": "decode" if t_decode >= t_forward else "forward",
    }
    suffix = "" if args.precision == "float32" and not args.channels_last else f"_{args.precision}{'_nhwc' * args.channels_last}"
    save(f"extract_throughput_{device}{suffix}", result)


if __name__ == "__main__":
    main()
