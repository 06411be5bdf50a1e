"""A failed read is not a bad image: through a fault-injecting proxy in front of moto, throttling
past every client retry budget, resets mid-body and slow answers end with every image read; an
outage longer than the run's retries fails (never skips) the image; a missing object is a skip."""

import pytest

from protonmf.data import ImageFolderSource, ImageReadError, Preprocess, ReadRetry, load_images
from protonmf.demo.synthetic import make_synthetic_parts, write_image_folder
from tests.s3_proxy import Fault, S3Proxy

#: The client's own retries, made small: botocore tries once, s3fs (5 attempts of its own) is left as it is.
CLIENT = {"config_kwargs": {"retries": {"total_max_attempts": 1}}}


@pytest.fixture
def images(s3, s3_bucket, tmp_path):
    """Two classes of 3 images on S3; the source reads them through the proxy."""
    write_image_folder(make_synthetic_parts(2, 3, image_size=32, seed=0), tmp_path / "train")
    s3.put(str(tmp_path / "train"), f"{s3_bucket}/train", recursive=True)
    return f"s3://{s3_bucket}/train"


def _source(root, proxy, retry):
    source = ImageFolderSource(root, storage_options={**CLIENT, "client_kwargs": {"endpoint_url": proxy.url}})
    source.read_retry = retry
    return source


def test_throttling_resets_and_slow_answers_past_the_clients_retries_lose_no_image(images, s3_server):
    with S3Proxy(s3_server) as proxy:
        source = _source(images, proxy, ReadRetry(attempts=4, backoff=0.01))
        first, second, third = (r.uri.removeprefix("s3://") for r in source.records_of(0))  # bucket/key
        proxy.faults = [Fault("slowdown", first, times=12),  # s3fs tries 5 times per read: 2 reads fail, the 3rd gets it
                        Fault("reset", second, times=7),  # half the body, then the connection closed
                        Fault("slow", third, times=1, seconds=1.0)]
        x, used = load_images(source, Preprocess(resize=32, crop=32), source.records_of(0), workers=0)
        assert len(used) == 3 and x.shape == (3, 3, 32, 32)
        assert proxy.injected[("slowdown", f"/{first}")] == 12 and proxy.injected[("reset", f"/{second}")] == 7
        assert proxy.injected[("slow", f"/{third}")] == 1
    plain = ImageFolderSource(images)  # the same pixels as without the proxy
    y, _ = load_images(plain, Preprocess(resize=32, crop=32), plain.records_of(0), workers=0)
    assert (x == y).all()


def test_an_outage_longer_than_the_retries_fails_the_image_and_a_missing_one_is_skipped(images, s3_server, s3, s3_bucket):
    with S3Proxy(s3_server) as proxy:
        source = _source(images, proxy, ReadRetry(attempts=2, backoff=0.01))
        records = source.records_of(1)
        key = records[1].uri.removeprefix("s3://")
        proxy.faults = [Fault("slowdown", key, times=1000)]
        with pytest.raises(ImageReadError, match=rf"^read error: {records[1].uri}: OSError: \[Errno 16\] Please reduce your request rate\. \(after 2 attempt\(s\)\)$"):
            load_images(source, Preprocess(resize=32, crop=32), records, workers=2)
        assert proxy.injected[("slowdown", f"/{key}")] == 10  # 2 of our attempts, 5 of s3fs's each
        proxy.faults = []
        s3.rm(records[2].uri.removeprefix("s3://"))  # gone since it was listed
        x, used = load_images(source, Preprocess(resize=32, crop=32), records, workers=2)
        assert [r.uri for r in used] == [r.uri for r in records[:2]]  # the missing one skipped, with its reason
        img, reason = source.load(records[2])
        assert img is None and reason.startswith(f"missing file: {records[2].uri}")
