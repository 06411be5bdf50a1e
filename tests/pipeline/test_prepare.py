"""Bad input found in prepare, before any extraction, each named with its config key."""

import shutil

import pytest
import torch

from protonmf import BackboneSpec, build_backbone
from protonmf.config import parse_config
from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder
from protonmf.pipeline import Run, index_data, make_split_source, prepare_store


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneSpec("torchvision:resnet18", num_classes=3))  # D = 512


@pytest.fixture
def folders(tmp_path):
    write_image_folder(make_synthetic_parts(3, 2, image_size=64, seed=0), tmp_path / "train")
    write_image_folder(make_synthetic_parts(3, 2, image_size=64, seed=1), tmp_path / "val")
    return tmp_path


def config(tmp_path, **data):
    return parse_config({
        "data": {"source": "imagefolder", "train": str(tmp_path / "train"), "val": str(tmp_path / "val"),
                 "preprocess": {"resize": 64, "crop": 64}, **data},
        "prototypes": {"p": [3, 600, 1000]},
        "storage": {"features": str(tmp_path / "features"), "model": str(tmp_path / "model")},
    })


def prepare(cfg, backbone):
    """As the run's prepare step does it: the data listed once into its index, then the store."""
    cfg = index_data(cfg)
    return prepare_store(Run(cfg), backbone, list(make_split_source(cfg, "train", labels=[]).classes))


def test_p_above_the_feature_dimension(folders, backbone):
    with pytest.raises(ValueError, match=r"^prototypes.p: \[600, 1000\] larger than the feature dimension D = 512 of "
                                         r"protonmf:small_cnn's features \(NMF needs p <= D\)$"):
        prepare(config(folders), backbone)
    assert not (folders / "features" / "zarr.json").exists()  # no store made


def ok(cfg):
    return cfg.model_copy(update={"prototypes": cfg.prototypes.model_copy(update={"p": [3]})})


def test_a_class_folder_without_images(folders, backbone):
    names = sorted(p.name for p in (folders / "train").iterdir())
    for image in (folders / "train" / names[1]).iterdir():
        image.unlink()
    (folders / "train" / ".cache").mkdir()  # hidden: not a class
    with pytest.raises(ValueError, match=rf"^data.train: 1 class folder\(s\) under {folders}/train hold no image: {names[1]}$"):
        prepare(ok(config(folders)), backbone)
    assert not (folders / "features" / "zarr.json").exists()


def test_held_out_classes_that_are_not_the_models(folders, backbone):
    names = sorted(p.name for p in (folders / "val").iterdir())
    shutil.copytree(folders / "val" / names[0], folders / "val" / "c999_stranger")
    with pytest.raises(ValueError, match=r"^data.val: 1 held-out class\(es\) are not classes of the model: c999_stranger; "
                                         r"set data.unknown_val_classes: skip"):
        prepare(ok(config(folders)), backbone)
    assert not (folders / "features" / "zarr.json").exists()
    shutil.rmtree(folders / "val" / "c999_stranger")
    shutil.rmtree(folders / "val" / names[2])  # a model's class without held-out images: mapped by name, fine
    store = prepare(ok(config(folders)).model_copy(update={"data": ok(config(folders)).data.model_copy(update={"val": None})}), backbone)
    assert store.class_names == names  # and with good data the store is made
