"""The prototype model (ProtoNMF §3.3): exact logits, explanations, intervention, artifact."""

import json

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf import ArtifactError, PrototypeModel


def black_box(backbone, images):
    with torch.no_grad():
        return backbone.head_logits(backbone(images))


def assert_exact(model, backbone, images):
    ours, theirs = model(images), black_box(backbone, images)
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())
    assert torch.equal(ours.argmax(1), theirs.argmax(1))


def test_resnet_prototype_model_gives_the_black_box_logits(resnet, resnet_data, resnet_model):
    _, _, held_out = resnet_data
    with torch.no_grad():
        own = resnet.model(held_out)  # the network's own forward pass, avgpool + fc
    torch.testing.assert_close(black_box(resnet, held_out), own, rtol=1e-5, atol=1e-5)
    for p in resnet_model.available_p:
        assert_exact(resnet_model.with_p(p), resnet, held_out)


def test_vit_prototype_model_gives_the_black_box_logits(vit, vit_data):
    images, labels, held_out = vit_data
    with torch.no_grad():
        F = vit(held_out)
    assert (F < 0).any(), "ViT features have negative entries; only the NMF input is clamped"
    model = PrototypeModel.fit(vit, images, labels, p=3)
    assert_exact(model, vit, held_out)
    assert model.prototypes.feature_error.max() < 1


def test_table3_modes_compute_their_formulas(resnet, resnet_data, resnet_model):
    _, _, x = resnet_data
    with torch.no_grad():
        pooled = resnet(x).flatten(1, 2).mean(1).double()
    fit = resnet_model.prototypes
    nmf_only = torch.einsum("bd,kpd,kp->bk", pooled, fit.B.double(), fit.C) + fit.bias
    residual_only = pooled @ fit.R.T + fit.bias
    torch.testing.assert_close(resnet_model.with_mode("nmf_only")(x), nmf_only.float())
    torch.testing.assert_close(resnet_model.with_mode("residual_only")(x), residual_only.float())
    # NMF + residual = augmented = the black box (eq. 7 = eq. 8)
    torch.testing.assert_close(resnet_model(x), (nmf_only + pooled @ fit.R.T).float(), rtol=1e-5, atol=1e-5)


def test_explanation_adds_up_to_the_logit(resnet, resnet_data, resnet_model):
    _, _, x = resnet_data
    exp = resnet_model.explain(x)
    B = x.shape[0]
    assert exp.logits.shape == (B, 5) and exp.contributions.shape == (B, 3)
    assert exp.heatmaps.shape == (B, 3, 64, 64) and exp.residual_heatmap.shape == (B, 64, 64)
    assert torch.equal(exp.target, exp.logits.argmax(1))
    target_logit = exp.logits[torch.arange(B), exp.target].double()
    torch.testing.assert_close(exp.contributions.sum(1) + exp.bias, target_logit, rtol=1e-5, atol=1e-5)
    assert (exp.heatmaps >= 0).all()
    # Heatmaps are each position's non-negative codes against the target's NMF prototypes B
    # (protonmf.prototypes.where); where="presence" gives eq. 9's against the augmented B'.
    with torch.no_grad():
        F = resnet(x[:1]).reshape(1, -1, 512).double().clamp_min(0)[0]
    presence = resnet_model.explain(x[:1], where="presence")
    for vectors, heat in ((resnet_model.B, exp.heatmaps[:1]), (resnet_model.B_aug, presence.heatmaps)):
        basis = vectors[exp.target[0]].double().numpy()
        ref = np.stack([scipy_nnls(basis.T, f)[0] for f in F.numpy()])  # (hw, p) at 2×2 resolution
        small = torch.nn.functional.interpolate(torch.from_numpy(ref).T.reshape(1, 3, 2, 2).float(), size=(64, 64), mode="bilinear")
        torch.testing.assert_close(heat, small, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(presence.heatmaps, exp.heatmaps[:1])  # two definitions, not one under two names
    with pytest.raises(ValueError, match="where must be one of"):
        resnet_model.explain(x[:1], where="gallery")
    # An explicit target explains that class instead.
    other = resnet_model.explain(x[:2], target=[4, 4])
    assert other.target.tolist() == [4, 4]


def test_intervention_removes_exactly_one_contribution(resnet_data, resnet_model):
    _, _, x = resnet_data
    c, i = 2, 1
    exp = resnet_model.explain(x, target=[c] * x.shape[0])
    edited = resnet_model.intervene({c: [i]})
    before, after = resnet_model(x), edited(x)
    torch.testing.assert_close(after[:, c].double(), before[:, c].double() - exp.contributions[:, i], rtol=1e-5, atol=1e-5)
    others = [k for k in range(5) if k != c]
    torch.testing.assert_close(after[:, others], before[:, others])
    assert edited.interventions == {c: [i]} and resnet_model.interventions == {}
    by_name = resnet_model.intervene({"class2": [1]})
    torch.testing.assert_close(by_name(x), after)
    with pytest.raises(ValueError, match=r"prototype 3 of class 2 is not in \[0, 3\)"):
        resnet_model.intervene({2: [3]})
    with pytest.raises(ValueError, match=r"class 9 is not in \[0, 5\)"):
        resnet_model.intervene({9: [0]})
    with pytest.raises(ValueError, match="unknown class name 'zebra'"):
        resnet_model.intervene({"zebra": [0]})


def test_artifact_round_trip_and_checksums(tmp_path, resnet_data, resnet_model):
    _, _, x = resnet_data
    uri = resnet_model.save(str(tmp_path / "model"))
    version = json.loads((tmp_path / "model" / "current.json").read_text())["version"]
    folder = tmp_path / "model" / "versions" / version
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["p"] == [1, 3, 5] and manifest["default_p"] == 3
    assert manifest["class_names"] == [f"class{k}" for k in range(5)]
    assert manifest["backbone"]["arch"] == "torchvision:resnet18"
    assert manifest["backbone"]["feature_layer"] == "layer4" and manifest["backbone"]["head"] == "fc"
    assert set(manifest["files"]) == {"backbone.safetensors", "prototypes_p1.safetensors", "prototypes_p3.safetensors", "prototypes_p5.safetensors"}

    loaded = PrototypeModel.load(uri)
    assert loaded.class_names == resnet_model.class_names and loaded.p == 3 and loaded.version == version
    assert torch.equal(loaded(x), resnet_model(x))
    assert torch.equal(PrototypeModel.load("file://" + uri, p=5)(x), resnet_model.with_p(5)(x))
    edited = resnet_model.intervene({0: [0]})
    edited.save(str(tmp_path / "edited"))
    assert torch.equal(PrototypeModel.load(str(tmp_path / "edited"))(x), edited(x))
    assert PrototypeModel.load(str(tmp_path / "edited")).interventions == {0: [0]}

    with pytest.raises(ValueError, match=r"p = 4 is not in the artifact .* available: \[1, 3, 5\]"):
        PrototypeModel.load(uri, p=4)
    blob = folder / "prototypes_p3.safetensors"
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0xFF
    blob.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="prototypes_p3.safetensors does not match its sha256"):
        PrototypeModel.load(uri)
    blob.unlink()
    with pytest.raises(ArtifactError, match="prototypes_p3.safetensors is missing"):
        PrototypeModel.load(uri)
    (folder / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match=f"versions/{version}/manifest.json is missing"):
        PrototypeModel.load(uri)
    (tmp_path / "model" / "current.json").unlink()
    with pytest.raises(ArtifactError, match="neither current.json nor manifest.json"):
        PrototypeModel.load(uri)


def test_bad_input_is_a_clear_value_error(resnet, resnet_data):
    images, labels, _ = resnet_data
    with pytest.raises(ValueError, match=r"labels: class\(es\) \[4\] have no images \(empty class\)"):
        PrototypeModel.fit(resnet, images[labels != 4], labels[labels != 4])
    with pytest.raises(ValueError, match="p \\(number of prototypes\\) must be >= 1, got -2"):
        PrototypeModel.fit(resnet, images, labels, p=-2)
    with pytest.raises(ValueError, match="p \\(number of prototypes\\) = 513 exceeds the feature dimension D = 512"):
        PrototypeModel.fit(resnet, images, labels, p=513)
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, H, W\)"):
        resnet(images[:, :1])


def test_fit_rejects_features_and_head_of_different_width(resnet):
    from protonmf import fit_prototypes

    with pytest.raises(ValueError, match="feature dimension mismatch: features have D = 256 but the head V has D = 512"):
        fit_prototypes(torch.rand(5, 20, 256), resnet.V, resnet.bias, 3)


def test_manifest_records_the_solver_settings(tmp_path, resnet_model):
    from protonmf.artifact import current_manifest

    resnet_model.save(str(tmp_path / "m"))
    settings = current_manifest(str(tmp_path / "m"))["settings"]
    assert settings == {
        "p": [3, 1, 5], "max_iter": 200, "tol": 1e-4, "seed": 0, "nonneg": False, "solver": "closed_form",
        "nmf_input": "negative features set to 0 (ProtoNMF §3.1)",
    }
