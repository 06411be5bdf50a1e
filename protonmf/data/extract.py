"""Feature extraction: images of whole classes → backbone features in the feature store.

One call handles a list of classes; each class is read, forwarded in batches, and written to the
store as a unit (features, records, then the completion marker), so a class is either complete
or absent and a rerun skips complete classes. A complete class is read back and checked against
its marker's checksums first: a damaged one is extracted again, from the same images.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import torch
from torch import Tensor

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.data import ImageSource, iter_batches
from protonmf.data.store import RECORD_SCHEMA, FeatureStore

__all__ = ["ClassExtraction", "extract_classes"]

log = logging.getLogger(__name__)


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


@torch.no_grad()
def extract_classes(
    backbone: FeatureBackbone,
    source: ImageSource,
    preprocess: Callable,
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
    """Extract and store the features of ``classes``; complete classes that are intact are skipped.

    A complete class that is damaged (see :meth:`FeatureStore.check_class`) is extracted again. If
    its images no longer give as many usable images as when it was extracted (they are gone or
    changed), this raises :class:`~protonmf.data.store.StoreError` naming the class and leaves the
    store as it was: features of other images would not be the ones the store's key promises.

    Parameters
    ----------
    backbone : the black box, moved to ``device`` (default: where it is; :mod:`protonmf.devices`).
    source : image source whose labels index the store's classes.
    preprocess : PIL image → (3, S, S) tensor.
    store : the :class:`~protonmf.data.store.FeatureStore` to write.
    classes : class indices to extract.
    top_k : how many of the black box's top logits each record keeps.
    precision : "float32", or "bfloat16" to run the forward pass under autocast (GPU workers);
        features are stored as float16 either way, logits are computed in float32 from them.
    channels_last : NHWC memory format for the network and its input (faster convolutions on GPUs).
    on_batch : called with the number of images after each batch (progress bars).
    """
    if precision not in ("float32", "bfloat16"):
        raise ValueError(f"precision must be 'float32' or 'bfloat16', got {precision!r}")
    device = torch.device(device) if device is not None else backbone.device
    backbone = backbone.to(device).eval()
    layout = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16")
    top_k = min(top_k, backbone.num_classes)
    results = []
    for k in classes:
        start = time.perf_counter()
        damage = previous = None
        if store.is_done(k):
            damage = store.check_class(k)
            if damage is None:
                results.append(ClassExtraction(k, 0, 0, 0, 0.0, resumed=True))
                continue
            log.warning("class %d of the feature store at %s is damaged (%s): extracting it again", k, store.uri, damage)
            previous = store.read_marker(k)
        records = source.records_of(k)
        feats: list[Tensor] = []
        rows: dict[str, list] = {name: [] for name in RECORD_SCHEMA.names}
        n_correct = 0
        for batch in iter_batches(source, preprocess, batch_size, workers=workers, records=records):
            for skip in batch.skipped:
                for name, value in zip(RECORD_SCHEMA.names, (skip.image_id, skip.uri, k, None, None, None, None, skip.reason)):
                    rows[name].append(value)
            if len(batch) == 0:
                continue
            with autocast:
                F = backbone(batch.images.to(device, memory_format=layout, non_blocking=True))
            F = F.float()
            F16 = F.to(torch.float16)
            # One image with NaN or Inf features would turn its class's NMF into NaN: it is skipped
            # (named, with why), and the other images and classes go on.
            bad = _nonfinite(F, F16)
            ids, uris, labels = batch.image_ids, batch.uris, batch.labels
            if bad:
                for i, why in bad.items():
                    log.warning("class %d: image %s skipped: %s", k, uris[i], why)
                    for name, value in zip(RECORD_SCHEMA.names, (ids[i], uris[i], k, None, None, None, None, why)):
                        rows[name].append(value)
                keep = [i for i in range(len(batch)) if i not in bad]
                F, F16 = F[keep], F16[keep]
                ids, uris, labels = [ids[i] for i in keep], [uris[i] for i in keep], labels[keep]
            if len(ids) == 0:
                continue
            logits = backbone.head_logits(F)
            top = logits.topk(top_k, dim=1)
            pred = logits.argmax(1).cpu()
            n_correct += int((pred == labels).sum())
            first = sum(f.shape[0] for f in feats)
            feats.append(F16.cpu())
            rows["image_id"] += ids
            rows["uri"] += uris
            rows["label"] += labels.tolist()
            rows["row"] += list(range(first, first + len(ids)))
            rows["pred"] += pred.tolist()
            rows["top_classes"] += top.indices.cpu().tolist()
            rows["top_logits"] += top.values.float().cpu().tolist()
            rows["skipped"] += [None] * len(ids)
            if on_batch is not None:
                on_batch(len(batch))
        h, w = store.grid
        F_all = torch.cat(feats) if feats else torch.zeros(0, h, w, store.dim, dtype=torch.float16)
        if previous is not None and F_all.shape[0] != previous.get("n_images", F_all.shape[0]):
            skipped = [f"{uri}: {why}" for uri, why in zip(rows["uri"], rows["skipped"]) if why]
            raise store.damaged(k, (
                f"{damage}; it cannot be extracted again: {F_all.shape[0]} of its images can be used now, "
                f"{previous['n_images']} when it was extracted (images gone or changed"
                + (f"; e.g. {skipped[0]})" if skipped else ")")
            ))
        store.write_class(k, F_all, pa.table(rows, schema=RECORD_SCHEMA))
        n_skipped = len(rows["image_id"]) - F_all.shape[0]
        results.append(ClassExtraction(k, F_all.shape[0], n_skipped, n_correct, time.perf_counter() - start, resumed=False))
    return results
