"""Perl Gearman::Client and Gearman::Worker (plain GRAB_JOB, 0.5 s reply budget)."""

from __future__ import annotations

import base64

from gearwire import JOB_CREATED, SUBMIT_JOB, WORK_FAIL, Conn, wait_status
from peerproc import perl


def pclient(server, func: str, mode: str, payload: str, *uniq: str) -> list[str]:
    return perl("perl_client.pl", server.host, server.port, func, mode, payload, *uniq)


def pworker(server, func: str, behavior: str = "record", count: int = 1) -> list[str]:
    return perl("perl_worker.pl", server.host, server.port, func, behavior, count)


def test_perl_foreground(server, func, peers) -> None:
    w = peers(pworker(server, func))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    res = peers(pclient(server, func, "fg", "perl-data")).wait_event("result")
    assert res["ok"] and base64.b64decode(res["data_b64"]) == b"ok:perl-data"
    assert base64.b64decode(w.wait_event("job")["data_b64"]) == b"perl-data"
    w.wait_event("exit")


def test_perl_high_priority_foreground(server, func, peers) -> None:
    w = peers(pworker(server, func))
    res = peers(pclient(server, func, "high", "hi")).wait_event("result")
    assert res["ok"] and base64.b64decode(res["data_b64"]) == b"ok:hi"
    w.wait_event("exit")


def test_perl_background_then_worker(server, func, peers) -> None:
    res = peers(pclient(server, func, "bg", "later", "perl-u1")).wait_event("result")
    # Gearman::Client returns "<server>//<handle>".
    assert res["ok"] and res["handle"].split("//")[-1].startswith("H:")
    wait_status(server.host, server.port, func, lambda r: r == (1, 0, 0))
    w = peers(pworker(server, func))
    job = w.wait_event("job")
    assert job["handle"] == res["handle"].split("//")[-1]
    w.wait_event("exit")
    wait_status(server.host, server.port, func, lambda r: r[0] == 0)


def test_perl_worker_failure_reaches_client(server, func, peers) -> None:
    """A Perl worker that dies sends WORK_FAIL; a waiting client gets it.

    Gearman::Worker frames it as ``H:x:n\0`` (a stray NUL after the handle), gearmand passes
    the body through unchanged, and Gearman::Client then rejects it ("work_fail for unknown
    handle"): so the client here is a raw one, which is also what catches a server that
    mangles the handle.
    """
    w = peers(pworker(server, func, "fail"))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    with Conn(server.host, server.port) as c:
        c.send(SUBMIT_JOB, func.encode(), b"", b"x")
        h = c.expect(JOB_CREATED).args[0]
        fail = c.expect(WORK_FAIL)
        assert fail.args[0].rstrip(b"\0") == h
    assert w.wait_event("job")["handle"].encode() == h
