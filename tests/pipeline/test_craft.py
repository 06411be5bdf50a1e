"""CRAFT steps without Ray: plan → groups (staged, resumable) → published concepts artifact."""

import io
import json
import re

import pytest
import torch
from PIL import Image

from protonmf.artifact import ArtifactError, list_versions
from protonmf.config import parse_config
from protonmf.craft.artifact import ConceptSet
from protonmf.pipeline import (
    Run, class_groups, extract_features, learn_concept_group, plan_concept_images, prepare_store, publish_concept_set,
    resolve_backbone,
)
from protonmf.storage import read_bytes, to_fs


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("craft")
    config = parse_config({
        "data": {"source": "synthetic", "n_classes": 3, "max_images_per_class": 8, "val_images_per_class": 6,
                 "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "protonmf:small_cnn", "num_classes": 3, "arch_kwargs": {"width": 8}},
        "storage": {"features": str(root / "features"), "model": str(root / "model"), "concepts": str(root / "concepts")},
        "compute": {"batch_size": 16},
        "craft": {"n_concepts": 3, "crop": 32, "stride": 16, "n_design": 8, "sub_layers": ["layer2"], "sub_concepts": 2,
                  "recurse": 1, "classes_per_task": 2, "figure_classes": 1, "top_crops": 4, "max_iter": 50},
    })
    run, backbone = resolve_backbone(Run(config))
    train, val = run.source("train"), run.source("val")
    store = prepare_store(run, backbone, list(train.classes))
    extract_features(run, [0, 1, 2], workers=0)
    plan = plan_concept_images(run)
    groups = [learn_concept_group(run, backbone, plan, g, train, val) for g in class_groups(3, 2)]
    return run.config, backbone, store, plan, groups, train, val


def test_plan_takes_the_predicted_images_most_confident_first(run):
    config, _, store, plan, *_ = run
    records = store.read_records()
    pred = records["pred"].to_pylist()
    top = [t[0] for t in records["top_logits"].to_pylist()]
    for k, rows in plan.items():
        expected = sorted((i for i, p in enumerate(pred) if p == k), key=lambda i: -top[i])
        assert [r["image_id"] for r in rows] == [records["image_id"][i].as_py() for i in expected][: config.craft.max_images_per_class]
    assert sum(len(v) for v in plan.values()) == len(pred)  # 8 per class < 100: every image is used


def test_groups_resume_and_publish_round_trips(run):
    config, backbone, store, plan, groups, train, val = run
    assert [g["resumed"] for g in groups] == [False, False]
    again = learn_concept_group(Run(config), backbone, plan, [0, 1], train, val)
    assert again["resumed"] and again["info"] == json.loads(json.dumps(groups[0]["info"]))
    uri = publish_concept_set(Run(config), backbone, train, val)
    fs, root = to_fs(uri)
    assert fs.ls(root + ".staging") == []  # the run's staged groups are removed once published
    cs = ConceptSet.load(uri)
    with_images = [k for k, v in plan.items() if v]
    assert sorted(cs.concepts) == with_images
    assert cs.summary["skipped_classes"] == [k for k, v in plan.items() if not v]
    for k in with_images:
        cc, info = cs.concepts[k], cs.info[k]
        assert cc.W.shape == (3, 32) and len(info["images"]) == len(plan[k])
        assert [im["image_id"] for im in info["images"]] == [r["image_id"] for r in plan[k]]
        (sub,) = [b for b in cc.banks.values() if b.id != "root"]  # recurse: 1 concept, 1 level
        assert sub.layer == "layer2" and sub.id == f"c{int(cc.importance.argmax())}"
        assert [c["id"] for c in info["tree"]["children"] if c["children"]] == [sub.id]
        assert set(info) >= {"banks", "images", "tree", "n_eval_images"}
        for bank in cc.banks.values():  # the stored banks are the normalised ones fidelity and maps used
            torch.testing.assert_close(bank.W.norm(dim=1), torch.ones(bank.W.shape[0]), rtol=1e-6, atol=0)
        if info["n_eval_images"]:  # every bank measured, the sub-bank at its own layer
            sub_f = info["sub_fidelity"][sub.id]
            assert sub_f["layer"] == "layer2" and sorted(sub_f["sobol"]["order"]) == [0, 1]
            assert sub_f["sobol"]["order"] == sub.importance.argsort(descending=True).tolist()
            assert len(sub_f["tcav"]["score"]) == 2 and len(info["fidelity"]["tcav"]["mean_derivative"]) == 3
    assert any(cs.info[k]["n_eval_images"] for k in with_images)  # the fidelity branch above ran
    crops = ConceptSet.read_top_crops(uri).to_pydict()
    k = with_images[0]
    cc = cs.concepts[k]
    rows = [i for i, (c, b) in enumerate(zip(crops["class_idx"], crops["bank"])) if c == k and b == "root"]
    assert len(rows) == 3 * 4  # 3 concepts × 4 top crops
    first = rows[0]  # concept c0, rank 0: the crop with the largest coefficient
    assert crops["concept"][first] == "c0" and crops["coefficient"][first] == pytest.approx(float(cc.root.U[:, 0].max()))
    manifest = ConceptSet.read_manifest(uri)
    root = f"{root}/versions/{manifest['version']}"  # the published version's folder
    pngs = [name for name in manifest["files"] if name.endswith(".png")]
    assert {f"figures/c{with_images[0]:05d}_{kind}.png" for kind in ("concepts", "importance", "tree")} <= set(pngs)
    for name in pngs:
        assert Image.open(io.BytesIO(read_bytes(fs, f"{root}/{name}"))).size[0] > 100
    page = read_bytes(fs, f"{root}/index.html").decode()
    assert "Fidelity in concept space" in page and "Concept localization against part masks" in page
    assert sorted(re.findall(r'src="([^"]+)"', page)) == sorted(pngs)  # every figure shown, each one there
    before = fs.info(f"{root}/manifest.json")["mtime"]
    assert publish_concept_set(Run(config), backbone, train, val) == uri  # same key: kept as it is
    assert fs.info(f"{root}/manifest.json")["mtime"] == before
    assert list_versions(uri) == [manifest["version"]]  # nothing republished
    with open(f"{root}/classes.json", "ab") as f:
        f.write(b" ")
    with pytest.raises(ArtifactError, match="classes.json does not match its sha256"):
        ConceptSet.load(uri)


def test_a_stored_image_that_disappeared_is_named(run):
    config, backbone, store, plan, _, train, val = run
    k = next(k for k, v in plan.items() if v)
    bad = {k: [{**plan[k][0], "image_id": "nope/none.png"}]}
    with pytest.raises(ValueError, match="image 'nope/none.png' of the feature store is no longer in the data"):
        learn_concept_group(Run(config.model_copy(update={"craft": config.craft.model_copy(update={"seed": 7})})), backbone, bad, [k], train,
                            val)
