"""The dataset index: one Parquet file per split, row groups by label, read class by class, named
by what was listed so an unchanged dataset finds its index and a changed one is listed anew."""

import io

import pyarrow.parquet as pq
import pytest
from PIL import Image

from protonmf.config import parse_config
from protonmf.data import make_source
from protonmf.data import index as index_module
from protonmf.data.index import index_table, open_index, read_index, write_index
from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder
from protonmf.pipeline import index_data, make_split_source


@pytest.fixture
def tree(tmp_path):
    write_image_folder(make_synthetic_parts(6, 5, image_size=32, seed=0), tmp_path / "train")
    return tmp_path / "train"


def test_reading_some_classes_reads_only_their_row_groups(tree, tmp_path, monkeypatch):
    monkeypatch.setattr(index_module, "ROW_GROUP_ROWS", 10)  # 30 images: row groups of 2 classes each
    source = make_source("imagefolder", root=str(tree))
    uri = write_index(index_table(source, "train"), str(tmp_path / "index"))
    assert pq.ParquetFile(uri).metadata.num_row_groups == 3
    read = []
    original = pq.ParquetFile.read_row_groups

    def spy(self, groups, *args, **kwargs):
        read.append(list(groups))
        return original(self, groups, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read_row_groups", spy)
    table, info = read_index(uri, labels=[3])
    assert read == [[1]] and table["label"].to_pylist() == [3] * 5
    assert info["kind"] == "imagefolder" and info["classes"] == source.classes and info["split"] == "train"
    reopened = open_index(uri, labels=[0, 5])
    assert read[-1] == [0, 2]
    assert reopened.classes == source.classes and reopened.records == source.records_of(0) + source.records_of(5)
    assert reopened.load(reopened.records[0])[0].size == (32, 32)
    assert read_index(uri, labels=[])[0].num_rows == 0


def test_cub_index_keeps_the_boxes(tmp_path):
    root = tmp_path / "CUB_200_2011"
    (root / "images" / "001.A").mkdir(parents=True)
    Image.new("RGB", (40, 30), (10, 200, 30)).save(root / "images" / "001.A" / "a.jpg")
    for name, text in {"images.txt": "1 001.A/a.jpg\n", "image_class_labels.txt": "1 1\n", "classes.txt": "1 001.A\n",
                       "train_test_split.txt": "1 1\n", "bounding_boxes.txt": "1 5.0 4.0 20.0 10.0\n"}.items():
        (root / name).write_text(text)
    source = make_source("cub", root=str(root), split="train")
    reopened = open_index(write_index(index_table(source, "train"), str(tmp_path / "index")))
    assert reopened.records == source.records and reopened.records[0].bbox == (5.0, 4.0, 20.0, 10.0)
    assert reopened.load(reopened.records[0])[0].size == (20, 10)  # cropped to the box


def test_an_unchanged_dataset_finds_its_index_and_a_changed_one_is_listed_again(tree, tmp_path):
    config = parse_config({"data": {"source": "imagefolder", "train": str(tree)},
                           "storage": {"features": str(tmp_path / "features")}})
    first = index_data(config).data.train_index
    assert index_data(config).data.train_index == first
    img = io.BytesIO()
    Image.new("RGB", (32, 32)).save(img, format="PNG")
    (tree / sorted(p.name for p in tree.iterdir())[0] / "new.png").write_bytes(img.getvalue())
    second = index_data(config).data.train_index
    assert second != first and len(make_split_source(index_data(config), "train")) == 31
    assert len(open_index(first)) == 30  # a run that used the old index still reads it


def test_unchanged_shards_are_not_read_again(tmp_path, monkeypatch):
    from tests.data.test_shards import write_tars

    write_image_folder(make_synthetic_parts(3, 4, image_size=32, seed=0), tmp_path / "tree")
    write_tars(tmp_path / "tree", tmp_path / "wds")
    from protonmf.data.sources.webdataset import WebDatasetSource

    reads = []
    original = WebDatasetSource._list_shard
    monkeypatch.setattr(WebDatasetSource, "_list_shard", lambda self, shard: reads.append(shard.path) or original(self, shard))
    config = parse_config({"data": {"source": "webdataset", "train": str(tmp_path / "wds")},
                           "storage": {"features": str(tmp_path / "features")}})
    first = index_data(config).data.train_index
    assert len(reads) == 2  # two shards read once each
    assert index_data(config).data.train_index == first and len(reads) == 2  # listed (one LIST), not read
    (tmp_path / "wds" / "classes.txt").write_text("x\ny\nz\n")
    renamed = index_data(config).data.train_index
    assert renamed != first and len(reads) == 4 and make_split_source(index_data(config), "train").classes == ["x", "y", "z"]
