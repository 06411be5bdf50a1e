"""Extraction: a real torchvision backbone over an ImageFolder on disk and on S3, into the feature store."""


import pytest
import torch

from protonmf import BackboneSpec, build_backbone
from protonmf.data import Preprocess, make_source
from protonmf.data.extract import extract_classes
from protonmf.data.store import FeatureStore, StoreError
from protonmf.pipeline.staging import run_key
from tests.data.odd_tree import write_odd_tree

PRE = Preprocess(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneSpec("torchvision:resnet18", num_classes=3))


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "train"
    return write_odd_tree(root)


def extract(backbone, root, store_uri):
    source = make_source("imagefolder", root=str(root))
    store = FeatureStore.create(
        store_uri, key=run_key(arch="resnet18", data="tree"), class_names=source.classes,
        grid=(2, 2), dim=512, V=backbone.V, bias=backbone.bias, chunk_images=4,
    )
    summary = extract_classes(backbone, source, PRE, store, range(3), batch_size=4, workers=2)
    return source, store, summary


def test_local_and_s3_extractions_are_bit_identical(backbone, tree, tmp_path, s3, s3_bucket):
    s3.put(str(tree), f"{s3_bucket}/train", recursive=True)
    _, local, summary = extract(backbone, tree, str(tmp_path / "features"))
    _, remote, _ = extract(backbone, f"s3://{s3_bucket}/train", f"s3://{s3_bucket}/features")
    assert [s.n_images for s in summary] == [6, 9, 6]  # gray, CMYK and RGBA images are converted
    assert [s.n_skipped for s in summary] == [0, 3, 0]  # truncated, not an image, empty
    reopened = FeatureStore.open(f"s3://{s3_bucket}/features")
    for k in range(3):
        assert torch.equal(reopened.read_class(k), local.read_class(k))
    same = ["image_id", "label", "row", "pred", "top_classes", "top_logits"]
    assert reopened.read_records().select(same).equals(local.read_records().select(same))
    reasons = [r and r.split(":")[0] for r in reopened.read_records()["skipped"].to_pylist()]
    assert reasons == [r and r.split(":")[0] for r in local.read_records()["skipped"].to_pylist()]


def test_stored_features_give_the_black_box_logits(backbone, tree, tmp_path):
    source, store, _ = extract(backbone, tree, str(tmp_path / "features"))
    records = store.read_records().to_pylist()
    used = [r for r in records if r["skipped"] is None]
    images = torch.stack([PRE(source.load(next(x for x in source.records if x.image_id == r["image_id"]))[0]) for r in used])
    with torch.no_grad():
        own = backbone.model(images)  # the network's own forward pass
    stored = torch.cat([store.read_class(k) for k in range(3)]).float()  # (n, h·w, D) float16 → float32
    recomputed = stored.mean(1) @ backbone.V.T + backbone.bias
    assert float((recomputed - own).abs().max()) <= 2e-3 * float(own.abs().max())  # float16 storage
    assert torch.equal(recomputed.argmax(1), own.argmax(1))
    torch.testing.assert_close(torch.tensor([r["top_logits"][0] for r in used]), own.max(1).values)
    assert [r["pred"] for r in used] == own.argmax(1).tolist()


def test_corrupt_files_are_listed_as_skipped_and_the_run_completes(backbone, tree, tmp_path):
    _, store, summary = extract(backbone, tree, str(tmp_path / "features"))
    skipped = {r["image_id"].split("/")[-1]: r["skipped"] for r in store.read_records().to_pylist() if r["skipped"]}
    assert set(skipped) == {"truncated.jpg", "notes.jpg", "empty.png"}
    assert skipped["truncated.jpg"].startswith("truncated image")
    assert skipped["notes.jpg"].startswith("not an image") and skipped["empty.png"].startswith("empty file")
    assert store.done_classes() == [0, 1, 2]
    again = extract_classes(backbone, make_source("imagefolder", root=str(tree)), PRE, store, range(3))
    assert all(s.resumed for s in again)


def test_bfloat16_channels_last_extraction_is_close_to_float32(backbone, tree, tmp_path):
    """The GPU worker's settings (bf16 autocast, NHWC), run here on the CPU: the same features to
    bfloat16 rounding, the float32 path untouched."""
    source = make_source("imagefolder", root=str(tree))
    stores = {}
    for name, kwargs in {"fp32": {}, "bf16": {"precision": "bfloat16", "channels_last": True}}.items():
        stores[name] = FeatureStore.create(
            str(tmp_path / name), key=run_key(arch="resnet18", data="tree", **kwargs), class_names=source.classes,
            grid=(2, 2), dim=512, V=backbone.V, bias=backbone.bias,
        )
        extract_classes(backbone, source, PRE, stores[name], [0], batch_size=4, workers=0, **kwargs)
    backbone.to(memory_format=torch.contiguous_format)
    full, half = stores["fp32"].read_class(0).float(), stores["bf16"].read_class(0).float()
    assert not torch.equal(full, half)
    assert float((full - half).norm() / full.norm()) < 2e-2  # bfloat16 has 8 bits of mantissa
    with pytest.raises(ValueError, match="precision must be 'float32' or 'bfloat16', got 'int8'"):
        extract_classes(backbone, source, PRE, stores["fp32"], [1], precision="int8")


def fit_all_classes(store):
    """Prototypes of every class of ``store`` for p = 3, as the fit step computes them."""
    from protonmf.prototypes.fit import fit_prototypes_sweep, stack_classes

    A, rows = stack_classes([store.read_class(k).reshape(-1, store.dim) for k in range(len(store.class_names))])
    V, bias = store.head()
    (fit, _), = fit_prototypes_sweep(A, V, bias, [3], n_rows=rows, max_iter=50, device="cpu").values()
    return fit.to_tensors()


def test_damaged_classes_are_extracted_again_and_refit_as_before(backbone, tree, tmp_path):
    from tests.data.test_store import damage_chunks

    source, store, _ = extract(backbone, tree, str(tmp_path / "features"))  # chunks of 4 images
    before = [store.read_class(k) for k in range(3)]
    fit_before = fit_all_classes(store)
    damage_chunks(tmp_path / "features", 0, lose=[1])
    damage_chunks(tmp_path / "features", 2, garble=[0])
    damaged = FeatureStore.open(str(tmp_path / "features"))
    for k, what in ((0, r"chunk 1 \(images 4–5\) is missing"), (2, r"chunk 0 \(images 0–3\) cannot be decoded")):
        with pytest.raises(StoreError, match=rf"class {k} \('{source.classes[k]}'\) of the feature store at '{tmp_path}/features' is damaged: {what}"):
            damaged.read_class(k)

    forwarded = []
    again = extract_classes(backbone, source, PRE, damaged, range(3), batch_size=4, workers=0, on_batch=forwarded.append)
    assert [s.resumed for s in again] == [False, True, False]  # exactly the damaged classes
    assert sum(forwarded) == 12 and [s.n_images for s in again] == [6, 0, 6]  # class 1's 9 images not forwarded
    for k in range(3):
        assert torch.equal(damaged.read_class(k), before[k])
    fit_after = fit_all_classes(damaged)
    for name in fit_before:
        assert torch.equal(fit_after[name], fit_before[name]), name


def test_a_damaged_class_whose_images_are_gone_fails_naming_it(backbone, tree, tmp_path):
    from tests.data.test_store import damage_chunks

    source, store, _ = extract(backbone, tree, str(tmp_path / "features"))
    name = source.classes[1]
    damage_chunks(tmp_path / "features", 1, lose=[0])
    for image in sorted((tree / name).glob("*.png"))[:2]:
        image.unlink()
    gone = make_source("imagefolder", root=str(tree))
    message = (
        rf"class 1 \('{name}'\) of the feature store at '{tmp_path}/features' is damaged: chunk 0 \(images 0–3\) is missing "
        r"\(Zarr reads it as zeros\); it cannot be extracted again: 7 of its images can be used now, 9 when it was extracted"
    )
    with pytest.raises(StoreError, match=message):
        extract_classes(backbone, gone, PRE, store, range(3), batch_size=4, workers=0)
    assert store.check_class(1).startswith("chunk 0 (images 0–3) is missing")  # left as it was, still reported


class _Poisoned(Preprocess):
    """The real preprocessing, but the 70-px-wide grey image comes out as NaN and the CMYK one
    (64 × 80) scaled by 1e8: a real resnet18 then gives NaN features, and features beyond float16.

    Extraction decodes to uint8 on one side and normalizes on the other: ``to_uint8`` marks the two
    images in their first pixels, ``normalize`` poisons what it finds marked."""

    MARKS = {(70, 64): (1, 2, 3, 4), (64, 80): (5, 6, 7, 8)}

    def to_uint8(self, image):
        x = super().to_uint8(image)
        if image.size in self.MARKS:
            x = x.clone()
            x[0, 0, :4] = torch.tensor(self.MARKS[image.size], dtype=torch.uint8)
        return x

    def normalize(self, images):
        out = super().normalize(images)
        for i in range(images.shape[0]):
            mark = tuple(images[i, 0, 0, :4].tolist())
            if mark == self.MARKS[(70, 64)]:
                out[i] = out[i] * float("nan")
            elif mark == self.MARKS[(64, 80)]:
                out[i] = out[i] * 1e8
        return out


def test_nan_and_inf_features_skip_the_image_naming_it_and_the_rest_goes_on(backbone, tree, tmp_path, caplog):
    source = make_source("imagefolder", root=str(tree))
    store = FeatureStore.create(
        str(tmp_path / "features"), key=run_key(arch="resnet18", data="poisoned"), class_names=source.classes,
        grid=(2, 2), dim=512, V=backbone.V, bias=backbone.bias, chunk_images=4,
    )
    with caplog.at_level("WARNING", logger="protonmf.data.extract"):
        summary = extract_classes(backbone, source, _Poisoned(**PRE.to_dict()), store, range(3), batch_size=4, workers=2)
    assert [s.n_images for s in summary] == [6, 7, 6]  # 9 readable in class 1, 2 of them poisoned
    assert [s.n_skipped for s in summary] == [0, 5, 0]
    records = store.read_records([1]).to_pylist()
    why = {r["uri"].rsplit("/", 1)[-1]: r["skipped"] for r in records if r["skipped"]}
    assert why["gray.png"] == "NaN in its features"
    assert why["cmyk.jpg"] == "features beyond float16's range (|x| > 65504), the store's dtype"
    for k in range(3):
        assert torch.isfinite(store.read_class(k).float()).all()
    assert sum(r["skipped"] is None for r in records) == 7 and sorted(r["row"] for r in records if r["row"] is not None) == list(range(7))
    assert any(f"class 1: image {r['uri']} skipped: NaN in its features" in m
               for m in caplog.messages for r in records if r["uri"].endswith("gray.png"))
