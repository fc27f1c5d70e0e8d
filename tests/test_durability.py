"""The durability contract, end to end, on the real daemon process.

JOB_CREATED for a background job means it survives kill -9; recovery keeps order,
priorities, due times and attempt counts; poison jobs are quarantined; a full disk
costs submissions an ERROR, never an acknowledged job.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import threading
import time

import pytest

from atomnode.gearman.protocol import T
from daemon_harness import Client, Daemon

FUNC = b"durable-fn"


def drain_all(d: Daemon, function: bytes, *, idle: float = 1.0) -> list[tuple[bytes, bytes]]:
    """Grab and complete every job of ``function``; returns (unique, data) in grab order.
    Stops when the server answers NO_JOB and status shows nothing left."""
    got = []
    with d.worker(function) as w:
        while True:
            p = w.grab(timeout=idle)
            if p is None:
                if d.status().get(function.decode(), (0, 0, 0))[0] == 0:
                    return got
                continue
            handle, _f, unique, data = p.args
            got.append((unique, data))
            w.complete(handle, b"ok")


def test_acknowledged_jobs_survive_repeated_kill9(tmp_path):
    """Clients submit continuously while the daemon is killed with SIGKILL three times:
    every job that got JOB_CREATED is delivered afterwards, and nothing else appears."""
    d = Daemon(tmp_path)
    acked: set[bytes] = set()
    sent: set[bytes] = set()
    lock = threading.Lock()
    counter = [0]

    def submitter(stop: threading.Event, tag: str) -> None:
        # Pipelines 8 submissions at a time; records each one acknowledged.
        while not stop.is_set():
            try:
                c = Client(d.port, timeout=5)
            except OSError:
                time.sleep(0.01)  # the daemon is restarting: retry the connect
                continue
            try:
                while not stop.is_set():
                    batch = []
                    for _ in range(8):
                        with lock:
                            counter[0] += 1
                            u = f"{tag}-{counter[0]}".encode()
                            sent.add(u)
                        batch.append(u)
                        c.send(T.SUBMIT_JOB_BG, FUNC, u, b"payload-" + u)
                    for u in batch:
                        p = c.expect(T.JOB_CREATED)
                        assert p.args[0].startswith(b"H:")
                        with lock:
                            acked.add(u)
            except (OSError, ConnectionError):
                pass
            finally:
                c.close()

    d.start()
    stop = threading.Event()
    threads = [threading.Thread(target=submitter, args=(stop, f"c{i}")) for i in range(3)]
    for t in threads:
        t.start()
    try:
        for round_ in range(3):
            target = len(acked) + 300
            deadline = time.monotonic() + 30
            while len(acked) < target:
                assert time.monotonic() < deadline, "submissions stalled"
                time.sleep(0.01)
            d.kill9()
            d.start()
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(acked) >= 900
    delivered = drain_all(d, FUNC)
    uniques = [u for u, _ in delivered]
    missing = acked - set(uniques)
    assert not missing, f"{len(missing)} acknowledged jobs lost, e.g. {sorted(missing)[:5]}"
    assert set(uniques) <= sent, "a job nobody submitted was delivered"
    for u, data in delivered:
        assert data == b"payload-" + u
    assert d.stop() == 0


def test_recovery_keeps_priority_and_fifo_order(tmp_path):
    d = Daemon(tmp_path).start()
    order = [(T.SUBMIT_JOB_LOW_BG, b"l1"), (T.SUBMIT_JOB_BG, b"n1"),
             (T.SUBMIT_JOB_HIGH_BG, b"h1"), (T.SUBMIT_JOB_LOW_BG, b"l2"),
             (T.SUBMIT_JOB_BG, b"n2"), (T.SUBMIT_JOB_HIGH_BG, b"h2"), (T.SUBMIT_JOB_BG, b"n3")]
    with d.client() as c:
        handles = [c.submit_bg(b"order", u, u, type_=t) for t, u in order]
    d.kill9()
    d.start()
    got = [u for u, _ in drain_all(d, b"order")]
    assert got == [b"h1", b"h2", b"n1", b"n2", b"n3", b"l1", b"l2"]
    # Handles are never reused across restarts.
    with d.client() as c:
        h = c.submit_bg(b"order", b"new", b"x")
    assert int(h.rsplit(b":", 1)[1]) > max(int(x.rsplit(b":", 1)[1]) for x in handles)
    d.stop()


def test_coalescing_of_queued_background_jobs_survives_restart(tmp_path):
    d = Daemon(tmp_path).start()
    with d.client() as c:
        h1 = c.submit_bg(b"coal", b"same-unique", b"first")
    d.kill9()
    d.start()
    with d.client() as c:
        h2 = c.submit_bg(b"coal", b"same-unique", b"second")
        h3 = c.submit_bg(b"coal", b"other", b"third")
    assert h2 == h1 and h3 != h1
    assert drain_all(d, b"coal") == [(b"same-unique", b"first"), (b"other", b"third")]
    d.stop()


def _jobs_cli(d: Daemon, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "atomnode", "jobs", *args, "--db", str(d.db)],
        capture_output=True, text=True, timeout=30,
    )


def wait_job_row(d: Daemon, handle: bytes, timeout: float = 10.0, **expected) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        out = _jobs_cli(d, "show", handle.decode(), "--json")
        if out.returncode == 0:
            row = json.loads(out.stdout)
            if all(row.get(k) == v for k, v in expected.items()):
                return row
        assert time.monotonic() < deadline, f"job row never matched {expected}: {out}"
        time.sleep(0.02)  # polling the database from outside: no event to wait on


def test_running_job_attempts_across_crash_then_poison_then_retry(tmp_path):
    """A job that was running when the daemon died runs again with the attempt counted;
    at max_attempts it is quarantined as failed, other jobs keep flowing, and an
    operator retry through the daemon runs it again."""
    d = Daemon(tmp_path, config="queue: {max_attempts: 2}\n").start()
    with d.client() as c:
        poison = c.submit_bg(b"poison", b"p", b"boom")
    for attempt in (1, 2):
        with d.worker(b"poison") as w:
            p = w.grab()
            assert p is not None and p.args[0] == poison
            # The assignment is recorded by the writer's next batch (the worker never
            # waits for the disk): kill once it is on disk.
            wait_job_row(d, poison, state="running", attempts=attempt)
            d.kill9()  # dies while the job runs
        d.start()
    # Attempt 2 was the last: quarantined, not offered again.
    with d.worker(b"poison") as w:
        assert w.grab(timeout=0.5) is None
    listing = _jobs_cli(d, "list", "--state", "failed", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    row = next(r for r in rows if r["handle"].endswith(":" + poison.decode().rsplit(":", 1)[1]))
    assert row["attempts"] == 2 and "gave up" in (row["reason"] or "")
    # Other jobs keep flowing.
    with d.client() as c:
        c.submit_bg(b"healthy", b"", b"fine")
    assert drain_all(d, b"healthy") == [(b"", b"fine")]
    # Operator retry, through the running daemon.
    with d.client() as c:
        reply = c.admin(f"atomnode-jobs retry {poison.decode()}")
    assert reply.startswith(b"OK"), reply
    with d.worker(b"poison") as w:
        p = w.grab()
        assert p is not None and p.args[0] == poison
        w.complete(p.args[0], b"done at last")
    d.stop()


def test_epoch_job_survives_restart_and_runs_when_due(tmp_path):
    d = Daemon(tmp_path).start()
    due = int(time.time()) + 3
    with d.client() as c:
        c.send(T.SUBMIT_JOB_EPOCH, b"later", b"e1", str(due).encode(), b"data")
        c.expect(T.JOB_CREATED)
    d.kill9()
    d.start()
    with d.worker(b"later") as w:
        asked = time.time()
        w.send(T.GRAB_JOB_UNIQ)
        p = w.expect(T.NO_JOB, T.JOB_ASSIGN_UNIQ)
        if asked < due - 0.5:
            assert p.type == T.NO_JOB  # not due yet
        if p.type == T.NO_JOB:  # (a slow restart may have taken us past the due time)
            p = w.grab(timeout=10)  # sleeps until the server wakes it when the job is due
        assert p is not None and p.args[2] == b"e1"
        assert time.time() >= due - 0.01
    d.stop()


def test_full_disk_refuses_submits_loses_nothing_and_recovers(tmp_path):
    """With the database file size capped (RLIMIT_FSIZE), submits get an ERROR and the
    connection stays usable; acknowledged jobs are intact; when the cap is lifted the
    daemon accepts jobs again by itself."""
    limit = 3 * 1024 * 1024

    def cap() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))

    d = Daemon(tmp_path, preexec_fn=cap).start()
    acked = []
    error = None
    payload = b"x" * 32768
    with d.client() as c:
        for i in range(400):
            c.send(T.SUBMIT_JOB_BG, b"big", f"u{i}".encode(), payload)
            p = c.expect(T.JOB_CREATED, T.ERROR)
            if p.type == T.ERROR:
                error = p.args
                break
            acked.append(f"u{i}".encode())
        assert error is not None, "the size cap was never hit"
        assert error[0] == b"QUEUE_ERROR"
        assert b"full" in error[1].lower() or b"disk" in error[1].lower(), error
        c.send(T.ECHO_REQ, b"still here")
        assert c.expect(T.ECHO_RES).args[0] == b"still here"
        assert b"store_healthy\":false" in c.admin("atomnode-status")
    # Lift the cap: the daemon recovers without a restart.
    resource.prlimit(d.proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    deadline = time.monotonic() + 15
    with d.client() as c:
        while True:
            c.send(T.SUBMIT_JOB_BG, b"big", b"after", b"small")
            p = c.expect(T.JOB_CREATED, T.ERROR)
            if p.type == T.JOB_CREATED:
                break
            assert time.monotonic() < deadline, f"never recovered: {p.args}"
            time.sleep(0.1)  # the writer retries with a backoff; nothing to wait on
    got = drain_all(d, b"big")
    assert set(acked) | {b"after"} == {u for u, _ in got}
    d.stop()


def test_corrupt_database_is_refused(tmp_path):
    db = tmp_path / "queue.db"
    db.write_bytes(b"this is not a database" * 100)
    rc, log = Daemon(tmp_path, db=db).run_to_exit()
    assert rc == 1
    assert str(db) in log


def test_second_daemon_on_same_database_is_refused(tmp_path):
    first = Daemon(tmp_path).start()
    rc, log = Daemon(tmp_path, db=first.db).run_to_exit()
    assert rc == 1 and str(first.db) in log
    first.stop()


@pytest.mark.parametrize("synchronous", ["normal", "off"])
def test_synchronous_setting_is_accepted(tmp_path, synchronous):
    d = Daemon(tmp_path, config=f"queue: {{synchronous: {synchronous}}}\n").start()
    with d.client() as c:
        c.submit_bg(b"s", b"", b"x")
    assert drain_all(d, b"s") == [(b"", b"x")]
    d.stop()
