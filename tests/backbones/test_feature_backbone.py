"""Backbones: torchvision and timm by name, weights from files and object storage, feature layers."""

import pytest
import torch
from safetensors.torch import save as save_safetensors

from protonmf import BackboneSpec, PrototypeModel, build_backbone


def images(n=3, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def trained():
    """A torchvision resnet18 'checkpoint' for 7 classes (random weights, as a user's own)."""
    torch.manual_seed(3)
    return build_backbone(BackboneSpec("torchvision:resnet18", num_classes=7)).model


def test_weights_from_a_local_file_and_from_s3(trained, tmp_path, s3, s3_bucket):
    torch.save(trained.state_dict(), tmp_path / "ckpt.pth")
    s3.pipe(f"{s3_bucket}/models/ckpt.safetensors", save_safetensors({k: v.contiguous() for k, v in trained.state_dict().items()}))
    with torch.no_grad():
        expected = trained(images())
    for weights in (str(tmp_path / "ckpt.pth"), f"s3://{s3_bucket}/models/ckpt.safetensors"):
        backbone = build_backbone(BackboneSpec("torchvision:resnet18", weights=weights, num_classes=7))
        assert backbone.num_classes == 7 and backbone.spec.weights == weights
        with torch.no_grad():
            assert torch.equal(backbone.model(images()), expected)
            assert torch.allclose(backbone.head_logits(backbone(images())), expected, atol=1e-5)


def test_a_checkpoint_of_another_network_is_refused(trained, tmp_path):
    ckpt = str(tmp_path / "ckpt.pth")
    torch.save(trained.state_dict(), ckpt)
    with pytest.raises(ValueError, match=rf"backbone.weights '{ckpt}' do not fit torchvision:resnet34: layers \d+ missing: layer1.2.conv1.weight"):
        build_backbone(BackboneSpec("torchvision:resnet34", weights=ckpt, num_classes=7))
    with pytest.raises(ValueError) as err:  # the same network with another number of classes
        build_backbone(BackboneSpec("torchvision:resnet18", weights=ckpt, num_classes=10))
    assert str(err.value) == (f"backbone.weights '{ckpt}' do not fit torchvision:resnet18: layers 2 with another shape: "
                              "fc.weight (7, 512) (model (10, 512)), fc.bias (7,) (model (10,))")


def test_weights_are_identified_by_their_content(trained, tmp_path):
    from protonmf.backbones import weights_sha256

    torch.save(trained.state_dict(), tmp_path / "a.pth")
    (tmp_path / "b.safetensors").write_bytes(save_safetensors({k: v.contiguous() for k, v in trained.state_dict().items()}))
    a, b = (build_backbone(BackboneSpec("torchvision:resnet18", weights=str(tmp_path / f), num_classes=7)) for f in ("a.pth", "b.safetensors"))
    assert weights_sha256(a.model) == weights_sha256(b.model) == weights_sha256(trained)
    with torch.no_grad():
        b.model.fc.bias[0] += 1e-3
    assert weights_sha256(b.model) != weights_sha256(a.model)


def test_timm_weights_select_the_pretrained_tag(monkeypatch):
    import timm

    with pytest.raises(ValueError) as err:
        build_backbone(BackboneSpec("timm:resnet18", weights="no_such_tag"))
    assert "timm resnet18 has no pretrained tag 'no_such_tag'; known: " in str(err.value) and "a1_in1k" in str(err.value)
    asked = []
    real = timm.create_model

    def create_model(name, pretrained=False, **kwargs):  # no download here: build the same net unpretrained
        asked.append((name, pretrained))
        return real(name.split(".")[0], pretrained=False, **kwargs)

    monkeypatch.setattr(timm, "create_model", create_model)
    build_backbone(BackboneSpec("timm:resnet18", weights="a1_in1k"))
    build_backbone(BackboneSpec("timm:resnet18", weights="default"))
    assert asked == [("resnet18.a1_in1k", True), ("resnet18", True)]


@pytest.mark.parametrize(
    "spec, message",
    [
        (BackboneSpec("torchvision:resnet18", weights="IMAGENET1K_V9"), "torchvision resnet18 has no weights 'IMAGENET1K_V9'; known: DEFAULT, IMAGENET1K_V1"),
        (BackboneSpec("torchvision:resnet1800"), "torchvision has no model 'resnet1800'"),
        (BackboneSpec("resnet18"), "must be 'library:name'"),
        (BackboneSpec("keras:resnet18"), "unknown library 'keras'"),
        (BackboneSpec("torchvision:resnet18", feature_layer="layer9"), "backbone.feature_layer 'layer9' is not a module"),
    ],
)
def test_bad_specs_are_clear(spec, message):
    with pytest.raises(ValueError) as err:
        build_backbone(spec)
    assert message in str(err.value)


def test_feature_layer_override_must_feed_the_head():
    backbone = build_backbone(BackboneSpec("torchvision:resnet18", num_classes=3, feature_layer="layer3"))
    with pytest.raises(ValueError, match="has D = 256 channels but the head 'fc' expects D = 512"):
        backbone(images())


def test_timm_cnn_and_vit_give_exact_prototype_models():
    torch.manual_seed(0)
    cnn = build_backbone(BackboneSpec("timm:resnet18", num_classes=4))
    with torch.no_grad():
        F = cnn(images())
        assert F.shape == (3, 2, 2, 512)
        assert torch.allclose(cnn.head_logits(F), cnn.model(images()), atol=1e-5)
    vit = build_backbone(BackboneSpec("timm:vit_tiny_patch16_224", num_classes=4, arch_kwargs={"img_size": 32}))
    with torch.no_grad():
        vit.model.head.weight.normal_(0, 0.2)
        F = vit(images(size=32))
    assert F.shape == (3, 2, 2, 192), "patch tokens on the 2×2 grid, class token dropped"
    x = images(n=12, size=32, seed=1)
    model = PrototypeModel.fit(vit, x, torch.arange(12) % 4, p=2)
    with torch.no_grad():
        expected = vit.head_logits(vit(x))
    assert float((model(x) - expected).abs().max()) <= 1e-4 * float(expected.abs().max())
