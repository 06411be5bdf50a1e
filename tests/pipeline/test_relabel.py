"""Held-out images are labelled by class name, not by their folder's sorted position: a missing
held-out class shifts no label, and an unknown one is an error naming it (or skipped, counted)."""

import json
import shutil

import pytest
import torch

from protonmf import PrototypeModel
from protonmf.config import parse_config
from protonmf.data import Preprocess, make_source
from protonmf.data.sources.relabel import RelabeledSource, relabel_by_name
from protonmf.demo.synthetic import write_image_folder
from protonmf.pipeline import index_data, make_split_source

PRE = {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def model_and_val(tmp_path_factory):
    """The demo CNN (right on every held-out synthetic image) as a prototype model, and a held-out
    folder with class 2 removed and a class the model does not know added."""
    from protonmf.demo.backbone import train_demo_backbone

    tmp = tmp_path_factory.mktemp("relabel")
    backbone = train_demo_backbone().backbone  # cached by the demo
    train = make_source("synthetic", n_classes=10, n_per_class=3, split="train", image_size=64)
    pre = Preprocess(**PRE)
    images = torch.stack([pre(train.load(r)[0]) for r in train.records])
    model = PrototypeModel.fit(backbone, images, torch.tensor([r.label for r in train.records]), p=[1],
                               class_names=train.classes)
    model.preprocess = dict(PRE)
    model.save(str(tmp / "model"))
    write_image_folder(make_source("synthetic", n_classes=10, n_per_class=4, split="val", image_size=64).data, tmp / "val")
    write_image_folder(make_source("synthetic", n_classes=10, n_per_class=3, split="train", image_size=64).data, tmp / "train")
    shutil.rmtree(tmp / "val" / train.classes[2])
    (tmp / "val" / "zzz_unknown").mkdir()
    for i, png in enumerate(sorted((tmp / "val" / train.classes[0]).glob("*.png"))[:2]):
        shutil.copy(png, tmp / "val" / "zzz_unknown" / f"{i}.png")
    return str(tmp / "model"), tmp, train.classes


def test_relabel_by_name_maps_labels_and_names_unknown_classes(model_and_val):
    _, tmp, classes = model_and_val
    own = make_source("imagefolder", root=str(tmp / "val"))
    assert own.classes == classes[:2] + classes[3:] + ["zzz_unknown"]  # by its own sorted order, class 3 is label 2
    with pytest.raises(ValueError, match=r"data.val: 1 held-out class\(es\) are not classes of the model: zzz_unknown; "
                                         r"set data.unknown_val_classes: skip"):
        relabel_by_name(own, classes)
    named = relabel_by_name(own, classes, unknown="skip")
    assert isinstance(named, RelabeledSource) and named.classes == classes
    assert named.unknown_classes == {"zzz_unknown": 2} and len(named) == 36
    assert sorted({r.label for r in named.records}) == [0, 1, 3, 4, 5, 6, 7, 8, 9]
    for r in named.records:
        assert r.image_id.split("/")[0] == classes[r.label]
    assert relabel_by_name(named, classes) is named  # already in the model's order


def test_cli_evaluate_val_labels_by_name(model_and_val, tmp_path, capsys):
    from flows.cli import main

    model, tmp, _ = model_and_val
    assert main(["evaluate", model, "--val", str(tmp / "val")]) == 2
    assert "--val: 1 held-out class(es) are not classes of the model: zzz_unknown" in capsys.readouterr().err
    out = tmp_path / "ev.json"
    assert main(["evaluate", model, "--val", str(tmp / "val"), "--unknown-val-classes", "skip", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    # the black box is right on every image; labelled by the folder's own order, the 28 images of the
    # 7 classes after the missing one would all have counted as wrong
    assert result["top1_black_box"] == 1.0 and result["n_images"] == 36
    assert result["n_skipped_unknown_class"] == 2 and result["unknown_classes"] == {"zzz_unknown": 2}
    assert result["top1_prototype"] == 1.0


def test_run_val_split_labels_by_name_with_and_without_an_index(model_and_val, tmp_path):
    _, tmp, classes = model_and_val
    tree = {"data": {"source": "imagefolder", "train": str(tmp / "train"), "val": str(tmp / "val"), "preprocess": PRE},
            "storage": {"features": str(tmp_path / "features")}}
    with pytest.raises(ValueError, match="data.val: 1 held-out class.*zzz_unknown"):
        make_split_source(parse_config(tree), "val")
    tree["data"]["unknown_val_classes"] = "skip"
    config = parse_config(tree)
    listed = make_split_source(config, "val")
    pinned = index_data(config)
    assert pinned.data.val_index.startswith(str(tmp_path / "features" / "index" / "val-"))
    indexed = make_split_source(pinned, "val")
    for source in (listed, indexed):
        assert source.classes == classes and source.unknown_classes == {"zzz_unknown": 2}
        assert [(r.image_id, r.label) for r in source.records] == [(r.image_id, r.label) for r in listed.records]
    three = make_split_source(pinned, "val", labels=[3])  # only class 3's rows of the held-out index
    assert {r.label for r in three.records} == {3} and len(three) == 4
    assert make_split_source(pinned, "val", labels=[2]).records == []  # no held-out images of class 2
