"""Feature extraction: images of whole classes → backbone features in the feature store.

Extraction has two halves, which may run in different processes:

- :func:`decode_class` (CPU): read, decode, resize and crop every image of a class into a
  (n, 3, S, S) uint8 tensor (:class:`DecodedClass`), noting each file it cannot use and why;
- :func:`extract_decoded` (GPU or CPU): normalize, forward in batches, and write each class to the
  store as a unit (features, records, then the completion marker), so a class is either
  complete or absent and a rerun skips complete classes.

:func:`extract_classes` does both in one process, decoding with threads while the forward pass
runs. Either way a class's records table lists its images in record order, and the stored
features are bit-identical.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import torch
from torch import Tensor

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.data import ImageSource, iter_batches
from protonmf.data.preprocess import Preprocess
from protonmf.data.records import Record, images_sha256
from protonmf.data.store import RECORD_SCHEMA, FeatureStore
from protonmf.storage import IN_FLIGHT

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
    retried: int = 0  # failed reads of its images that were tried again (throttled, reset, timed out)
    worker: int = 0  # pid of the process that forwarded it on Ray (0: in the caller's process)
    decoder: int = 0  # pid of the process that decoded it on Ray (0: in the caller's process)


log = logging.getLogger(__name__)


def _nonfinite(F: Tensor, F16: Tensor) -> dict[int, str]:
    """Images (index in the batch → why) whose features (B, h, w, D) cannot be stored: NaN or Inf
    from the backbone, or values beyond float16's range (the store's dtype), which become Inf."""
    bad = {}
    finite, finite16 = F.isfinite().flatten(1).all(1), F16.isfinite().flatten(1).all(1)
    for i in (~finite16).nonzero().flatten().tolist():
        if not finite[i]:
            kinds = [name for name, t in (("NaN", F[i].isnan()), ("Inf", F[i].isinf())) if t.any()]
            bad[i] = f"{' and '.join(kinds)} in its features"
        else:
            bad[i] = "features beyond float16's range (|x| > 65504), the store's dtype"
    return bad


def damaged_or_missing(store: FeatureStore, k: int) -> tuple[bool, dict | None, str | None]:
    """(extract class k?, its old marker if it is complete but damaged, what is wrong).

    A complete class is read back and checked against its marker's checksums; an intact one is
    not extracted again, a damaged one is (from the same images: see :func:`_check_same_images`).
    """
    done, damage = store.verify_class(k)
    if not done:
        return True, None, None
    if damage is None:
        return False, None, None
    log.warning("class %d of the feature store at %s is damaged (%s): extracting it again", k, store.uri, damage)
    return True, store.read_marker(k), damage


def _check_same_images(store: FeatureStore, k: int, previous: dict | None, damage: str | None, n_used: int,
                       entries: list[tuple[str, str, str | None]]) -> None:
    """A damaged class extracted again must give as many usable images as the first time: if its
    images are gone or changed, the features would not be the ones the store's key promises, so
    this raises naming the class and the store is left as it was."""
    if previous is None or n_used == previous.get("n_images", n_used):
        return
    skipped = [f"{uri}: {why}" for _, uri, why in entries if why]
    raise store.damaged(k, (
        f"{damage}; it cannot be extracted again: {n_used} of its images can be used now, "
        f"{previous['n_images']} when it was extracted (images gone or changed"
        + (f"; e.g. {skipped[0]})" if skipped else ")")
    ))


def _check_skipped(store: FeatureStore, k: int, listed: list[tuple[str, str, str | None]], most: float) -> None:
    """Raise naming class k, its count and its first reasons if more than ``most`` of its images were skipped."""
    skipped = [(uri, why) for _, uri, why in listed if why]
    if not listed or len(skipped) <= most * len(listed):
        return
    first = "; ".join(f"{uri}: {why}" for uri, why in skipped[:3])
    raise ValueError(f"data.max_skipped_fraction: class {k} ({store.class_names[k]!r}) skipped {len(skipped)} of its "
                     f"{len(listed)} images ({100 * len(skipped) / len(listed):.1f}%, more than {100 * most:g}%): {first}"
                     f"{' …' if len(skipped) > 3 else ''}; repair or remove them, or raise data.max_skipped_fraction")


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
    damage : for a complete class found damaged (extracted again), what was wrong; else None.
    made_from : :func:`~protonmf.data.records.images_sha256` of the records decoded (the marker keeps it).
    retried : failed reads of its images that were tried again (:class:`~protonmf.data.decode.ReadRetry`).
    """

    k: int
    images: Tensor
    entries: list[tuple[str, str, str | None]]
    seconds: float = 0.0
    damage: str | None = None
    made_from: str | None = None
    retried: int = 0

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
    return DecodedClass(k, images, _entries(records, reasons), time.perf_counter() - start, made_from=images_sha256(records),
                        retried=source.read_retry.retries_of(r.uri for r in records))


class _Forward:
    """The backbone on its device, with the precision and memory layout of the run."""

    def __init__(self, backbone: FeatureBackbone, device: torch.device | str | None, precision: str, channels_last: bool,
                 top_k: int, max_skipped_fraction: float = 1.0):
        if precision not in ("float32", "bfloat16"):
            raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
        self.device = torch.device(device) if device is not None else backbone.device
        self.backbone = backbone.to(self.device).eval()
        self.layout = torch.channels_last if channels_last else torch.contiguous_format
        if channels_last:
            self.backbone = self.backbone.to(memory_format=torch.channels_last)
        self.precision = precision
        self.top_k = min(top_k, backbone.num_classes)
        self.max_skipped_fraction = max_skipped_fraction

    def write_class(
        self, store: FeatureStore, k: int, batches: Iterable[Tensor], preprocess: Preprocess,
        entries: Callable[[], list[tuple[str, str, str | None]]], on_batch: Callable[[int], None] | None = None,
        previous: tuple[dict | None, str | None] | None = None, made_from: str | None = None,
    ) -> tuple[int, int, int]:
        """Forward uint8 ``batches`` of class k and write the class; (n used, n skipped, n correct)."""
        return self.forward_class(store, k, batches, preprocess, entries, on_batch, previous, made_from).write(store)

    def forward_class(
        self, store: FeatureStore, k: int, batches: Iterable[Tensor], preprocess: Preprocess,
        entries: Callable[[], list[tuple[str, str, str | None]]], on_batch: Callable[[int], None] | None = None,
        previous: tuple[dict | None, str | None] | None = None, made_from: str | None = None,
    ) -> _Forwarded:
        """Forward uint8 ``batches`` of class k: what :meth:`_Forwarded.write` writes to the store.

        ``entries`` is called once every batch has been consumed (a streaming decoder knows its
        skipped files only then). ``previous``: the old marker and damage of a damaged class
        extracted again (see :func:`_check_same_images`); ``made_from``: what the class is made from
        (:func:`~protonmf.data.records.images_sha256` of its records), kept in its marker.
        """
        F_all, outputs, bad = self._forward_batches(store, batches, preprocess, on_batch)
        listed = entries()
        rows, used = _record_rows(k, listed, bad, outputs)
        if used != F_all.shape[0]:
            raise ValueError(f"class {k}: {F_all.shape[0]} images forwarded but {used} records marked as used")
        _check_same_images(store, k, *(previous or (None, None)), used, listed)
        _check_skipped(store, k, listed, self.max_skipped_fraction)
        return _Forwarded(k, F_all, pa.table(rows, schema=RECORD_SCHEMA), used, len(rows["image_id"]) - used,
                          sum(p == k for p in outputs["pred"]), made_from)

    @torch.no_grad()
    def _forward_batches(
        self, store: FeatureStore, batches: Iterable[Tensor], preprocess: Preprocess, on_batch: Callable[[int], None] | None,
    ) -> tuple[Tensor, dict[str, list], dict[int, str]]:
        """Forward uint8 ``batches``: the features (n, h, w, D) float16 of the images whose features
        can be stored, the black box's outputs for each of them (``pred``, ``top_classes``,
        ``top_logits``, one list entry per image), and the others (index among the decoded images → why)."""
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")
        feats: list[Tensor] = []
        preds: list[Tensor] = []
        tops: list[tuple[Tensor, Tensor]] = []
        bad: dict[int, str] = {}
        seen = 0
        for images in batches:
            # Normalizing where the forward pass runs: a uint8 batch is a quarter of float32's bytes to move.
            x = preprocess.normalize(images.to(self.device, non_blocking=True)).contiguous(memory_format=self.layout)
            with autocast:
                F = self.backbone(x)
            F = F.float()
            F16 = F.to(torch.float16)
            # One image with NaN or Inf features would turn its class's NMF into NaN: it is skipped
            # (named, with why), and the other images and classes go on.
            nonfinite = _nonfinite(F, F16)
            if nonfinite:
                bad.update({seen + i: why for i, why in nonfinite.items()})
                keep = [i for i in range(F.shape[0]) if i not in nonfinite]
                F, F16 = F[keep], F16[keep]
            seen += len(images)
            logits = self.backbone.head_logits(F)
            top = logits.topk(self.top_k, dim=1)
            preds.append(logits.argmax(1).cpu())
            tops.append((top.indices.cpu(), top.values.float().cpu()))
            feats.append(F16.cpu())
            if on_batch is not None:
                on_batch(len(images))
        h, w = store.grid
        F_all = torch.cat(feats) if feats else torch.zeros(0, h, w, store.dim, dtype=torch.float16)
        outputs = {
            "pred": torch.cat(preds).tolist() if preds else [],
            "top_classes": torch.cat([t[0] for t in tops]).tolist() if tops else [],
            "top_logits": torch.cat([t[1] for t in tops]).tolist() if tops else [],
        }
        return F_all, outputs, bad


def _record_rows(k: int, listed: list[tuple[str, str, str | None]], bad: dict[int, str],
                 outputs: dict[str, list]) -> tuple[dict[str, list], int]:
    """Class k's records (columns of ``RECORD_SCHEMA``), one per entry of ``listed`` in order, and how
    many are used. A decoded image whose features were not finite (``bad``) is skipped now: its
    reason is logged and written into ``listed`` too. ``outputs`` holds one value per used image."""
    rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
    used = decoded = 0
    for n, (image_id, uri, reason) in enumerate(listed):
        if reason is None:  # a decoded image: skipped now if its features were not finite
            reason = bad.get(decoded)
            decoded += 1
            if reason is not None:
                log.warning("class %d: image %s skipped: %s", k, uri, reason)
                listed[n] = (image_id, uri, reason)
        rows["image_id"].append(image_id)
        rows["uri"].append(uri)
        rows["label"].append(k)
        rows["skipped"].append(reason)
        rows["row"].append(used if reason is None else None)
        for name, values in outputs.items():
            rows[name].append(values[used] if reason is None else None)
        used += reason is None
    return rows, used


@dataclass(frozen=True)
class _Forwarded:
    """A class forwarded, not yet written: its features (n, h, w, D) float16, records, and counts."""

    k: int
    features: Tensor
    records: pa.Table
    used: int
    skipped: int
    correct: int
    made_from: str | None = None

    def write(self, store: FeatureStore) -> tuple[int, int, int]:
        """Write the class (features, records, then its marker); (n used, n skipped, n correct)."""
        store.write_class(self.k, self.features, self.records, images_sha256=self.made_from)
        return self.used, self.skipped, self.correct


def extract_decoded(
    backbone: FeatureBackbone,
    decoded: Sequence[DecodedClass],
    preprocess: Preprocess,
    store: FeatureStore,
    *,
    batch_size: int = 64,
    top_k: int = 5,
    device: torch.device | str | None = None,
    precision: str = "float32",
    channels_last: bool = False,
    writers: int = IN_FLIGHT,
    max_skipped_fraction: float = 1.0,
) -> list[ClassExtraction]:
    """Forward decoded classes in batches of ``batch_size`` and write each to ``store`` (see
    :func:`extract_classes` for the arguments); one result per class, in order.

    The classes are forwarded one after another, each on its own (batches of one class only, as
    :func:`extract_classes` forwards them: the same features to the bit), and written by up to
    ``writers`` threads while the next ones are forwarded: a class is a few small objects, each a
    request that object storage answers in tens of milliseconds. Each class is still written as a
    unit, its marker last. An error (a class's images gone, a failed write) is raised once the
    writes already started have ended. ``seconds`` counts decoding, the forward pass and the write.
    """
    forward = _Forward(backbone, device, precision, channels_last, top_k, max_skipped_fraction)

    def write(job: tuple[_Forwarded, DecodedClass, float]) -> ClassExtraction:
        done, d, start = job
        used, skipped, correct = done.write(store)
        return ClassExtraction(done.k, used, skipped, correct, d.seconds + time.perf_counter() - start, resumed=False,
                               retried=d.retried)

    with ThreadPoolExecutor(max(1, min(writers, len(decoded)))) as pool:
        pending = []
        for d in decoded:
            start = time.perf_counter()
            previous = (store.read_marker(d.k), d.damage) if d.damage else None
            done = forward.forward_class(store, d.k, d.images.split(batch_size), preprocess, lambda d=d: list(d.entries),
                                         previous=previous, made_from=d.made_from)
            pending.append(pool.submit(write, (done, d, start)))
        return [f.result() for f in pending]


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
    max_skipped_fraction: float = 1.0,
) -> list[ClassExtraction]:
    """Extract and store the features of ``classes`` in this process; complete classes that are
    intact are skipped.

    A complete class that is damaged (see :meth:`FeatureStore.check_class`) is extracted again. If
    its images no longer give as many usable images as when it was extracted (they are gone or
    changed), this raises :class:`~protonmf.data.store.StoreError` naming the class and leaves the
    store as it was: features of other images would not be the ones the store's key promises.

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
    max_skipped_fraction : a class with a larger share of skipped images raises (ValueError naming
        it, its count and its first reasons) and is not written.
    """
    forward = _Forward(backbone, device, precision, channels_last, top_k, max_skipped_fraction)
    results = []
    for k in classes:
        start = time.perf_counter()
        todo, marker, damage = damaged_or_missing(store, k)
        if not todo:
            results.append(ClassExtraction(k, 0, 0, 0, 0.0, resumed=True))
            continue
        records = source.records_of(k)
        reasons: dict[str, str] = {}
        batches = _uint8_batches(source, preprocess, records, batch_size, workers, reasons)
        used, skipped, correct = forward.write_class(
            store, k, batches, preprocess, lambda: _entries(records, reasons), on_batch, previous=(marker, damage),
            made_from=images_sha256(records),
        )
        results.append(ClassExtraction(k, used, skipped, correct, time.perf_counter() - start, resumed=False,
                                       retried=source.read_retry.retries_of(r.uri for r in records)))
    return results
