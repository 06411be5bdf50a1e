"""Run: a run's context built once per process, crossing process boundaries as its config alone;
Staged: one resume marker and one publish for every artifact."""

import pickle

import pytest

from protonmf.config import parse_config
from protonmf.data.store import FeatureStore
from protonmf.pipeline import Run, Staged, craft_key, fit_key
from protonmf.pipeline.staging import fit_group_keys
from protonmf.storage import to_fs


def _config(tmp_path, **storage):
    return parse_config({
        "data": {"source": "synthetic", "n_classes": 2, "max_images_per_class": 2,
                 "preprocess": {"resize": 32, "crop": 32, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "protonmf:small_cnn", "num_classes": 2, "arch_kwargs": {"width": 4}},
        "storage": {"features": str(tmp_path / "features"), "model": str(tmp_path / "model"),
                    "concepts": str(tmp_path / "concepts"), **storage},
    })


def test_what_a_run_builds_is_built_once_and_none_of_it_is_pickled(tmp_path, monkeypatch):
    import torch

    FeatureStore.create(str(tmp_path / "features"), key="k", class_names=["a", "b"], grid=(1, 1), dim=4,
                        V=torch.zeros(2, 4), bias=torch.zeros(2))
    opened = []
    open_store = FeatureStore.open.__func__
    monkeypatch.setattr(FeatureStore, "open", classmethod(lambda cls, *a, **kw: opened.append(a) or open_store(cls, *a, **kw)))
    run = Run(_config(tmp_path))
    assert run.store is run.store and run.preprocess is run.preprocess and run.backbone is run.backbone
    assert len(opened) == 1
    assert (run.preprocess.resize, run.preprocess.crop, run.preprocess.mean) == (32, 32, (0.5, 0.5, 0.5))
    assert run.storage_options is None and run.in_memory
    data = pickle.dumps(run)
    assert len(data) < 5_000  # the config, not the network or the store
    again = pickle.loads(data)
    assert again.config == run.config and "store" not in again.__dict__ and "backbone" not in again.__dict__
    groups = fit_group_keys(run.config, "k", run.images_sha256)
    assert again.fit.key == run.fit.key == fit_key(groups) and again.concepts.key == craft_key(run.config, "k")
    assert len(opened) == 2  # the copy opened the store itself, once


def test_storage_options_are_none_only_when_empty(tmp_path):
    opts = {"anon": True}
    assert Run(_config(tmp_path, storage_options=opts)).storage_options == opts
    assert parse_config({}).storage.options is None


def _staged(tmp_path, key="a" * 64):
    return Staged(str(tmp_path / "artifact"), key, "fit_key", (".first", ".marker"))


def test_a_group_is_complete_once_its_last_file_is_written(tmp_path):
    staged = _staged(tmp_path)
    assert staged.read([0, 1]) is None
    staged.fs.makedirs(staged.folder, exist_ok=True)
    staged.fs.pipe_file(staged.path([0, 1], ".first"), b"1")  # an attempt that died before its marker
    assert staged.read([0, 1]) is None
    staged.write([0, 1], {".first": b"one", ".marker": b"two"})
    assert staged.read([0, 1]) == {".marker": b"two"}
    assert staged.read([0, 1], also=[".first"]) == {".marker": b"two", ".first": b"one"}
    assert staged.path([0, 1], ".marker") == f"{tmp_path}/artifact.staging/{'a' * 16}/g00000-00001.marker"
    with pytest.raises(ValueError, match=r"a staged group holds \['.first', '.marker'\], got \['.marker'\]"):
        staged.write([2], {".marker": b""})


def test_publish_merges_every_group_once_and_names_a_missing_one(tmp_path):
    from protonmf.artifact import write_artifact

    staged = _staged(tmp_path)
    staged.write([0, 1], {".first": b"a", ".marker": b"b"})
    with pytest.raises(FileNotFoundError, match=rf"^the fit of classes 2–2: {tmp_path}/artifact.staging/a{{16}}/g00002-00002.marker is missing$"):
        staged.publish([[0, 1], [2]], lambda groups: None, what="fit")
    staged.write([2], {".first": b"c", ".marker": b"d"})
    merged = []

    def merge(groups):
        merged.append(groups)
        write_artifact(staged.uri, {"x.bin": b"x"}, {"settings": {"fit_key": staged.key}}, format="test", format_version=1)

    assert staged.publish([[0, 1], [2]], merge, what="fit") == staged.uri
    assert merged == [[{".marker": b"b", ".first": b"a"}, {".marker": b"d", ".first": b"c"}]]
    fs, _ = to_fs(staged.uri)
    assert not fs.exists(staged.folder) and staged.is_published()
    assert staged.publish([[0, 1], [2]], merge, what="fit") == staged.uri and len(merged) == 1  # published: kept
    assert not _staged(tmp_path, key="b" * 64).is_published()  # another key is another fit
