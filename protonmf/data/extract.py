"""Feature extraction: images of whole classes → backbone features in the feature store.

Extraction has two halves, which may run in different processes:

- :func:`decode_class` (CPU): read, decode, resize and crop every image of a class into a
  (n, 3, S, S) uint8 tensor (:class:`DecodedClass`), noting each file it cannot use and why;
- :func:`extract_decoded` (GPU or CPU): normalize, forward in batches, and write the class to the
  store as a unit (features, records, then the completion marker), so a class is either
  complete or absent and a rerun skips complete classes.

:func:`extract_classes` does both in one process, decoding with threads while the forward pass
runs. Either way a class's records table lists its images in record order, and the stored
features are bit-identical.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.data import ImageSource, iter_batches
from protonmf.data.preprocess import Preprocess
from protonmf.data.records import Record
from protonmf.data.store import RECORD_SCHEMA, FeatureStore

__all__ = ["ClassExtraction", "DecodedClass", "decode_class", "extract_classes", "extract_decoded"]


@dataclass(frozen=True)
class ClassExtraction:
    """What extracting one class did (small, returned by workers)."""

    k: int
    n_images: int
    n_skipped: int
    n_correct: int  # images the black box classifies as their label
    seconds: float
    resumed: bool  # already complete in the store: nothing was recomputed

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class DecodedClass:
    """One class read, decoded, resized and cropped: what the CPU half hands to the forward pass.

    Attributes
    ----------
    k : the class index.
    images : (n, 3, S, S) uint8, the usable images in record order.
    entries : every record of the class in record order, as (image_id, uri, reason): reason is
        None for an image in ``images``, else why the file was skipped.
    seconds : time spent reading and decoding.
    """

    k: int
    images: Tensor
    entries: list[tuple[str, str, str | None]]
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return sum(reason is not None for _, _, reason in self.entries)


def _uint8_batches(
    source: ImageSource, preprocess: Preprocess, records: Sequence[Record], batch_size: int, workers: int | None,
    reasons: dict[str, str],
) -> Iterable[Tensor]:
    """The usable images of ``records`` as uint8 batches, in record order; skip reasons go to ``reasons``."""
    for batch in iter_batches(source, preprocess.to_uint8, batch_size, workers=workers, records=records):
        for skip in batch.skipped:
            reasons[skip.image_id] = skip.reason
        if len(batch):
            yield batch.images


def _entries(records: Sequence[Record], reasons: dict[str, str]) -> list[tuple[str, str, str | None]]:
    return [(r.image_id, r.uri, reasons.get(r.image_id)) for r in records]


def decode_class(
    source: ImageSource, preprocess: Preprocess, k: int, *, workers: int | None = None, batch_size: int = 64,
) -> DecodedClass:
    """Read, decode, resize and crop every image of class ``k`` (``source.records_of(k)``).

    ``workers`` threads read and decode (see :func:`~protonmf.data.batching.iter_batches`);
    unreadable files are listed in ``entries`` with their reason, never raised.
    """
    start = time.perf_counter()
    records = source.records_of(k)
    reasons: dict[str, str] = {}
    chunks = list(_uint8_batches(source, preprocess, records, batch_size, workers, reasons))
    S = preprocess.crop
    images = torch.cat(chunks) if chunks else torch.zeros(0, 3, S, S, dtype=torch.uint8)
    return DecodedClass(k, images, _entries(records, reasons), time.perf_counter() - start)


class _Forward:
    """The backbone on its device, with the precision and memory layout of the run."""

    def __init__(self, backbone: FeatureBackbone, device: torch.device | str | None, precision: str, channels_last: bool,
                 top_k: int):
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.backbone = backbone.to(self.device).eval()
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.precision = precision
        self.top_k = min(top_k, backbone.num_classes)

    @torch.no_grad()
    def write_class(
        self, store: FeatureStore, k: int, batches: Iterable[Tensor], preprocess: Preprocess,
        entries: Callable[[], list[tuple[str, str, str | None]]], on_batch: Callable[[int], None] | None = None,
    ) -> tuple[int, int, int]:
        """Forward uint8 ``batches`` of class k and write the class; (n used, n skipped, n correct).

        ``entries`` is called once every batch has been consumed (a streaming decoder knows its
        skipped files only then).
        """
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")
        feats: list[Tensor] = []
        preds: list[Tensor] = []
        tops: list[tuple[Tensor, Tensor]] = []
        for images in batches:
            # Normalizing where the forward pass runs: a uint8 batch is a quarter of float32's bytes to move.
            x = preprocess.normalize(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.layout)
            with autocast:
                F = self.backbone(x)
            F = F.float()
            logits = self.backbone.head_logits(F)
            top = logits.topk(self.top_k, dim=1)
            preds.append(logits.argmax(1).cpu())
            tops.append((top.indices.cpu(), top.values.float().cpu()))
            feats.append(F.to(torch.float16).cpu())
            if on_batch is not None:
                on_batch(len(images))
        h, w = store.grid
        F_all = torch.cat(feats) if feats else torch.zeros(0, h, w, store.dim, dtype=torch.float16)
        pred = torch.cat(preds).tolist() if preds else []
        top_classes = torch.cat([t[0] for t in tops]).tolist() if tops else []
        top_logits = torch.cat([t[1] for t in tops]).tolist() if tops else []
        rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
        used = 0
        for image_id, uri, reason in entries():
            rows["image_id"].append(image_id)
            rows["uri"].append(uri)
            rows["label"].append(k)
            rows["skipped"].append(reason)
            if reason is None:
                for name, value in (("row", used), ("pred", pred[used]), ("top_classes", top_classes[used]),
                                    ("top_logits", top_logits[used])):
                    rows[name].append(value)
                used += 1
            else:
                for name in ("row", "pred", "top_classes", "top_logits"):
                    rows[name].append(None)
        if used != F_all.shape[0]:
            raise ValueError(f"class {k}: {F_all.shape[0]} images forwarded but {used} records marked as used")
        store.write_class(k, F_all, pa.table(rows, schema=RECORD_SCHEMA))
        return used, len(rows["image_id"]) - used, sum(p == k for p in pred)


def extract_decoded(
    backbone: FeatureBackbone,
    decoded: DecodedClass,
    preprocess: Preprocess,
    store: FeatureStore,
    *,
    batch_size: int = 64,
    top_k: int = 5,
    device: torch.device | str | None = None,
    precision: str = "float32",
    channels_last: bool = False,
) -> ClassExtraction:
    """Forward a decoded class in batches of ``batch_size`` and write it to ``store`` (see
    :func:`extract_classes` for the arguments). ``seconds`` counts decoding and the forward pass."""
    start = time.perf_counter()
    forward = _Forward(backbone, device, precision, channels_last, top_k)
    used, skipped, correct = forward.write_class(
        store, decoded.k, decoded.images.split(batch_size), preprocess, lambda: decoded.entries,
    )
    return ClassExtraction(decoded.k, used, skipped, correct, decoded.seconds + time.perf_counter() - start, resumed=False)


def extract_classes(
    backbone: FeatureBackbone,
    source: ImageSource,
    preprocess: Preprocess,
    store: FeatureStore,
    classes: Sequence[int],
    *,
    batch_size: int = 64,
    workers: int | None = None,
    top_k: int = 5,
    device: torch.device | str | None = None,
    precision: str = "float32",
    channels_last: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> list[ClassExtraction]:
    """Extract and store the features of ``classes`` in this process; complete classes are skipped.

    Parameters
    ----------
    backbone : the black box, moved to ``device`` (default: CUDA if present, else CPU).
    source : image source whose labels index the store's classes.
    preprocess : the :class:`~protonmf.data.preprocess.Preprocess` of the run.
    store : the :class:`~protonmf.data.store.FeatureStore` to write.
    classes : class indices to extract.
    workers : decoding threads, which run while the forward pass does (see ``iter_batches``).
    top_k : how many of the black box's top logits each record keeps.
    precision : "float32", or "bfloat16" to run the forward pass under autocast (GPU workers);
        features are stored as float16 either way, logits are computed in float32 from them.
    channels_last : NHWC memory format for the network and its input (faster convolutions on GPUs).
    on_batch : called with the number of images after each batch (progress bars).
    """
    forward = _Forward(backbone, device, precision, channels_last, top_k)
    results = []
    for k in classes:
        start = time.perf_counter()
        if store.is_done(k):
            results.append(ClassExtraction(k, 0, 0, 0, 0.0, resumed=True))
            continue
        records = source.records_of(k)
        reasons: dict[str, str] = {}
        batches = _uint8_batches(source, preprocess, records, batch_size, workers, reasons)
        used, skipped, correct = forward.write_class(
            store, k, batches, preprocess, lambda: _entries(records, reasons), on_batch,
        )
        results.append(ClassExtraction(k, used, skipped, correct, time.perf_counter() - start, resumed=False))
    return results
