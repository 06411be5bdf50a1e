import os

# Offline machines: keep Prefect and Ray from phoning home in every test process.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import pytest
import torch

from protonmf import BackboneSpec, PrototypeModel, build_backbone

N_CLASSES = 5


def _images(n, size, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


@pytest.fixture(scope="session")
def resnet():
    """A real torchvision resnet18 (random weights), 5 classes, 64×64 inputs → 2×2×512 features."""
    torch.manual_seed(0)
    return build_backbone(BackboneSpec("torchvision:resnet18", num_classes=N_CLASSES))


@pytest.fixture(scope="session")
def vit():
    """A real torchvision ViT (2 blocks, 32-dim), 5 classes, 32×32 inputs → 4×4×32 patch tokens.

    torchvision zero-initialises a ViT head; we draw it at random so that logits are not all 0.
    """
    torch.manual_seed(0)
    backbone = build_backbone(BackboneSpec("protonmf:tiny_vit", num_classes=N_CLASSES))
    with torch.no_grad():
        backbone.model.heads.head.weight.normal_(0, 0.5)
        backbone.model.heads.head.bias.normal_(0, 0.1)
    return backbone


@pytest.fixture(scope="session")
def resnet_data():
    images = _images(60, 64, seed=1)
    return images, torch.arange(60) % N_CLASSES, _images(16, 64, seed=2)


@pytest.fixture(scope="session")
def vit_data():
    images = _images(60, 32, seed=3)
    return images, torch.arange(60) % N_CLASSES, _images(16, 32, seed=4)


@pytest.fixture(scope="session")
def resnet_model(resnet, resnet_data):
    images, labels, _ = resnet_data
    return PrototypeModel.fit(resnet, images, labels, p=[3, 1, 5], class_names=[f"class{k}" for k in range(N_CLASSES)])


# ---------------------------------------------------------------------------------------------
# A local S3 endpoint (moto in server mode) for tests of object-storage paths.
# ---------------------------------------------------------------------------------------------


#: Every request the moto server answered, as (method, path, query string), in order: tests count
#: LIST requests here, whichever process (the test, a Ray worker) sent them.
S3_REQUESTS: list[tuple[str, str, str]] = []


@pytest.fixture(scope="session")
def s3_server():
    """A moto S3 server on 127.0.0.1 (a free port), for the whole session; yields its endpoint URL.

    Requests are logged in :data:`S3_REQUESTS` (see :func:`s3_lists`)."""
    import logging

    from moto.moto_server.threaded_moto_server import ThreadedMotoServer
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise

    class LoggingMotoServer(ThreadedMotoServer):
        def _server_entry(self) -> None:  # moto's own, with the application wrapped in a log
            app = DomainDispatcherApplication(create_backend_app)

            def logged(environ, start_response):
                S3_REQUESTS.append((environ["REQUEST_METHOD"], environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", "")))
                return app(environ, start_response)

            self._server = make_server(self._ip_address, self._port, logged, True, request_handler=MotoRequestHandler)
            self._server_ready_event.set()
            self._server.serve_forever()

    server = LoggingMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{server._server.server_port}"
    finally:
        server.stop()


def s3_lists(since: int, bucket: str, prefix: str) -> int:
    """LIST requests (ListObjects v1/v2) on ``bucket`` under ``prefix`` among ``S3_REQUESTS[since:]``."""
    from urllib.parse import parse_qs

    n = 0
    for method, path, query in S3_REQUESTS[since:]:
        q = parse_qs(query, keep_blank_values=True)
        listing = method == "GET" and path.strip("/") == bucket and ("list-type" in q or "prefix" in q or "delimiter" in q)
        if listing and q.get("prefix", [""])[0].startswith(prefix):
            n += 1
    return n


@pytest.fixture
def s3_bucket():
    """A fresh bucket name for one test (the ``s3`` fixture creates it)."""
    import uuid

    return f"test-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def s3(s3_server, s3_bucket, monkeypatch):
    """An ``s3fs.S3FileSystem`` on the moto server, with the bucket ``s3_bucket`` created.

    The endpoint and credentials are set through the standard AWS environment variables, so any
    code that opens ``s3://`` URIs through fsspec reaches the same server.
    """
    import s3fs

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    fs.mkdir(s3_bucket)
    yield fs
    s3fs.S3FileSystem.clear_instance_cache()
