"""Versioned publishing: readers never see a half-published artifact, a dead publish changes
nothing, older versions can be opened by id and are pruned beyond ``keep``."""

import json
import multiprocessing as mp
import os
import signal
import threading

import pytest
import torch

import protonmf.artifact as artifact
from protonmf import PrototypeModel
from protonmf.artifact import ArtifactError, list_versions, open_artifact, write_artifact


def _publish(uri, tag, keep=3, **kw):
    files = {f"part{i}.bin": f"{tag}:{i}".encode() * 1000 for i in range(3)}
    return write_artifact(uri, files, {"tag": tag}, format="test", format_version=1, keep=keep, **kw)


def _read(uri, version=None):
    """Every file of one version; all of them must come from the same publish."""
    reader = open_artifact(uri, format="test", format_version=1, what="test artifact", version=version)
    tags = {reader.blob(name).split(b":")[0].decode() for name in reader.manifest["files"]}
    assert tags == {reader.manifest["tag"]}
    return reader.manifest["tag"]


def test_versions_are_kept_pruned_and_opened_by_id(tmp_path):
    uri = str(tmp_path / "a")
    ids = [_publish(uri, f"v{i}", keep=2) for i in range(4)]
    assert ids == sorted(ids) and len(set(ids)) == 4
    assert list_versions(uri) == ids[-2:]  # the newest two stay
    assert _read(uri) == "v3" and _read(uri, version=ids[2]) == "v2"
    with pytest.raises(ArtifactError, match=rf"has no version '{ids[0]}'; versions: \['{ids[2]}', '{ids[3]}'\]"):
        _read(uri, version=ids[0])
    with pytest.raises(ValueError, match="keep must be ≥ 1"):
        _publish(uri, "v4", keep=0)


def _publish_and_die_at(uri, crash_at):
    """In a child process: publish, SIGKILLed just before its ``crash_at``-th write (no cleanup runs)."""
    writes = []
    real = artifact.write_bytes_atomic

    def dying(fs, path, data):
        writes.append(path)
        if len(writes) == crash_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(fs, path, data)

    artifact.write_bytes_atomic = dying
    _publish(uri, "new")


@pytest.mark.parametrize("crash_at", [1, 3, 4, 5])  # a file, the last file, the manifest, the pointer
def test_a_publish_that_dies_midway_leaves_the_previous_version(tmp_path, crash_at):
    uri = str(tmp_path / "a")
    first = _publish(uri, "old")
    child = mp.get_context("fork").Process(target=_publish_and_die_at, args=(uri, crash_at))
    child.start()
    child.join(60)
    assert child.exitcode == -signal.SIGKILL  # killed mid-publish, not finished
    assert _read(uri) == "old"
    assert json.loads((tmp_path / "a" / "current.json").read_text())["version"] == first
    third = _publish(uri, "newer")  # the next publish clears what the dead one left unfinished
    assert _read(uri) == "newer" and list_versions(uri)[0] == first and list_versions(uri)[-1] == third
    unfinished = [p.name for p in (tmp_path / "a" / "versions").iterdir() if not (p / "manifest.json").exists()]
    assert unfinished == []


def test_an_artifact_written_before_versions_still_opens(tmp_path):
    root = tmp_path / "legacy"
    root.mkdir()
    data = b"old:0" * 10
    (root / "part0.bin").write_bytes(data)
    (root / "manifest.json").write_text(json.dumps({
        "format": "test", "format_version": 1, "tag": "old",
        "files": {"part0.bin": {"sha256": artifact.sha256(data), "bytes": len(data)}}}))
    assert _read(str(root)) == "old"
    _publish(str(root), "new")
    assert _read(str(root)) == "new"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_readers_during_a_republish_get_the_old_or_the_new_model(where, tmp_path, resnet_data, resnet_model, request):
    if where == "s3":
        request.getfixturevalue("s3")  # the moto endpoint, its bucket created
        bucket = request.getfixturevalue("s3_bucket")
        uri = f"s3://{bucket}/models/m"
    else:
        uri = str(tmp_path / "m")
    _, _, x = resnet_data
    old, new = resnet_model, resnet_model.with_p(5).intervene({0: [0, 1]})  # other settings, other logits
    expected = {"old": old(x), "new": new(x)}
    old.save(uri)
    seen, errors, published = [], [], threading.Event()
    after = []

    def reader():
        while len(after) < 2:  # keep reading until two loads started after the new version was in place
            if published.is_set():
                after.append(1)
            try:
                model = PrototypeModel.load(uri)
                logits = model(x)
                kind = "new" if model.interventions else "old"
                assert torch.equal(logits, expected[kind]) and model.p == (5 if kind == "new" else 3)
                seen.append(kind)
            except Exception as err:  # noqa: BLE001 - every failure is reported
                errors.append(repr(err))
                return

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    while len(seen) < 2 and not errors:
        threading.Event().wait(0.05)
    new.save(uri)
    published.set()
    for t in threads:
        t.join(timeout=300)
    assert errors == []
    assert "old" in seen and seen[-1] == "new" and set(seen) == {"old", "new"}
    assert PrototypeModel.load(uri, version=list_versions(uri)[0]).interventions == {}  # the old one, by id
