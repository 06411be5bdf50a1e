"""The black box is identified by its weights' sha256, not by the name or path of its file."""

import pytest
import torch
from safetensors.torch import save as save_safetensors

from protonmf import BackboneSpec, build_backbone
from protonmf.backbones import weights_sha256
from protonmf.config import parse_config
from protonmf.data.store import StoreError
from protonmf.pipeline import Run, load_backbone, make_split_source, prepare_store
from protonmf.pipeline import resolve_backbone as resolve_run_backbone


def resolve_backbone(config):
    """(the pinned config, the backbone loaded)."""
    run, backbone = resolve_run_backbone(Run(config))
    return run.config, backbone


def _checkpoint(path, seed):
    torch.manual_seed(seed)
    net = build_backbone(BackboneSpec("protonmf:small_cnn", num_classes=3, arch_kwargs={"width": 8})).model
    path.write_bytes(save_safetensors({k: v.contiguous() for k, v in net.state_dict().items()}))
    return weights_sha256(net)


def _config(tmp_path, weights):
    return parse_config({
        "data": {"source": "synthetic", "n_classes": 3, "max_images_per_class": 4,
                 "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "protonmf:small_cnn", "weights": weights, "num_classes": 3, "arch_kwargs": {"width": 8}},
        "storage": {"features": str(tmp_path / "features"), "model": str(tmp_path / "model")},
    })


def test_pinned_weights_are_content_addressed_in_the_run_storage(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    digest = _checkpoint(ckpt, seed=0)
    pinned, backbone = resolve_backbone(_config(tmp_path, str(ckpt)))
    assert pinned.backbone.weights == f"{tmp_path}/features/weights/{digest}.safetensors"
    assert weights_sha256(backbone.model) == digest == weights_sha256(load_backbone(pinned).model)
    ckpt.unlink()  # workers read the run's own copy, not the user's file
    assert weights_sha256(load_backbone(pinned).model) == digest


def test_a_checkpoint_overwritten_at_the_same_path_never_reuses_its_features(tmp_path):
    ckpt = tmp_path / "ckpt.safetensors"
    first = _checkpoint(ckpt, seed=0)
    pinned, backbone = resolve_backbone(_config(tmp_path, str(ckpt)))
    prepare_store(Run(pinned), backbone, list(make_split_source(pinned, "train").classes))
    second = _checkpoint(ckpt, seed=1)  # a retrained network, saved over the old file
    assert second != first
    pinned2, backbone2 = resolve_backbone(_config(tmp_path, str(ckpt)))
    assert pinned2.backbone.weights.endswith(f"/weights/{second}.safetensors")
    with pytest.raises(StoreError, match="was made with other settings"):
        prepare_store(Run(pinned2), backbone2, list(make_split_source(pinned2, "train").classes))
    # the first run's workers still load the network the first run started with
    assert weights_sha256(load_backbone(pinned).model) == first


def test_a_random_init_is_drawn_from_the_seed_and_pinned(tmp_path):
    a, _ = resolve_backbone(_config(tmp_path / "a", None))
    b, _ = resolve_backbone(_config(tmp_path / "b", None))
    assert a.backbone.weights.rsplit("/", 1)[1] == b.backbone.weights.rsplit("/", 1)[1]
