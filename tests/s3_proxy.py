"""A fault-injecting proxy in front of the tests' S3 endpoint (moto), on loopback.

Requests pass through unchanged unless a :class:`Fault` matches them (method and a substring of
the path), as many times as it says: ``"slowdown"`` answers 503 SlowDown (S3's throttling),
``"reset"`` sends the headers and half the body, then closes the connection, ``"slow"`` waits
``seconds`` before answering. What was injected is counted in :attr:`S3Proxy.injected`.
"""

from __future__ import annotations

import http.client
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


@dataclass
class Fault:
    kind: str  # "slowdown", "reset" or "slow"
    path: str  # a substring of the request's path
    times: int  # how many matching requests it hits
    method: str = "GET"
    seconds: float = 0.0  # for "slow"


class S3Proxy:
    """``with S3Proxy(upstream) as proxy``: ``proxy.url`` forwards to ``upstream``; ``proxy.faults``
    (a list, changed at will) says which requests fail."""

    def __init__(self, upstream: str):
        self.upstream = urlsplit(upstream).netloc
        self.faults: list[Fault] = []
        self.injected: Counter[tuple[str, str]] = Counter()  # (kind, path) -> times
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _any(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                fault = proxy._take(self.command, self.path)
                if fault is not None and fault.kind == "slowdown":
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                if fault is not None and fault.kind == "slow":
                    time.sleep(fault.seconds)
                conn = http.client.HTTPConnection(proxy.upstream, timeout=60)
                try:
                    conn.request(self.command, self.path, body=body or None, headers=dict(self.headers.items()))
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status)
                    head = self.command == "HEAD"  # no body: the object's size is the upstream's Content-Length
                    for name, value in resp.getheaders():
                        if name.lower() not in ("transfer-encoding", "connection", "date", "server") and \
                                (head or name.lower() != "content-length"):
                            self.send_header(name, value)
                    if not head:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if fault is not None and fault.kind == "reset" and len(data) > 1:
                        self.wfile.write(data[: len(data) // 2])
                        self.wfile.flush()
                        self.connection.shutdown(socket.SHUT_RDWR)
                        self.close_connection = True
                        return
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _any

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"

    def _take(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self.faults:
                if fault.times > 0 and fault.method == method and fault.path in path:
                    fault.times -= 1
                    self.injected[(fault.kind, path.split("?", 1)[0])] += 1
                    return fault
        return None

    def __enter__(self) -> S3Proxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
