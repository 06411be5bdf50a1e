"""``residual="distributed"`` (Tan et al., ICML 2024) in the prototype model: exact logits, the
pieces sum to the residual, recorded in the manifest, and only this choice changes the fit key."""

import torch

from protonmf import PrototypeModel
from protonmf.config import parse_config
from protonmf.head import distribute_residual
from protonmf.prototypes.fit import fit_settings, stack_classes
from tests.prototypes.test_model import assert_exact


def test_distributed_model_gives_the_black_box_logits_for_every_p(resnet, resnet_data):
    images, labels, held_out = resnet_data
    model = PrototypeModel.fit(resnet, images, labels, p=[3, 1, 5], residual="distributed")
    equal = PrototypeModel.fit(resnet, images, labels, p=[3, 1, 5])
    assert model.residual == "distributed" and equal.residual == "equal"
    with torch.no_grad():
        A, _ = stack_classes([resnet(images[labels == k]) for k in range(5)])
    for p in model.available_p:
        m, e = model.with_p(p), equal.with_p(p)
        assert_exact(m, resnet, held_out)
        fit = m.prototypes
        assert fit.spread.all()
        torch.testing.assert_close(fit.B, e.prototypes.B, rtol=0, atol=0)  # same NMF, same C, same R
        torch.testing.assert_close(fit.C, e.prototypes.C, rtol=0, atol=0)
        pieces = fit.C.unsqueeze(2) * (fit.B_aug - fit.B.double())  # a_i (b'_i − b_i) = r_i
        torch.testing.assert_close(pieces.sum(1), fit.R, rtol=0, atol=1e-12 * float(fit.R.abs().max()))  # Σ r_i = R
        ref = distribute_residual(A, fit.B, fit.R)
        torch.testing.assert_close(pieces, ref, rtol=1e-6, atol=1e-9 * float(ref.abs().max()))
        torch.testing.assert_close((fit.C.unsqueeze(1) @ fit.B_aug).squeeze(1), resnet.V.double(), rtol=1e-10, atol=1e-12)
        if p > 1:  # the option changes the prototypes (a single prototype takes all of R either way)
            assert float((fit.B_aug - e.prototypes.B_aug).abs().max()) > 1e-3 * float(fit.B_aug.abs().max())
        else:
            torch.testing.assert_close(fit.B_aug, e.prototypes.B_aug, rtol=1e-10, atol=1e-12)


def test_distributed_contributions_are_the_pieces_heatmaps_and_add_up_to_the_logit(vit, vit_data):
    images, labels, held_out = vit_data
    model = PrototypeModel.fit(vit, images, labels, p=3, residual="distributed")
    assert_exact(model, vit, held_out)
    exp = model.explain(held_out)
    with torch.no_grad():
        pooled = vit(held_out).flatten(1, 2).mean(1).double()
    fit = model.prototypes
    p_tilde = fit.C.unsqueeze(2) * fit.B.double() + fit.C.unsqueeze(2) * (fit.B_aug - fit.B.double())  # a_i b_i + r_i
    expected = torch.einsum("bd,bpd->bp", pooled, p_tilde[exp.target])
    torch.testing.assert_close(exp.contributions, expected, rtol=1e-6, atol=1e-6)
    logit = exp.logits[torch.arange(len(held_out)), exp.target].double()
    torch.testing.assert_close(exp.contributions.sum(1) + exp.bias, logit, rtol=1e-5, atol=1e-5)


def test_manifest_records_the_distributed_residual(tmp_path, resnet, resnet_data):
    from protonmf.artifact import current_manifest

    images, labels, _ = resnet_data
    PrototypeModel.fit(resnet, images, labels, p=1, residual="distributed").save(str(tmp_path / "m"))
    assert current_manifest(str(tmp_path / "m"))["settings"]["residual"] == "distributed"
    assert PrototypeModel.load(str(tmp_path / "m")).residual == "distributed"


def test_only_the_distributed_residual_changes_the_fit_settings_and_key():
    from protonmf.pipeline.staging import fit_settings_of as _settings

    assert fit_settings(residual="equal") == fit_settings() and "residual" not in fit_settings()
    assert fit_settings(residual="distributed") == {**fit_settings(), "residual": "distributed"}
    base = parse_config({})
    assert _settings(base) == _settings(parse_config({"prototypes": {"residual": "equal"}}))
    assert _settings(base) == {"max_iter": 200, "tol": 1e-4, "seed": 0, "nonneg": False, "solver": "closed_form",
                               "nmf_input": "negative features set to 0 (ProtoNMF §3.1)"}
    assert _settings(parse_config({"prototypes": {"residual": "distributed"}}))["residual"] == "distributed"


def test_unknown_residual_is_a_clear_error(resnet, resnet_data):
    import pytest

    from protonmf.config import ConfigError

    images, labels, _ = resnet_data
    with pytest.raises(ValueError, match=r"residual must be one of \('equal', 'distributed'\), got 'spread'"):
        PrototypeModel.fit(resnet, images, labels, p=1, residual="spread")
    with pytest.raises(ConfigError, match="prototypes.residual"):
        parse_config({"prototypes": {"residual": "spread"}})
