"""CRAFT (Fel et al.): concepts of a class from crops of the images the model predicts as it.

Notation. CRAFT writes A ≈ U Wᵀ with W (D, r); we keep :mod:`protonmf.nmf`'s row convention:
``A`` (M, D) pooled activations of M crops, ``U`` (M, r) concept coefficients (NMF's E),
``W`` (r, D) the concept bank, one concept per row (NMF's B), so A ≈ U W.

1. Images the model *predicts* as class c (CRAFT §3.1), cut into crops resized back to the input
   size (:func:`crop_images`), activations at a layer, averaged over positions (CNNs).
2. NMF of A (CRAFT eq. 1; the core batched NMF, all classes of a call in one batch) gives U, W,
   rescaled so that every concept (row of W) has unit norm, the scale moved into U (U W unchanged;
   :func:`unit_concepts`): NMF's split of scale between U and W is arbitrary, and anything that
   compares concepts by W alone (a directional derivative along W_i) would otherwise follow it.
3. New inputs are encoded against the fixed bank by NNLS (:func:`encode`, :func:`encode_positions`).
4. Importance of each concept: total Sobol indices of the class logit under masks on the concept
   values of the class's images (CRAFT §3.3, eq. 2; :func:`protonmf.sobol.concept_importance`),
   through the rest of the network.
5. Recursion (CRAFT §3.2): for the most important concepts, the crops whose coefficient exceeds
   the concept's 90th percentile are factorized again at an earlier layer into sub-concepts, whose
   importance is measured through the network from that layer (:class:`~protonmf.backbones.layer_cut.LayerCut`).
   A class's concepts form a tree: bank ``root`` holds concepts ``c0 … c{r-1}``; bank ``c2`` holds
   the sub-concepts ``c2.0, c2.1, …`` of concept ``c2``, and so on down the layers.

:func:`class_concepts` runs 1–5 for many classes at once: every NMF of a level is one batched call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from torchvision.ops import roi_align

from protonmf.backbones.feature_backbone import FeatureBackbone
from protonmf.prototypes.fit import stack_classes
from protonmf.backbones.layer_cut import LayerCut
from protonmf.craft.settings import CraftSettings
from protonmf.nmf import nmf
from protonmf.nnls import nnls
from protonmf.sobol import concept_importance

__all__ = [
    "Bank",
    "ClassConcepts",
    "CraftSettings",
    "class_concepts",
    "crop_images",
    "crops_at",
    "encode",
    "encode_positions",
    "extract_concepts",
    "pool",
    "pooled_activations",
    "pooled_head",
    "unit_concepts",
]


def crop_images(images: Tensor, crop: int, *, stride: int | None = None, n_random: int = 0, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Square crops of side ``crop``, resized back to the input size (one bilinear pass, roi_align).

    Parameters
    ----------
    images : (N, 3, H, W).
    crop : side of a crop in pixels.
    stride : grid crops every ``stride`` pixels (default ``crop``: non-overlapping); ignored when
        ``n_random`` > 0.
    n_random : if > 0, that many random crops per image instead of a grid (seeded).

    Returns
    -------
    crops : (M, 3, H, W); boxes : (M, 5) float, rows (image index, x0, y0, x1, y1).
    """
    N, _, H, W = images.shape
    if not 1 <= crop <= min(H, W):
        raise ValueError(f"crop must be in [1, {min(H, W)}], got {crop}")
    if n_random > 0:
        g = torch.Generator().manual_seed(seed)
        x0 = torch.randint(0, W - crop + 1, (N, n_random), generator=g).float()
        y0 = torch.randint(0, H - crop + 1, (N, n_random), generator=g).float()
        idx = torch.arange(N).repeat_interleave(n_random).float()
        x0, y0 = x0.flatten(), y0.flatten()
    else:
        step = stride or crop
        ys = torch.arange(0, H - crop + 1, step).float()
        xs = torch.arange(0, W - crop + 1, step).float()
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        k = gy.numel()
        idx = torch.arange(N).repeat_interleave(k).float()
        y0, x0 = gy.flatten().repeat(N), gx.flatten().repeat(N)
    boxes = torch.stack([idx, x0, y0, x0 + crop, y0 + crop], 1).to(images)
    return crops_at(images, boxes), boxes


def crops_at(images: Tensor, boxes: Tensor) -> Tensor:
    """The crops of ``boxes`` (M, 5: image index, x0, y0, x1, y1) resized to the images' size."""
    H, W = images.shape[2:]
    return roi_align(images, boxes.to(images), output_size=(H, W), spatial_scale=1.0, sampling_ratio=1, aligned=True)


def _activations(model: FeatureBackbone | LayerCut, images: Tensor) -> Tensor:
    return model.activations(images) if isinstance(model, LayerCut) else model(images)


def pool(features: Tensor) -> Tensor:
    """Feature maps (N, h, w, D) → (N, D): negatives set to 0, then averaged over positions."""
    return features.clamp_min(0).flatten(1, 2).mean(1)


def pooled_head(backbone: FeatureBackbone) -> Callable[[Tensor], Tensor]:
    """h, the rest of the network after pooling: pooled activations (m, D) → logits (m, K)."""
    V, bias = backbone.V, backbone.bias
    return lambda a: a @ V.T.to(a) + bias.to(a)


@torch.no_grad()
def pooled_activations(model: FeatureBackbone | LayerCut, images: Tensor, *, batch_size: int = 64) -> Tensor:
    """:func:`pool` of the activations at the backbone's feature layer (or a cut's layer): (N, D)."""
    return torch.cat([pool(_activations(model, images[i : i + batch_size])) for i in range(0, images.shape[0], batch_size)])


def encode(activations: Tensor, W: Tensor) -> Tensor:
    """U = argmin_{U ≥ 0} ||A − U W||² against a fixed concept bank (CRAFT's encoding of new inputs).

    activations (M, D), W (r, D) → U (M, r).
    """
    return nnls(activations.clamp_min(0), W)


def encode_positions(features: Tensor, W: Tensor) -> Tensor:
    """Each position of feature maps encoded against the bank: (N, h, w, D) → (N, h, w, r)."""
    return encode(features.reshape(-1, features.shape[-1]), W).reshape(*features.shape[:-1], W.shape[0])


@dataclass
class Bank:
    """One concept bank of a class: the root (at the feature layer) or the sub-concepts of a concept.

    Attributes
    ----------
    id : "root", or the id of the concept it decomposes ("c2", "c2.0", ...).
    layer : the layer its activations come from.
    W : (r, D) the concepts, one per row, each of unit norm.
    U : (M, r) coefficients of the crops it was learned from.
    crops : (M,) indices of those crops in the class's crop list.
    importance : (r,) total Sobol index of each concept for the class logit.
    relative_error : ||A − UW||² / ||A||².
    """

    id: str
    layer: str
    W: Tensor
    U: Tensor
    crops: Tensor
    importance: Tensor
    relative_error: float

    @property
    def concept_ids(self) -> list[str]:
        prefix = "c" if self.id == "root" else f"{self.id}."
        return [f"{prefix}{i}" for i in range(self.W.shape[0])]

    def top_crops(self, i: int, k: int) -> Tensor:
        """Indices (in the class's crop list) of the ``k`` crops with the largest coefficient of concept i."""
        order = self.U[:, i].argsort(descending=True)[:k]
        return self.crops[order]


_BANK_TENSORS = ("W", "U", "crops", "importance")  # what a bank stores as tensors


@dataclass
class ClassConcepts:
    """The concepts of one class: a tree of banks (see the module docstring).

    Attributes
    ----------
    class_idx : the class.
    image_ids : (N,) which of the given images were used (those predicted as the class).
    boxes : (M, 5) the crops: (index into ``image_ids``, x0, y0, x1, y1).
    banks : bank id → :class:`Bank`; ``banks["root"]`` is the class's concept bank.
    """

    class_idx: int
    image_ids: Tensor
    boxes: Tensor
    banks: dict[str, Bank] = field(default_factory=dict)

    @property
    def root(self) -> Bank:
        return self.banks["root"]

    @property
    def W(self) -> Tensor:
        return self.root.W

    @property
    def U(self) -> Tensor:
        return self.root.U

    @property
    def importance(self) -> Tensor:
        return self.root.importance

    @property
    def relative_error(self) -> float:
        return self.root.relative_error

    def tree(self, class_name: str = "") -> dict:
        """The tree of concepts as nested dicts (id, label, layer, importance, children)."""

        def node(bank: Bank, i: int) -> dict:
            cid = bank.concept_ids[i]
            children = self.banks.get(cid)
            return {
                "id": cid,
                "label": ("concept " if bank.id == "root" else "sub-concept ") + cid,
                "layer": bank.layer,
                "importance": float(bank.importance[i]),
                "children": [node(children, j) for j in range(children.W.shape[0])] if children else [],
            }

        return {"id": "root", "label": class_name or f"class {self.class_idx}",
                "children": [node(self.root, i) for i in range(self.root.W.shape[0])]}

    def to_tensors(self) -> dict[str, Tensor]:
        out = {"image_ids": self.image_ids.cpu(), "boxes": self.boxes.cpu()}
        for bank in self.banks.values():
            for f in _BANK_TENSORS:
                out[f"{bank.id}/{f}"] = getattr(bank, f).detach().cpu().contiguous()
        return out

    def meta(self) -> dict:
        return {"class_idx": self.class_idx,
                "banks": [{"id": b.id, "layer": b.layer, "relative_error": b.relative_error} for b in self.banks.values()]}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], meta: dict) -> ClassConcepts:
        banks = {}
        for b in meta["banks"]:
            parts = {f: tensors[f"{b['id']}/{f}"] for f in _BANK_TENSORS}
            banks[b["id"]] = Bank(b["id"], b["layer"], relative_error=b["relative_error"], **parts)
        return cls(meta["class_idx"], tensors["image_ids"], tensors["boxes"], banks)


def unit_concepts(W: Tensor, U: Tensor) -> tuple[Tensor, Tensor]:
    """The same factorization with unit-norm concepts: W_i / ||W_i||, U_:i · ||W_i||, so U W is unchanged.

    W (r, D), U (M, r) → (W', U') of the same shapes. A row of W that is exactly 0 (a component
    NMF switched off) has no direction and is left as it is.
    """
    norm = W.norm(dim=1)
    scale = torch.where(norm > 0, norm, torch.ones_like(norm))
    return W / scale[:, None], U * scale.to(U)


def _factorize(As: Sequence[Tensor], r: int, s: CraftSettings, device: torch.device) -> list[tuple[Tensor, Tensor, float]]:
    """One batched NMF (CRAFT eq. 1) over several activation matrices: (W, U, relative error) each,
    W with unit-norm rows (:func:`unit_concepts`; every bank is made here)."""
    A, rows = stack_classes(list(As))
    res = nmf(A, r, n_rows=rows, max_iter=s.max_iter, tol=s.tol, seed=s.seed, device=device)
    err = res.relative_error
    return [(*unit_concepts(res.B[i], res.E[i, : int(rows[i])]), float(err[i])) for i in range(len(As))]


@torch.no_grad()
def class_concepts(
    backbone: FeatureBackbone,
    images: Sequence[Tensor],
    classes: Sequence[int],
    settings: CraftSettings = CraftSettings(),
    *,
    image_ids: Sequence[Tensor] | None = None,
    batch_size: int = 64,
) -> list[ClassConcepts]:
    """CRAFT steps 1–5 for several classes at once.

    Parameters
    ----------
    backbone : the black box (on the device to compute on).
    images : per class, (N_c, 3, S, S) preprocessed images the black box predicts as that class.
    classes : the class of each entry of ``images``.
    settings : see :class:`CraftSettings`.
    image_ids : per class, ids recorded for its images (default 0..N_c−1).
    batch_size : images (or crops) per forward pass.
    """
    s = settings
    if len(images) != len(classes) or not images:
        raise ValueError(f"images and classes must be non-empty and of equal length, got {len(images)} and {len(classes)}")
    empty = [int(c) for c, x in zip(classes, images) if x.shape[0] == 0]
    if empty:
        raise ValueError(f"classes {empty}: no image is predicted as them, so CRAFT has nothing to learn from")
    size = images[0].shape[-1]
    top = LayerCut(backbone, None, size)
    cuts = [LayerCut(backbone, layer, size) for layer in s.sub_layers]  # every cut checked before any work
    out = _root_banks(backbone, top, images, classes, s, image_ids, batch_size)
    parents = [(k, out[k].root) for k in range(len(out))]
    for cut in cuts:  # CRAFT §3.2: one level of sub-concepts per earlier layer
        parents = _sub_banks(cut, images, out, parents, s, batch_size)
        if not parents:
            break
    return out


def _root_banks(
    backbone: FeatureBackbone, top: LayerCut, images: Sequence[Tensor], classes: Sequence[int], s: CraftSettings,
    image_ids: Sequence[Tensor] | None, batch_size: int,
) -> list[ClassConcepts]:
    """Each class's concepts at the feature layer, from its crops, with their Sobol importance."""
    device = backbone.V.device
    boxes, acts = [], []
    for x in images:  # one class's crops at a time (ImageNet: ~0.5 GB each); only the boxes are kept
        crops, b = crop_images(x.to(device), s.crop, stride=s.stride, n_random=s.n_random, seed=s.seed)
        acts.append(pooled_activations(top, crops, batch_size=batch_size))
        boxes.append(b)
        del crops
    out = []
    for k, (c, (W, U, err)) in enumerate(zip(classes, _factorize(acts, s.n_concepts, s, device))):
        U_images = encode(pooled_activations(top, images[k].to(device), batch_size=batch_size), W)
        importance = concept_importance(U_images, W, pooled_head(backbone), int(c), n_design=s.n_design, seed=s.seed)
        ids = image_ids[k] if image_ids is not None else torch.arange(images[k].shape[0])
        bank = Bank("root", top.layer, W, U, torch.arange(U.shape[0], device=U.device), importance, err)
        out.append(ClassConcepts(int(c), torch.as_tensor(ids), boxes[k], {"root": bank}))
    return out


def _sub_banks(
    cut: LayerCut, images: Sequence[Tensor], out: list[ClassConcepts], parents: list[tuple[int, Bank]],
    s: CraftSettings, batch_size: int,
) -> list[tuple[int, Bank]]:
    """One level of the recursion: the most important concepts of each parent bank decomposed at
    ``cut`` from the crops where they are strongest; the new banks are added to ``out`` and returned."""
    jobs = []  # (class position, parent concept id, crop indices)
    for k, bank in parents:
        for i in bank.importance.argsort(descending=True)[: s.recurse].tolist():
            coef = bank.U[:, i]
            chosen = bank.crops[coef > torch.quantile(coef, s.percentile / 100)]  # U_(n,i) > λ_i
            if chosen.numel() >= 2:
                jobs.append((k, bank.concept_ids[i], chosen))
    if not jobs:
        return []
    device = cut.device
    maps = []  # per job, the activations (M', h', w', D') of its crops at the earlier layer
    for k, _, chosen in jobs:
        x = crops_at(images[k].to(device), out[k].boxes[chosen])
        maps.append(torch.cat([cut.activations(x[i : i + batch_size]) for i in range(0, x.shape[0], batch_size)]).clamp_min(0))
    banks = []
    for (k, cid, chosen), F, (W, U, err) in zip(jobs, maps, _factorize([pool(F) for F in maps], s.sub_concepts, s, device)):
        U_pos = encode_positions(F, W)  # the tail is not linear: perturb per position
        importance = concept_importance(U_pos, W, cut.logits, out[k].class_idx, n_design=s.n_design, seed=s.seed,
                                        batch_size=max(1, 2**22 // F[0].numel()))
        bank = Bank(cid, cut.layer, W, U, chosen, importance, err)
        out[k].banks[cid] = bank
        banks.append((k, bank))
    return banks


@torch.no_grad()
def extract_concepts(
    backbone: FeatureBackbone,
    images: Tensor,
    class_idx: int,
    n_concepts: int,
    *,
    crop: int,
    stride: int | None = None,
    n_random: int = 0,
    n_design: int = 32,
    seed: int = 0,
    batch_size: int = 64,
    **settings,
) -> ClassConcepts:
    """CRAFT for one class from candidate images (a notebook's entry point).

    ``images`` (N, 3, H, W) are candidates; only those the black box predicts as ``class_idx`` are
    used (CRAFT §3.1). Raises ValueError if there are none. ``settings``: more
    :class:`CraftSettings` fields (``sub_layers``, ...).
    """
    feats = [backbone(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)]
    pred = torch.cat([backbone.head_logits(F) for F in feats]).argmax(1)
    chosen = (pred == class_idx).nonzero().flatten()
    if chosen.numel() == 0:
        raise ValueError(f"no image is predicted as class {class_idx}: CRAFT learns concepts from predicted images")
    s = CraftSettings(n_concepts=n_concepts, crop=crop, stride=stride, n_random=n_random, n_design=n_design,
                      seed=seed, **settings)
    return class_concepts(backbone, [images[chosen]], [class_idx], s, image_ids=[chosen.cpu()], batch_size=batch_size)[0]
