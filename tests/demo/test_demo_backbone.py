"""The demo backbone: small_cnn trained on the synthetic part set, deterministic and cached."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from protonmf import BackboneSpec, build_backbone
from protonmf.demo.backbone import DEMO_MEAN, DEMO_STD, default_cache_dir, preprocess_images, train_demo_backbone
from protonmf.demo.synthetic import make_synthetic_parts

TINY = dict(n_classes=3, n_train_per_class=8, n_val_per_class=4, epochs=1)


def _state(demo):
    return {k: v.clone() for k, v in demo.backbone.model.state_dict().items()}


def _assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    cache = tmp_path_factory.mktemp("demo_cache")
    return cache, train_demo_backbone(**TINY, cache_dir=cache)


def test_tiny_result_fields(tiny):
    cache, demo = tiny
    assert not demo.from_cache
    assert demo.class_names == make_synthetic_parts(3, 1).class_names
    assert demo.preprocess == {"resize": 64, "crop": 64, "mean": list(DEMO_MEAN), "std": list(DEMO_STD)}
    assert 0.0 <= demo.val_accuracy <= 1.0
    assert demo.train_seconds > 0
    spec = demo.backbone.spec
    assert spec.arch == "protonmf:small_cnn" and spec.num_classes == 3
    assert spec.weights == demo.weights_path
    assert Path(demo.weights_path).parent == Path(cache)
    assert demo.backbone.feature_layer == "layer4" and demo.backbone.head_name == "fc"


def test_tiny_cache_files(tiny):
    cache, demo = tiny
    weights = Path(demo.weights_path)
    assert weights.is_file() and weights.suffix == ".safetensors"
    info = json.loads(weights.with_suffix(".json").read_text())
    assert info["val_accuracy"] == demo.val_accuracy
    assert info["preprocess"] == demo.preprocess
    assert info["class_names"] == demo.class_names
    assert info["train_seconds"] == demo.train_seconds
    assert sorted(p.name for p in Path(cache).iterdir()) == sorted([weights.name, weights.with_suffix(".json").name])


def test_second_call_loads_from_cache(tiny):
    cache, demo = tiny
    mtime = Path(demo.weights_path).stat().st_mtime_ns
    again = train_demo_backbone(**TINY, cache_dir=cache)
    assert again.from_cache
    assert again.weights_path == demo.weights_path
    assert Path(demo.weights_path).stat().st_mtime_ns == mtime  # not rewritten
    assert again.val_accuracy == demo.val_accuracy and again.train_seconds == demo.train_seconds
    _assert_same_state(_state(again), _state(demo))


def test_training_is_deterministic(tiny, tmp_path):
    _, demo = tiny
    torch.manual_seed(1234)  # the global RNG state must not matter
    fresh = train_demo_backbone(**TINY, cache_dir=tmp_path)
    assert not fresh.from_cache
    assert Path(fresh.weights_path).name == Path(demo.weights_path).name  # same arguments, same key
    _assert_same_state(_state(fresh), _state(demo))
    assert fresh.val_accuracy == demo.val_accuracy


def test_other_arguments_other_cache_entry(tiny, tmp_path):
    _, demo = tiny
    other = train_demo_backbone(**{**TINY, "seed": 1}, cache_dir=tmp_path)
    assert Path(other.weights_path).name != Path(demo.weights_path).name
    assert not torch.equal(other.backbone.model.fc.weight, demo.backbone.model.fc.weight)


def test_corrupt_cache_is_retrained(tiny, tmp_path):
    _, demo = tiny
    first = train_demo_backbone(**TINY, cache_dir=tmp_path)
    Path(first.weights_path).write_bytes(b"not safetensors")
    again = train_demo_backbone(**TINY, cache_dir=tmp_path)
    assert not again.from_cache
    _assert_same_state(_state(again), _state(demo))


def test_head_logits_equal_model_logits(tiny):
    _, demo = tiny
    data = make_synthetic_parts(3, 4, seed=7)
    x = preprocess_images(data.images, demo.preprocess)
    backbone = demo.backbone
    with torch.no_grad():
        F = backbone(x)
        assert F.shape == (12, 8, 8, backbone.V.shape[1])
        assert (F >= 0).all()  # ReLU features
        torch.testing.assert_close(backbone.head_logits(F), backbone.model(x), atol=1e-5, rtol=1e-5)


def test_spec_weights_load_with_build_backbone(tiny):
    _, demo = tiny
    spec = BackboneSpec(**demo.backbone.spec.to_dict())
    rebuilt = build_backbone(spec)
    _assert_same_state(_state(demo), {k: v for k, v in rebuilt.model.state_dict().items()})
    x = preprocess_images(make_synthetic_parts(3, 2, seed=3).images, demo.preprocess)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt.model(x), demo.backbone.model(x))


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PROTONMF_CACHE", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("PROTONMF_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "protonmf"


def test_preprocess_images():
    pre = {"resize": 64, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    images[0, 1, 2] = (255, 0, 128)
    x = preprocess_images(images, pre)
    assert x.shape == (2, 3, 64, 64) and x.dtype == torch.float32
    torch.testing.assert_close(x[0, :, 1, 2], torch.tensor([2.0, -2.0, (128 / 255 - 0.5) / 0.25]))
    assert torch.all(x[1] == -2.0)
    # other sizes are resized (shorter side) and centre-cropped
    small = np.full((3, 32, 48, 3), 128, dtype=np.uint8)
    y = preprocess_images(small, pre)
    assert y.shape == (3, 3, 64, 64)
    torch.testing.assert_close(y, torch.full_like(y, (128 / 255 - 0.5) / 0.25))
    with pytest.raises(ValueError):
        preprocess_images(np.zeros((2, 64, 64), dtype=np.uint8), pre)


@pytest.mark.slow
def test_default_config_reaches_95_percent(tmp_path):
    demo = train_demo_backbone(cache_dir=tmp_path)
    assert demo.val_accuracy >= 0.95
    assert len(demo.class_names) == 10 and demo.backbone.num_classes == 10
    x = preprocess_images(make_synthetic_parts(10, 2, seed=11).images, demo.preprocess)
    with torch.no_grad():
        torch.testing.assert_close(demo.backbone.head_logits(demo.backbone(x)), demo.backbone.model(x), atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_digits_variant_trains_on_the_real_digits(tmp_path):
    demo = train_demo_backbone(dataset="digits", cache_dir=tmp_path)
    assert demo.class_names == [str(d) for d in range(10)] and demo.backbone.num_classes == 10
    assert demo.val_accuracy > 0.85  # 360 held-out real digits; measured 0.89-0.92
    with pytest.raises(ValueError, match="n_classes must be 10 for the digits"):
        train_demo_backbone(dataset="digits", n_classes=5, cache_dir=tmp_path)
