"""The Zarr feature store: bit-identical round trip, markers, resumption, records."""

import pyarrow as pa
import pytest
import torch

from protonmf.data.store import FeatureStore, StoreError
from tests.conftest import S3_REQUESTS

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
    start = len(S3_REQUESTS)
    assert torch.equal(reopened.read_class(2), FeatureStore.open(str(tmp_path / "fs")).read_class(2))
    # a class's features read back checked: its marker (with the array's metadata), its 3 chunks at once
    chunks = [("GET", f"c00002/c/{i}/0/0") for i in range(3)]
    read = sorted((m, p.split("/features/", 1)[1]) for m, p, _ in S3_REQUESTS[start:])
    assert read == chunks + [("GET", "done/c00002.json")]
    # with its records: its record table too, checked against the same marker
    start = len(S3_REQUESTS)
    _, table = reopened.read_class_with_records(2)
    assert table.equals(records(9).cast(table.schema))
    read = sorted((m, p.split("/features/", 1)[1]) for m, p, _ in S3_REQUESTS[start:])
    assert read == chunks + [("GET", "done/c00002.json"), ("GET", "tables/c00002.parquet")]
    assert reopened.read_records().equals(local.read_records())
    assert s3.exists(f"{s3_bucket}/features/done/c00002.json")
    remote.write_class(0, torch.zeros(0, *GRID, D), records(0, skipped={0, 1}))  # every image unreadable: no chunk
    assert FeatureStore.open(f"s3://{s3_bucket}/features").read_class(0).shape == (0, GRID[0] * GRID[1], D)


def damage_chunks(root, k, *, lose=(), garble=()):
    """Delete the chunks ``lose`` and overwrite the chunks ``garble`` (indices along the images) of class k."""
    for i in lose:
        (root / f"c{k:05d}" / "c" / str(i) / "0" / "0").unlink()
    for i in garble:
        (root / f"c{k:05d}" / "c" / str(i) / "0" / "0").write_bytes(b"\x00not a zstd frame" * 7)


def test_lost_and_garbled_chunks_are_named_when_read(tmp_path):
    """Zarr alone reads a lost chunk as zeros: the marker's checksums catch it and name the class."""
    store = make(tmp_path / "fs")
    F = torch.rand(10, *GRID, D).half() + 0.5  # chunks of 4 images: 0–3, 4–7, 8–9
    for k in (0, 1):
        store.write_class(k, F, records(10))
    damage_chunks(tmp_path / "fs", 1, lose=[2], garble=[0])
    again = FeatureStore.open(str(tmp_path / "fs"))
    assert again.done_classes() == [0, 1]  # the markers are there; the classes are not what they say
    assert float(again.group["c00001"][8:].sum()) == 0.0  # what Zarr alone would hand to the NMF
    expected = (
        rf"class 1 \('b'\) of the feature store at '{tmp_path}/fs' is damaged: chunk 0 \(images 0–3\) cannot be "
        r"decoded \(RuntimeError: .+\); chunk 2 \(images 8–9\) is missing \(Zarr reads it as zeros\)$"
    )
    with pytest.raises(StoreError, match=expected):
        again.read_class(1)
    assert again.check_class(0) is None and torch.equal(again.read_class(0), F.flatten(1, 2))


def test_a_chunk_replaced_by_valid_data_and_a_changed_table_are_named(tmp_path):
    store = make(tmp_path / "fs")
    F0 = torch.rand(8, *GRID, D).half()
    store.write_class(0, F0, records(8))
    store.write_class(2, torch.rand(8, *GRID, D), records(8))
    root = tmp_path / "fs"
    # a chunk that decodes, but is another class's: only a checksum can tell
    (root / "c00002/c/1/0/0").write_bytes((root / "c00000/c/1/0/0").read_bytes())
    again = FeatureStore.open(str(root))
    with pytest.raises(StoreError, match=r"class 2 \('c'\) .* is damaged: chunk 1 \(images 4–7\) does not match its sha256$"):
        again.read_class(2)
    (root / "tables/c00000.parquet").write_bytes((root / "tables/c00002.parquet").read_bytes() + b"x")
    table_damage = r"class 0 \('a'\) .* is damaged: its record table tables/c00000.parquet does not match its sha256"
    with pytest.raises(StoreError, match=table_damage):
        again.read_records()
    with pytest.raises(StoreError, match=table_damage):
        again.read_class_with_records(0)
    assert torch.equal(again.read_class(0), F0.flatten(1, 2))  # the features alone: no table read
    assert again.check_class(0) == "its record table tables/c00000.parquet does not match its sha256"
    (root / "tables/c00000.parquet").unlink()
    assert again.check_class(0) == "its record table tables/c00000.parquet is missing"


def test_a_store_written_before_checksums_opens_and_its_classes_count_as_unverified(tmp_path):
    """A marker of format 1 (no checksums): the store opens, the class must be extracted again."""
    import json

    store = make(tmp_path / "fs")
    F = torch.rand(5, *GRID, D).half()
    store.write_class(1, F, records(5))
    marker = tmp_path / "fs/done/c00001.json"
    old = {k: v for k, v in json.loads(marker.read_text()).items() if k in ("class", "name", "n_images", "n_skipped", "key")}
    marker.write_text(json.dumps(old))
    again = make(tmp_path / "fs")  # a rerun reopens it: same key
    assert again.done_classes() == [1]
    assert again.check_class(1) == "its marker holds no checksums (written by an earlier protonmf), so it cannot be verified"
    with pytest.raises(StoreError, match=r"class 1 \('b'\) .* is damaged: its marker holds no checksums"):
        again.read_class(1)
    again.write_class(1, F, records(5))  # what extraction does with it
    assert again.check_class(1) is None and torch.equal(again.read_class(1), F.flatten(1, 2))


def test_many_classes_are_read_at_once_checked_as_one_by_one(tmp_path, monkeypatch):
    """read_classes_with_records: read_class_with_records's results in the order asked, several classes' reads in flight at
    once, and the error of the first class asked that is damaged or not complete."""
    import threading
    import time

    store = make(tmp_path / "fs")
    F = [torch.rand(6, *GRID, D).half() for _ in range(K)]
    for k in range(K):
        store.write_class(k, F[k], records(6))
    again = FeatureStore.open(str(tmp_path / "fs"))
    in_flight, most, lock = 0, 0, threading.Lock()
    cat_file = again.fs.cat_file

    def slow_cat_file(path, *args, **kwargs):  # a store that answers in tens of milliseconds
        nonlocal in_flight, most
        with lock:
            in_flight += 1
            most = max(most, in_flight)
        time.sleep(0.05)
        try:
            return cat_file(path, *args, **kwargs)
        finally:
            with lock:
                in_flight -= 1

    monkeypatch.setattr(again.fs, "cat_file", slow_cat_file)
    read = again.read_classes_with_records([2, 0, 1])
    assert [torch.equal(r, F[k].flatten(1, 2)) for (r, _), k in zip(read, [2, 0, 1])] == [True] * 3
    assert all(table.equals(records(6).cast(table.schema)) for _, table in read)
    assert most == K  # the markers (and record tables) of all three classes in flight together
    damage_chunks(tmp_path / "fs", 1, lose=[0])
    (tmp_path / "fs/done/c00002.json").unlink()
    with pytest.raises(StoreError, match=r"class 1 \('b'\) .* is damaged: chunk 0 \(images 0–3\) is missing"):
        again.read_classes_with_records([0, 1, 2])
    with pytest.raises(StoreError, match=r"class 2 \('c'\) is not complete"):
        again.read_classes_with_records([2, 1])
    for read_classes in (again.read_classes, lambda ks: [f for f, _ in again.read_classes_with_records(ks)]):
        assert [torch.equal(r, F[k].flatten(1, 2)) for r, k in zip(read_classes([0]), [0])] == [True]
        with pytest.raises(StoreError, match=r"class 1 \('b'\) .* is damaged: chunk 0 \(images 0–3\) is missing"):
            read_classes([0, 1])


def test_a_read_takes_the_array_metadata_from_the_marker(tmp_path):
    """The marker carries the class array's zarr.json: a read needs only the marker, the chunks and
    the record table; a marker without the copy (written before it) reads the array's own."""
    import json

    store = make(tmp_path / "fs")
    F = torch.rand(10, *GRID, D).half()
    store.write_class(0, F, records(10))
    store.write_class(1, F, records(10))
    root = tmp_path / "fs"
    assert json.loads((root / "done/c00000.json").read_text())["array"] == json.loads((root / "c00000/zarr.json").read_text())
    (root / "c00000/zarr.json").unlink()  # not read any more
    assert torch.equal(FeatureStore.open(str(root)).read_class(0), F.flatten(1, 2))
    marker = json.loads((root / "done/c00001.json").read_text())
    del marker["array"]
    (root / "done/c00001.json").write_text(json.dumps(marker))
    again = FeatureStore.open(str(root))
    assert torch.equal(again.read_class(1), F.flatten(1, 2))
    (root / "c00001/zarr.json").unlink()
    assert again.check_class(1).startswith("its array c00001/ cannot be opened")


def test_an_io_error_reading_a_chunk_is_raised_not_taken_for_damage(tmp_path, monkeypatch):
    """A chunk that cannot be fetched (the network) is not a lost chunk: the error propagates, so
    the step is retried instead of the class being reported damaged."""
    store = make(tmp_path / "fs")
    store.write_class(0, torch.rand(6, *GRID, D).half(), records(6))
    again = FeatureStore.open(str(tmp_path / "fs"))
    real = type(again.fs).cat

    def flaky(fs, paths, *args, **kwargs):
        out = real(fs, paths, *args, **kwargs)
        return {p: (ConnectionResetError("reset by peer") if "/c/" in p else v) for p, v in out.items()}

    monkeypatch.setattr(type(again.fs), "cat", flaky)
    with pytest.raises(ConnectionResetError):
        again.read_class(0)
