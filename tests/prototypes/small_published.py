"""A run's steps in this process, no Ray, no Prefect: a small synthetic set, the small CNN,
prepare → extract → fit (staged groups) → publish. Its model has a gallery."""

from protonmf.config import parse_config
from protonmf.pipeline.prototype_run import (
    extract_group, fit_group, make_split_source, prepare_store, publish_model, resolve_backbone,
)
from protonmf.pipeline.staging import class_groups

N_CLASSES = 3


def small_config(root, **prototypes):
    return parse_config({
        "data": {"source": "synthetic", "n_classes": N_CLASSES, "max_images_per_class": 6, "val_images_per_class": 4,
                 "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "protonmf:small_cnn", "num_classes": N_CLASSES, "arch_kwargs": {"width": 8}},
        "prototypes": {"p": [3, 1], "classes_per_task": 2, "max_iter": 100, **prototypes},
        "storage": {"features": str(root / "features"), "model": str(root / "model")},
        "compute": {"batch_size": 16},
    })


def published_run(root, **prototypes):
    """(config, store, the GroupFits of the first fit, the model URI)."""
    config, backbone = resolve_backbone(small_config(root, **prototypes))
    train = make_split_source(config, "train")
    store = prepare_store(config, backbone, train)
    extract_group(config, backbone, train, store, list(range(N_CLASSES)), workers=0)
    fits = [fit_group(config, store, g) for g in class_groups(N_CLASSES, config.prototypes.classes_per_task)]
    return config, store, fits, publish_model(config, backbone, store)
