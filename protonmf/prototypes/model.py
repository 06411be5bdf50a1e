"""The prototype model: a black box's backbone with each class's head rebuilt from prototypes.

For features F (h·w, D) of an image, the class-c logit is (ProtoNMF §3.3, eq. 7–8)

    logit_c = Σ_i a_i · mean_hw(F b'_iᵀ) + bias_c,      b'_i = b_i + R_c / Σ_j a_j,

which equals the black box's mean_hw(F) V_cᵀ + bias_c exactly, because Σ_i a_i b'_i = V_c. A fit
with ``residual="distributed"`` stores b'_i = b_i + r_i / a_i instead (the residual split into
pieces r_i shaped like each prototype's heatmap, Tan et al. 2024); everything below reads it alike.
Modes (paper Table 3): ``augmented`` (the above, NMF + residual), ``nmf_only`` (b_i instead of
b'_i), ``residual_only`` (mean_hw(F R_cᵀ) + bias_c).

The artifact is a folder (any fsspec URI):

- ``manifest.json``: format, library version, backbone spec, feature layer, preprocessing, class
  names, the prototype counts, solver settings, interventions, and the sha256 of every other file;
  written last, so a folder without it is not an artifact.
- ``backbone.safetensors``: the backbone's state dict.
- ``prototypes_p{p}.safetensors``: :class:`~protonmf.fit.ClassPrototypes` for each p.
- ``gallery.parquet`` (a run's fit): the training patches where each prototype is most present,
  every p (:mod:`protonmf.prototypes.gallery`); read when :meth:`PrototypeModel.gallery` is first called.

Devices and dtypes follow :mod:`protonmf.devices`: the prototypes live where the backbone is, a
model derived from this one (``with_p``, ``with_mode``, ``intervene``) where this one is, inputs
are moved to the model and results come back where the inputs were.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.nn.functional as nnf
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import Tensor, nn

from protonmf.artifact import ArtifactError, open_artifact, write_artifact
from protonmf.backbones.feature_backbone import BackboneSpec, FeatureBackbone, build_backbone
from protonmf.devices import back_to, output_dtype, to_model
from protonmf.head import residual_heatmap
from protonmf.prototypes.gallery import read_gallery, write_gallery
from protonmf.prototypes.fit import ClassPrototypes, fit_prototypes, fit_prototypes_sweep, fit_settings, stack_classes
from protonmf.prototypes.where import WHERE, Where, codes_by_class

__all__ = ["ArtifactError", "Explanation", "MAP_KINDS", "PrototypeModel"]

Mode = Literal["augmented", "nmf_only", "residual_only"]
#: The readings of "where a prototype is" that :meth:`PrototypeModel.prototype_maps` gives.
MAP_KINDS: tuple[str, ...] = (*WHERE, "activation")
MODES: tuple[str, ...] = ("augmented", "nmf_only", "residual_only")
FORMAT = "protonmf.prototype_model"
FORMAT_VERSION = 1
GALLERY_FILE = "gallery.parquet"


@dataclass(frozen=True)
class Explanation:
    """Why the model gave each image its class.

    All on the device of the explained images; "float32" below is the model's output dtype
    (float64 for a float64 model, see :mod:`protonmf.devices`).

    Attributes
    ----------
    logits : (B, K) float32, the model's logits.
    target : (B,) int64, the explained class (the prediction unless given).
    contributions : (B, p) float64, a_i · mean_hw(F b_iᵀ) of the target's prototypes (b'_i in
        ``augmented`` mode); their sum + ``residual`` (if not spread) + ``bias`` is the target logit.
    residual : (B,) float64, mean_hw(F R_cᵀ): the residual prototype's share of the logit. In
        ``augmented`` mode it is already inside the contributions when the class spreads it.
    bias : (B,) float64, the target's bias.
    heatmaps : (B, p, H, W) float32, where each prototype is in the image
        (:mod:`protonmf.prototypes.where`: the image's own non-negative codes against the NMF
        prototypes, the map the gallery is the top of; ``where="presence"``: eq. 9's codes against
        b'_i), upsampled to the input size.
    residual_heatmap : (B, H, W) float32, where the residual prototype explains what the NMF
        prototypes leave out (eq. 6 on the image's own features and codes).
    """

    logits: Tensor
    target: Tensor
    contributions: Tensor
    residual: Tensor
    bias: Tensor
    heatmaps: Tensor
    residual_heatmap: Tensor


def _check_where(where: str) -> None:
    if where not in WHERE:
        raise ValueError(f"where must be one of {WHERE}, got {where!r}")


class PrototypeModel(nn.Module):
    """A backbone and, per class, p prototypes with their coefficients: an exact, readable head.

    Build one with :meth:`from_prototypes` after :func:`protonmf.fit.fit_prototypes`, or load a
    saved artifact with :meth:`load`. Call it on preprocessed images (B, 3, H, W) for logits (B, K).
    """

    def __init__(
        self,
        backbone: FeatureBackbone,
        prototypes: ClassPrototypes,
        class_names: Sequence[str],
        *,
        mode: Mode = "augmented",
        preprocess: Mapping[str, Any] | None = None,
        settings: Mapping[str, Any] | None = None,
        interventions: Mapping[int, Sequence[int]] | None = None,
        extra_prototypes: Mapping[int, ClassPrototypes] | None = None,
        gallery: pa.Table | Callable[[], pa.Table] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        K, p, D = prototypes.B.shape
        if len(class_names) != K:
            raise ValueError(f"class_names has {len(class_names)} names but the prototypes cover {K} classes")
        if backbone.V.shape[1] != D:
            raise ValueError(f"feature dimension mismatch: backbone head has D = {backbone.V.shape[1]}, prototypes D = {D}")
        self.backbone = backbone
        self.class_names = [str(c) for c in class_names]
        self.mode = mode
        self.preprocess = dict(preprocess or {})
        self.settings = dict(settings or {})
        self.interventions = {int(k): sorted(int(i) for i in v) for k, v in (interventions or {}).items()}
        self.version: str | None = None  # the artifact version it was loaded from (None: not loaded)
        # Other prototype counts of the same fit, kept so that save() writes them all back; they
        # stay where they were given (with_p moves the chosen one to this model).
        self.extra_prototypes = dict(extra_prototypes or {})
        # The gallery of every fitted p (protonmf.prototypes.gallery), or a function that reads it
        # from the artifact when first asked for; None: the model has none (fitted in memory).
        self._gallery = gallery
        for f in fields(prototypes):  # copies: the model owns its buffers
            self.register_buffer(f.name, getattr(prototypes, f.name).detach().to(backbone.device, copy=True))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_prototypes(
        cls,
        backbone: FeatureBackbone,
        prototypes: ClassPrototypes | Sequence[ClassPrototypes],
        class_names: Sequence[str] | None = None,
        **kwargs: Any,
    ) -> "PrototypeModel":
        """A model from one fit, or from fits of several p (the first one is the model's p)."""
        fits = [prototypes] if isinstance(prototypes, ClassPrototypes) else list(prototypes)
        if not fits:
            raise ValueError("prototypes: no fit given")
        names = list(class_names) if class_names is not None else [str(k) for k in range(fits[0].num_classes)]
        extra = {fit.p: fit for fit in fits[1:]}
        return cls(backbone, fits[0], names, extra_prototypes=extra, **kwargs)

    @classmethod
    @torch.no_grad()
    def fit(
        cls,
        backbone: FeatureBackbone,
        images: Tensor,
        labels: Tensor,
        p: int | Sequence[int] = 3,
        *,
        class_names: Sequence[str] | None = None,
        batch_size: int = 64,
        **fit_kwargs: Any,
    ) -> "PrototypeModel":
        """Fit in memory, for a notebook: features of ``images`` (N, 3, H, W) grouped by ``labels`` (N,).

        Every class of the backbone's head needs at least one image. ``p`` may list several counts;
        the first is the model's. ``fit_kwargs`` go to :func:`protonmf.fit.fit_prototypes_sweep` (all counts in one NMF pass).
        """
        labels = torch.as_tensor(labels).reshape(-1)
        if labels.numel() != images.shape[0]:
            raise ValueError(f"labels has {labels.numel()} entries for {images.shape[0]} images")
        F = torch.cat([backbone(images[i : i + batch_size]) for i in range(0, images.shape[0], batch_size)])
        K = backbone.num_classes
        missing = [k for k in range(K) if not (labels == k).any()]
        if missing:
            raise ValueError(f"labels: class(es) {missing[:10]} have no images (empty class)")
        A, n_rows = stack_classes([F[labels == k] for k in range(K)])
        fit_kwargs.setdefault("device", backbone.device)  # the NMF follows the backbone; A streams to it
        counts = [p] if isinstance(p, int) else list(p)
        if isinstance(p, int):
            fits = [fit_prototypes(A, backbone.V, backbone.bias, p, n_rows=n_rows, **fit_kwargs)[0]]
        else:
            fits = [fit for fit, _ in fit_prototypes_sweep(A, backbone.V, backbone.bias, counts, n_rows=n_rows, **fit_kwargs).values()]
        return cls.from_prototypes(backbone, fits, class_names, settings=fit_settings(p=counts, **fit_kwargs))

    @property
    def prototypes(self) -> ClassPrototypes:
        return ClassPrototypes.from_tensors({name: getattr(self, name) for name in ClassPrototypes.__dataclass_fields__})

    @property
    def p(self) -> int:
        return self.B.shape[1]

    @property
    def residual(self) -> str:
        """How the residual sits in B_aug: "equal" (eq. 8, ProtoNMF) or "distributed" (Tan et al. 2024)."""
        return str(self.settings.get("residual", "equal"))

    @property
    def num_classes(self) -> int:
        return self.B.shape[0]

    @property
    def available_p(self) -> list[int]:
        return sorted({self.p, *self.extra_prototypes})

    @property
    def device(self) -> torch.device:
        """The model's device: its backbone's (see :mod:`protonmf.devices`)."""
        return self.backbone.device

    @property
    def dtype(self) -> torch.dtype:
        """The model's dtype: its backbone's; logits and maps come in :func:`~protonmf.devices.output_dtype`."""
        return self.backbone.dtype

    def _derive(self, prototypes: ClassPrototypes, **changes: Any) -> "PrototypeModel":
        """A model on the same backbone with other prototypes or settings, where this one is.

        Every buffer takes the device and dtype of this model's buffer of the same name (a model
        moved with ``.to("cuda")`` or ``.double()`` derives models like it).
        """
        kwargs = {
            "mode": self.mode, "preprocess": self.preprocess, "settings": self.settings,
            "interventions": self.interventions, "extra_prototypes": self.extra_prototypes,
            "gallery": self._gallery, **changes,
        }
        model = PrototypeModel(self.backbone, prototypes, self.class_names, **kwargs)
        for name, buffer in self.named_buffers(recurse=False):
            setattr(model, name, getattr(model, name).to(device=buffer.device, dtype=buffer.dtype))
        return model

    def with_p(self, p: int) -> "PrototypeModel":
        """The same model with another fitted prototype count (interventions are per p: not kept)."""
        if p == self.p:
            return self
        if p not in self.extra_prototypes:
            raise ValueError(f"p = {p} was not fitted; available: {self.available_p}")
        fits = {self.p: self.prototypes, **self.extra_prototypes}
        chosen = fits.pop(p)
        return self._derive(chosen, interventions=None, extra_prototypes=fits)

    def with_mode(self, mode: Mode) -> "PrototypeModel":
        """The same prototypes read in another mode of Table 3."""
        return self._derive(self.prototypes, mode=mode)

    @property
    def has_gallery(self) -> bool:
        return self._gallery is not None

    def gallery(self, p: int | None = None) -> pa.Table:
        """The training patches where each prototype is most present (:mod:`protonmf.prototypes.gallery`),
        of this model's p (or of the fitted ``p``), ordered by class, prototype and rank.

        Raises ValueError if the model has none (fitted in memory, or published before galleries).
        """
        if self._gallery is None:
            raise ValueError("this model has no gallery: galleries are made by the run's fit "
                             "(prototypes.gallery > 0); a model fitted in memory or published before them has none")
        q = self.p if p is None else int(p)
        if q not in self.available_p:
            raise ValueError(f"p = {q} was not fitted; available: {self.available_p}")
        table = self.gallery_table()
        table = table.filter(pc.equal(table["p"], q))
        return table.sort_by([("class_idx", "ascending"), ("prototype", "ascending"), ("rank", "ascending")])

    def gallery_table(self) -> pa.Table:
        """The gallery of every fitted p, read from the artifact the first time it is needed."""
        if callable(self._gallery):
            self._gallery = self._gallery()
        return self._gallery

    # ----------------------------------------------------------------- inference
    def _class_vectors(self) -> tuple[Tensor, Tensor]:
        """Per-class prototype vectors (K, p, D) of the current mode, float64, and coefficients (K, p)."""
        # .double() is a no-op on the head's own float64 buffers; it keeps the head's arithmetic in
        # float64 after a cast of the whole model (e.g. .float()).
        if self.mode == "augmented":
            return self.B_aug.double(), self.C.double()
        return self.B.double(), self.C.double()

    def effective_head(self) -> Tensor:
        """The (K, D) float64 head the model applies to mean-pooled features (eq. 7–8)."""
        if self.mode == "residual_only":
            return self.R.double()
        vectors, coef = self._class_vectors()
        head = (coef.unsqueeze(1) @ vectors).squeeze(1)
        if self.mode == "augmented":
            head = head + (~self.spread).unsqueeze(1) * self.R.double()  # eq. 7 where eq. 8 is undefined
        return head

    def features(self, images: Tensor) -> Tensor:
        """Backbone features F of shape (B, h, w, D), on the images' device."""
        return self.backbone(images)

    def _logits(self, F: Tensor) -> Tensor:
        """:meth:`logits_from_features` for F already on the model's device, in its dtype."""
        pooled = F.flatten(1, 2).mean(1).double()
        return (pooled @ self.effective_head().T + self.bias.double()).to(output_dtype(self.backbone.V))

    def logits_from_features(self, F: Tensor) -> Tensor:
        """Logits (B, K) from features (B, h, w, D): Σ_i a_i mean_hw(F b'_iᵀ) + bias (linear in F)."""
        return back_to(self._logits(to_model(F, self.backbone.V)), F)

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        """Logits (B, K) of images (B, 3, H, W), on the images' device."""
        return back_to(self._logits(self.features(to_model(images, self.backbone.V))), images)

    @torch.no_grad()
    def explain(self, images: Tensor, target: Tensor | Sequence[int] | None = None, *, where: Where = "codes") -> Explanation:
        """Each image's logits, the explained class, each prototype's contribution and heatmap.

        Parameters
        ----------
        images : (B, 3, H, W) preprocessed images.
        target : (B,) class indices to explain; default: the predicted class.
        where : the heatmaps' definition (:data:`~protonmf.prototypes.where.WHERE`): ``"codes"``
            (the default, the gallery's) or ``"presence"`` (eq. 9).
        """
        _check_where(where)
        x = to_model(images, self.backbone.V)
        F = self.features(x)  # (B, h, w, D)
        Bsz, h, w, D = F.shape
        logits = self._logits(F)
        if target is None:
            target = logits.argmax(1)
        target = torch.as_tensor(target, dtype=torch.int64, device=logits.device).reshape(-1)
        if target.numel() != Bsz or (target < 0).any() or (target >= self.num_classes).any():
            raise ValueError(f"target must hold {Bsz} class indices in [0, {self.num_classes}), got {target.tolist()}")
        flat = F.reshape(Bsz, h * w, D).double()
        pooled = flat.mean(1)  # (B, D)
        vectors, coef = self._class_vectors()
        V_t, a_t = vectors[target], coef[target]  # (B, p, D), (B, p)
        R_t = self.R[target].double()  # (B, D)
        residual = (pooled * R_t).sum(1)
        if self.mode == "residual_only":
            contributions = torch.zeros_like(a_t)
        else:
            contributions = a_t * (pooled.unsqueeze(1) * V_t).sum(-1)
        B_t = self.B[target].double()
        codes = codes_by_class(flat, self.B.double(), target)  # (B, hw, p): where each prototype is (protonmf.prototypes.where)
        res_map = residual_heatmap(flat, codes, B_t, R_t)  # (B, hw), eq. 6 with images as the batch
        maps = codes if where == "codes" else codes_by_class(flat, vectors, target)  # eq. 9 against the mode's vectors
        size, out = images.shape[-2:], output_dtype(self.backbone.V)
        heatmaps = nnf.interpolate(maps.transpose(1, 2).reshape(Bsz, -1, h, w).to(out), size=size, mode="bilinear", align_corners=False)
        res_heat = nnf.interpolate(res_map.reshape(Bsz, 1, h, w).to(out), size=size, mode="bilinear", align_corners=False)[:, 0]
        return Explanation(
            logits=back_to(logits, images),
            target=back_to(target, images),
            contributions=back_to(contributions, images),
            residual=back_to(residual, images),
            bias=back_to(self.bias[target].double(), images),
            heatmaps=back_to(heatmaps, images),
            residual_heatmap=back_to(res_heat, images),
        )

    @torch.no_grad()
    def prototype_maps(self, F: Tensor, target: Tensor | Sequence[int]) -> dict[str, Tensor]:
        """Where each prototype of the class ``target`` is, at the feature grid, in every reading.

        Parameters
        ----------
        F : (B, h, w, D) features (:meth:`features`). target : (B,) class indices.

        Returns
        -------
        {kind: (B, p, h, w) float32} for the kinds of :data:`MAP_KINDS`:

        - ``codes``: the image's codes against the NMF prototypes (:mod:`protonmf.prototypes.where`;
          what :meth:`explain` upsamples, and what the gallery is the top of);
        - ``presence``: the non-negative codes of eq. 9 against the mode's vectors (b'_i);
        - ``activation``: F p̃_iᵀ with p̃_i = a_i b'_i, the prototype's share of the class's head
          (Tan et al. 2024 read their prototypes this way); Σ_i of it is F V_cᵀ in ``augmented``
          mode where the residual is spread.
        """
        x = to_model(F, self.backbone.V)
        Bsz, h, w, D = x.shape
        target = torch.as_tensor(target, dtype=torch.int64, device=x.device).reshape(-1)
        if target.numel() != Bsz or (target < 0).any() or (target >= self.num_classes).any():
            raise ValueError(f"target must hold {Bsz} class indices in [0, {self.num_classes}), got {target.tolist()}")
        flat = x.reshape(Bsz, h * w, D).double()
        vectors, coef = self._class_vectors()
        V_t = vectors[target]  # (B, p, D)
        maps = {
            "codes": codes_by_class(flat, self.B.double(), target),
            "presence": codes_by_class(flat, vectors, target),  # eq. 9
            "activation": flat @ (coef[target].unsqueeze(2) * V_t).transpose(1, 2),
        }  # each (B, hw, p)
        out = output_dtype(self.backbone.V)
        return {kind: back_to(m.transpose(1, 2).reshape(Bsz, -1, h, w).to(out), F) for kind, m in maps.items()}

    def intervene(self, removals: Mapping[int | str, Sequence[int]]) -> "PrototypeModel":
        """A new model in which the given prototypes of the given classes contribute nothing.

        ``removals`` maps a class (index or name) to prototype indices; their coefficients a_i are
        set to 0 (paper A.4), the rest of the model is unchanged. This model is not modified.
        """
        C = self.C.clone()  # on this model's device, in its dtype
        done = {k: list(v) for k, v in self.interventions.items()}
        for key, protos in removals.items():
            k = self._class_index(key)
            for i in protos:
                if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.p:
                    raise ValueError(f"intervene: prototype {i!r} of class {key!r} is not in [0, {self.p})")
                C[k, i] = 0.0
            done[k] = sorted(set(done.get(k, [])) | set(protos))
        # The other p are dropped: their prototypes are other ones, and save() must not write them
        # back as if they carried these interventions.
        return self._derive(replace(self.prototypes, C=C), interventions=done, extra_prototypes=None)

    def _class_index(self, key: int | str) -> int:
        if isinstance(key, str):
            if key not in self.class_names:
                raise ValueError(f"intervene: unknown class name {key!r}")
            return self.class_names.index(key)
        if isinstance(key, bool) or not isinstance(key, int) or not 0 <= key < self.num_classes:
            raise ValueError(f"intervene: class {key!r} is not in [0, {self.num_classes})")
        return key

    # ----------------------------------------------------------------- artifact
    def save(self, uri: str, *, keep_versions: int = 3, storage_options: dict[str, Any] | None = None) -> str:
        """Publish the model as a new version of the artifact at ``uri`` (see :mod:`protonmf.artifact`);
        the newest ``keep_versions`` versions stay. Returns the URI."""
        files: dict[str, bytes] = {
            "backbone.safetensors": save_safetensors(
                {k: v.detach().cpu().contiguous() for k, v in self.backbone.model.state_dict().items()}
            ),
        }
        fits = {self.p: self.prototypes, **self.extra_prototypes}
        for p, fit in sorted(fits.items()):
            files[f"prototypes_p{p}.safetensors"] = save_safetensors(fit.to_tensors())
        if self._gallery is not None:
            table = self.gallery_table()
            files[GALLERY_FILE] = write_gallery(table.filter(pc.is_in(table["p"], pa.array(sorted(fits), pa.int32()))))
        meta = {
            "backbone": self.backbone.spec_dict(),
            "preprocess": self.preprocess,
            "class_names": self.class_names,
            "p": sorted(fits),
            "default_p": self.p,
            "mode": self.mode,
            "settings": self.settings,
            "interventions": {str(k): v for k, v in sorted(self.interventions.items())},
        }
        write_artifact(uri, files, meta, format=FORMAT, format_version=FORMAT_VERSION, keep=keep_versions,
                       storage_options=storage_options)
        return uri

    @classmethod
    def load(
        cls,
        uri: str,
        *,
        p: int | None = None,
        mode: Mode | None = None,
        map_location: str | torch.device = "cpu",
        version: str | None = None,
        storage_options: dict[str, Any] | None = None,
    ) -> "PrototypeModel":
        """Load the current version of the artifact at a local path or any fsspec URI (or the
        published ``version``, an id of :func:`protonmf.artifact.list_versions`), verifying every
        file's sha256. ``model.version`` says which version was loaded."""
        reader = open_artifact(uri, format=FORMAT, format_version=FORMAT_VERSION, what="model", version=version,
                               storage_options=storage_options)
        manifest, blob = reader.manifest, reader.blob
        spec_fields = manifest["backbone"]
        spec = BackboneSpec(
            arch=spec_fields["arch"],
            weights=None,  # the artifact carries its own weights
            num_classes=spec_fields.get("num_classes"),
            feature_layer=spec_fields.get("feature_layer"),
            head=spec_fields.get("head"),
            arch_kwargs=spec_fields.get("arch_kwargs") or {},
        )
        backbone = build_backbone(spec)
        backbone.model.load_state_dict(load_safetensors(blob("backbone.safetensors")))
        backbone.spec = BackboneSpec(**{**spec.to_dict(), "weights": spec_fields.get("weights")})
        available = manifest["p"]
        chosen = manifest["default_p"] if p is None else p
        if chosen not in available:
            raise ValueError(f"p = {chosen} is not in the artifact at {uri!r}; available: {available}")
        fits = {q: ClassPrototypes.from_tensors(load_safetensors(blob(f"prototypes_p{q}.safetensors"))) for q in available}
        first = fits.pop(chosen)
        model = cls(
            backbone,
            first,
            manifest["class_names"],
            mode=mode or manifest.get("mode", "augmented"),
            preprocess=manifest.get("preprocess"),
            settings=manifest.get("settings"),
            interventions={int(k): v for k, v in manifest.get("interventions", {}).items()},
            extra_prototypes=fits,
            gallery=(lambda: read_gallery(blob(GALLERY_FILE))) if GALLERY_FILE in manifest["files"] else None,
        )
        model.version = reader.version
        return model.to(map_location).eval()
