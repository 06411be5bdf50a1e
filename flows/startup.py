"""A local run's start once its checks pass: Prefect's temporary server, the flow's modules and
Ray, in that order, each begun while the one before it is still under way.

Three things stand between the checks and a flow's first step, and none needs another: Prefect's
temporary server (a process of its own, :class:`flows.server.TemporaryServer`, launched before any
of Prefect is imported here), the imports of the flow's modules (Prefect, the tasks, the flow:
~1.3 s of this process on two cores) and Ray (``ray.init``). :func:`started_together` enters the
block once all three are ready. (Importing the modules in a thread while ``ray.init`` waits showed
no gain in one-off timings on two cores: all three are CPU work.) ``benchmarks/startup.py``
measures this order beside the ways before.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from flows.server import TemporaryServer
from protonmf.pipeline import Run

__all__ = ["started_together"]


@contextmanager
def started_together(run: Run, *modules: str) -> Iterator[list[ModuleType]]:
    """The block with Prefect's temporary server answering (or the server Prefect's settings
    name), ``modules`` imported (what it yields) and Ray connected or started
    (:func:`tasks.runtime.ray_session`); server and Ray stop after it."""
    server = TemporaryServer()
    try:
        imported = [importlib.import_module(name) for name in modules]
        from tasks.runtime import ray_session

        with ray_session(run), server.serving():
            yield imported
    finally:
        server.stop()
