"""The small run the flow and task tests start from: 4 synthetic classes, a random resnet18, stores on S3."""

N_CLASSES = 4


def tree(bucket: str, name: str, **overrides) -> dict:
    config = {
        "data": {
            "source": "synthetic", "n_classes": N_CLASSES, "max_images_per_class": 10, "val_images_per_class": 5,
            "preprocess": {"resize": 64, "crop": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]},
        },
        "backbone": {"arch": "torchvision:resnet18", "num_classes": N_CLASSES},
        "prototypes": {"p": [3, 1], "classes_per_task": 2},
        "compute": {"batch_size": 8},
        "storage": {"features": f"s3://{bucket}/{name}/features", "model": f"s3://{bucket}/{name}/model"},
    }
    for key, value in overrides.items():
        section, field = key.split("__")
        config.setdefault(section, {})[field] = value
    return config


def assert_gives_the_black_box_logits(model, black_box) -> None:
    """The published model reproduces the black box on the run's held-out images (argmax exactly,
    logits to float32 rounding)."""
    import torch

    from protonmf.data import Preprocess, make_source

    source = make_source("synthetic", n_classes=N_CLASSES, n_per_class=5, split="val", image_size=64)
    pre = Preprocess(resize=64, crop=64, mean=(0.5,) * 3, std=(0.25,) * 3)
    images = torch.stack([pre(source.load(r)[0]) for r in source.records])
    with torch.no_grad():
        theirs = black_box.model(images)
    ours = model(images)
    assert torch.equal(ours.argmax(1), theirs.argmax(1))
    assert float((ours - theirs).abs().max()) <= 1e-4 * float(theirs.abs().max())


def module_bucket(s3_server: str, name: str):
    """A generator for a module fixture: the bucket ``name`` on the moto server, with the AWS
    variables set in this process (and so for the Ray workers it starts), restored afterwards."""
    import os

    import s3fs

    names = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")
    saved = {n: os.environ.get(n) for n in names}
    os.environ.update(AWS_ENDPOINT_URL=s3_server, AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1")
    s3fs.S3FileSystem.clear_instance_cache()
    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)
    yield name
    for n, v in saved.items():
        if v is None:
            os.environ.pop(n, None)
        else:
            os.environ[n] = v
