"""Explanations of single images written out: a PNG per image (and per intervened model) and
``explanations.json`` (Figure 3 / 9).

The picture shows, per prototype, its heatmap in its own colour, its contribution and coefficient,
and its gallery (the training patches where it is most present, when the model has one:
:mod:`protonmf.prototypes.gallery`). With interventions (paper A.4), the same again for the
edited model, so the two can be compared. The numbers come from :mod:`protonmf.prototypes.explain_images`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from protonmf.data import Preprocess, load_image
from protonmf.prototypes.explain_images import class_key, describe, gallery_entries
from protonmf.prototypes.gallery import class_patches
from protonmf.prototypes.model import PrototypeModel
from protonmf.storage import join, to_fs, write_bytes_atomic
from protonmf.viz.png import figure_png
from protonmf.viz.prototype_figures import explanation_figure

__all__ = ["explain_images"]


def explain_images(
    model: PrototypeModel,
    uris: Sequence[str],
    out: str,
    *,
    interventions: Mapping[str, Sequence[int]] | None = None,
    storage_options: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Write ``<out>/<i>_<name>.png`` and ``<out>/explanations.json`` for the images at ``uris``.

    Images that cannot be read are reported with their reason instead of stopping the rest.
    """
    pre = Preprocess(**model.preprocess) if model.preprocess else Preprocess()
    fs, root = to_fs(out, storage_options)
    edited = model.intervene({class_key(model, k): list(v) for k, v in interventions.items()}) if interventions else None
    gallery = model.gallery() if model.has_gallery else None  # the same p for the intervened model
    results = []
    for i, uri in enumerate(uris):
        img, reason = load_image(uri)
        if img is None:
            results.append({"image": uri, "skipped": reason})
            continue
        x = pre(img).unsqueeze(0)
        display = pre.undo(x)[0]
        entry: dict[str, Any] = {"image": uri}
        for name, m in (("model", model), ("intervened", edited)):
            if m is None:
                continue
            rows, exp = describe(m, x)
            row = rows[0]
            stem = f"{i:03d}_{name}"
            c = row["predicted_class"]
            fig = explanation_figure(
                display, exp.heatmaps[0].numpy(), exp.residual_heatmap[0].numpy(), row["contributions"],
                title=f"{'intervened: ' if name == 'intervened' else ''}{row['predicted_name']} "
                      f"(logit {row['logit']:.3f}, p {row['probability']:.2f})",
                residual=None if row["residual_spread_over_prototypes"] else row["residual"],
                coefficients=row["coefficients"],
                patches=class_patches(gallery, c, m.p) if gallery is not None else None,
            )
            write_bytes_atomic(fs, join(root, f"{stem}.png"), figure_png(fig, dpi=100))
            entry[name] = {**row, "picture": join(out, f"{stem}.png")}
            if gallery is not None:
                entry[name]["gallery"] = gallery_entries(gallery, c, m.p)
        results.append(entry)
    write_bytes_atomic(fs, join(root, "explanations.json"), json.dumps(results, indent=2).encode())
    return results
