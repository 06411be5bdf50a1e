"""The gallery: for every class and prototype, the k training patches where it is most present.

Notation of :mod:`protonmf.nmf`: a class's features A (n, D) stack its images' feature maps, one
row per position, n = images × h × w, so row r is image ``r // (h·w)`` of the class (its ``row``
in the feature store's record table), grid cell (``(r mod h·w) // w``, ``r mod w``). E (n, p) is
where each prototype is, by the one definition of :mod:`protonmf.prototypes.where` (the codes of A
against the fitted B, the E of eq. 1 at its optimum), the map ``explain``'s heatmaps draw on
held-out images. A prototype's gallery is the k rows with the largest E[:, i]: solved in the fit on
the features it holds, with no pass over the images to find them (only the few images it names are
read again, for their size and the patch's pixels). Entries with E = 0 are left out (a prototype
present nowhere has no gallery).

A patch's box is the cell's footprint on the preprocessed crop (crop / w pixels wide), mapped back
through the centre crop and the resize (:meth:`~protonmf.data.Preprocess.unmap_points`) into the
pixels of the image as its source loads it (the file itself; for CUB the bounding-box crop, as for
keypoints).

Columns (:data:`GALLERY_SCHEMA`), one row per (p, class, prototype, rank):

- ``p``, ``class_idx``, ``prototype``, ``rank`` (0 = largest E entry), ``score`` (that entry),
  ``row`` (r above);
- ``image_id``, ``uri`` of the training image, ``x0, y0, x1, y1`` its box (null where the image
  can no longer be read);
- ``patch_jpeg``: the patch's pixels with one cell of context on each side (clipped to the crop),
  as the network saw them (resized and cropped, at most :data:`PATCH_MAX_SIDE` pixels a side),
  JPEG; ``cell_x0, cell_y0, cell_x1, cell_y1``: where the cell itself lies in that picture. The
  gallery thus draws without the training data (the report, ``protonmf explain``).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from PIL import Image
from torch import Tensor

from protonmf.data.preprocess import Preprocess
from protonmf.storage import concurrently, parquet_bytes, parquet_table

__all__ = ["GALLERY_SCHEMA", "PATCH_MAX_SIDE", "TopCodes", "cell_box", "class_patches", "gallery_table", "patch_picture",
           "read_gallery", "top_codes", "write_gallery"]

log = logging.getLogger(__name__)

#: Longest side of a stored patch picture (pixels); larger ones are downscaled.
PATCH_MAX_SIDE = 64

GALLERY_SCHEMA = pa.schema(
    [
        ("p", pa.int32()),
        ("class_idx", pa.int32()),
        ("prototype", pa.int32()),
        ("rank", pa.int32()),
        ("score", pa.float32()),
        ("row", pa.int64()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("patch_jpeg", pa.binary()),
        ("cell_x0", pa.float32()),
        ("cell_y0", pa.float32()),
        ("cell_x1", pa.float32()),
        ("cell_y1", pa.float32()),
    ]
)


@dataclass(frozen=True)
class TopCodes:
    """The largest E entries of each prototype of K classes.

    Attributes
    ----------
    rows : (K, p, k) int64, row r of the class's stacked features, by decreasing E[r, i]; −1 past
        the class's positive entries.
    scores : (K, p, k) float32, E[r, i] (0 where ``rows`` is −1).
    """

    rows: Tensor
    scores: Tensor

    @classmethod
    def empty(cls, K: int, p: int, k: int) -> "TopCodes":
        """Classes with no rows (no usable image): no gallery."""
        return cls(torch.full((K, p, k), -1, dtype=torch.int64), torch.zeros(K, p, k))

    @classmethod
    def concat(cls, parts: Sequence["TopCodes"]) -> "TopCodes":
        return cls(torch.cat([t.rows for t in parts]), torch.cat([t.scores for t in parts]))

    def take(self, order: Tensor) -> "TopCodes":
        return TopCodes(self.rows[order], self.scores[order])


def top_codes(E: Tensor, n_rows: Tensor, k: int) -> TopCodes:
    """The k largest entries of each column of E, per class.

    Parameters
    ----------
    E : (K, n, p), the encodings of K zero-padded classes (:class:`protonmf.nmf.NMFResult`).
    n_rows : (K,) int64, each class's real rows (padded rows never count).
    k : entries per prototype.
    """
    K, n, p = E.shape
    E = E.detach().float().cpu()
    padded = torch.arange(n)[None, :] >= torch.as_tensor(n_rows).cpu()[:, None]  # (K, n)
    E = E.masked_fill(padded[..., None], 0.0)
    kk = min(k, n)
    scores, rows = E.topk(kk, dim=1)  # (K, kk, p)
    scores, rows = scores.transpose(1, 2), rows.transpose(1, 2)  # (K, p, kk)
    rows = torch.where(scores > 0, rows, -1)
    scores = torch.where(scores > 0, scores, 0.0)
    if kk < k:
        rows = torch.cat([rows, rows.new_full((K, p, k - kk), -1)], 2)
        scores = torch.cat([scores, scores.new_zeros(K, p, k - kk)], 2)
    return TopCodes(rows, scores)


def cell_box(row: int, grid: tuple[int, int], crop: int) -> tuple[int, tuple[float, float, float, float]]:
    """The image (its row in the class's record table) and the crop-space box (x0, y0, x1, y1) of
    feature row ``row`` on an h × w grid over a crop × crop input."""
    h, w = grid
    image, cell = divmod(int(row), h * w)
    i, j = divmod(cell, w)
    return image, (j * crop / w, i * crop / h, (j + 1) * crop / w, (i + 1) * crop / h)


def _patch(crop_pixels: np.ndarray, box: tuple[float, float, float, float]) -> tuple[bytes, tuple[float, ...]]:
    """The box with one cell of context from the (S, S, 3) uint8 crop, as JPEG, and the cell's box in it."""
    S = crop_pixels.shape[0]
    x0, y0, x1, y1 = box
    cw, ch = x1 - x0, y1 - y0
    tx0, ty0 = max(0, int(np.floor(x0 - cw))), max(0, int(np.floor(y0 - ch)))
    tx1, ty1 = min(S, int(np.ceil(x1 + cw))), min(S, int(np.ceil(y1 + ch)))
    picture = Image.fromarray(np.ascontiguousarray(crop_pixels[ty0:ty1, tx0:tx1]))
    scale = min(1.0, PATCH_MAX_SIDE / max(picture.size))
    if scale < 1.0:
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    picture.save(buf, format="JPEG", quality=90)
    return buf.getvalue(), ((x0 - tx0) * scale, (y0 - ty0) * scale, (x1 - tx0) * scale, (y1 - ty0) * scale)


def gallery_table(
    codes: dict[int, TopCodes],
    classes: Sequence[int],
    records: Sequence[pa.Table],
    load: Callable[[str], tuple[Image.Image | None, str | None]],
    preprocess: Preprocess,
    grid: tuple[int, int],
) -> pa.Table:
    """The gallery rows of ``classes`` (see the module doc).

    Parameters
    ----------
    codes : p → :class:`TopCodes` of ``classes``, in their order.
    records : the feature store's record table of each class (``row``, ``image_id``, ``uri``), in the order of ``classes``.
    load : image_id → (PIL image, None) or (None, reason), as the source loads it.
    preprocess : the run's preprocessing; ``grid`` : the feature grid (h, w).
    """
    where = {(pos, row): (iid, uri) for pos, table in enumerate(records) for row, iid, uri in zip(
        table["row"].to_pylist(), table["image_id"].to_pylist(), table["uri"].to_pylist()) if row is not None}

    def image(iid: str) -> tuple[tuple[int, int], np.ndarray] | None:
        img, reason = load(iid)
        if img is None:
            log.warning("gallery: training image %s can no longer be read (%s): its patches have no box", iid, reason)
            return None
        return img.size, preprocess.to_uint8(img).permute(1, 2, 0).numpy()

    named = dict.fromkeys(  # the images the top entries name, each read once, several at once
        where[(pos, cell_box(r, grid, preprocess.crop)[0])][0]
        for tc in codes.values() for pos in range(len(classes)) for r in tc.rows[pos].flatten().tolist() if r >= 0)
    images = dict(zip(named, concurrently(image, named)))

    out: dict[str, list] = {name: [] for name in GALLERY_SCHEMA.names}
    for p, tc in codes.items():
        for pos, c in enumerate(classes):
            for i in range(tc.rows.shape[1]):
                for rank, (r, score) in enumerate(zip(tc.rows[pos, i].tolist(), tc.scores[pos, i].tolist())):
                    if r < 0:
                        break
                    img_row, box = cell_box(r, grid, preprocess.crop)
                    iid, uri = where[(pos, img_row)]
                    loaded = images[iid]
                    if loaded is None:
                        orig, jpeg, cell = (None,) * 4, None, (None,) * 4
                    else:
                        size, pixels = loaded
                        corners = preprocess.unmap_points(np.array([box[:2], box[2:]]), size)
                        W, H = size
                        orig = (max(0.0, corners[0, 0]), max(0.0, corners[0, 1]), min(W, corners[1, 0]), min(H, corners[1, 1]))
                        jpeg, cell = _patch(pixels, box)
                    values = (p, c, i, rank, score, r, iid, uri, *orig, jpeg, *cell)
                    for name, v in zip(GALLERY_SCHEMA.names, values):
                        out[name].append(v)
    return pa.table(out, schema=GALLERY_SCHEMA)


def write_gallery(table: pa.Table) -> bytes:
    """The table as Parquet bytes."""
    return parquet_bytes(table.cast(GALLERY_SCHEMA))


def read_gallery(data: bytes) -> pa.Table:
    return parquet_table(data).cast(GALLERY_SCHEMA)


def patch_picture(jpeg: bytes | None) -> np.ndarray | None:
    """A stored patch as an (h, w, 3) uint8 array (None for a patch whose image was unreadable)."""
    return None if jpeg is None else np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))


def class_patches(table: pa.Table, c: int, p: int) -> list[list[tuple[np.ndarray | None, tuple[float, float, float, float], float]]]:
    """Class ``c``'s gallery from ``table`` (one p's rows, e.g. ``model.gallery()``), per prototype
    0..p−1 in rank order: (picture, cell box in the picture, E entry) for drawing."""
    out: list[list] = [[] for _ in range(p)]
    cols = table.filter(pc.equal(table["class_idx"], c)).sort_by([("prototype", "ascending"), ("rank", "ascending")]).to_pydict()
    for i, jpeg, x0, y0, x1, y1, score in zip(cols["prototype"], cols["patch_jpeg"], cols["cell_x0"], cols["cell_y0"],
                                               cols["cell_x1"], cols["cell_y1"], cols["score"]):
        out[i].append((patch_picture(jpeg), (x0, y0, x1, y1), score))
    return out
