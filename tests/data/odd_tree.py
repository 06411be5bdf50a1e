"""A small ImageFolder tree with the files real data sets hold: 3 classes × 6 synthetic PNGs, plus
in the second class 3 unusable files (truncated, not an image, empty) and 3 in other modes (grey
70 × 64, CMYK 64 × 80, RGBA)."""

import io
from pathlib import Path

from PIL import Image

from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder


def write_odd_tree(root: Path) -> Path:
    write_image_folder(make_synthetic_parts(3, 6, image_size=64, seed=0), root)
    odd = root / sorted(p.name for p in root.iterdir())[1]
    good = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(good, format="JPEG")
    (odd / "truncated.jpg").write_bytes(good.getvalue()[: len(good.getvalue()) // 2])
    (odd / "notes.jpg").write_text("not an image")
    (odd / "empty.png").write_bytes(b"")
    Image.new("L", (70, 64), 128).save(odd / "gray.png")
    Image.new("CMYK", (64, 80), (0, 50, 50, 0)).save(odd / "cmyk.jpg")
    Image.new("RGBA", (64, 64), (0, 0, 255, 128)).save(odd / "rgba.png")
    return root
