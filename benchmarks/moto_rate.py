"""How many S3 requests per second the moto server of benchmark 9 answers on this machine.

The server runs in its own process (as in ``flow_vs_script_1000.py``, where it runs in the
benchmark's process and the flow in others); this process sends, with s3fs, ``--n`` GETs of 2 kB
objects one after another, then ``--n`` GETs at once, then ``--n`` PUTs at once, and prints the
seconds and requests per second of each, with the load average.

    .venv/bin/python benchmarks/moto_rate.py [--n 500]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from flow_vs_script_1000 import CountingMotoServer, s3_env


def _serve(conn) -> None:
    server = CountingMotoServer()
    conn.send(server.url)
    conn.recv()
    server.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=500)
    n = parser.parse_args().n
    ours, theirs = mp.Pipe()
    server = mp.get_context("spawn").Process(target=_serve, args=(theirs,), daemon=True)
    server.start()
    os.environ.update(s3_env(ours.recv()))
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, max_concurrency=1, use_listings_cache=False)
    fs.mkdir("motorate")
    paths = [f"motorate/o{i}" for i in range(n)]
    fs.pipe({p: b"x" * 2000 for p in paths})
    print(f"load average {os.getloadavg()[0]:.1f}")
    for what, send in (("GETs one after another", lambda: [fs.cat_file(p) for p in paths]),
                       ("GETs at once", lambda: fs.cat(paths)),
                       ("PUTs at once", lambda: fs.pipe({p + "-2": b"y" * 2000 for p in paths}))):
        t = time.perf_counter()
        send()
        dt = time.perf_counter() - t
        print(f"{n} {what}: {dt:.2f} s, {n / dt:.0f} requests/s")
    ours.send("stop")
    server.join()


if __name__ == "__main__":
    main()
