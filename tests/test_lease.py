"""One run at a time: leases on a local disk and on a local S3 endpoint (moto), with real processes."""

import multiprocessing as mp
import os
import signal
import time
import traceback

import pytest

from protonmf.lease import LeaseHeld, LeaseLost, acquire_lease, read_lease
from protonmf.storage import join, to_fs

# Fresh interpreters that inherit the environment (the AWS variables the fixture set). Not fork:
# after a Prefect test harness has run in this process (tests/flows), a forked child exits with 1,
# Prefect's at-exit drain of a service asserting in the copy (prefect 3.8.8).
CTX = mp.get_context("spawn")


@pytest.fixture(params=["local", "s3"])
def location(request, tmp_path):
    """A store location on a local disk or on moto's S3 (the AWS variables set for children too)."""
    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3")  # the moto endpoint, its bucket created
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/store"


def _race(uri, owner, barrier, results):
    barrier.wait(120)  # every process calls acquire at the same moment, give or take a scheduler tick
    try:
        lease = acquire_lease(uri, owner=owner, mode="fail", seconds=30)
    except LeaseHeld as err:
        lease = None
        results.put((owner, "lost", str(err)))
    barrier.wait(120)  # the winner holds the lease until every process has tried
    if lease is not None:
        results.put((owner, "won", ""))
        lease.release()


def test_racing_runs_one_wins_the_others_name_it(location):
    results, barrier = CTX.Queue(), CTX.Barrier(4)
    procs = [CTX.Process(target=_race, args=(location, f"run-{i}", barrier, results)) for i in range(4)]
    for p in procs:
        p.start()
    outcomes = [results.get(timeout=180) for _ in procs]
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 4
    winners = [o for o, status, _ in outcomes if status == "won"]
    assert len(winners) == 1
    for owner, status, message in outcomes:
        if status == "lost":
            assert message.startswith(f"lease: {location} is in use by run {winners[0]} (host ")
            assert "set storage.lease=wait" in message
    assert read_lease(location) is None  # released


def _count(uri, owner, n, log):
    """Under the lease: n read-modify-write increments of a counter object (lost without the lease)."""
    try:
        _count_under_lease(uri, owner, n, log)
    except BaseException:
        with open(f"{log}.{owner}.error", "w") as f:
            f.write(traceback.format_exc())  # the child's stderr is not in pytest's report
        raise


def _count_under_lease(uri, owner, n, log):
    fs, root = to_fs(uri)
    path = join(root, "counter")
    lease = acquire_lease(uri, owner=owner, mode="wait", seconds=30, poll=0.05)
    with open(log, "a") as f:
        f.write(f"start {owner} {time.time()}\n")
    for _ in range(n):
        value = int(fs.cat_file(path)) if fs.exists(path) else 0
        fs.pipe_file(path, str(value + 1).encode())
    with open(log, "a") as f:
        f.write(f"end {owner} {time.time()}\n")
    lease.release()


def test_second_run_waits_until_the_first_releases(location, tmp_path):
    log, n = tmp_path / "log", 40
    procs = [CTX.Process(target=_count, args=(location, f"run-{i}", n, log)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = {e.name: e.read_text() for e in tmp_path.glob("log.*.error")}
    assert not errors, "\n".join(errors.values())
    assert [p.exitcode for p in procs] == [0, 0, 0]
    fs, root = to_fs(location)
    assert int(fs.cat_file(join(root, "counter"))) == 3 * n  # no increment lost: never two at once
    events = [line.split() for line in log.read_text().splitlines()]
    assert [e[0] for e in events] == ["start", "end"] * 3  # one run's work, then the next's
    assert all(events[i][1] == events[i + 1][1] for i in range(0, 6, 2))


def _hold_forever(uri, seconds, ready):
    acquire_lease(uri, owner="doomed", mode="fail", seconds=seconds)
    ready.set()
    time.sleep(600)


def test_lease_of_a_killed_run_is_taken_over_after_expiry(location):
    ready = CTX.Event()
    holder = CTX.Process(target=_hold_forever, args=(location, 2.0, ready))
    holder.start()
    assert ready.wait(60)
    time.sleep(1.0)  # alive past a third of its lease: renewed at least once, so it is still held
    with pytest.raises(LeaseHeld, match=rf"in use by run doomed \(host .*, pid {holder.pid};"):
        acquire_lease(location, owner="next", mode="fail", seconds=2.0)
    os.kill(holder.pid, signal.SIGKILL)  # no release, no more renewals
    holder.join(30)
    dead = read_lease(location)
    assert dead["owner"] == "doomed" and dead["pid"] == holder.pid
    lease = acquire_lease(location, owner="next", mode="wait", seconds=2.0, timeout=30, poll=0.05)
    assert time.time() >= dead["expires"]  # taken over only once the dead run's lease ran out
    first = read_lease(location)
    assert first["owner"] == "next"
    time.sleep(2.5)  # longer than the lease: a live holder renews it, so nobody takes it over
    assert lease.renewals >= 2 and read_lease(location)["expires"] > first["expires"] + 1.0
    with pytest.raises(LeaseHeld, match="in use by run next"):
        acquire_lease(location, owner="third", mode="fail", seconds=2.0)
    lease.release()
    assert read_lease(location) is None


def test_wait_gives_up_after_the_timeout_naming_the_holder(location):
    lease = acquire_lease(location, owner="long-run", mode="fail", seconds=30)
    t = time.perf_counter()
    with pytest.raises(LeaseHeld, match=r"still in use by run long-run .* after waiting 0.5 s \(storage.lease_timeout\)"):
        acquire_lease(location, owner="other", mode="wait", seconds=30, timeout=0.5, poll=0.1)
    assert time.perf_counter() - t < 5
    lease.release()


def test_a_taken_over_lease_fails_its_run_at_release(location):
    lease = acquire_lease(location, owner="stalled", mode="fail", seconds=0.6)
    lease._stop.set()  # a run whose renewals stopped (a stalled driver), yet which goes on
    lease._thread.join()
    other = acquire_lease(location, owner="other", mode="wait", seconds=30, timeout=10, poll=0.05)
    assert not lease.renew()  # its conditional write is refused: the record is no longer the one it wrote
    with pytest.raises(LeaseLost, match=r"was lost during the run \(taken over by run other "):
        lease.release()
    assert read_lease(location)["owner"] == "other"  # the loser deletes nothing
    other.release()


def test_storage_without_conditional_writes_reads_its_record_back():
    """fsspec's memory filesystem stands for an object store without If-None-Match: write, settle, read back."""
    uri = f"memory://lease-test-{os.getpid()}/store"
    lease = acquire_lease(uri, owner="first", mode="fail", seconds=30, settle=0.05)
    assert read_lease(uri)["owner"] == "first"
    with pytest.raises(LeaseHeld, match=f"lease: {uri} is in use by run first "):
        acquire_lease(uri, owner="second", mode="fail", seconds=30, settle=0.05)
    lease.release()
    assert read_lease(uri) is None
