"""Priorities and unique-id coalescing, checked with raw connections on a fresh server."""

from __future__ import annotations

import base64

from gearwire import (
    GRAB_JOB_UNIQ,
    JOB_ASSIGN,
    WORK_COMPLETE,
    WORK_DATA,
    Conn,
    RawWorker,
    status_table,
)
from peerproc import php


def test_priorities_high_normal_low_fifo_within(fresh_server, func) -> None:
    """Jobs queued with no worker come out HIGH > NORMAL > LOW, FIFO within a priority."""
    s = fresh_server
    order = ["low-1", "normal-1", "high-1", "low-2", "normal-2", "high-2", "normal-3"]
    with Conn(s.host, s.port) as c:
        for name in order:
            c.submit(func, name.encode(), name, background=True, priority=name.split("-")[0])
    assert status_table(s.host, s.port)[func] == (len(order), 0, 0)
    with RawWorker(s.host, s.port) as w:
        w.can_do(func)
        got = []
        for _ in order:
            job = w.grab()
            assert job.type == JOB_ASSIGN
            got.append(job.args[2].decode())
            w.send(WORK_COMPLETE, job.args[0], b"")
        assert got == ["high-1", "high-2", "normal-1", "normal-2", "normal-3", "low-1", "low-2"]
        assert w.grab().name == "NO_JOB"


def test_priorities_with_php_worker(fresh_server, func, peers) -> None:
    """The same order seen by a real libgearman worker (GRAB_JOB_ALL)."""
    s = fresh_server
    with Conn(s.host, s.port) as c:
        for name in ["low-a", "normal-a", "high-a", "normal-b", "high-b"]:
            c.submit(func, name.encode(), b"", background=True, priority=name.split("-")[0])
    w = peers(
        php(
            "php_worker.php",
            "--host",
            s.host,
            "--port",
            s.port,
            "--func",
            func,
            "--behavior",
            "record",
            "--count",
            "5",
        )
    )
    got = [base64.b64decode(w.wait_event("job")["data_b64"]).decode() for _ in range(5)]
    assert got == ["high-a", "high-b", "normal-a", "normal-b", "low-a"]


def test_coalescing_foreground_same_unique(fresh_server, func) -> None:
    """Same function + unique while queued: same handle, both clients get the one result."""
    s = fresh_server
    with Conn(s.host, s.port) as c1, Conn(s.host, s.port) as c2, RawWorker(s.host, s.port) as w:
        h1 = c1.submit(func, b"first payload", "same-u")
        h2 = c2.submit(func, b"ignored payload", "same-u", priority="high")
        assert h1 == h2
        assert status_table(s.host, s.port)[func] == (1, 0, 0)
        w.can_do(func)
        job = w.grab()
        assert job.args == (h1, func.encode(), b"first payload")
        w.send(WORK_DATA, h1, b"partial")
        w.send(WORK_COMPLETE, h1, b"the result")
        for c in (c1, c2):
            assert c.expect(WORK_DATA).args == (h1, b"partial")
            assert c.expect(WORK_COMPLETE).args == (h1, b"the result")
        assert w.grab().name == "NO_JOB"


def test_coalescing_background_and_foreground_join(fresh_server, func) -> None:
    """A foreground submission joins a queued background job with the same unique."""
    s = fresh_server
    with Conn(s.host, s.port) as c, RawWorker(s.host, s.port) as w:
        hb = c.submit(func, b"bg", "joined", background=True)
        hb2 = c.submit(func, b"bg again", "joined", background=True)
        assert hb == hb2
        with Conn(s.host, s.port) as fg:
            hf = fg.submit(func, b"fg", "joined")
            assert hf == hb
            w.can_do(func)
            job = w.grab()
            assert job.args[2] == b"bg"
            w.send(WORK_COMPLETE, hb, b"done")
            assert fg.expect(WORK_COMPLETE).args == (hb, b"done")
        # the unique is free again once the job ended
        h3 = c.submit(func, b"new", "joined", background=True)
        assert h3 != hb


def test_empty_unique_never_coalesces(fresh_server, func) -> None:
    s = fresh_server
    with Conn(s.host, s.port) as c:
        handles = {c.submit(func, b"same", b"", background=True) for _ in range(3)}
    assert len(handles) == 3
    assert status_table(s.host, s.port)[func] == (3, 0, 0)


def test_dash_unique_coalesces_on_payload(fresh_server, func) -> None:
    """gearmand: unique "-" means "derive the unique from the payload" (same data coalesces)."""
    s = fresh_server
    with Conn(s.host, s.port) as c:
        a1 = c.submit(func, b"payload-A", "-", background=True)
        a2 = c.submit(func, b"payload-A", "-", background=True)
        b1 = c.submit(func, b"payload-B", "-", background=True)
    assert a1 == a2
    assert b1 != a1
    assert status_table(s.host, s.port)[func] == (2, 0, 0)
    with RawWorker(s.host, s.port) as w:
        w.can_do(func)
        j = w.grab(GRAB_JOB_UNIQ)
        assert j.args[2] == b"-" and j.args[3] == b"payload-A"


def test_coalescing_with_php_clients(fresh_server, func, peers) -> None:
    """Two php-gearman clients submitting the same unique share the handle and the result."""
    s = fresh_server
    args = ("--host", s.host, "--port", s.port, "--func", func, "--unique", "php-u", "--callbacks")
    c1 = peers(php("php_client.php", *args, "--payload", "one"))
    h1 = c1.wait_event("created")["handle"]
    c2 = peers(php("php_client.php", *args, "--payload", "two"))
    h2 = c2.wait_event("created")["handle"]
    assert h1 == h2
    w = peers(
        php(
            "php_worker.php",
            "--host",
            s.host,
            "--port",
            s.port,
            "--func",
            func,
            "--behavior",
            "record",
            "--count",
            "1",
        )
    )
    job = w.wait_event("job")
    assert base64.b64decode(job["data_b64"]) == b"one"
    for c in (c1, c2):
        ev = c.wait_event("complete")
        assert base64.b64decode(ev["data_b64"]) == b"ok:one"
    w.wait_event("exit")
