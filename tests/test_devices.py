"""The device policy (protonmf.devices) without a GPU: the meta device stands in for CUDA, float64
for a change of dtype.

A derived model that falls back to the CPU (the bug of issue #12: every variant an evaluation
built was on the CPU next to a CUDA backbone) leaves a buffer off the meta device here; an input
not moved to the model's dtype makes a float64 network fail on float32 images.
"""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as nnf
from scipy.optimize import nnls as scipy_nnls

from protonmf import PrototypeModel
from protonmf.devices import step_device


def tensors(model):
    return dict(model.named_parameters()) | dict(model.named_buffers())


def assert_all_on(model, device, what="model"):
    off = {name: str(t.device) for name, t in tensors(model).items() if t.device.type != device}
    assert off == {}, f"{what}: not on {device}: {off}"


def derived(model):
    """Every way of deriving a model, and chains of them."""
    return {
        "with_p(5)": model.with_p(5),
        "with_p(1)": model.with_p(1),
        "with_mode(nmf_only)": model.with_mode("nmf_only"),
        "intervene": model.intervene({2: [1]}),
        "with_p(5).with_mode(residual_only)": model.with_p(5).with_mode("residual_only"),
        "with_p(5).with_mode(nmf_only).intervene": model.with_p(5).with_mode("nmf_only").intervene({0: [4], "class3": [0]}),
        "with_mode(nmf_only).with_p(1).with_p(3)": model.with_mode("nmf_only").with_p(1).with_p(3),
    }


@pytest.fixture(scope="module")
def meta_model(resnet_model):
    return copy.deepcopy(resnet_model).to("meta")  # a copy: the session's model and backbone stay put


@pytest.fixture(scope="module")
def model64(resnet_model):
    return copy.deepcopy(resnet_model).double()


def test_derived_models_stay_on_the_parents_device(meta_model):
    assert meta_model.device.type == "meta"
    assert_all_on(meta_model, "meta")
    models = derived(meta_model)
    for name, model in models.items():
        assert_all_on(model, "meta", name)
        assert model.backbone is meta_model.backbone, name
    assert models["with_p(5)"].p == 5
    assert models["with_p(5).with_mode(nmf_only).intervene"].interventions == {0: [4], 3: [0]}


def test_logits_and_explanations_are_computed_on_the_models_device(meta_model):
    x = torch.zeros(2, 3, 64, 64, device="meta")
    for name, model in {"model": meta_model, **derived(meta_model)}.items():
        logits = model(x)
        assert (logits.device.type, logits.shape, logits.dtype) == ("meta", (2, 5), torch.float32), name


def test_load_with_map_location_puts_everything_there(resnet_model, tmp_path):
    resnet_model.save(str(tmp_path / "model"))
    model = PrototypeModel.load(str(tmp_path / "model"), map_location="meta")
    assert_all_on(model, "meta")
    for name, m in derived(model).items():
        assert_all_on(m, "meta", name)
    other = PrototypeModel.load(str(tmp_path / "model"), p=5, map_location="meta")
    assert other.p == 5
    assert_all_on(other.with_p(1), "meta")


def test_derived_models_keep_the_parents_dtypes(resnet_model, model64):
    parent = {name: t.dtype for name, t in tensors(model64).items()}
    assert parent["B"] == parent["C"] == parent["backbone.model.fc.weight"] == torch.float64
    assert resnet_model.B.dtype == torch.float32, "the fixture itself is untouched"
    for name, model in derived(model64).items():
        assert {n: t.dtype for n, t in tensors(model).items()} == parent, name


def test_a_float64_model_gives_the_black_boxs_float64_logits_from_float32_images(resnet, resnet_data, model64):
    _, _, x = resnet_data  # float32 images
    assert x.dtype == torch.float32
    with torch.no_grad():
        black_box = model64.backbone.head_logits(model64.backbone(x))
    assert black_box.dtype == torch.float64
    scale = float(black_box.abs().max())
    for p in (1, 3, 5):
        logits = model64.with_p(p)(x)
        assert logits.dtype == torch.float64
        # eq. 8 holds to float64 rounding: a float32 model only gets to ~1e-7 of max |logit|
        assert float((logits - black_box).abs().max()) <= 1e-10 * scale, p
    # and the float64 network is the float32 one: the same logits to float32 rounding
    with torch.no_grad():
        torch.testing.assert_close(black_box.float(), resnet.head_logits(resnet(x)), rtol=1e-4, atol=1e-4 * scale)


def test_an_intervention_on_a_float64_model_removes_its_contribution_in_float64(resnet_data, model64):
    _, _, x = resnet_data
    model = model64.with_p(5)
    c, i = 2, 1
    edited = model.intervene({c: [i]})
    assert edited.C.dtype == torch.float64
    with torch.no_grad():
        pooled = model.backbone(x).flatten(1, 2).mean(1)
    removed = model.C[c, i] * (pooled @ model.B_aug[c, i])
    expected = model(x)
    expected[:, c] -= removed
    torch.testing.assert_close(edited(x), expected, rtol=0, atol=1e-10 * float(expected.abs().max()))


def test_explain_on_a_float64_model_keeps_float64_and_adds_up(resnet_data, model64):
    _, _, x = resnet_data
    exp = model64.explain(x[:4])
    dtypes = {name: getattr(exp, name).dtype for name in ("logits", "contributions", "residual", "bias", "heatmaps", "residual_heatmap")}
    assert set(dtypes.values()) == {torch.float64}, dtypes
    target_logit = exp.logits[torch.arange(4), exp.target]
    torch.testing.assert_close(exp.contributions.sum(1) + exp.bias, target_logit, rtol=0, atol=1e-10 * float(target_logit.abs().max()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_explains_residual_heatmap_is_eq6_least_squares_on_the_images_codes(resnet_model, model64, resnet_data, dtype):
    """Eq. 6 per position, by numpy's least squares on scipy's NNLS codes, upsampled as explain does."""
    model = resnet_model if dtype == torch.float32 else model64
    _, _, x = resnet_data
    exp = model.explain(x[:3])
    with torch.no_grad():
        F = model.backbone(x[:3]).double()  # (3, 2, 2, 512)
    ref = []
    for b in range(3):
        k = int(exp.target[b])
        B, R = model.B[k].double().numpy(), model.R[k].double().numpy()
        A = F[b].reshape(-1, 512).clamp_min(0).numpy()
        codes = np.stack([scipy_nnls(B.T, a)[0] for a in A])  # the image's own NMF codes
        unexplained = A - codes @ B
        ref.append(np.linalg.lstsq(R[:, None], unexplained.T, rcond=None)[0][0])  # min_h ||row − h R||
    ref = torch.from_numpy(np.stack(ref)).reshape(3, 1, 2, 2).to(dtype)
    ref = nnf.interpolate(ref, size=(64, 64), mode="bilinear", align_corners=False)[:, 0]
    assert exp.residual_heatmap.dtype == dtype
    tol = 1e-9 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(exp.residual_heatmap, ref, rtol=tol, atol=tol * float(ref.abs().max()))


def test_evaluation_and_report_of_a_float64_model_on_float32_images(model64):
    from protonmf.data import Preprocess, make_source
    from protonmf.evaluation.held_out import evaluate_model
    from protonmf.viz.report import render_report

    model = copy.copy(model64)  # a shallow copy to set preprocess on: same tensors
    model.preprocess = {"resize": 64, "crop": 64, "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    source = make_source("synthetic", n_classes=5, n_per_class=4, split="val", image_size=64)
    result = evaluate_model(model, source, Preprocess(**model.preprocess))
    assert result["n_images"] == 20
    # every p of the augmented float64 model equals the float64 black box to float64 rounding
    assert result["max_abs_logit_diff"] <= 1e-10 * result["max_abs_logit"]
    assert result["top1_prototype"] == result["top1_black_box"]
    assert set(result["localization"]) == {1, 3, 5}  # explain ran on every p
    html = render_report(model, result, source, classes=[0, 1], images_per_class=2)
    # two classes × (coefficients, a heatmap strip per prototype, the residual's) + Figure 4 (fitted in memory: no gallery)
    assert html.count("data:image/png;base64,") == 2 * (1 + model.p + 1) + 1 and html.count("no gallery") == 2 * model.p
    assert {t.dtype for t in tensors(model).values() if t.is_floating_point()} == {torch.float64}, "nothing was cast back"
    assert model.device.type == "cpu"


def test_a_layer_cut_of_a_float64_network_gives_its_float64_logits(resnet):
    from protonmf.backbones.layer_cut import LayerCut

    backbone = copy.deepcopy(resnet).double()
    cut = LayerCut(backbone, "layer3", 64)  # its self-check runs float32 noise through the float64 network
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        full = backbone.model(x.double())
        logits = cut.logits(cut.activations(x.double()))
    assert logits.dtype == torch.float64
    torch.testing.assert_close(logits, full, rtol=0, atol=1e-10 * float(full.abs().max()))


# ---------------------------------------------------------------------------------------------
# A run's steps take their device from the config, never from "CUDA if present".
# ---------------------------------------------------------------------------------------------


def test_step_device_follows_the_gpus_the_config_gives(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert step_device(0, "compute.fit_gpus") == torch.device("cpu")  # a GPU present is not a GPU given
    assert step_device(0.5, "compute.fit_gpus") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"compute\.fit_gpus = 1 but this worker has no CUDA device.*set compute\.fit_gpus=0"):
        step_device(1, "compute.fit_gpus")


def _store_and_config(tmp_path, **compute):
    from protonmf.config import parse_config
    from protonmf.data.store import FeatureStore
    from protonmf.pipeline import Run
    from tests.data.test_store import records

    g = torch.Generator().manual_seed(6)
    store = FeatureStore.create(str(tmp_path / "fs"), key="k", class_names=["a", "b"], grid=(2, 2), dim=8,
                                V=torch.randn(2, 8, generator=g), bias=torch.zeros(2))
    config = parse_config({"storage": {"features": store.uri, "model": str(tmp_path / "model")},
                           "prototypes": {"p": [2]}, "compute": compute})
    made_from = Run(config).images_sha256  # the run's (synthetic) images: the fit checks its features are theirs
    for k in range(2):
        store.write_class(k, torch.rand(6, 2, 2, 8, generator=g), records(6), images_sha256=made_from[k])
    return store, config


def test_a_group_fits_on_the_cpu_unless_the_config_gives_gpus(tmp_path, monkeypatch):
    from protonmf.pipeline import Run, fit_prototype_group

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    store, config = _store_and_config(tmp_path, fit_gpus=1)
    with pytest.raises(RuntimeError, match=r"compute\.fit_gpus = 1 but this worker has no CUDA device"):
        fit_prototype_group(Run(config), [0, 1])
    store, config = _store_and_config(tmp_path / "cpu", fit_gpus=0)
    done = fit_prototype_group(Run(config), [0, 1])
    assert done.classes == [0, 1] and len(done.feature_error[2]) == 2


def test_evaluation_and_craft_steps_take_the_extraction_gpus(tmp_path, monkeypatch):
    from protonmf.pipeline import Run, evaluate_prototype_model
    from tasks.craft import _open

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _, config = _store_and_config(tmp_path, extract_gpus=1)
    with pytest.raises(RuntimeError, match=r"compute\.extract_gpus = 1 but this worker has no CUDA device"):
        evaluate_prototype_model(Run(config), source=None)
    with pytest.raises(RuntimeError, match=r"compute\.extract_gpus = 1 but this worker has no CUDA device"):
        _open(Run(config), config.compute.extract_gpus)


def test_the_command_lines_device_is_checked_before_any_work(monkeypatch, capsys):
    from flows.cli import main

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["evaluate", "no-model-here", "--val", "x", "--device", "cuda"]) == 2
    assert "--device 'cuda': this machine has no CUDA device" in capsys.readouterr().err
    assert main(["explain", "no-model-here", "img.png", "--device", "gpu"]) == 2
    assert "--device 'gpu': Expected one of cpu, cuda" in capsys.readouterr().err
