"""Synthetic part-annotated images: a three-part creature (head, body, tail) on a cluttered background.

The project's default demo data, made so that one can *measure* whether learned prototypes find
object parts: every pixel carries a ground-truth part label.

What determines the class
    Each part has ``N_LOOKS = 5`` looks (a saturated colour, drawn solid, striped, dotted or
    checked; see ``PART_LOOKS``). A class is one fixed combination (head look, body look, tail
    look), so at most ``MAX_CLASSES = 125`` classes. Class ``c`` gets, with ``a = c % 5``,
    ``q = (c // 5) % 5``, ``r = c // 25``: head ``a``, body ``(a + q) % 5``, tail
    ``(a + 2q + r) % 5`` (a bijection onto all 125 combinations). Consequences: classes 0-4 differ
    in every part; any two of classes 0-24 differ in at least two parts; and once
    ``n_classes > 5`` every look is shared by several classes, so no single part determines the
    class (from 25 classes on, each part alone identifies at most 1/5 of the classes).

What varies per image (nuisance, independent of the class)
    Object position, scale (the object is about 45-80 % of the image side long), rotation (±30°),
    horizontal flip (facing left or right), part sizes and the tail's tilt, the texture phase,
    a small per-part colour jitter, global brightness, and the background: a random grey-ish base
    colour, low-contrast stripes and eight low-contrast, desaturated blobs, plus pixel noise on
    the whole image. The background is drawn from the same distribution for every class and
    uses no saturated colours, so it carries no class information.

The creature faces its head: an ellipse body, a round head with a dark eye (eye pixels are
head pixels in the mask) and a triangular tail. It is drawn inside the image by construction
(its bounding box is kept 1 px from the border; the position is uniform over the places where
it fits). Parts overlap only in drawing order (tail, then body, then head on top), and the mask
is a single label map, so every pixel belongs to exactly one part or the background.
Everything is drawn with vectorized numpy over blocks of images; one ``seed`` fixes all of it.
"""

from __future__ import annotations

import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "MAX_CLASSES",
    "N_LOOKS",
    "PART_LOOKS",
    "PART_NAMES",
    "SyntheticParts",
    "class_looks",
    "make_synthetic_parts",
    "mask_root",
    "write_image_folder",
]

PART_NAMES: tuple[str, ...] = ("background", "head", "body", "tail")

_TEXTURES = ("solid", "striped", "dotted", "checked")

# Per part (head, body, tail): N_LOOKS looks of (colour name, RGB, texture index into _TEXTURES).
_LOOK_SPECS: tuple[tuple[tuple[str, tuple[int, int, int], int], ...], ...] = (
    (  # head
        ("red", (220, 40, 40), 0),
        ("blue", (40, 80, 220), 0),
        ("yellow", (235, 200, 40), 2),
        ("green", (40, 170, 60), 1),
        ("magenta", (200, 50, 190), 3),
    ),
    (  # body
        ("orange", (240, 130, 30), 1),
        ("teal", (30, 170, 170), 0),
        ("purple", (120, 60, 200), 2),
        ("lime", (150, 220, 50), 3),
        ("pink", (240, 120, 170), 0),
    ),
    (  # tail
        ("cyan", (30, 200, 220), 0),
        ("gold", (230, 190, 40), 1),
        ("green", (50, 180, 80), 2),
        ("violet", (150, 70, 220), 3),
        ("navy", (30, 40, 140), 0),
    ),
)

N_LOOKS = 5
MAX_CLASSES = N_LOOKS**3

#: Readable look names per part, e.g. ``PART_LOOKS[0][2] == "dottedyellow"`` (head look 2).
PART_LOOKS: tuple[tuple[str, ...], ...] = tuple(
    tuple(("" if tex == 0 else _TEXTURES[tex]) + name for name, _, tex in part) for part in _LOOK_SPECS
)
_LOOK_RGB = np.array([[rgb for _, rgb, _ in part] for part in _LOOK_SPECS], dtype=np.float32)  # (3, K, 3)
_LOOK_TEX = np.array([[tex for _, _, tex in part] for part in _LOOK_SPECS], dtype=np.int64)  # (3, K)

# Geometry, in units of the object length L (see _sample_params for the ranges).
_TEX_PERIOD = 0.1  # texture period
_SECONDARY = 0.45  # texture's second colour = this × the look colour
_EYE_RGB = np.array([20.0, 20.0, 20.0], dtype=np.float32)
_N_BLOBS = 8
_NOISE_STD = 4.0
_CHUNK_PIXELS = 1 << 20  # images are drawn in blocks of about this many pixels


@dataclass(frozen=True)
class SyntheticParts:
    """A synthetic part-annotated data set, images grouped by class (class 0 first).

    Attributes
    ----------
    images : np.ndarray of shape (N, S, S, 3), uint8, RGB.
    masks : np.ndarray of shape (N, S, S), uint8, part label per pixel: 0 background, 1 head,
        2 body, 3 tail (indices into ``part_names``).
    labels : np.ndarray of shape (N,), int64, class index per image.
    class_names : list of str, one per class, e.g. ``"c007_dottedyellowhead-orangebody-navytail"``
        (here ``"orange"`` is the body look named ``PART_LOOKS[1][0]``, i.e. striped orange).
    part_names : tuple of str, the names of the mask values.
    """

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    part_names: tuple[str, ...] = PART_NAMES


def _positive_int(value, name: str, minimum: int) -> int:
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def class_looks(n_classes: int) -> np.ndarray:
    """Look indices of the first ``n_classes`` classes.

    Parameters
    ----------
    n_classes : int, 1 to ``MAX_CLASSES``.

    Returns
    -------
    np.ndarray of shape (n_classes, 3), int64: the (head, body, tail) look of each class, indices
    into ``PART_LOOKS[part]``. Rows are distinct.
    """
    n_classes = _positive_int(n_classes, "n_classes", 1)
    if n_classes > MAX_CLASSES:
        raise ValueError(
            f"n_classes must be <= {MAX_CLASSES} (the number of distinct head/body/tail look "
            f"combinations), got {n_classes}"
        )
    c = np.arange(n_classes, dtype=np.int64)
    a, q, r = c % N_LOOKS, (c // N_LOOKS) % N_LOOKS, c // N_LOOKS**2
    return np.stack([a, (a + q) % N_LOOKS, (a + 2 * q + r) % N_LOOKS], axis=1)


def _class_names(looks: np.ndarray) -> list[str]:
    return [
        f"c{c:03d}_{PART_LOOKS[0][h]}head-{PART_LOOKS[1][b]}body-{PART_LOOKS[2][t]}tail"
        for c, (h, b, t) in enumerate(looks.tolist())
    ]


def _extent(p: dict[str, np.ndarray]) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Bounding box of each object around its body centre, in pixels: ((x_lo, x_hi), (y_lo, y_hi)).

    Conservative: it covers the body ellipse, the head circle and the whole tail triangle.
    """
    L, ct, st, f = p["L"], np.cos(p["theta"]), np.sin(p["theta"]), p["flip"]

    def to_xy(u, v):  # object frame (units of L) -> pixel offsets from the body centre
        return L * (f * u * ct - v * st), L * (f * u * st + v * ct)

    ab, bb, rh, hv = p["ab"], p["bb"], p["rh"], p["hv"]
    hx, hy = to_xy(ab + 0.6 * rh, hv)
    ex, ey = L * np.hypot(ab * ct, bb * st), L * np.hypot(ab * st, bb * ct)  # body half-extents
    tail = [to_xy(-(ab + p["tl"]), p["tv"]), to_xy(-0.7 * ab, p["tw"]), to_xy(-0.7 * ab, -p["tw"])]
    xs = np.stack([hx - L * rh, hx + L * rh, -ex, ex] + [x for x, _ in tail])
    ys = np.stack([hy - L * rh, hy + L * rh, -ey, ey] + [y for _, y in tail])
    return (xs.min(0), xs.max(0)), (ys.min(0), ys.max(0))


def _sample_params(rng: np.random.Generator, looks: np.ndarray, S: int) -> dict[str, np.ndarray]:
    """Draw every per-image parameter (arrays with leading axis N) in a fixed order."""
    N = looks.shape[0]

    def u(lo, hi, size=None):
        return rng.uniform(lo, hi, N if size is None else (N, *size)).astype(np.float32)

    p: dict[str, np.ndarray] = {}
    # object size, pose and part geometry (units of L, body centre at the origin, head towards +u)
    p["L"] = u(0.6, 0.9) * S
    p["theta"] = u(-np.pi / 6, np.pi / 6)
    p["flip"] = np.where(rng.random(N) < 0.5, -1.0, 1.0).astype(np.float32)
    p["ab"], p["bb"] = u(0.19, 0.23), u(0.12, 0.15)  # body semi-axes
    p["rh"], p["hv"] = u(0.10, 0.13), u(-0.06, 0.0)  # head radius, head centre's v
    p["tl"], p["tw"], p["tv"] = u(0.20, 0.26), u(0.10, 0.13), u(-0.10, 0.04)  # tail length, half-width, tip's v
    # position: uniform over the centres that keep the whole object 1 px inside the image
    (x_lo, x_hi), (y_lo, y_hi) = _extent(p)
    p["cx"] = 1 - x_lo + u(0, 1) * (S - 2 - (x_hi - x_lo))
    p["cy"] = 1 - y_lo + u(0, 1) * (S - 2 - (y_hi - y_lo))
    p["tex_phase"] = u(0, 1, (2,))
    # colours: per part, the class's look colour with jitter
    p["part_rgb"] = _LOOK_RGB[np.arange(3), looks] + u(-12, 12, (3, 3))  # (N, 3 parts, 3)
    p["part_tex"] = _LOOK_TEX[np.arange(3), looks]  # (N, 3)
    p["gain"] = u(0.9, 1.1)
    # background
    p["bg_rgb"] = u(80, 170)[:, None] + u(-10, 10, (3,))
    p["st_amp"], p["st_period"] = u(0, 10), u(0.1, 0.3) * S
    p["st_angle"], p["st_phase"] = u(0, np.pi), u(0, 2 * np.pi)
    p["blob_xy"] = u(0, S, (_N_BLOBS, 2))
    p["blob_ax"] = u(0.04, 0.2, (_N_BLOBS, 2)) * S
    p["blob_angle"] = u(0, np.pi, (_N_BLOBS,))
    p["blob_rgb"] = u(-30, 30, (_N_BLOBS,))[..., None] + u(-6, 6, (_N_BLOBS, 3))
    return p


def _col(a: np.ndarray) -> np.ndarray:
    """(n,) -> (n, 1, 1), to broadcast a per-image value over the pixel grid."""
    return a[:, None, None]


def _draw_background(p: dict[str, np.ndarray], S: int, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """The background of each image: base colour, low-contrast stripes, low-contrast blobs.

    ``xx`` (1, 1, S) and ``yy`` (1, S, 1) are the pixel centres. Returns (n, S, S, 3) float32.
    """
    n = p["L"].shape[0]
    img = np.empty((n, S, S, 3), dtype=np.float32)
    img[...] = p["bg_rgb"][:, None, None, :]
    proj = xx * _col(np.cos(p["st_angle"])) + yy * _col(np.sin(p["st_angle"]))
    img += (_col(p["st_amp"]) * np.sin(2 * np.pi * proj / _col(p["st_period"]) + _col(p["st_phase"])))[..., None]
    inside = np.empty((n, _N_BLOBS, S, S), dtype=np.float32)
    for k in range(_N_BLOBS):
        dx, dy = xx - _col(p["blob_xy"][:, k, 0]), yy - _col(p["blob_xy"][:, k, 1])
        ca, sa = _col(np.cos(p["blob_angle"][:, k])), _col(np.sin(p["blob_angle"][:, k]))
        ax, ay = _col(p["blob_ax"][:, k, 0]), _col(p["blob_ax"][:, k, 1])
        inside[:, k] = (dx * (ca / ax) + dy * (sa / ax)) ** 2 + (dy * (ca / ay) - dx * (sa / ay)) ** 2 <= 1
    # (n, S·S, blobs) @ (n, blobs, 3): each pixel gets the summed colour of the blobs it lies in
    img += np.matmul(inside.reshape(n, _N_BLOBS, S * S).transpose(0, 2, 1), p["blob_rgb"]).reshape(n, S, S, 3)
    return img


def _part_masks(
    p: dict[str, np.ndarray], xx: np.ndarray, yy: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The creature's parts in each image, from the pixel centres ``xx`` (1, 1, S), ``yy`` (1, S, 1).

    Returns ``u`` and ``v`` (n, S, S) float32, each pixel in the object frame (u along the body
    axis towards the head, v across it, in units of L), the part label ``mask`` (n, S, S) uint8
    and the ``eye`` (n, S, S) bool.
    """
    dx, dy = xx - _col(p["cx"]), yy - _col(p["cy"])
    ct, st = _col(np.cos(p["theta"])), _col(np.sin(p["theta"]))
    u = (dx * ct + dy * st) / _col(p["L"]) * _col(p["flip"])
    v = (dy * ct - dx * st) / _col(p["L"])

    ab, bb, rh, hv = _col(p["ab"]), _col(p["bb"]), _col(p["rh"]), _col(p["hv"])
    hu = ab + 0.6 * rh
    body = (u / ab) ** 2 + (v / bb) ** 2 <= 1
    head = (u - hu) ** 2 + (v - hv) ** 2 <= rh**2
    eye = head & ((u - hu - 0.35 * rh) ** 2 + (v - hv + 0.25 * rh) ** 2 <= (0.22 * rh) ** 2)
    tip_u, base_u = -(ab + _col(p["tl"])), -0.7 * ab
    t = (u - tip_u) / (base_u - tip_u)  # 0 at the tail tip, 1 at its base (hidden in the body)
    tail = (t >= 0) & (t <= 1) & (np.abs(v - _col(p["tv"]) * (1 - t)) <= _col(p["tw"]) * t)

    # drawing order: the body covers the tail's base, the head covers the body
    mask = np.zeros(u.shape, dtype=np.uint8)
    mask[tail] = 3
    mask[body] = 2
    mask[head] = 1
    return u, v, mask, eye


def _paint_parts(
    img: np.ndarray, p: dict[str, np.ndarray], u: np.ndarray, v: np.ndarray, mask: np.ndarray, eye: np.ndarray
) -> None:
    """Colour the object's pixels of ``img`` (n, S, S, 3) in place, each part in its look.

    The textures live in the object frame (``u``, ``v`` of :func:`_part_masks`) so that they
    move, turn and scale with the creature.
    """
    fg = mask > 0
    i = np.nonzero(fg)[0]  # image index of each object pixel
    part = mask[fg].astype(np.int64) - 1
    tu = u[fg] / _TEX_PERIOD + p["tex_phase"][i, 0]
    tv = v[fg] / _TEX_PERIOD + p["tex_phase"][i, 1]
    fu, fv = tu - np.floor(tu), tv - np.floor(tv)
    tex = p["part_tex"][i, part]
    second = np.select(  # True = the texture's darker second colour
        [tex == 1, tex == 2, tex == 3],
        [
            fu < 0.5,  # striped: bands across the body axis
            (fu - 0.5) ** 2 + (fv - 0.5) ** 2 < 0.3**2,  # dotted
            (np.floor(tu) + np.floor(tv)) % 2 == 1,  # checked
        ],
        False,  # solid
    )
    rgb = p["part_rgb"][i, part] * np.where(second, np.float32(_SECONDARY), np.float32(1))[:, None]
    img[fg] = np.where(eye[fg][:, None], _EYE_RGB, rgb)


def _render(p: dict[str, np.ndarray], S: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Draw the images whose parameters are ``p`` (arrays of leading length n).

    Returns images (n, S, S, 3) uint8 and masks (n, S, S) uint8. The pixel noise, last, is the
    only random draw.
    """
    g = np.arange(S, dtype=np.float32) + 0.5
    yy, xx = g[None, :, None], g[None, None, :]  # pixel centres, broadcast to (n, S, S)
    img = _draw_background(p, S, xx, yy)
    u, v, mask, eye = _part_masks(p, xx, yy)
    _paint_parts(img, p, u, v, mask, eye)
    img *= p["gain"][:, None, None, None]
    img += _NOISE_STD * rng.standard_normal(img.shape, dtype=np.float32)
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), mask


def make_synthetic_parts(n_classes: int, n_per_class: int, *, image_size: int = 64, seed: int = 0) -> SyntheticParts:
    """Draw ``n_per_class`` images of each of the first ``n_classes`` classes.

    Parameters
    ----------
    n_classes : int, 1 to ``MAX_CLASSES`` (125).
    n_per_class : int, >= 1.
    image_size : int, side S of the square images, >= 32.
    seed : int, fixes every random choice; the same arguments give bit-identical arrays.

    Returns
    -------
    SyntheticParts with N = n_classes × n_per_class images, grouped by class: images
    ``[c * n_per_class, (c + 1) * n_per_class)`` have label c.

    Raises
    ------
    ValueError
        If n_classes < 1 or > ``MAX_CLASSES``, n_per_class < 1 or image_size < 32 (the message
        names the argument).
    """
    n_classes = _positive_int(n_classes, "n_classes", 1)
    n_per_class = _positive_int(n_per_class, "n_per_class", 1)
    S = _positive_int(image_size, "image_size", 32)
    looks = class_looks(n_classes)  # checks n_classes <= MAX_CLASSES

    labels = np.repeat(np.arange(n_classes, dtype=np.int64), n_per_class)
    N = labels.shape[0]
    rng = np.random.default_rng(seed)
    params = _sample_params(rng, looks[labels], S)

    images, masks = draw_in_blocks(_render, params, N, S, rng)
    return SyntheticParts(images=images, masks=masks, labels=labels, class_names=_class_names(looks))


def draw_in_blocks(render, params: dict[str, np.ndarray], N: int, S: int,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Images (N, S, S, 3) and masks (N, S, S), uint8, drawn by ``render(params of a block, S, rng)``
    over blocks of about ``_CHUNK_PIXELS`` pixels (the random draws in block order)."""
    images = np.empty((N, S, S, 3), dtype=np.uint8)
    masks = np.empty((N, S, S), dtype=np.uint8)
    chunk = max(1, _CHUNK_PIXELS // (S * S))
    for start in range(0, N, chunk):
        sl = slice(start, min(N, start + chunk))
        images[sl], masks[sl] = render({k: a[sl] for k, a in params.items()}, S, rng)
    return images, masks


def mask_root(root: str | os.PathLike) -> Path:
    """The mask tree that :func:`write_image_folder` writes beside ``root``: ``<root>_masks``."""
    root = Path(os.path.abspath(root))
    return root.with_name(root.name + "_masks")


def write_image_folder(data: SyntheticParts, root: str | os.PathLike) -> None:
    """Write ``data`` as a torchvision ``ImageFolder`` tree plus a parallel tree of masks.

    Layout (local paths; ``i`` is the image's index in ``data``, so sorted file order within a
    class is the order in ``data``):

    - images: ``<root>/<class_name>/<i:06d>.png`` (RGB);
    - masks: ``<root>_masks/<class_name>/<i:06d>.png`` (8-bit grey, pixel value = part label
      0-3, so it looks black), see :func:`mask_root`.

    The masks go to the *sibling* tree ``<root>_masks`` rather than into ``<root>``, because
    ``ImageFolder(root)`` takes every sub-folder of ``root`` as a class. So
    ``torchvision.datasets.ImageFolder(root)`` sees exactly the classes of ``data``, and the mask
    of an image at ``<root>/<rel>`` is at ``mask_root(root) / <rel>``.

    Parameters
    ----------
    data : SyntheticParts, as made by :func:`make_synthetic_parts`.
    root : str or os.PathLike, a local directory, created if missing.
    """
    from PIL import Image

    root = Path(os.path.abspath(root))
    mroot = mask_root(root)
    for name in data.class_names:
        (root / name).mkdir(parents=True, exist_ok=True)
        (mroot / name).mkdir(parents=True, exist_ok=True)
    for i in range(data.images.shape[0]):
        rel = Path(data.class_names[int(data.labels[i])]) / f"{i:06d}.png"
        Image.fromarray(np.ascontiguousarray(data.images[i])).save(root / rel)
        Image.fromarray(np.ascontiguousarray(data.masks[i])).save(mroot / rel)
