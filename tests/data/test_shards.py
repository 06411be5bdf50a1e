"""Sharded sources: Parquet (Hugging Face imagenet-1k layout) and WebDataset tars, locally and on S3,
give the very features of the same images stored as an ImageFolder."""

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from protonmf import BackboneSpec, build_backbone
from protonmf.data import Preprocess, make_source
from protonmf.data.extract import extract_classes
from protonmf.data.index import index_table, open_index, write_index
from protonmf.data.store import FeatureStore
from protonmf.pipeline.staging import run_key
from tests.data.odd_tree import write_odd_tree

PRE = Preprocess(resize=64, crop=64, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
SAME = ["label", "row", "pred", "top_classes", "top_logits"]


@pytest.fixture(scope="module")
def backbone():
    torch.manual_seed(0)
    return build_backbone(BackboneSpec("torchvision:resnet18", num_classes=3))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """3 classes × 6 PNGs, plus odd files in the second class: 3 unusable (truncated, not an
    image, empty) and 3 in other modes (grey, CMYK, RGBA)."""
    root = tmp_path_factory.mktemp("shards") / "train"
    return write_odd_tree(root)


def _samples(tree):
    """(relative path, label, bytes) of every image of the tree, in ImageFolder order."""
    source = make_source("imagefolder", root=str(tree))
    return source.classes, [(r.image_id, r.label, (tree / r.image_id).read_bytes()) for r in source.records]


def write_parquet(tree, out, order=None, shards=2, hf_names=True):
    """Hugging Face's layout: columns image {bytes, path} and label; ClassLabel names in the metadata."""
    classes, samples = _samples(tree)
    samples = [samples[i] for i in (order if order is not None else range(len(samples)))]
    out.mkdir(parents=True)
    meta = {b"huggingface": json.dumps({"info": {"features": {
        "image": {"_type": "Image"}, "label": {"names": classes, "_type": "ClassLabel"}}}}).encode()}
    per = -(-len(samples) // shards)
    for s in range(shards):
        part = samples[s * per:(s + 1) * per]
        table = pa.table({
            "image": pa.array([{"bytes": data, "path": rel} for rel, _, data in part]),
            "label": pa.array([label for _, label, _ in part], pa.int64()),
        })
        if hf_names:
            table = table.replace_schema_metadata(meta)
        pq.write_table(table, out / f"train-{s:05d}-of-{shards:05d}.parquet", row_group_size=4)
    return classes


def write_tars(tree, out, shards=2, classes_txt=True):
    """WebDataset: <key>.<ext> image members and <key>.cls labels; class names in classes.txt."""
    classes, samples = _samples(tree)
    out.mkdir(parents=True)
    per = -(-len(samples) // shards)
    for s in range(shards):
        with tarfile.open(out / f"train-{s:06d}.tar", "w") as tar:
            for rel, label, data in samples[s * per:(s + 1) * per]:
                key, ext = rel.rsplit(".", 1)
                for name, payload in ((f"{key}.{ext}", data), (f"{key}.cls", str(label).encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
    if classes_txt:
        (out / "classes.txt").write_text("\n".join(classes) + "\n")
    return classes


def extract(backbone, source, uri):
    store = FeatureStore.create(uri, key=run_key(arch="resnet18", data="shards"), class_names=source.classes,
                                grid=(2, 2), dim=512, V=backbone.V, bias=backbone.bias, chunk_images=4)
    summary = extract_classes(backbone, source, PRE, store, range(3), batch_size=4, workers=2)
    return store, summary


@pytest.fixture(scope="module")
def reference(backbone, tree, tmp_path_factory):
    store, summary = extract(backbone, make_source("imagefolder", root=str(tree)), str(tmp_path_factory.mktemp("ref") / "f"))
    assert [s.n_images for s in summary] == [6, 9, 6] and [s.n_skipped for s in summary] == [0, 3, 0]
    return store


def assert_same_features(store, reference):
    for k in range(3):
        assert torch.equal(store.read_class(k), reference.read_class(k)), k
    ours, theirs = store.read_records(), reference.read_records()
    assert ours.select(SAME).equals(theirs.select(SAME))
    reasons = [r and r.split(":")[0] for r in ours["skipped"].to_pylist()]
    assert reasons == [r and r.split(":")[0] for r in theirs["skipped"].to_pylist()]
    assert sorted(r for r in reasons if r) == ["empty file", "not an image", "truncated image"]


@pytest.mark.parametrize("kind", ["parquet", "webdataset"])
def test_shards_give_the_features_of_the_same_images_as_an_imagefolder(kind, backbone, tree, reference, tmp_path, s3, s3_bucket):
    shards = tmp_path / "shards"
    classes = (write_parquet if kind == "parquet" else write_tars)(tree, shards)
    local = make_source(kind, root=str(shards))
    assert local.classes == classes and len(local) == 24
    store, _ = extract(backbone, local, str(tmp_path / "features"))
    assert_same_features(store, reference)

    s3.put(str(shards), f"{s3_bucket}/shards", recursive=True)
    pattern = f"s3://{s3_bucket}/shards/train-*.{'parquet' if kind == 'parquet' else 'tar'}"
    remote = make_source(kind, root=pattern)  # a glob, as for Hugging Face's data/train-*.parquet
    assert [r.image_id for r in remote.records] == [r.image_id for r in local.records]
    store, _ = extract(backbone, remote, f"s3://{s3_bucket}/features")
    assert_same_features(store, reference)

    # through the dataset index: the same records, loading the same pixels, nothing listed
    uri = write_index(index_table(remote, "train"), f"s3://{s3_bucket}/index")
    reopened = open_index(uri, labels=[1])
    assert reopened.classes == classes and reopened.records == remote.records_of(1)
    for r in reopened.records:
        a, b = reopened.load(r), remote.load(r)
        assert (a[1] is None) == (b[1] is None)
        if a[0] is not None:
            assert np.array_equal(np.asarray(a[0]), np.asarray(b[0]))


def test_parquet_shards_in_any_order_load_each_image_by_its_path(tree, tmp_path):
    """Hugging Face's imagenet-1k shards mix the classes: records still group by class (in shard,
    row order) and each loads the pixels of the file of the same path."""
    order = np.random.default_rng(0).permutation(24)
    write_parquet(tree, tmp_path / "shuffled", order=order, shards=3)
    source = make_source("parquet", root=str(tmp_path / "shuffled"))
    folder = make_source("imagefolder", root=str(tree))
    by_id = {r.image_id: r for r in folder.records}
    assert [r.label for r in source.records] == sorted(r.label for r in source.records)
    assert {r.image_id for r in source.records} == set(by_id)
    for r in source.records:
        assert r.label == by_id[r.image_id].label
        mine, theirs = source.load(r), folder.load(by_id[r.image_id])
        assert (mine[0] is None) == (theirs[0] is None)
        if mine[0] is not None:
            assert np.array_equal(np.asarray(mine[0]), np.asarray(theirs[0]))
        else:
            assert mine[1].split(":")[0] == theirs[1].split(":")[0]


def test_class_names_come_from_config_classes_txt_or_metadata(tree, tmp_path):
    names = write_parquet(tree, tmp_path / "hf")
    assert make_source("parquet", root=str(tmp_path / "hf")).classes == names
    write_parquet(tree, tmp_path / "bare", hf_names=False)
    with pytest.raises(ValueError, match="no class names for the labels of .*bare: give data.classes"):
        make_source("parquet", root=str(tmp_path / "bare"))
    (tmp_path / "bare" / "classes.txt").write_text("a\nb\nc\n")
    assert make_source("parquet", root=str(tmp_path / "bare")).classes == ["a", "b", "c"]
    assert make_source("parquet", root=str(tmp_path / "bare"), classes=["x", "y", "z"]).classes == ["x", "y", "z"]
    with pytest.raises(ValueError, match=r"label 2 is not in \[0, 2\)"):
        make_source("parquet", root=str(tmp_path / "bare"), classes=["x", "y"])

    write_tars(tree, tmp_path / "wds", classes_txt=False)
    with pytest.raises(ValueError, match="no class names for the labels of .*wds"):
        make_source("webdataset", root=str(tmp_path / "wds"))
    src = make_source("webdataset", root=str(tmp_path / "wds"), classes=names, max_images_per_class=2)
    assert [r.label for r in src.records] == [0, 0, 1, 1, 2, 2]


def test_bad_shards_are_named(tree, tmp_path):
    with pytest.raises(ValueError, match=r"data.train: no \.parquet shards found under .*nothing"):
        make_source("parquet", root=str(tmp_path / "nothing"), name="data.train")
    out = tmp_path / "nolabel"
    out.mkdir()
    with tarfile.open(out / "a.tar", "w") as tar:
        info = tarfile.TarInfo("x/0001.png")
        data = next(tree.rglob("0*.png")).read_bytes()
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match=r"a\.tar: 1 image\(s\) have no \.cls label, e\.g\. 'x/0001'"):
        make_source("webdataset", root=str(out), classes=["c"])
    pq.write_table(pa.table({"img": [b"x"], "label": [0]}), tmp_path / "cols.parquet")
    with pytest.raises(ValueError, match="cols.parquet has no column 'image'"):
        make_source("parquet", root=str(tmp_path / "cols.parquet").replace("cols", "col*"), classes=["c"])
