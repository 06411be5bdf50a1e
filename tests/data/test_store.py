"""The Zarr feature store: bit-identical round trip, markers, resumption, records."""

import pyarrow as pa
import pytest
import torch

from protonmf.data.store import FeatureStore, StoreError

K, GRID, D = 3, (2, 2), 8


def records(n, skipped=()):
    rows, ids = [], []
    row = 0
    for i in range(n + len(skipped)):
        if i in skipped:
            rows.append(None)
        else:
            rows.append(row)
            row += 1
        ids.append(f"img{i}")
    return pa.table(
        {
            "image_id": ids,
            "uri": [f"/data/{i}.png" for i in ids],
            "label": [0] * len(ids),
            "row": rows,
            "pred": [None if r is None else 0 for r in rows],
            "top_classes": [None if r is None else [0, 1] for r in rows],
            "top_logits": [None if r is None else [2.0, 1.0] for r in rows],
            "skipped": ["truncated image" if r is None else None for r in rows],
        }
    )


def make(uri, key="k1", **kw):
    g = torch.Generator().manual_seed(0)
    return FeatureStore.create(
        str(uri), key=key, class_names=["a", "b", "c"], grid=GRID, dim=D,
        V=torch.randn(K, D, generator=g), bias=torch.randn(K, generator=g), chunk_images=4, **kw,
    )


def test_round_trip_is_bit_identical_and_marked(tmp_path):
    store = make(tmp_path / "fs")
    F = torch.rand(10, *GRID, D).half()
    assert store.done_classes() == []
    store.write_class(1, F, records(10, skipped={3}))
    again = FeatureStore.open(str(tmp_path / "fs"))
    assert again.done_classes() == [1] and again.is_done(1) and not again.is_done(0)
    assert torch.equal(again.read_class(1), F.flatten(1, 2))
    table = again.read_records()
    assert table.num_rows == 11 and table["skipped"].to_pylist().count("truncated image") == 1
    V, bias = again.head()
    assert torch.equal(V, store.head()[0]) and bias.shape == (K,)
    # chunks of 4 images: a writer of one class never touches another class's chunks
    assert again.group["c00001"].chunks == (4, 4, D)
    with pytest.raises(StoreError, match=r"class 0 \('a'\) is not complete"):
        again.read_class(0)


def test_rerun_resumes_and_other_settings_are_refused(tmp_path):
    store = make(tmp_path / "fs")
    store.write_class(0, torch.rand(5, *GRID, D), records(5))
    assert make(tmp_path / "fs").done_classes() == [0]
    with pytest.raises(StoreError, match="was made with other settings"):
        make(tmp_path / "fs", key="k2")


def test_bad_writes(tmp_path):
    store = make(tmp_path / "fs")
    with pytest.raises(ValueError, match=r"expected \(n, 4, 8\)"):
        store.write_class(0, torch.rand(5, 3, 3, D), records(5))
    with pytest.raises(ValueError, match="5 feature rows but 4 records with a row"):
        store.write_class(0, torch.rand(5, *GRID, D), records(4))
    bad = torch.rand(5, *GRID, D)
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="contain NaN or Inf"):
        store.write_class(0, bad, records(5))
    assert store.done_classes() == []
    with pytest.raises(StoreError, match="no feature store"):
        FeatureStore.open(str(tmp_path / "nothing"))


def test_same_store_on_a_local_s3_endpoint(tmp_path, s3, s3_bucket):
    F = torch.rand(9, *GRID, D).half()
    local = make(tmp_path / "fs")
    remote = make(f"s3://{s3_bucket}/features")
    for store in (local, remote):
        store.write_class(2, F, records(9))
    reopened = FeatureStore.open(f"s3://{s3_bucket}/features")
    assert reopened.done_classes() == [2]
    assert torch.equal(reopened.read_class(2), FeatureStore.open(str(tmp_path / "fs")).read_class(2))
    assert reopened.read_records().equals(local.read_records())
    assert s3.exists(f"{s3_bucket}/features/done/c00002.json")
