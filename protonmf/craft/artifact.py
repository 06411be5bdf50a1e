"""The published CRAFT concepts of every class: a folder (any fsspec URI), manifest last.

- ``manifest.json``: format, backbone spec, class names, settings, a summary (mean fidelity and
  localization), and the sha256 of every other file (:mod:`protonmf.artifact`).
- ``concepts.safetensors``: per class k, under ``c{k:05d}/``: ``image_ids`` and ``boxes`` of its
  crops, and for each bank (``root``, ``c2``, ``c2.0``, ...) its ``W``, ``U``, ``crops`` and
  ``importance`` (:class:`protonmf.craft.ClassConcepts`).
- ``classes.json``: per class: its banks (layer, relative error), the images its concepts come from
  (image id and URI), the tree of concepts and sub-concepts, the fidelity curves (Sobol vs TCAV
  ranking) and the localization of its concepts against part masks when the data has them.
- ``top_crops.parquet``: one row per (class, concept, rank): where the crop is (image id, URI,
  box) and the concept's coefficient there, the top crops of every concept of every bank.
- ``figures/*.png``: concept sheets, importance bars, attribution overlays, trees, fidelity curves
  of a few classes; ``index.html`` shows them with the summary tables.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from protonmf.artifact import open_artifact, write_artifact
from protonmf.craft.concepts import ClassConcepts
from protonmf.storage import class_of_stem, class_stem, parquet_bytes, parquet_table

__all__ = ["TOP_CROP_SCHEMA", "ConceptSet", "class_tensors", "split_class_tensors", "top_crops_table"]

FORMAT = "protonmf.craft_concepts"
FORMAT_VERSION = 1

TOP_CROP_SCHEMA = pa.schema(
    [
        ("class_idx", pa.int32()),
        ("bank", pa.string()),
        ("concept", pa.string()),
        ("rank", pa.int32()),
        ("image_id", pa.string()),
        ("uri", pa.string()),
        ("x0", pa.float32()),
        ("y0", pa.float32()),
        ("x1", pa.float32()),
        ("y1", pa.float32()),
        ("coefficient", pa.float32()),
    ]
)


def class_tensors(concepts: dict[int, ClassConcepts]) -> dict[str, torch.Tensor]:
    """All classes' tensors in one flat dict, keyed ``c{k:05d}/<name>``."""
    return {f"{class_stem(k)}/{name}": t for k, cc in concepts.items() for name, t in cc.to_tensors().items()}


def split_class_tensors(tensors: dict[str, torch.Tensor], info: dict[int, dict]) -> dict[int, ClassConcepts]:
    """Undo :func:`class_tensors`; ``info[k]["banks"]`` says which banks class k has."""
    per: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        head, name = key.split("/", 1)
        per.setdefault(class_of_stem(head), {})[name] = t
    return {k: ClassConcepts.from_tensors(per[k], {"class_idx": k, "banks": info[k]["banks"]}) for k in sorted(per)}


def top_crops_table(concepts: dict[int, ClassConcepts], info: dict[int, dict], k: int) -> pa.Table:
    """The ``k`` top crops of every concept of every bank of every class (see the module doc)."""
    rows: dict[str, list] = {name: [] for name in TOP_CROP_SCHEMA.names}
    for c, cc in concepts.items():
        images = info[c]["images"]
        for bank in cc.banks.values():
            for i, cid in enumerate(bank.concept_ids):
                order = bank.U[:, i].argsort(descending=True)[:k]
                for rank, (crop, coef) in enumerate(zip(bank.crops[order].tolist(), bank.U[order, i].tolist())):
                    box = cc.boxes[crop].tolist()
                    image = images[int(box[0])]
                    for name, value in zip(TOP_CROP_SCHEMA.names, (c, bank.id, cid, rank, image["image_id"], image["uri"], *box[1:], coef)):
                        rows[name].append(value)
    return pa.table(rows, schema=TOP_CROP_SCHEMA)


@dataclass
class ConceptSet:
    """The concepts of many classes, as published (see the module docstring).

    Attributes
    ----------
    class_names : names of all classes of the black box, in logit order.
    concepts : class → :class:`~protonmf.craft.ClassConcepts` (classes without predicted
        images are absent).
    info : class → its ``classes.json`` entry.
    backbone : the black box's spec (``FeatureBackbone.spec_dict()``).
    settings : the CRAFT settings and the run's keys.
    summary : means over classes (fidelity AUCs, localization).
    figures : file name → PNG bytes, written under ``figures/``.
    page : the HTML of ``index.html`` (empty: none).
    """

    class_names: list[str]
    concepts: dict[int, ClassConcepts]
    info: dict[int, dict]
    backbone: dict[str, Any]
    settings: dict[str, Any]
    summary: dict[str, Any] = field(default_factory=dict)
    figures: dict[str, bytes] = field(default_factory=dict)
    page: str = ""  # index.html: the summary and the figures, for a browser

    def save(
        self, uri: str, *, storage_options: dict[str, Any] | None = None, top_crops: int = 10, keep_versions: int = 3
    ) -> str:
        """Publish the set as a new version of the artifact at ``uri`` (see :mod:`protonmf.artifact`)."""
        table = top_crops_table(self.concepts, self.info, top_crops)
        files = {
            "concepts.safetensors": save_safetensors(class_tensors(self.concepts)),
            "classes.json": json.dumps({str(k): v for k, v in sorted(self.info.items())}, indent=1).encode(),
            "top_crops.parquet": parquet_bytes(table),
            **{f"figures/{name}": data for name, data in sorted(self.figures.items())},
        }
        if self.page:
            files["index.html"] = self.page.encode()
        meta = {"backbone": self.backbone, "class_names": self.class_names, "settings": self.settings,
                "summary": self.summary, "classes": sorted(self.concepts)}
        write_artifact(uri, files, meta, format=FORMAT, format_version=FORMAT_VERSION, keep=keep_versions,
                       storage_options=storage_options)
        return uri

    @classmethod
    def load(cls, uri: str, *, version: str | None = None, storage_options: dict[str, Any] | None = None) -> ConceptSet:
        """Read a published concept set (its current version, or ``version``), checking every file's sha256."""
        reader = _open(uri, version, storage_options)
        m = reader.manifest
        info = {int(k): v for k, v in json.loads(reader.blob("classes.json")).items()}
        concepts = split_class_tensors(load_safetensors(reader.blob("concepts.safetensors")), info)
        return cls(m["class_names"], concepts, info, m["backbone"], m["settings"], m.get("summary", {}))

    @staticmethod
    def read_manifest(uri: str, *, version: str | None = None, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
        """The manifest alone (settings, summary, files), without reading the concepts."""
        return _open(uri, version, storage_options).manifest

    @staticmethod
    def read_top_crops(uri: str, *, version: str | None = None, storage_options: dict[str, Any] | None = None) -> pa.Table:
        reader = _open(uri, version, storage_options)
        return parquet_table(reader.blob("top_crops.parquet"))


def _open(uri: str, version: str | None, storage_options: dict[str, Any] | None):
    return open_artifact(uri, format=FORMAT, format_version=FORMAT_VERSION, what="concepts", version=version,
                         storage_options=storage_options)
