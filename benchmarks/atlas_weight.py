"""The prototype atlas at ImageNet's size: its index, its largest page, its page count, its total
bytes and the seconds to write it, for a model of ``--classes`` classes with p ∈ {3, 1, 5, 10}
(the small CNN's head, prototypes fitted on random non-negative features) and ``--patches``
gallery patches of 32 px (random JPEGs) per prototype, without held-out heatmaps.

    .venv/bin/python benchmarks/atlas_weight.py [--classes 1000] [--patches 5]
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from PIL import Image

from _common import save
from protonmf import PrototypeModel
from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.backbones.nets import SmallCNN
from protonmf.prototypes.fit import fit_classes
from protonmf.prototypes.gallery import GALLERY_SCHEMA
from protonmf.viz.atlas import atlas_weights, write_atlas

PS = [3, 1, 5, 10]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--patches", type=int, default=5)
    args = parser.parse_args()
    K = args.classes
    torch.manual_seed(0)
    backbone = FeatureBackbone.from_model(SmallCNN(num_classes=K, width=8))
    fits = fit_classes([torch.rand(2, 4, 4, backbone.V.shape[1]) for _ in range(K)], backbone.V, backbone.bias, PS, max_iter=20)
    rng = np.random.default_rng(0)

    def jpeg() -> bytes:
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
        return buf.getvalue()

    patches = [jpeg() for _ in range(50)]
    rows: dict[str, list] = {n: [] for n in GALLERY_SCHEMA.names}
    for p in PS:
        for k in range(K):
            for i in range(p):
                for r in range(args.patches):
                    row = {"p": p, "class_idx": k, "prototype": i, "rank": r, "score": 1.0, "row": 0, "image_id": f"{k}/{r}",
                           "uri": f"s3://bucket/imagenet/train/n{k:08d}/{r}.JPEG", "x0": 0.0, "y0": 0.0, "x1": 32.0, "y1": 32.0,
                           "patch_jpeg": patches[(k + i + r) % 50], "cell_x0": 0.0, "cell_y0": 0.0, "cell_x1": 32.0, "cell_y1": 32.0}
                    for n in GALLERY_SCHEMA.names:
                        rows[n].append(row[n])
    model = PrototypeModel.from_prototypes(backbone, [fits[p] for p in PS], [f"n{k:08d} some ImageNet class name" for k in range(K)],
                                           gallery=pa.table(rows, schema=GALLERY_SCHEMA))
    out = Path(tempfile.mkdtemp(prefix="protonmf-atlas-")) / "atlas"
    start = time.perf_counter()
    write_atlas(model, str(out), images_per_class=0)
    seconds = time.perf_counter() - start
    save("atlas_weight", {"classes": K, "p": PS, "patches_per_prototype": args.patches, "write_seconds": round(seconds, 1),
                          **atlas_weights(str(out))})


if __name__ == "__main__":
    main()
