"""Tests of protonmf.data: image sources (local and S3), decoding, preprocessing and batching."""

from __future__ import annotations

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from protonmf.data import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    SOURCE_KINDS,
    Batch,
    CUBSource,
    DigitsSource,
    ImageFolderSource,
    Preprocess,
    Record,
    SyntheticSource,
    iter_batches,
    load_image,
    make_source,
)
from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder

N_CLASSES, N_PER_CLASS, SIZE, SEED = 3, 4, 32, 1
SMALL = Preprocess(resize=SIZE, crop=SIZE)  # identity geometry on the 32×32 synthetic images

# The odd files that the tree holds besides the synthetic images: name -> expected outcome.
RED, WHITE = (200, 30, 40), (255, 255, 255)
GOOD_ODD = ("gray.png", "cmyk.jpg", "rgba.png")
BAD_ODD = {"truncated.jpg": "truncated image", "empty.jpg": "empty file", "notimage.jpg": "not an image"}


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _gray_array() -> np.ndarray:
    return (np.arange(40 * 48, dtype=np.int64).reshape(40, 48) % 251).astype(np.uint8)


def _rgba_array() -> np.ndarray:
    """Left half opaque RED, right half fully transparent (with black RGB), one half-alpha pixel."""
    a = np.zeros((20, 24, 4), dtype=np.uint8)
    a[:, :12] = (*RED, 255)
    a[:, 12:] = (0, 0, 0, 0)
    a[0, 0] = (0, 0, 0, 128)
    return a


def _write_odd_files(folder: Path) -> None:
    Image.fromarray(_gray_array()).save(folder / "gray.png")
    Image.new("CMYK", (24, 16), (0, 255, 255, 0)).save(folder / "cmyk.jpg", quality=95)
    Image.fromarray(_rgba_array()).save(folder / "rgba.png")
    noise = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    jpeg = _encode(Image.fromarray(noise), "JPEG", quality=90)
    (folder / "truncated.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notimage.jpg").write_text("this is not a JPEG, just text\n")
    (folder / "notes.txt").write_text("not an image extension: not a record\n")
    (folder / ".DS_Store").write_bytes(b"\x00\x01hidden")


@pytest.fixture(scope="module")
def synth():
    return make_synthetic_parts(N_CLASSES, N_PER_CLASS, image_size=SIZE, seed=SEED)


@pytest.fixture(scope="module")
def tree(tmp_path_factory, synth) -> Path:
    """``<tmp>/tree/<class>/<i>.png`` from the synthetic data, plus odd files in the first class."""
    root = tmp_path_factory.mktemp("data") / "tree"
    write_image_folder(synth, root)
    _write_odd_files(root / synth.class_names[0])
    (root / "README.txt").write_text("files directly under the root are not in any class\n")
    return root


def _collect(batches: list[Batch]):
    ids = [i for b in batches for i in b.image_ids]
    skipped = {s.image_id: s for b in batches for s in b.skipped}
    return ids, skipped


def _good_ids(synth) -> list[str]:
    return [f"{synth.class_names[int(c)]}/{i:06d}.png" for i, c in enumerate(synth.labels)]


# --------------------------------------------------------------------------------------------
# ImageFolderSource on a local tree
# --------------------------------------------------------------------------------------------


def test_imagefolder_lists_classes_and_records_in_sorted_order(tree, synth):
    src = ImageFolderSource(str(tree))
    assert src.classes == sorted(synth.class_names) == synth.class_names
    first = synth.class_names[0]
    expected = sorted([f"{first}/{n}" for n in (*GOOD_ODD, *BAD_ODD)] + _good_ids(synth)[:N_PER_CLASS]) + _good_ids(synth)[N_PER_CLASS:]
    assert [r.image_id for r in src.records] == expected
    assert [r.label for r in src.records] == [0] * (N_PER_CLASS + 6) + [1] * N_PER_CLASS + [2] * N_PER_CLASS
    assert all(r.uri == str(tree / r.image_id) for r in src.records)
    assert len(src) == 3 * N_PER_CLASS + 6 and src.num_classes == 3
    # file:// URIs and a trailing slash give the same listing
    other = ImageFolderSource(f"file://{tree}/")
    assert [r.image_id for r in other.records] == [r.image_id for r in src.records]


def test_iter_batches_skips_bad_files_with_reasons_and_yields_every_good_image(tree, synth):
    src = ImageFolderSource(str(tree))
    batches = list(iter_batches(src, SMALL, batch_size=5, workers=3))
    ids, skipped = _collect(batches)
    first = synth.class_names[0]
    # every good file, in record order; every bad one skipped with its reason
    good = [r.image_id for r in src.records if r.image_id.rsplit("/", 1)[1] not in BAD_ODD]
    assert ids == good and len(ids) == 3 * N_PER_CLASS + 3
    assert sorted(skipped) == sorted(f"{first}/{n}" for n in BAD_ODD)
    for name, prefix in BAD_ODD.items():
        s = skipped[f"{first}/{name}"]
        assert s.reason.startswith(prefix), s.reason
        assert s.uri == str(tree / first / name)
    assert [len(b) for b in batches] == [5, 5, 5]
    for b in batches:
        assert b.images.shape == (len(b), 3, SIZE, SIZE) and b.images.dtype == torch.float32
        assert b.labels.dtype == torch.int64 and b.uris == [str(tree / i) for i in b.image_ids]
    labels = torch.cat([b.labels for b in batches])
    assert labels.tolist() == [src.records[[r.image_id for r in src.records].index(i)].label for i in ids]


def test_imagefolder_pixels_equal_the_synthetic_arrays(tree, synth):
    """PNG is lossless: the tree's batches equal SyntheticSource's (same ids, same tensors)."""
    folder = ImageFolderSource(str(tree))
    keep = [r for r in folder.records if r.image_id.endswith(".png") and r.image_id.rsplit("/", 1)[1][0].isdigit()]
    from_tree = list(iter_batches(folder, SMALL, batch_size=4, workers=2, records=keep))
    syn = SyntheticSource(N_CLASSES, N_PER_CLASS, split="train", image_size=SIZE, seed=SEED)
    from_arrays = list(iter_batches(syn, SMALL, batch_size=4, workers=0))
    assert [b.image_ids for b in from_tree] == [b.image_ids for b in from_arrays]
    for a, b in zip(from_tree, from_arrays):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    # and the values are the normalized pixels
    x = from_arrays[0].images[0]
    want = (torch.from_numpy(synth.images[0]).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]
    torch.testing.assert_close(x, want, atol=1e-5, rtol=0)


def test_odd_modes_are_converted_to_rgb(tree, synth):
    folder = tree / synth.class_names[0]
    gray, reason = load_image(str(folder / "gray.png"))
    assert reason is None and gray.mode == "RGB" and gray.size == (48, 40)
    g = np.asarray(gray)
    assert np.array_equal(g[..., 0], _gray_array()) and np.array_equal(g[..., 0], g[..., 1]) and np.array_equal(g[..., 1], g[..., 2])

    cmyk, reason = load_image(str(folder / "cmyk.jpg"))
    assert reason is None and cmyk.mode == "RGB" and cmyk.size == (24, 16)
    assert np.abs(np.asarray(cmyk).astype(int) - (255, 0, 0)).max() <= 3  # C=0 M=1 Y=1 K=0 is red

    rgba, reason = load_image(f"file://{folder / 'rgba.png'}")
    assert reason is None and rgba.mode == "RGB"
    r = np.asarray(rgba).astype(int)
    assert (r[1:, :12] == RED).all()  # opaque: unchanged
    assert (r[:, 12:] == WHITE).all()  # transparent: the white background, not the stored black
    assert np.abs(r[0, 0] - 127).max() <= 1  # half-transparent black on white


@pytest.mark.parametrize("kind", ["LA", "P+transparency", "RGB+tRNS", "I;16", "1"])
def test_more_modes_are_converted_to_rgb(kind):
    if kind == "LA":
        a = np.zeros((4, 6, 2), dtype=np.uint8)
        a[..., 0], a[:, :3, 1], a[:, 3:, 1] = 50, 255, 0
        data, want = _encode(Image.fromarray(a), "PNG"), np.where(np.arange(6) < 3, 50, 255)
    elif kind == "P+transparency":
        p = Image.new("P", (6, 4), 0)
        p.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
        p.paste(1, (3, 0, 6, 4))
        data = _encode(p, "PNG", transparency=1)
        want = None
    elif kind == "RGB+tRNS":
        a = np.full((4, 6, 3), (10, 20, 30), dtype=np.uint8)
        a[:, 3:] = (1, 2, 3)
        data, want = _encode(Image.fromarray(a), "PNG", transparency=(1, 2, 3)), None
    elif kind == "I;16":
        a = (np.arange(24, dtype=np.uint16).reshape(4, 6) * 2570).astype(np.uint16)  # 0..59110, step 10 * 257
        data, want = _encode(Image.fromarray(a), "PNG"), None
    else:
        data, want = _encode(Image.new("1", (6, 4), 1), "PNG"), None
    img, reason = __import__("protonmf.data", fromlist=["decode_image"]).decode_image(data, kind)
    assert reason is None and img.mode == "RGB" and img.size == (6, 4)
    r = np.asarray(img).astype(int)
    if kind == "LA":
        assert (r == want[None, :, None]).all()
    elif kind in ("P+transparency", "RGB+tRNS"):
        assert (r[:, :3] == (10, 20, 30)).all() and (r[:, 3:] == WHITE).all()
    elif kind == "I;16":
        assert (r[..., 0] == np.arange(24).reshape(4, 6) * 10).all()
    else:
        assert (r == 255).all()


def test_load_image_never_raises(tmp_path):
    assert load_image(str(tmp_path / "nope.jpg"))[1].startswith("missing file")
    assert load_image(str(tmp_path))[0] is None  # a directory
    (tmp_path / "e.png").write_bytes(b"")
    img, reason = load_image(str(tmp_path / "e.png"))
    assert img is None and reason.startswith("empty file")
    png = _encode(Image.new("RGB", (30, 30), (1, 2, 3)), "PNG")
    (tmp_path / "t.png").write_bytes(png[: len(png) - 30])
    img, reason = load_image(str(tmp_path / "t.png"))
    assert img is None and reason.startswith("truncated image"), reason
    (tmp_path / "g.png").write_bytes(png[:20])  # a header and nothing after it
    img, reason = load_image(str(tmp_path / "g.png"))
    assert img is None and reason is not None


def test_max_images_per_class_and_class_subset_keep_labels(tree, synth):
    names = synth.class_names
    src = ImageFolderSource(str(tree), max_images_per_class=2)
    g = _good_ids(synth)
    assert [r.image_id for r in src.records] == g[0:2] + g[4:6] + g[8:10]  # digits sort before the odd files
    assert [r.label for r in src.records] == [0, 0, 1, 1, 2, 2]

    sub = ImageFolderSource(str(tree), class_subset=[names[2], names[1]], max_images_per_class=3)
    assert sub.classes == names  # the full class list: labels index into it
    assert [r.label for r in sub.records] == [1, 1, 1, 2, 2, 2]
    assert [r.image_id for r in sub.records] == _good_ids(synth)[4:7] + _good_ids(synth)[8:11]
    with pytest.raises(ValueError, match="class_subset.*nonexistent"):
        ImageFolderSource(str(tree), class_subset=["nonexistent"])


def test_given_classes_list_sets_label_order_and_names_missing_folders(tree, synth):
    names = synth.class_names
    order = [names[2], "n00000001", names[0], names[1]]  # logit order, with a class we have no folder for
    with pytest.raises(ValueError, match="n00000001"):
        ImageFolderSource(str(tree), classes=order)
    # restricted to classes that have folders, labels follow the given list
    src = ImageFolderSource(str(tree), classes=order, class_subset=[names[0], names[2]])
    assert src.classes == order
    assert sorted({(r.image_id.split("/")[0], r.label) for r in src.records}) == sorted([(names[0], 2), (names[2], 0)])
    assert [r.label for r in src.records][:N_PER_CLASS] == [0] * N_PER_CLASS  # sorted by label
    # folders missing from the list are ignored and reported
    two = ImageFolderSource(str(tree), classes=[names[1], names[0]])
    assert two.unlisted_folders == [names[2]]
    assert {r.label for r in two.records} == {0, 1}
    assert all((r.label == 0) == r.image_id.startswith(names[1]) for r in two.records)
    with pytest.raises(ValueError, match="duplicate"):
        ImageFolderSource(str(tree), classes=[names[0], names[0]])


def test_missing_or_empty_roots_fail_fast_with_clear_messages(tmp_path):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match="no images found under .*does not exist"):
        ImageFolderSource(str(tmp_path / "missing"))
    (tmp_path / "only_text" / "cls").mkdir(parents=True)
    (tmp_path / "only_text" / "cls" / "a.txt").write_text("x")
    with pytest.raises(ValueError, match=r"no images found under .*only_text \(found 1 other file.*\.jpg.*\.webp"):
        ImageFolderSource(str(tmp_path / "only_text"))
    with pytest.raises(ValueError, match=r"^data\.train: no images found under"):
        make_source("imagefolder", root=str(tmp_path / "only_text"), name="data.train")
    with pytest.raises(ValueError, match="max_images_per_class"):
        ImageFolderSource(str(tmp_path), max_images_per_class=0)
    assert time.monotonic() - t0 < 5


# --------------------------------------------------------------------------------------------
# The same tree on S3 (moto server)
# --------------------------------------------------------------------------------------------


def test_imagefolder_on_s3_gives_bit_identical_batches(tree, s3, s3_bucket, monkeypatch):
    s3.put(str(tree), f"s3://{s3_bucket}/imagenet/train", recursive=True)
    local = ImageFolderSource(str(tree))

    # spy (not mock) on the S3 calls made while building the source: the root listed, then each
    # class prefix (at once), no per-file calls
    import s3fs

    calls: list[str] = []
    real = s3fs.S3FileSystem._call_s3

    async def spy(self, method, *args, **kwargs):
        calls.append(getattr(method, "__name__", str(method)))
        return await real(self, method, *args, **kwargs)

    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", spy)
    remote = ImageFolderSource(f"s3://{s3_bucket}/imagenet/train/")
    monkeypatch.setattr(s3fs.S3FileSystem, "_call_s3", real)
    assert set(calls) == {"list_objects_v2"} and len(calls) == 1 + len(local.classes), calls
    # each record keeps what the listing said of its bytes: the object's ETag, the file's size and mtime
    etags = {info["name"].split("/imagenet/train/", 1)[1]: info["ETag"].strip('"')
             for info in s3.find(f"{s3_bucket}/imagenet/train", detail=True).values()}
    assert [r.version for r in remote.records] == [etags[r.image_id] for r in remote.records]
    assert all(r.version == f"{(tree / r.image_id).stat().st_size}:{(tree / r.image_id).stat().st_mtime}"
               for r in local.records)

    assert remote.classes == local.classes
    assert [(r.image_id, r.label) for r in remote.records] == [(r.image_id, r.label) for r in local.records]
    assert all(r.uri == f"s3://{s3_bucket}/imagenet/train/{r.image_id}" for r in remote.records)

    a = list(iter_batches(local, SMALL, batch_size=4, workers=2))
    b = list(iter_batches(remote, SMALL, batch_size=4, workers=4))
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert x.image_ids == y.image_ids
        assert torch.equal(x.images, y.images) and torch.equal(x.labels, y.labels)
        assert [(s.image_id, s.reason.split(":")[0]) for s in x.skipped] == [(s.image_id, s.reason.split(":")[0]) for s in y.skipped]
    assert sum(len(x.skipped) for x in b) == 3

    # decoded odd files are the same as from the local disk
    rgba = next(r for r in remote.records if r.image_id.endswith("rgba.png"))
    assert np.array_equal(np.asarray(remote.load(rgba)[0]), np.asarray(load_image(str(tree / rgba.image_id))[0]))


def test_s3_missing_prefix_or_bucket_fails_fast(s3, s3_bucket):
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=f"no images found under s3://{s3_bucket}/nothing"):
        make_source("imagefolder", root=f"s3://{s3_bucket}/nothing", name="data.train")
    with pytest.raises(ValueError, match="no images found under s3://no-such-bucket-xyz/x"):
        ImageFolderSource("s3://no-such-bucket-xyz/x")
    s3.pipe_file(f"{s3_bucket}/flat/readme.md", b"hello")
    with pytest.raises(ValueError, match=r"found 1 other file"):
        ImageFolderSource(f"s3://{s3_bucket}/flat")
    assert time.monotonic() - t0 < 10


# --------------------------------------------------------------------------------------------
# CUB-200-2011
# --------------------------------------------------------------------------------------------

BIRD = (10, 250, 20)


def _write_cub(root: Path) -> list[dict]:
    """3 classes × 3 images; each image is noise with its bounding box filled with BIRD."""
    rng = np.random.default_rng(5)
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    rows = []
    for k in range(9):
        c = k // 3
        W, H = 40 + 4 * k, 30 + 2 * k
        x, y, w, h = 3 + k, 2 + k % 4, 10 + k, 8 + (k % 3)
        rows.append(dict(id=k + 1, cls=c + 1, path=f"{classes[c]}/{classes[c][4:]}_{k:04d}_{k}.jpg", box=(x, y, w, h), size=(W, H), train=int(k % 3 != 2)))
    (root / "images").mkdir(parents=True)
    for r in rows:
        a = rng.integers(0, 120, (r["size"][1], r["size"][0], 3), dtype=np.uint8)
        x, y, w, h = r["box"]
        a[y : y + h, x : x + w] = BIRD
        (root / "images" / r["path"]).parent.mkdir(exist_ok=True)
        Image.fromarray(a).save(root / "images" / r["path"].replace(".jpg", ".png"), "PNG")
        (root / "images" / r["path"].replace(".jpg", ".png")).rename(root / "images" / r["path"])  # PNG bytes, .jpg name: lossless
    (root / "classes.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(classes)))
    (root / "images.txt").write_text("".join(f"{r['id']} {r['path']}\n" for r in rows))
    (root / "image_class_labels.txt").write_text("".join(f"{r['id']} {r['cls']}\n" for r in rows))
    (root / "train_test_split.txt").write_text("".join(f"{r['id']} {r['train']}\n" for r in rows))
    (root / "bounding_boxes.txt").write_text("".join(f"{r['id']} " + " ".join(f"{v:.1f}" for v in r["box"]) + "\n" for r in rows))
    return rows


def test_cub_splits_labels_and_crop_to_the_bounding_box(tmp_path):
    rows = _write_cub(tmp_path / "CUB_200_2011")
    root = str(tmp_path / "CUB_200_2011")
    train, test, every = (CUBSource(root, split=s) for s in ("train", "test", "all"))
    assert (len(train), len(test), len(every)) == (6, 3, 9)
    assert train.classes == ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
    assert [r.label for r in train.records] == [0, 0, 1, 1, 2, 2]
    assert [r.label for r in test.records] == [0, 1, 2]
    assert [r.image_id for r in every.records] == [r["path"] for r in rows]
    assert {r.image_id for r in train.records} | {r.image_id for r in test.records} == {r["path"] for r in rows}
    for rec, row in zip(every.records, rows):
        assert rec.bbox == tuple(float(v) for v in row["box"])
        assert rec.uri == str(tmp_path / "CUB_200_2011" / "images" / row["path"])
        img, reason = every.load(rec)
        assert reason is None and img.size == row["box"][2:]  # exactly the box: (w, h)
        assert (np.asarray(img) == BIRD).all()
    full, _ = CUBSource(root, split="all", crop=False).load(every.records[0])
    assert full.size == rows[0]["size"]
    batch = next(iter_batches(test, Preprocess(resize=16, crop=16), batch_size=8, workers=2))
    assert batch.images.shape == (3, 3, 16, 16) and batch.labels.tolist() == [0, 1, 2]
    want = (torch.tensor(BIRD) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(batch.images.mean((2, 3)), want.expand(3, 3), atol=1e-5, rtol=0)


def test_cub_errors(tmp_path):
    _write_cub(tmp_path / "cub")
    with pytest.raises(ValueError, match="split must be one of train, test, all"):
        CUBSource(str(tmp_path / "cub"), split="val")
    (tmp_path / "cub" / "bounding_boxes.txt").unlink()
    with pytest.raises(ValueError, match="bounding_boxes.txt is missing"):
        CUBSource(str(tmp_path / "cub"), split="train")
    assert len(CUBSource(str(tmp_path / "cub"), split="train", crop=False)) == 6
    with pytest.raises(ValueError, match="images.txt is missing"):
        make_source("cub", root=str(tmp_path / "elsewhere"), split="train")


def test_cub_on_s3(tmp_path, s3, s3_bucket):
    rows = _write_cub(tmp_path / "CUB_200_2011")
    s3.put(str(tmp_path / "CUB_200_2011"), f"s3://{s3_bucket}/cub", recursive=True)
    src = make_source("cub", root=f"s3://{s3_bucket}/cub", split="test")
    assert [r.image_id for r in src.records] == [r["path"] for r in rows if not r["train"]]
    img, reason = src.load(src.records[1])
    assert reason is None and (np.asarray(img) == BIRD).all() and img.size == rows[5]["box"][2:]


# --------------------------------------------------------------------------------------------
# Digits and synthetic sources
# --------------------------------------------------------------------------------------------


def test_digits_source_split_sizes_labels_and_determinism():
    from sklearn.datasets import load_digits

    target = load_digits().target
    train, val = DigitsSource(split="train"), DigitsSource(split="val")
    assert (len(train), len(val), len(DigitsSource(split="all"))) == (1437, 360, 1797)
    assert train.classes == [str(d) for d in range(10)]
    ti, vi = [r.index for r in train.records], [r.index for r in val.records]
    assert ti == sorted(ti) and not set(ti) & set(vi) and len(set(ti) | set(vi)) == 1797
    assert all(r.label == target[r.index] for r in train.records + val.records)
    counts = np.bincount([r.label for r in val.records], minlength=10)
    assert counts.min() >= 35 and counts.max() <= 37  # stratified: 20 % of ~180 per class
    assert [r.image_id for r in DigitsSource(split="val").records] == [r.image_id for r in val.records]
    assert [r.index for r in DigitsSource(split="val", seed=1).records] != vi

    img, reason = train.load(train.records[0])
    assert reason is None and img.mode == "RGB" and img.size == (64, 64)
    eight = DigitsSource(split="all", image_size=8)
    x = np.asarray(eight.load(eight.records[0])[0])[..., 0]
    assert np.array_equal(x, np.rint(load_digits().images[0] * 255 / 16).astype(np.uint8))
    with pytest.raises(ValueError, match="split must be one of train, val, all"):
        DigitsSource(split="test")


def test_synthetic_source_train_val_masks_and_determinism(synth):
    train = SyntheticSource(N_CLASSES, N_PER_CLASS, split="train", image_size=SIZE, seed=SEED)
    assert np.array_equal(train.data.images, synth.images) and np.array_equal(train.masks, synth.masks)
    assert train.classes == synth.class_names and len(train) == N_CLASSES * N_PER_CLASS
    assert [r.label for r in train.records] == synth.labels.tolist()
    assert [r.image_id for r in train.records] == _good_ids(synth)
    rec = train.records[5]
    assert np.array_equal(np.asarray(train.load(rec)[0]), synth.images[5])
    assert train.mask(rec).shape == (SIZE, SIZE) and set(np.unique(train.mask(rec))) <= {0, 1, 2, 3}
    assert train.part_names == ("background", "head", "body", "tail")

    val = SyntheticSource(N_CLASSES, 2, split="val", image_size=SIZE, seed=SEED)
    again = SyntheticSource(N_CLASSES, 2, split="val", image_size=SIZE, seed=SEED)
    assert len(val) == 6 and np.array_equal(val.data.images, again.data.images)
    assert not np.array_equal(val.data.images, make_synthetic_parts(N_CLASSES, 2, image_size=SIZE, seed=SEED).images)
    with pytest.raises(ValueError, match="split must be one of train, val"):
        SyntheticSource(2, 2, split="all")


# --------------------------------------------------------------------------------------------
# Preprocess, batching, the factory
# --------------------------------------------------------------------------------------------


def test_preprocess_shape_dtype_and_normalization_of_a_constant_image():
    p = Preprocess()
    assert (p.resize, p.crop, p.mean, p.std) == (256, 224, IMAGENET_MEAN, IMAGENET_STD)
    rgb = (10, 128, 250)
    x = p(Image.new("RGB", (300, 180), rgb))
    assert x.shape == (3, 224, 224) and x.dtype == torch.float32 and type(x) is torch.Tensor
    want = (torch.tensor(rgb) / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    torch.testing.assert_close(x, want[:, None, None].expand(3, 224, 224), atol=1e-6, rtol=0)
    # shorter side → resize, then the centre crop; a grey input gives 3 channels
    q = Preprocess(resize=20, crop=10, mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    assert q.mean == (0.5, 0.5, 0.5) and q == Preprocess(20, 10, (0.5,) * 3, (0.5,) * 3)
    a = np.zeros((40, 80), dtype=np.uint8)
    a[:, 40:] = 255  # left half black, right half white
    y = q(Image.fromarray(a))
    assert y.shape == (3, 10, 10)
    torch.testing.assert_close(y[:, :, :4], torch.full((3, 10, 4), -1.0))  # 80×40 → 40×20, crop cols 15-24
    torch.testing.assert_close(y[:, :, 6:], torch.full((3, 10, 4), 1.0))
    assert q.to_dict() == {"resize": 20, "crop": 10, "mean": [0.5] * 3, "std": [0.5] * 3}
    with pytest.raises(ValueError, match="crop"):
        Preprocess(crop=0)


def test_uint8_crop_then_normalize_is_the_whole_transform_to_the_bit():
    """Extraction ships uint8 crops between processes and normalizes a batch where the forward pass
    runs: that must be torchvision's own transform, bit for bit."""
    from torchvision.transforms import InterpolationMode, v2

    p = Preprocess(resize=70, crop=64, mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    torchvision_own = v2.Compose([
        v2.Resize(70, interpolation=InterpolationMode.BILINEAR, antialias=True), v2.CenterCrop(64), v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ])
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in ((80, 100), (91, 71), (64, 64))]
    crops = torch.stack([p.to_uint8(im) for im in images])
    assert crops.dtype == torch.uint8 and crops.shape == (3, 3, 64, 64)
    want = torch.stack([torchvision_own(im) for im in images])
    assert torch.equal(p.normalize(crops), want) and torch.equal(torch.stack([p(im) for im in images]), want)


def test_iter_batches_by_records_cuts_every_batch_size_records_so_shards_batch_as_the_whole(tree):
    src = ImageFolderSource(str(tree))
    ids = [r.image_id for r in src.records]
    whole = list(iter_batches(src, SMALL, batch_size=5, workers=2, by_records=True))
    # each batch covers the next 5 records, the skipped ones included (the bad files are in the first class)
    for k, b in zip(range(0, len(ids), 5), whole):
        skipped = {s.image_id for s in b.skipped}
        assert sorted(b.image_ids + list(skipped)) == sorted(ids[k:k + 5])
        assert b.image_ids == [i for i in ids[k:k + 5] if i not in skipped]
    assert len(whole) == -(-len(ids) // 5) and sum(len(b.skipped) for b in whole) == 3
    assert any(0 < len(b) < 5 for b in whole[:-1])  # a batch short of its skipped files
    # a shard starting at a multiple of batch_size is batched as the whole is from there
    by_records = list(iter_batches(src, SMALL, batch_size=5, workers=0, records=src.records[10:], by_records=True))
    assert [b.image_ids for b in by_records] == [b.image_ids for b in whole[2:]]
    assert all(torch.equal(a.images, b.images) for a, b in zip(by_records, whole[2:]))


def test_iter_batches_workers_shards_all_bad_and_early_close(tree, tmp_path):
    src = ImageFolderSource(str(tree))
    serial = list(iter_batches(src, SMALL, batch_size=7, workers=0))
    threaded = list(iter_batches(src, SMALL, batch_size=7, workers=4))
    assert [b.image_ids for b in serial] == [b.image_ids for b in threaded]
    assert all(torch.equal(a.images, b.images) for a, b in zip(serial, threaded))
    assert [len(b) for b in serial] == [7, 7, 1]

    shard = src.records[1::2]
    ids, skipped = _collect(list(iter_batches(src, SMALL, batch_size=4, workers=2, records=shard)))
    assert sorted(ids + list(skipped)) == sorted(r.image_id for r in shard)

    # a source whose every file is bad: one empty batch that carries all of them
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    for i in range(3):
        (bad / f"{i}.jpg").write_bytes(b"")
    (only,) = list(iter_batches(ImageFolderSource(str(tmp_path / "bad")), SMALL, batch_size=2, workers=2))
    assert len(only) == 0 and only.images.shape == (0, 3, SIZE, SIZE) and len(only.skipped) == 3

    # stopping early shuts the pool down without hanging
    it = iter_batches(src, SMALL, batch_size=2, workers=2)
    assert len(next(it)) == 2
    it.close()
    with pytest.raises(ValueError, match="batch_size"):
        iter_batches(src, SMALL, batch_size=0)


def test_make_source_kinds_and_errors(tree):
    assert set(SOURCE_KINDS) == {"imagefolder", "cub", "digits", "synthetic", "shapes", "parquet", "webdataset"}
    assert isinstance(make_source("imagefolder", root=str(tree), max_images_per_class=1), ImageFolderSource)
    assert len(make_source("digits", split="val")) == 360
    syn = make_source("synthetic", n_classes=2, n_per_class=3, split="train", image_size=32)
    assert isinstance(syn, SyntheticSource) and len(syn) == 6
    with pytest.raises(ValueError, match="unknown source kind 'folder'; valid kinds: imagefolder, cub, digits, synthetic, shapes, parquet, webdataset"):
        make_source("folder", root=str(tree))
    with pytest.raises(ValueError, match="data.val: unknown argument.*rotate"):
        make_source("imagefolder", root=str(tree), rotate=True, name="data.val")
    with pytest.raises(ValueError, match="needs argument.*split"):
        make_source("digits")
    assert isinstance(Record("a", "b", 0), Record)
