"""php-gearman (libgearman) client and worker against the server."""

from __future__ import annotations

import base64
import hashlib
import random

import pytest
from gearwire import wait_status
from peerproc import php


def b64(ev: dict, key: str = "data_b64") -> bytes:
    return base64.b64decode(ev[key])


def client(server, func: str, *args: object) -> list[str]:
    return php(
        "php_client.php", "--host", server.host, "--port", server.port, "--func", func, *args
    )


def worker(server, func: str, *args: object) -> list[str]:
    return php(
        "php_worker.php", "--host", server.host, "--port", server.port, "--func", func, *args
    )


def start_worker(server, peers, func: str, *args: object):
    """Start a PHP worker and wait until the server lists it as capable of ``func``."""
    w = peers(worker(server, func, *args))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    return w


@pytest.mark.parametrize("mode", ["normal", "high", "low"])
def test_foreground_round_trip(server, func, peers, mode) -> None:
    w = start_worker(server, peers, func, "--behavior", "record", "--count", "1")
    c = peers(client(server, func, "--mode", mode, "--payload", "héllo"))
    res = c.wait_event("result")
    assert res["rc"] == "SUCCESS"
    assert b64(res) == "ok:héllo".encode()
    job = w.wait_event("job")
    assert job["func"] == func and b64(job) == "héllo".encode()
    assert job["handle"].startswith("H:")
    w.wait_event("exit")


@pytest.mark.parametrize("mode", ["bg", "high_bg", "low_bg"])
def test_background_job_queued_then_run(server, func, peers, mode) -> None:
    c = peers(client(server, func, "--mode", mode, "--payload", "bg-data", "--unique", "u-" + mode))
    res = c.wait_event("result")
    assert res["rc"] == "SUCCESS" and res["handle"].startswith("H:")
    wait_status(server.host, server.port, func, lambda r: r == (1, 0, 0))
    w = peers(worker(server, func, "--behavior", "record", "--count", "1"))
    job = w.wait_event("job")
    assert job["handle"] == res["handle"]
    assert job["unique"] == "u-" + mode
    assert b64(job) == b"bg-data"
    w.wait_event("exit")
    wait_status(server.host, server.port, func, lambda r: r[0] == 0)


@pytest.mark.parametrize("size", [16, 1 << 20])
def test_binary_payload_byte_for_byte(server, func, peers, tmp_path, size) -> None:
    """NUL bytes and 1 MiB payloads survive client -> server -> worker -> server -> client."""
    rnd = random.Random(size)
    payload = b"\0" + rnd.randbytes(size - 2) + b"\0"
    assert payload.count(b"\0") >= 2
    f = tmp_path / "payload.bin"
    f.write_bytes(payload)
    w = start_worker(server, peers, func, "--behavior", "echo", "--count", "1")
    c = peers(client(server, func, "--payload-file", f))
    res = c.wait_event("result", timeout=20)
    job = w.wait_event("job")
    assert job["size"] == size and job["sha256"] == hashlib.sha256(payload).hexdigest()
    assert res["rc"] == "SUCCESS"
    assert b64(res) == payload


def test_status_data_warning_callbacks(server, func, peers) -> None:
    """WORK_STATUS, WORK_DATA, WORK_WARNING and WORK_COMPLETE reach the client in order."""
    start_worker(server, peers, func, "--behavior", "progress", "--count", "2")
    c = peers(client(server, func, "--callbacks"))
    events = []
    while True:
        ev = c.event()
        if ev["event"] == "done":
            break
        events.append(ev)
    assert events[0]["event"] == "created"
    seen = [
        (e["event"], e.get("numerator"), e.get("denominator"), b64(e) if "data_b64" in e else None)
        for e in events[1:]
    ]
    assert seen == [
        ("status", 1, 2, None),
        ("data", None, None, b"d1"),
        ("warning", None, None, b"w1"),
        ("status", 2, 2, None),
        ("complete", None, None, b"done"),
    ]
    # doNormal() returns the WORK_DATA chunks concatenated with the final result.
    res = peers(client(server, func)).wait_event("result")
    assert res["rc"] == "SUCCESS" and b64(res) == b"d1done"


def test_work_fail(server, func, peers) -> None:
    start_worker(server, peers, func, "--behavior", "fail", "--count", "2")
    res = peers(client(server, func)).wait_event("result")
    assert res["rc"] == "WORK_FAIL"
    cb = peers(client(server, func, "--callbacks"))
    assert cb.wait_event("created")
    assert cb.event()["event"] == "fail"


def test_work_exception_with_exceptions_option(server, func, peers) -> None:
    """addServer() with exceptions on (php-gearman's default): GEARMAN_WORK_EXCEPTION."""
    start_worker(server, peers, func, "--behavior", "exception", "--count", "2")
    res = peers(client(server, func)).wait_event("result")
    assert res["rc"] == "WORK_EXCEPTION"
    cb = peers(client(server, func, "--callbacks"))
    cb.wait_event("created")
    ev = cb.event()
    assert ev["event"] == "exception" and b64(ev) == b"boom"


def test_work_exception_without_exceptions_option(server, func, peers) -> None:
    """A client that did not ask for exceptions never sees WORK_EXCEPTION.

    gearmand sends it a WORK_FAIL whose body is the handle plus a stray NUL
    (``H:x:n\\0``); libgearman then never returns from doNormal() (observed: it waits until
    its timeout). atomnode sends a clean WORK_FAIL, so the client gets GEARMAN_WORK_FAIL.
    """
    start_worker(server, peers, func, "--behavior", "exception", "--count", "1")
    res = peers(client(server, func, "--no-exceptions", "--timeout", "1500")).wait_event("result")
    if server.kind == "gearmand":
        assert res["rc"] == "TIMEOUT", res
    else:
        assert res["rc"] == "WORK_FAIL"


def test_job_status_of_queued_running_and_unknown(server, func, peers) -> None:
    """GearmanClient::jobStatus (GET_STATUS) for a queued, a running and an unknown handle."""
    bg = peers(client(server, func, "--mode", "bg")).wait_event("result")
    h = bg["handle"]
    st = peers(client(server, func, "--status", h)).wait_event("status")
    assert (st["known"], st["running"]) == (True, False)
    w = peers(worker(server, func, "--behavior", "block"))
    w.wait_event("job")
    st = peers(client(server, func, "--status", h)).wait_event("status")
    assert (st["known"], st["running"]) == (True, True)
    st = peers(client(server, func, "--status", h + "999")).wait_event("status")
    assert (st["known"], st["running"]) == (False, False)


def test_worker_killed_mid_job_job_goes_to_another(server, func, peers) -> None:
    """SIGKILL a worker holding a foreground job: another worker runs it, the client gets it."""
    w1 = peers(worker(server, func, "--behavior", "block"))
    wait_status(server.host, server.port, func, lambda r: r[2] >= 1)
    c = peers(client(server, func, "--payload", "precious"))
    first = w1.wait_event("job")
    w1.kill()
    w1.proc.wait(5)
    w2 = peers(worker(server, func, "--behavior", "record", "--count", "1"))
    second = w2.wait_event("job")
    assert second["handle"] == first["handle"] and b64(second) == b"precious"
    res = c.wait_event("result")
    assert res["rc"] == "SUCCESS" and b64(res) == b"ok:precious"
