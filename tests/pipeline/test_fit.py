"""Step 3, fit, on its own: the group's features reach the NMF already on the fit's device (moved
once, not streamed from the host every iteration), and they must be those of the images the
run's listing shows."""

import pytest
import torch

from protonmf.config import parse_config
from protonmf.data.store import StoreError
from protonmf.pipeline import Run, extract_features, prepare_run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fit")
    config = parse_config({
        "data": {"source": "synthetic", "n_classes": 2, "max_images_per_class": 4, "val_images_per_class": 2,
                 "preprocess": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "torchvision:resnet18", "num_classes": 2},
        "prototypes": {"p": [2], "gallery": 0, "classes_per_task": 2},
        "storage": {"features": str(tmp / "features"), "model": str(tmp / "model")},
    })
    prepared = prepare_run(Run(config))
    extract_features(prepared.run, [0, 1], workers=0)
    return prepared.run


def test_the_features_are_on_the_fit_device_before_the_first_nmf_pass(run, monkeypatch):
    """``meta`` stands in for a GPU: the A the NMF gets is already there, whole (its blocks' moves
    to the device inside the loop are then no-ops), in the store's float16."""
    import protonmf.prototypes.fit as fit_module
    from protonmf.pipeline import fit_prototype_group

    seen = {}

    class Stop(Exception):
        pass

    def spy(A, ps, **kwargs):
        seen.update(device=A.device, dtype=A.dtype, shape=tuple(A.shape), asked=kwargs["device"])
        raise Stop

    monkeypatch.setattr(fit_module, "nmf_sweep", spy)
    with pytest.raises(Stop):
        fit_prototype_group(run, [0, 1], device="meta")
    h, w = run.store.grid
    assert seen == {"device": torch.device("meta"), "dtype": torch.float16, "shape": (2, 4 * h * w, run.store.dim),
                    "asked": torch.device("meta")}


def test_a_class_extracted_from_other_images_is_not_fitted(run):
    """A marker that says other images than the listing's (the data changed, extraction was not
    run) is refused where the features are read, naming the class."""
    from protonmf.pipeline import fit_prototype_group

    stale = Run(run.config)
    stale.__dict__["images_sha256"] = ["0" * 64, run.images_sha256[1]]  # class 0 listed with other images now
    with pytest.raises(StoreError, match=r"class 0 \('[^']+'\) of the feature store at .* is damaged: it was extracted "
                                         r"from other images than the data holds now \(extract it again\)"):
        fit_prototype_group(stale, [0, 1], device="cpu")
