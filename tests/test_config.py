"""Configs: YAML validated into typed objects; bad keys and types name the key."""

from pathlib import Path

import pytest

from protonmf.config import ConfigError, load_config, parse_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    config = load_config(path)
    assert config.prototypes.p and config.storage.model


def test_issue_example_and_overrides():
    tree = {
        "data": {
            "source": "imagefolder",
            "train": "s3://bucket/imagenet/train",
            "val": "s3://bucket/imagenet/val",
            "max_images_per_class": None,
            "preprocess": {"resize": 256, "crop": 224, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        },
        "backbone": {"arch": "torchvision:resnet34", "weights": "IMAGENET1K_V1", "num_classes": 1000},
        "prototypes": {"p": [3], "max_iter": 200, "tol": 1.0e-4, "seed": 0},
        "compute": {"ray_address": None, "extract_gpus": 1, "batch_size": 256},
        "storage": {"features": "s3://bucket/protonmf/features", "model": "s3://bucket/protonmf/models/resnet34"},
    }
    config = parse_config(tree, ["prototypes.p=[1,3,5,10]", "compute.batch_size=64", "data.val=null"])
    assert config.prototypes.p == [1, 3, 5, 10]
    assert config.compute.batch_size == 64 and config.data.val is None
    assert config.backbone.num_classes == 1000 and config.data.preprocess.crop == 224


@pytest.mark.parametrize(
    "tree, overrides, message",
    [
        ({"data": {"sorce": "x"}}, [], "data.sorce: unknown key"),
        ({"prototypes": {"p": ["three"]}}, [], "prototypes.p.0: Input should be a valid integer"),
        ({"prototypes": {"p": [0, 3]}}, [], "prototype counts must be >= 1, got [0]"),
        ({}, ["compute.batch_size=-1"], "compute.batch_size: Input should be greater than or equal to 1"),
        ({}, ["compute.retries=-1"], "compute.retries: Input should be greater than or equal to 0"),
        ({}, ["backbone.arch=resnet34"], "backbone.arch: must be 'library:name'"),
        ({}, ["prototypes.tol"], "--set expects key=value"),
        ({"storage": {"model": 3}}, [], "storage.model: Input should be a valid string"),
        ({"compute": {"workers": 4}}, [], "compute.workers was removed: the extraction pool sizes itself to the cluster; "
                                          "cap it with compute.max_extract_workers"),
        ({}, ["data.unknown_val_classes=ignore"], "data.unknown_val_classes: Input should be 'error' or 'skip'"),
        ({}, ["evaluation.shard_images=0"], "evaluation.shard_images: Input should be greater than or equal to 1"),
    ],
)
def test_bad_config_names_the_key(tree, overrides, message):
    with pytest.raises(ConfigError) as err:
        parse_config(tree, overrides)
    assert message in str(err.value)


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("data: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(tmp_path / "bad.yaml")
