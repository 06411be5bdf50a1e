"""Evaluation: Table 4 intervention, the real-patch baseline, matched cosine, reconstruction study."""

import numpy as np
import pytest
import torch
from scipy.optimize import nnls as scipy_nnls

from protonmf.evaluation.baselines import basis_error, patch_prototypes
from protonmf.evaluation.held_out import _fixed_by_intervention
from protonmf.evaluation.reconstruction import matched_cosine, reconstruction_study


def test_intervention_count_matches_editing_the_model_image_by_image(resnet, resnet_data, resnet_model):
    _, _, x = resnet_data
    labels = torch.arange(x.shape[0]) % 5
    with torch.no_grad():
        F = resnet(x)
    logits = resnet_model.logits_from_features(F)
    wrong = (logits.argmax(1) != labels).nonzero().flatten().tolist()
    assert wrong, "the random network gets some images wrong"
    expected = 0
    for i in wrong:
        c = int(logits[i].argmax())
        edited = resnet_model.intervene({c: [int(resnet_model.C[c].argmax())]})
        expected += int(edited(x[i : i + 1]).argmax(1)) == int(labels[i])
    assert _fixed_by_intervention(resnet_model, F, logits, labels) == expected


def test_patch_prototypes_are_real_rows_one_per_cluster():
    g = torch.Generator().manual_seed(0)
    centers = torch.tensor([[5.0, 0, 0, 0], [0, 5.0, 0, 0], [0, 0, 5.0, 0]])
    A = (centers.repeat_interleave(40, 0) + 0.1 * torch.rand(120, 4, generator=g)).clamp_min(0)
    B = patch_prototypes(A, 3)
    assert all(bool((A == row).all(1).any()) for row in B), "every prototype is a row of A"
    assert sorted(B.argmax(1).tolist()) == [0, 1, 2]
    with pytest.raises(ValueError, match="need 1 <= p <= n"):
        patch_prototypes(A[:2], 3)


def test_basis_error_uses_non_negative_codes():
    g = torch.Generator().manual_seed(1)
    A, B = torch.rand(30, 6, generator=g, dtype=torch.float64), torch.rand(2, 6, generator=g, dtype=torch.float64)
    E = np.stack([scipy_nnls(B.numpy().T, a)[0] for a in A.numpy()])
    expected = ((A.numpy() - E @ B.numpy()) ** 2).sum() / (A.numpy() ** 2).sum()
    assert basis_error(A, B) == pytest.approx(expected, rel=1e-9)


def test_matched_cosine_ignores_order():
    B = torch.rand(4, 8, generator=torch.Generator().manual_seed(2))
    assert matched_cosine(B, B[[2, 0, 3, 1]]) == pytest.approx(1.0)
    assert matched_cosine(B, torch.rand(4, 8)) < 1.0


def test_reconstruction_study_on_a_store(tmp_path):
    from protonmf.data.store import FeatureStore
    from tests.data.test_store import records

    g = torch.Generator().manual_seed(3)
    store = FeatureStore.create(str(tmp_path / "fs"), key="k", class_names=["a", "b"], grid=(2, 2), dim=16,
                                V=torch.randn(2, 16, generator=g), bias=torch.zeros(2))
    for k in range(2):
        E, B = torch.rand(20 * 4, 3, generator=g), torch.rand(3, 16, generator=g)
        store.write_class(k, (E @ B).reshape(20, 2, 2, 16), records(20))
    study = reconstruction_study(store, [1, 3])
    assert set(study) == {1, 3}
    assert study[3]["feature_error"]["mean"] < study[1]["feature_error"]["mean"]  # more prototypes, less error (Fig. 5)
    assert study[3]["feature_error"]["mean"] < 1e-2  # rank-3 data, 3 prototypes
    assert study[3]["head_error"]["mean"] <= study[1]["head_error"]["mean"]
    assert 0.9 < study[1]["stability"]["mean"] <= 1.0 + 1e-9
    assert study[3]["feature_error"]["mean"] <= study[3]["baseline_feature_error"]["mean"]


def test_reconstruction_study_reuses_a_given_fit(tmp_path):
    from protonmf.prototypes.fit import fit_prototypes, stack_classes
    from protonmf.data.store import FeatureStore
    from tests.data.test_store import records

    g = torch.Generator().manual_seed(4)
    store = FeatureStore.create(str(tmp_path / "fs"), key="k", class_names=["a", "b", "c"], grid=(2, 2), dim=12,
                                V=torch.randn(3, 12, generator=g), bias=torch.zeros(3))
    for k in range(3):
        store.write_class(k, torch.rand(15, 2, 2, 12, generator=g), records(15))
    A, rows = stack_classes([store.read_class(k).reshape(-1, 12) for k in range(3)])
    V, bias = store.head()
    published = {p: fit_prototypes(A, V, bias, p, n_rows=rows, seed=0)[0] for p in (1, 3)}
    reused = reconstruction_study(store, [1, 3], classes=[0, 2], fitted=published)
    refitted = reconstruction_study(store, [1, 3], classes=[0, 2])  # every p in one NMF sweep: float rounding apart
    assert reused.keys() == refitted.keys()
    for p in reused:
        for metric, value in reused[p].items():
            assert value == pytest.approx(refitted[p][metric], rel=1e-5, abs=1e-7), (p, metric)


def test_shards_evaluated_apart_and_merged_give_the_whole_evaluation_exactly(resnet_model):
    from protonmf.data import Preprocess, make_source
    from protonmf.evaluation.held_out import (
        accumulate_held_out,
        evaluate_model,
        held_out_shards,
        merge_held_out,
        summarize_held_out,
    )

    # the demo's part set: part masks (localization) and keypoints (consistency, stability)
    source = make_source("synthetic", n_classes=5, n_per_class=4, split="val", image_size=64)
    pre = Preprocess(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    whole = evaluate_model(resnet_model, source, pre, batch_size=3, workers=0)
    assert whole["n_images"] == 20 and set(whole["localization"]) == set(whole["consistency"]) == set(whole["stability"]) == {1, 3, 5}
    assert any(v["fixed"] for v in whole["intervention"].values()), "the random network gets some images wrong"

    shards = held_out_shards(len(source.records), 5, 3)  # rounded up to 6 records: 6, 6, 6, 2
    assert shards == [(0, 6), (6, 12), (12, 18), (18, 20)]
    labels = [r.label for r in source.records]
    assert labels == sorted(labels) and any(labels[b - 1] == labels[b] for _, b in shards[:-1]), "a class is split between shards"
    stats = [accumulate_held_out(resnet_model, source, pre, records=source.records[a:b], batch_size=3, workers=0)
             for a, b in shards]
    assert [s.n_images for s in stats] == [6, 6, 6, 2]
    assert summarize_held_out(merge_held_out(stats)) == whole  # every number, to the bit
    with pytest.raises(ValueError, match="no statistics"):
        merge_held_out([])
    with pytest.raises(ValueError, match="statistics of different models"):
        merge_held_out([stats[0], accumulate_held_out(resnet_model.with_p(1), source, pre, records=source.records[:3], workers=0)])
