"""A second part-annotated set, unlike the demo's creatures: upright three-part "totems".

Made to check that what is tuned on :mod:`protonmf.demo.synthetic` holds elsewhere: other part
shapes, other textures, another layout and another background, with its own trained network
(``train_demo_backbone(dataset="shapes")``).

The object stands upright (its axis within ±40° of vertical): a **cap** on top (a dome, a roof or a
diamond, the shape being part of the cap's look), a rectangular **trunk**, and a **base** of two
discs side by side. Mask labels: 0 background, 1 cap, 2 trunk, 3 base.

What determines the class
    Each part has 5 looks (a colour with one of the textures rings, hatched, gradient, grainy or
    solid; the cap's look also fixes its shape); class c takes the looks of
    :func:`protonmf.demo.synthetic.class_looks` (the same bijection onto the 125 combinations).

What varies per image
    Position, size (the object is 45–70% of the image side tall), rotation, part proportions,
    texture phase, colour jitter, brightness; the background is a vertical two-tone gradient with a
    few thin, low-contrast bars and pixel noise, drawn from one distribution for every class.
"""

from __future__ import annotations

import numpy as np

from protonmf.demo.synthetic import SyntheticParts, _positive_int, class_looks, draw_in_blocks

__all__ = ["SHAPE_PART_NAMES", "make_shapes"]

SHAPE_PART_NAMES: tuple[str, ...] = ("background", "cap", "trunk", "base")

_TEXTURES = ("solid", "rings", "hatched", "gradient", "grainy")
_CAP_SHAPES = ("dome", "roof", "diamond")
# Per part (cap, trunk, base): 5 looks of (name, RGB, texture index, cap shape index).
_LOOKS = (
    (("crimson", (200, 30, 60), 1, 0), ("sky", (70, 150, 230), 0, 1), ("amber", (240, 170, 20), 2, 2),
     ("olive", (130, 150, 30), 3, 0), ("plum", (140, 40, 120), 4, 1)),
    (("coral", (250, 110, 80), 2, 0), ("mint", (90, 210, 150), 1, 0), ("indigo", (70, 50, 170), 0, 0),
     ("ochre", (200, 140, 40), 3, 0), ("turquoise", (20, 180, 190), 4, 0)),
    (("brown", (130, 70, 30), 0, 0), ("lavender", (170, 140, 230), 2, 0), ("chartreuse", (170, 230, 40), 1, 0),
     ("rose", (230, 90, 140), 3, 0), ("slate", (60, 90, 110), 4, 0)),
)
_RGB = np.array([[rgb for _, rgb, _, _ in part] for part in _LOOKS], dtype=np.float32)  # (3, 5, 3)
_TEX = np.array([[t for _, _, t, _ in part] for part in _LOOKS], dtype=np.int64)  # (3, 5)
_SHAPE = np.array([s for _, _, _, s in _LOOKS[0]], dtype=np.int64)  # (5,)
_NOISE_STD = 5.0
_N_BARS = 5


def _names(looks: np.ndarray) -> list[str]:
    def look(part: int, k: int) -> str:
        name, _, tex, shape = _LOOKS[part][k]
        return ("" if tex == 0 else _TEXTURES[tex]) + name + (_CAP_SHAPES[shape] if part == 0 else "")

    return [f"s{c:03d}_{look(0, a)}-{look(1, b)}trunk-{look(2, t)}base" for c, (a, b, t) in enumerate(looks.tolist())]


def _params(rng: np.random.Generator, looks: np.ndarray, S: int) -> dict[str, np.ndarray]:
    N = looks.shape[0]

    def u(lo, hi, size=None):
        return rng.uniform(lo, hi, N if size is None else (N, *size)).astype(np.float32)

    p = {"H": u(0.45, 0.70) * S, "theta": u(-np.pi * 2 / 9, np.pi * 2 / 9)}
    p["rb"], p["wb"] = u(0.09, 0.12), u(0.12, 0.16)  # base discs: radius, centre's |v|
    p["tw"], p["top"] = u(0.09, 0.13), u(0.08, 0.16)  # trunk half-width, trunk top's u
    p["rc"], p["ch"] = u(0.19, 0.24), u(0.28, 0.36)  # cap half-width, cap height
    reach = 0.62 * p["H"]  # every part lies within this radius of the centre (u = v = 0)
    p["cx"] = reach + 1 + u(0, 1) * np.maximum(S - 2 - 2 * reach, 0)
    p["cy"] = reach + 1 + u(0, 1) * np.maximum(S - 2 - 2 * reach, 0)
    p["tex_phase"] = u(0, 1, (2,))
    p["rgb"] = _RGB[np.arange(3), looks] + u(-14, 14, (3, 3))  # (N, 3 parts, 3)
    p["tex"] = _TEX[np.arange(3), looks]  # (N, 3)
    p["shape"] = _SHAPE[looks[:, 0]]
    p["gain"] = u(0.88, 1.12)
    p["bg_top"], p["bg_bottom"] = u(70, 170, (3,)), u(70, 170, (3,))
    p["bg_top"] = 0.5 * p["bg_top"] + 0.5 * p["bg_top"].mean(1, keepdims=True)  # desaturated
    p["bg_bottom"] = 0.5 * p["bg_bottom"] + 0.5 * p["bg_bottom"].mean(1, keepdims=True)
    p["bar_xy"], p["bar_angle"] = u(0, S, (_N_BARS, 2)), u(0, np.pi, (_N_BARS,))
    p["bar_len"], p["bar_shade"] = u(0.2, 0.5, (_N_BARS,)) * S, u(-25, 25, (_N_BARS,))
    return p


def _col(a: np.ndarray) -> np.ndarray:
    return a[:, None, None]


def _render(p: dict[str, np.ndarray], S: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = p["H"].shape[0]
    g = np.arange(S, dtype=np.float32) + 0.5
    yy, xx = g[None, :, None], g[None, None, :]
    # background: vertical two-tone gradient and thin low-contrast bars
    t = (yy / S)[..., None]  # (1, S, 1, 1)
    img = (p["bg_top"][:, None, None, :] * (1 - t) + p["bg_bottom"][:, None, None, :] * t).astype(np.float32)
    img = np.broadcast_to(img, (n, S, S, 3)).copy()
    for k in range(_N_BARS):
        dx, dy = xx - _col(p["bar_xy"][:, k, 0]), yy - _col(p["bar_xy"][:, k, 1])
        ca, sa = _col(np.cos(p["bar_angle"][:, k])), _col(np.sin(p["bar_angle"][:, k]))
        along, across = dx * ca + dy * sa, -dx * sa + dy * ca
        bar = (np.abs(along) <= _col(p["bar_len"][:, k]) / 2) & (np.abs(across) <= 1.0)
        img += (bar * _col(p["bar_shade"][:, k]))[..., None]
    # the object frame: u up the object's axis, v across it, in units of H
    dx, dy = xx - _col(p["cx"]), yy - _col(p["cy"])
    ct, st = _col(np.cos(p["theta"])), _col(np.sin(p["theta"]))
    u = -(dy * ct - dx * st) / _col(p["H"])  # image y grows downwards; u grows upwards
    v = (dx * ct + dy * st) / _col(p["H"])
    rb, wb, tw, top, rc, ch = (_col(p[k]) for k in ("rb", "wb", "tw", "top", "rc", "ch"))
    base_u = -0.5 + rb
    base = ((u - base_u) ** 2 + (np.abs(v) - wb) ** 2) <= rb**2
    trunk = (u >= base_u) & (u <= top) & (np.abs(v) <= tw)
    shape = _col(p["shape"])
    cu = u - top  # height above the trunk's top
    dome = (cu >= 0) & (cu**2 / ch**2 + v**2 / rc**2 <= 1)
    roof = (cu >= 0) & (np.abs(v) <= rc * (1 - cu / ch))
    diamond = np.abs(cu - ch / 2) / (ch / 2) + np.abs(v) / rc <= 1
    cap = np.where(shape == 0, dome, np.where(shape == 1, roof, diamond))
    mask = np.zeros(u.shape, dtype=np.uint8)
    mask[base] = 3
    mask[trunk] = 2
    mask[cap] = 1
    # paint the parts in the object frame, so textures turn and scale with the object
    fg = mask > 0
    i = np.nonzero(fg)[0]
    part = mask[fg].astype(np.int64) - 1
    uu, vv = u[fg], v[fg]
    centre_u = np.select([part == 0, part == 1], [top[i, 0, 0] + ch[i, 0, 0] / 2, (base_u[i, 0, 0] + top[i, 0, 0]) / 2],
                         base_u[i, 0, 0])
    tex = p["tex"][i, part]
    r = np.hypot(uu - centre_u, vv) / 0.06 + p["tex_phase"][i, 0]
    h = (uu + vv) / 0.07 + p["tex_phase"][i, 1]
    shade = np.select(
        [tex == 1, tex == 2, tex == 3, tex == 4],
        [np.where(r - np.floor(r) < 0.5, 0.5, 1.0),  # rings around the part's centre
         np.where(h - np.floor(h) < 0.35, 0.45, 1.0),  # diagonal hatching
         0.55 + 0.45 * np.clip((uu - centre_u) / 0.25 + 0.5, 0, 1),  # gradient along the axis
         np.where(rng.random(uu.shape) < 0.3, 0.5, 1.0)],  # grainy speckle
        1.0,
    ).astype(np.float32)
    img[fg] = p["rgb"][i, part] * shade[:, None]
    img *= p["gain"][:, None, None, None]
    img += _NOISE_STD * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def make_shapes(n_classes: int, n_per_class: int, *, image_size: int = 64, seed: int = 0) -> SyntheticParts:
    """Draw ``n_per_class`` images of each of the first ``n_classes`` classes (grouped by class);
    the same arguments give bit-identical arrays (see :func:`protonmf.demo.synthetic.make_synthetic_parts`)."""
    n_classes = _positive_int(n_classes, "n_classes", 1)
    n_per_class = _positive_int(n_per_class, "n_per_class", 1)
    S = _positive_int(image_size, "image_size", 32)
    looks = class_looks(n_classes)
    labels = np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class)
    rng = np.random.default_rng(seed)
    params = _params(rng, looks[labels], S)
    images, masks = draw_in_blocks(_render, params, labels.shape[0], S, rng)
    return SyntheticParts(images=images, masks=masks, labels=labels, class_names=_names(looks), part_names=SHAPE_PART_NAMES)
