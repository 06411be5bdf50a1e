"""A run's steps in this process, no Ray, no Prefect: a small synthetic set, the small CNN,
prepare → extract → fit (staged groups) → publish. Its model has a gallery."""

from protonmf.config import parse_config
from protonmf.pipeline import (
    Run, class_groups, extract_features, fit_prototype_group, prepare_store, publish_prototype_model, resolve_backbone,
)

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
    run, backbone = resolve_backbone(Run(small_config(root, **prototypes)))
    store = prepare_store(run, backbone, list(run.source("train").classes))
    extract_features(run, list(range(N_CLASSES)), workers=0)
    fits = [fit_prototype_group(run, g) for g in class_groups(N_CLASSES, run.config.prototypes.classes_per_task)]
    return run.config, store, fits, publish_prototype_model(run)
