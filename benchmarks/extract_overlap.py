"""Is the extraction stage the bottleneck once the forward pass costs nothing? With a stand-in
backbone whose forward costs ~0 (its output the shape of resnet34's ``layer4`` at 224 px:
(B, 7, 7, 512)), one extraction actor's work (``protonmf.data.extract.extract_decoded``: normalize,
forward, float16, the black box's top logits, the Zarr encoding, the checksums, the writes) on
classes already decoded, into a feature store on S3 (moto in server mode, in this process), with
every PUT delayed by ``--latency`` seconds (50 ms) or not at all.

Beside it, the plain ``DataLoader`` loop a user would write: per class, a ``DataLoader`` over its
decoded images, the same normalization and forward pass, then the class's features and labels
written to the same bucket (``fs.pipe_file`` of the float16 bytes and of a small JSON), one
after the other, before the next class.

Reported for each, with and without the latency: images/s, the seconds spent in the forward pass
(the stand-in's), and the seconds spent outside it. The stage's writes overlap the next classes'
forward passes (a pool of writer threads), so the latency should cost it little; the loop waits
for every PUT.

    .venv/bin/python benchmarks/extract_overlap.py [--classes 40] [--per-class 32] [--latency 0.05]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from _common import save

D, GRID, CROP = 512, 7, 224


class _Layer4(nn.Module):
    """(B, 3, 224, 224) → (B, 512, 7, 7) for ~nothing: one value per 32 × 32 block, repeated."""

    def forward(self, x):
        return F.avg_pool2d(x[:, :1], CROP // GRID).expand(-1, D, -1, -1)


class ZeroCostNet(nn.Module):
    def __init__(self, num_classes: int):
        super().__init__()
        self.layer4 = _Layer4()
        self.fc = nn.Linear(D, num_classes)

    def forward(self, x):
        return self.fc(self.layer4(x).mean((2, 3)))


class Timed(nn.Module):
    """The backbone with the seconds of its forward passes summed."""

    def __init__(self, backbone):
        super().__init__()
        self.inner, self.seconds = backbone, 0.0

    def forward(self, x):
        t = time.perf_counter()
        out = self.inner(x)
        self.seconds += time.perf_counter() - t
        return out

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.inner, name)


def delayed_puts(latency: float) -> None:
    """Every PUT of s3fs waits ``latency`` seconds first (the object store's answer time)."""
    import s3fs

    real = s3fs.S3FileSystem._pipe_file
    if getattr(real, "delayed", None) is not None:
        real = real.delayed

    async def pipe_file(self, path, data, *args, **kwargs):
        if latency:
            await asyncio.sleep(latency)
        return await real(self, path, data, *args, **kwargs)

    pipe_file.delayed = real
    s3fs.S3FileSystem._pipe_file = pipe_file


def stage(backbone, decoded, pre, uri: str) -> tuple[float, float]:
    from protonmf.data.extract import extract_decoded
    from protonmf.data.store import FeatureStore

    timed = Timed(backbone)
    store = FeatureStore.create(uri, key="bench", class_names=[f"c{k}" for k in range(len(decoded))], grid=(GRID, GRID),
                                dim=D, V=backbone.V, bias=backbone.bias)
    start = time.perf_counter()
    extract_decoded(timed, decoded, pre, store, batch_size=64, device="cpu")
    return time.perf_counter() - start, timed.seconds


def loop(backbone, decoded, pre, uri: str) -> tuple[float, float]:
    import s3fs
    from torch.utils.data import DataLoader, TensorDataset

    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    timed = Timed(backbone)
    start = time.perf_counter()
    with torch.no_grad():
        for d in decoded:
            feats, labels = [], []
            for (images,) in DataLoader(TensorDataset(d.images), batch_size=64):
                out = timed(pre.normalize(images))
                feats.append(out.to(torch.float16))
                labels += backbone.head_logits(out).argmax(1).tolist()
            fs.pipe_file(f"{uri}/c{d.k:05d}.bin", torch.cat(feats).numpy().tobytes())
            fs.pipe_file(f"{uri}/c{d.k:05d}.json", json.dumps(labels).encode())
    return time.perf_counter() - start, timed.seconds


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=40)
    parser.add_argument("--per-class", type=int, default=32)
    parser.add_argument("--latency", type=float, default=0.05, help="seconds added to every PUT")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs of each")
    args = parser.parse_args()

    import os

    import logging

    import s3fs
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise

    from protonmf.backbones.feature_backbone import FeatureBackbone
    from protonmf.data import Preprocess
    from protonmf.data.extract import DecodedClass

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{server._server.server_port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir("overlap")
    torch.manual_seed(0)
    backbone = FeatureBackbone.from_model(ZeroCostNet(args.classes), feature_layer="layer4", head="fc")
    pre = Preprocess(resize=CROP, crop=CROP)
    g = torch.Generator().manual_seed(0)
    decoded = [DecodedClass(k, torch.randint(0, 256, (args.per_class, 3, CROP, CROP), dtype=torch.uint8, generator=g),
                            [(f"{k}/{i}", f"mem://{k}/{i}", None) for i in range(args.per_class)])
               for k in range(args.classes)]
    n = args.classes * args.per_class
    rows = {}
    try:
        for name, fn in (("extraction stage", stage), ("DataLoader loop", loop)):
            for latency in (0.0, args.latency):
                delayed_puts(latency)
                best = None
                for r in range(args.rounds):
                    wall, forward = fn(backbone, decoded, pre, f"s3://overlap/{name.split()[0]}-{latency}-{r}")
                    best = (wall, forward) if best is None or wall < best[0] else best
                rows[f"{name}, PUT latency {latency * 1000:.0f} ms"] = {
                    "images_per_s": round(n / best[0]), "seconds": round(best[0], 2),
                    "forward_s": round(best[1], 2), "outside_forward_s": round(best[0] - best[1], 2)}
    finally:
        delayed_puts(0.0)
        server.stop()
    for name in ("extraction stage", "DataLoader loop"):
        plain, slow = rows[f"{name}, PUT latency 0 ms"], rows[f"{name}, PUT latency {args.latency * 1000:.0f} ms"]
        rows[f"{name}: throughput with latency / without"] = round(slow["images_per_s"] / plain["images_per_s"], 3)
    save("extract_overlap", {"classes": args.classes, "images_per_class": args.per_class, "image_px": CROP,
                             "features": f"(B, {GRID}, {GRID}, {D}) float16, resnet34 layer4's shape",
                             "latency_s": args.latency, "rounds": args.rounds, "rows": rows})


if __name__ == "__main__":
    main()
