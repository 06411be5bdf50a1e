"""Extraction on Ray: the data listed once (by prepare), workers that never list it, an actor pool
sized to the cluster, and features bit-identical to extraction in one process."""

import json
import os
import tempfile
from pathlib import Path

import pytest
import torch

from protonmf.config import parse_config
from protonmf.data.store import FeatureStore
from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder
from tests.conftest import S3_REQUESTS, s3_lists
from tests.small_run import module_bucket

pytestmark = pytest.mark.slow

N_CPUS = 2
N_CLASSES = 4
#: How often decoding each class fails (tests/faults.py), for the cluster's workers.
DECODE_FAILS = Path(tempfile.mkdtemp(prefix="decode-fails-")) / "fails.json"


@pytest.fixture(scope="module")
def bucket(s3_server):
    """A bucket on the moto server, with the AWS variables set for this process and Ray's workers."""
    yield from module_bucket(s3_server, "extract")


@pytest.fixture(scope="module")
def cluster(bucket):
    """A local Ray with N_CPUS CPUs and one logical GPU (no CUDA behind it: a GPU actor runs on the
    CPU, but Ray Data plans the GPU pipeline), whose workers see the S3 variables."""
    import ray

    from tasks.runtime import worker_env
    from tests import faults

    os.environ[faults.DECODE_FAILS] = str(DECODE_FAILS)  # no failures until a test writes some
    ray.init(num_cpus=N_CPUS, num_gpus=1, include_dashboard=False, log_to_driver=False,
             runtime_env=faults.runtime_env({"env_vars": worker_env()}))
    # The pool starts at its full size; dispatch once every actor is up, so each one takes classes.
    ctx = ray.data.DataContext.get_current()
    saved, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 120
    yield
    ctx.wait_for_min_actors_s = saved
    ray.shutdown()
    os.environ.pop(faults.DECODE_FAILS)


def test_pool_size_is_what_the_cluster_holds_or_the_cap(cluster):
    import ray

    from tasks.extract import cluster_most, extract_pool_bounds, extract_pool_size

    now = ray.cluster_resources()
    assert now["CPU"] == N_CPUS
    assert cluster_most() is None  # started by `ray start`, no autoscaler: Ray knows no largest size
    assert extract_pool_size(now, 0, 1000) == N_CPUS  # one actor per CPU
    assert extract_pool_size(now, 0, 1000, cap=1) == 1
    assert extract_pool_size(now, 0, 1) == 1  # never more actors than classes
    assert extract_pool_size(now, 1, 1000) == 1  # one GPU here
    assert extract_pool_size(now, 2, 1000) == 1  # not even one whole actor's GPUs: still one
    assert extract_pool_size({"CPU": 64, "GPU": 8}, 1, 1000) == 8  # one per GPU
    assert extract_pool_size({"CPU": 64, "GPU": 8}, 0.5, 1000) == 16
    assert extract_pool_size({"CPU": 4, "GPU": 8}, 1, 1000) == 4  # each actor needs a CPU too
    assert extract_pool_size({"CPU": 64, "GPU": 8}, 1, 1000, cap=3) == 3
    # An autoscaling cluster of 16 one-GPU nodes, one of them up: start with 1, grow to 16 when
    # autoscaler v2 tells Ray its largest size, or to the cap when it does not (autoscaler v1).
    assert extract_pool_bounds({"CPU": 16, "GPU": 1}, {"CPU": 256, "GPU": 16}, 1, 1000) == (1, 16)
    assert extract_pool_bounds({"CPU": 16, "GPU": 1}, {"CPU": 256, "GPU": 16}, 1, 1000, cap=4) == (1, 4)
    assert extract_pool_bounds({"CPU": 16, "GPU": 1}, None, 1, 1000, cap=16) == (1, 16)
    assert extract_pool_bounds({"CPU": 16, "GPU": 1}, None, 1, 1000) == (1, 1)
    assert extract_pool_bounds({"CPU": 16, "GPU": 1}, None, 1, 3, cap=16) == (1, 3)  # never more than classes
    assert extract_pool_bounds(now, cluster_most(), 0, 1000) == (N_CPUS, N_CPUS)


@pytest.fixture(scope="module")
def prepared(cluster, bucket, tmp_path_factory):
    """A synthetic ImageFolder on S3 and the config that reads it."""
    import s3fs

    tmp = tmp_path_factory.mktemp("ray")
    write_image_folder(make_synthetic_parts(N_CLASSES, 5, image_size=64, seed=0), tmp / "train")
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(tmp / "train"), f"{bucket}/data/train", recursive=True)
    return {
        "data": {"source": "imagefolder", "train": f"s3://{bucket}/data/train",
                 "preprocess": {"resize": 64, "crop": 64, "mean": [0.5] * 3, "std": [0.25] * 3}},
        "backbone": {"arch": "torchvision:resnet18", "num_classes": N_CLASSES},
        "compute": {"batch_size": 4},
        "storage": {"features": f"s3://{bucket}/features", "model": f"s3://{bucket}/model"},
    }


def test_prepare_lists_the_data_once_and_extraction_workers_list_nothing(cluster, bucket, prepared, tmp_path):
    from protonmf import pipeline
    from protonmf.pipeline import Run, prepare_store, resolve_backbone
    from tasks.extract import extract_features
    from tasks.prepare import prepare_run

    tree = prepared
    start = len(S3_REQUESTS)
    prepared = prepare_run(Run(parse_config(tree)))
    config = prepared.run.config
    # one LIST of the tree's top level, then one of each class prefix (a single page each here)
    assert s3_lists(start, bucket, "data/train") == 1 + N_CLASSES
    assert config.data.train_index.startswith(f"s3://{bucket}/features/index/train-")

    start = len(S3_REQUESTS)
    rows = extract_features(prepared)
    assert s3_lists(start, bucket, "data") == 0  # decode tasks read their classes' index rows, no listing
    # Per class, given prepare's listing of the markers: its 5 images read, and 4 objects written
    # (array metadata, chunk, record table, marker); no request for a marker or an array not there.
    per_class = [(m, path) for m, path, _ in S3_REQUESTS[start:] if "/c00" in path or "/done/" in path or "/data/train/" in path]
    assert sorted(m for m, path in per_class if "/done/" in path) == ["PUT"] * N_CLASSES
    assert sorted(m for m, path in per_class if "/data/train/" in path) == ["GET"] * 5 * N_CLASSES
    assert sorted(m for m, path in per_class if "/features/c00" in path or "/tables/c00" in path) == ["PUT"] * 3 * N_CLASSES
    assert [r.n_images for r in rows] == [5] * N_CLASSES and not any(r.resumed for r in rows)
    assert len({r.worker for r in rows}) == N_CPUS  # the pool grew to one actor per CPU, and both worked
    assert all(r.decoder == r.worker for r in rows)  # on CPUs Ray Data fuses decoding into the actors

    # the same features as one process extracting from a listing (one thread: the actors' own count)
    local = parse_config({**tree, "storage": {"features": str(tmp_path / "features"), "model": str(tmp_path / "m")}})
    local, backbone = resolve_backbone(Run(local.model_copy(update={"backbone": config.backbone})))
    source = local.source("train")
    store = prepare_store(local, backbone, list(source.classes))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipeline.extract_features(local, list(range(N_CLASSES)), workers=0)
    finally:
        torch.set_num_threads(threads)
    remote = FeatureStore.open(config.storage.features)
    for k in range(N_CLASSES):
        assert torch.equal(remote.read_class(k), store.read_class(k)), k
    same = ["image_id", "label", "row", "pred", "top_classes", "top_logits", "skipped"]
    assert remote.read_records().select(same).equals(store.read_records().select(same))

    # A rerun: decided from the listing and the markers; no chunk, no image, no record table read.
    start = len(S3_REQUESTS)
    again = extract_features(prepare_run(Run(parse_config(tree))))
    assert all(r.resumed and r.n_images == 5 for r in again)
    reads = [path for m, path, _ in S3_REQUESTS[start:] if m == "GET"]
    assert not [p for p in reads if "/features/c00" in p or "/tables/" in p or "/data/train/" in p], reads
    assert sorted(p for p in reads if "/done/" in p) == [f"/{bucket}/features/done/c{k:05d}.json" for k in range(N_CLASSES)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a step given GPUs needs CUDA (protonmf.devices.step_device)")
def test_gpu_actors_take_classes_decoded_by_separate_cpu_tasks(cluster, bucket, prepared):
    """extract_gpus > 0: decode tasks (CPU) stream into the GPU actors, two Ray Data operators, and
    the features are those of the CPU pipeline to the bit."""
    from protonmf.pipeline import Run
    from tasks.extract import extract_features
    from tasks.prepare import prepare_run

    tree = {**prepared, "compute": {"batch_size": 4, "extract_gpus": 1},
            "storage": {"features": f"s3://{bucket}/gpu/features", "model": f"s3://{bucket}/gpu/model"}}
    cpu = FeatureStore.open(f"s3://{bucket}/features")
    pinned = prepare_run(Run(parse_config(prepared))).run.config  # the CPU run's weights, pinned by its prepare
    run = prepare_run(Run(parse_config(tree).model_copy(update={"backbone": parse_config(tree).backbone.model_copy(
        update={"weights": pinned.backbone.weights})})))
    config = run.run.config
    rows = extract_features(run)
    assert len({r.worker for r in rows}) == 1  # one GPU: one actor
    assert not {r.decoder for r in rows} & {r.worker for r in rows}  # decoded in other processes
    gpu = FeatureStore.open(config.storage.features)
    for k in range(N_CLASSES):
        assert torch.equal(gpu.read_class(k), cpu.read_class(k)), k


def test_evaluation_shards_read_the_val_index_on_a_pool_and_list_nothing(cluster, bucket, prepared, tmp_path):
    """The evaluation's actors build the held-out source from the index prepare wrote, measure shards
    of it, and their merged JSON is that of one process evaluating a listing of the same images."""
    import s3fs

    from protonmf import PrototypeModel
    from protonmf.data import ImageFolderSource
    from protonmf.evaluation.held_out import evaluate_model
    from protonmf.pipeline import Run, class_groups
    from tasks.evaluate import evaluate_prototype_model
    from tasks.extract import extract_features
    from tasks.fit import fit_prototype_groups
    from tasks.prepare import prepare_run
    from tasks.publish import publish_prototype_model

    write_image_folder(make_synthetic_parts(N_CLASSES, 3, image_size=64, seed=1), tmp_path / "val")
    s3fs.S3FileSystem(skip_instance_cache=True).put(str(tmp_path / "val"), f"{bucket}/data/val", recursive=True)
    tree = {**prepared, "data": {**prepared["data"], "val": f"s3://{bucket}/data/val"},
            "storage": {**prepared["storage"], "model": f"s3://{bucket}/evaluated/model"},
            "evaluation": {"shard_images": 4, "report": False, "reconstruction_classes": 0}}
    prepared_run = prepare_run(Run(parse_config(tree)))  # the features of the extraction test (val is not in their key)
    run = prepared_run.run
    config = run.config
    assert config.data.val_index.startswith(f"s3://{bucket}/features/index/val-")
    extract_features(prepared_run)
    fit_prototype_groups(run, class_groups(N_CLASSES, config.prototypes.classes_per_task))
    publish_prototype_model(run)

    start = len(S3_REQUESTS)
    ev, shards = evaluate_prototype_model(run)
    assert s3_lists(start, bucket, "data") == 0  # the actors read the val index, never a listing
    assert [(s["start"], s["stop"], s["n_images"]) for s in shards] == [(0, 4, 4), (4, 8, 4), (8, 12, 4)]
    assert len({s["worker"] for s in shards}) == N_CPUS

    model = PrototypeModel.load(config.storage.model)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the actors' own count: the same arithmetic
    try:
        local = evaluate_model(model, ImageFolderSource(str(tmp_path / "val")), run.preprocess,
                               batch_size=config.compute.batch_size, workers=0)
    finally:
        torch.set_num_threads(threads)
    atlas = ev.pop("atlas")  # the atlas of every class, beside the version (not part of what is measured)
    assert atlas == f"{config.storage.model}/versions/{model.version}/atlas/index.html"
    assert ev == {**local, "n_skipped_unknown_class": 0, "unknown_classes": {}}


def test_a_failed_class_does_not_stop_the_others_and_a_retry_extracts_it_alone(cluster, bucket, prepared):
    """Decoding class 2 fails (a reset connection): the other classes are extracted and marked, the
    step fails naming class 2 with an error Prefect retries, and the retry, from the markers as they
    are now, reads the three complete classes back and extracts class 2 alone."""
    from protonmf.pipeline import Run
    from tasks.extract import ClassesFailed, extract_features
    from tasks.prepare import prepare_run
    from tasks.runtime import is_retryable

    tree = {**prepared, "storage": {"features": f"s3://{bucket}/one-fails/features", "model": f"s3://{bucket}/one-fails/model"}}
    ready = prepare_run(Run(parse_config(tree)))
    DECODE_FAILS.write_text(json.dumps({"2": 1}))
    name = ready.class_names[2]
    with pytest.raises(ClassesFailed, match=rf"^extraction failed for 1 of 4 classes: 2 \('{name}'\); the other classes "
                                            r"are in the store, and a retry or a rerun extracts only these") as failed:
        extract_features(ready)
    (err,) = failed.value.exceptions
    assert isinstance(err, ConnectionResetError) and f"the error of class(es) 2 ('{name}')" in err.__notes__
    assert is_retryable(failed.value)
    store = FeatureStore.open(f"s3://{bucket}/one-fails/features")
    assert store.done_classes() == [0, 1, 3]
    rows = extract_features(ready)  # what a Prefect retry of the step runs: the same prepared run
    assert [(r.k, r.resumed) for r in rows] == [(0, True), (1, True), (2, False), (3, True)]
    assert rows[2].n_images == 5 and store.done_classes() == [0, 1, 2, 3] and store.check_class(2) is None
    reference = FeatureStore.open(f"s3://{bucket}/features")  # the first test's store: the same features
    for k in range(N_CLASSES):
        assert torch.equal(store.read_class(k), reference.read_class(k)), k


def test_throttled_reads_lose_no_image_and_an_outage_fails_its_class_until_it_ends(cluster, bucket, prepared, s3_server):
    """Every request of the run through a fault-injecting proxy in front of moto, the client's own
    retries cut to one attempt: throttling and resets past them are retried by the run
    (``storage.read_attempts``) and every image ends in the store; an outage longer than that
    fails its class, never skips an image, and once it ends a retry extracts that class alone."""
    from protonmf.data import ImageReadError
    from protonmf.pipeline import Run
    from tasks.extract import ClassesFailed, extract_features
    from tasks.prepare import prepare_run
    from tests.s3_proxy import Fault, S3Proxy

    with S3Proxy(s3_server) as proxy:
        options = {"client_kwargs": {"endpoint_url": proxy.url}, "config_kwargs": {"retries": {"total_max_attempts": 1}}}

        def prepared_at(name):
            return prepare_run(Run(parse_config({**prepared, "storage": {
                "features": f"s3://{bucket}/{name}/features", "model": f"s3://{bucket}/{name}/model",
                "storage_options": options, "read_attempts": 4, "read_backoff": 0.01}})))

        ready = prepared_at("throttled")
        train = ready.run.source("train")
        key = {k: [r.uri.removeprefix("s3://") for r in train.records_of(k)] for k in range(N_CLASSES)}
        proxy.faults = [Fault("slowdown", key[0][1], times=12), Fault("slowdown", key[1][4], times=7),
                        Fault("reset", key[3][0], times=6)]
        rows = extract_features(ready)
        assert proxy.injected[("slowdown", f"/{key[0][1]}")] == 12 and proxy.injected[("reset", f"/{key[3][0]}")] == 6
        # what the run's summary names: the run's own retries of each class (s3fs tries 5 times per attempt)
        assert [r.retried for r in rows][:3] == [2, 1, 0] and rows[3].retried >= 1
        assert [(r.resumed, r.n_images, r.n_skipped) for r in rows] == [(False, 5, 0)] * N_CLASSES

        outage = prepared_at("outage")
        proxy.faults = [Fault("slowdown", key[2][2], times=1000)]
        with pytest.raises(ClassesFailed, match=r"^extraction failed for 1 of 4 classes: 2 ") as failed:
            extract_features(outage)
        (err,) = failed.value.exceptions
        assert isinstance(err, ImageReadError) and f"read error: s3://{key[2][2]}" in str(err)
        assert proxy.injected[("slowdown", f"/{key[2][2]}")] == 4 * 5  # the run's 4 attempts, s3fs's 5 each
        proxy.faults = []  # the outage ends
        again = extract_features(outage)
        assert [(r.k, r.resumed, r.n_skipped) for r in again] == [(0, True, 0), (1, True, 0), (2, False, 0), (3, True, 0)]
    reference = FeatureStore.open(f"s3://{bucket}/features")
    for name in ("throttled", "outage"):
        store = FeatureStore.open(f"s3://{bucket}/{name}/features")
        records = store.read_records()
        assert records.num_rows == 5 * N_CLASSES and records["skipped"].null_count == 5 * N_CLASSES  # every image, none skipped
        for k in range(N_CLASSES):
            assert torch.equal(store.read_class(k), reference.read_class(k)), (name, k)
