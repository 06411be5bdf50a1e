"""Failures the reliability tests inject into a run's Ray workers, from outside the project's code.

:func:`runtime_env` gives a Ray runtime environment whose workers run :func:`install` when they
start (Ray's ``worker_process_setup_hook``, pickled by value: the workers need not import
``tests``); it wraps the steps of :mod:`protonmf.pipeline` that ``tasks/`` calls, as these
variables (set by a test, forwarded to the workers) ask:

- ``PROTONMF_ATTEMPT_LOG``: a file each fit or CRAFT group task appends its pid to when it starts
  (a test counts attempts);
- ``PROTONMF_FAULT_KILL_ONCE``: a file; while it does not exist, the first fit or CRAFT group task
  to start creates it (its pid inside) and kills its worker process, as a lost node or an OOM
  kill would;
- ``PROTONMF_FAULT_KILL_EXTRACT_ONCE``: a file; while it does not exist, an extraction actor dies
  when it is about to write a class's completion marker, after writing to the file its pid, the
  marker's path and the class's objects in the store then (written whole but for the marker);
- ``PROTONMF_FAULT_DECODE_FAILS``: a JSON file ``{class: n}``; decoding a bundle that holds class
  ``class`` fails ``n`` more times with a reset connection (the file counts down);
- ``PROTONMF_FAULT_STEAL_LEASE``: a file; when it exists, the next fit group task to start reads
  the lease location it names, removes the file, and writes over that lease a live one of another
  run (as a run that took it over would).
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import json
import os
import sys
from collections.abc import Callable
from typing import Any

ATTEMPT_LOG = "PROTONMF_ATTEMPT_LOG"
KILL_ONCE = "PROTONMF_FAULT_KILL_ONCE"
KILL_EXTRACT_ONCE = "PROTONMF_FAULT_KILL_EXTRACT_ONCE"
DECODE_FAILS = "PROTONMF_FAULT_DECODE_FAILS"
STEAL_LEASE = "PROTONMF_FAULT_STEAL_LEASE"
VARIABLES = (ATTEMPT_LOG, KILL_ONCE, KILL_EXTRACT_ONCE, DECODE_FAILS, STEAL_LEASE)


def runtime_env(base: dict[str, Any] | None = None) -> dict[str, Any]:
    """``base`` with the variables above forwarded and :func:`install` as the workers' setup hook."""
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    env = dict(base or {})
    env["env_vars"] = {**env.get("env_vars", {}), **{name: os.environ[name] for name in VARIABLES if name in os.environ}}
    env["worker_process_setup_hook"] = install
    return env


def install() -> None:
    """In a Ray worker, when it starts: wrap the pipeline's group steps, the decoding and the
    forward-and-write of extraction once :mod:`protonmf.pipeline` is imported (not before: the
    worker's first task imports torch, after Ray has set its thread count)."""
    if "protonmf.pipeline" in sys.modules:
        _wrap(sys.modules["protonmf.pipeline"])
        return
    sys.meta_path.insert(0, _WrapOnImport())


class _WrapOnImport(importlib.abc.MetaPathFinder):
    """Finds ``protonmf.pipeline`` as usual, and wraps its steps once it has been executed."""

    def find_spec(self, name, path, target=None):
        if name != "protonmf.pipeline":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        execute = spec.loader.exec_module

        def exec_and_wrap(module):
            execute(module)
            _wrap(module)

        spec.loader.exec_module = exec_and_wrap
        return spec


def _wrap(pipeline) -> None:
    for name in ("fit_prototype_group", "learn_concept_group"):
        setattr(pipeline, name, _logged_and_killable(getattr(pipeline, name)))
    pipeline.fit_prototype_group = _steals_a_lease(pipeline.fit_prototype_group)
    pipeline.forward_group = _dies_before_a_marker(pipeline.forward_group)
    pipeline.decode_group = _fails_for_some_classes(pipeline.decode_group)


def _logged_and_killable(step: Callable) -> Callable:
    @functools.wraps(step)
    def wrapped(*args, **kwargs):
        log = os.environ.get(ATTEMPT_LOG)
        if log:
            with open(log, "a") as f:
                f.write(f"{os.getpid()}\n")
        marker = os.environ.get(KILL_ONCE)
        if marker and not os.path.exists(marker):
            with open(marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(137)
        return step(*args, **kwargs)

    return wrapped


def _steals_a_lease(step: Callable) -> Callable:
    @functools.wraps(step)
    def wrapped(run, *args, **kwargs):
        request = os.environ.get(STEAL_LEASE)
        if request and os.path.exists(request):
            with open(request) as f:
                uri = f.read().strip()
            os.remove(request)
            import time

            from protonmf.storage import join, to_fs

            fs, root = to_fs(uri, run.storage_options)
            record = {"owner": "thief/1", "host": "elsewhere", "pid": 1, "expires": time.time() + 3600}
            fs.pipe_file(join(root, "lease.json"), json.dumps(record).encode())
        return step(run, *args, **kwargs)

    return wrapped


def _dies_before_a_marker(forward_group: Callable) -> Callable:
    @functools.wraps(forward_group)
    def wrapped(run, decoded, *args, **kwargs):
        marker = os.environ.get(KILL_EXTRACT_ONCE)
        if marker and not os.path.exists(marker) and decoded:
            _die_at_marker_write(run.store, {run.store.marker_path(d.k): d.k for d in decoded}, marker)
        return forward_group(run, decoded, *args, **kwargs)

    return wrapped


def _die_at_marker_write(store, markers: dict[str, int], record: str) -> None:
    """Make ``store``'s filesystem kill this process when it is about to write one of ``markers``
    (the object itself, or the temporary file renamed to it), recording what was written."""
    fs = store.fs
    pipe_file = fs.pipe_file

    def pipe_file_or_die(target, *args, **kwargs):
        for path, k in markers.items():
            if str(target).startswith(path):
                from protonmf.storage import class_stem

                written = sorted(p.removeprefix(store.root).lstrip("/") for p in fs.find(store.root) if class_stem(k) in p)
                with open(record, "w") as f:
                    json.dump({"pid": os.getpid(), "path": path, "written": written}, f)
                os._exit(137)
        return pipe_file(target, *args, **kwargs)

    fs.pipe_file = pipe_file_or_die


def _fails_for_some_classes(decode_group: Callable) -> Callable:
    @functools.wraps(decode_group)
    def wrapped(run, classes, *args, **kwargs):
        path = os.environ.get(DECODE_FAILS)
        if path and os.path.exists(path):
            left = json.loads(open(path).read() or "{}")
            hit = [k for k in classes if left.get(str(k), 0) > 0]
            if hit:
                for k in hit:
                    left[str(k)] -= 1
                with open(path, "w") as f:
                    f.write(json.dumps(left))
                raise ConnectionResetError(f"injected: the images of class {hit[0]} could not be read")
        return decode_group(run, classes, *args, **kwargs)

    return wrapped
