"""Malformed input: what gearmand does (the oracle) and that other connections keep working."""

from __future__ import annotations

import struct

import pytest
from gearwire import (
    ECHO_REQ,
    ECHO_RES,
    ERROR,
    JOB_CREATED,
    RES,
    SUBMIT_JOB_BG,
    WORK_COMPLETE,
    Closed,
    Conn,
    RawWorker,
    encode,
)


def assert_server_still_serves(server, func: str) -> None:
    """A second client completes a job through a worker after the bad connection."""
    with RawWorker(server.host, server.port) as w, Conn(server.host, server.port) as c:
        w.can_do(func)
        h = c.submit(func, b"after", b"")
        job = w.wait_job()
        assert job.args[0] == h
        w.send(WORK_COMPLETE, h, b"fine")
        assert c.expect(WORK_COMPLETE).args == (h, b"fine")


def test_response_magic_gets_invalid_magic(server, func) -> None:
    with Conn(server.host, server.port) as c:
        c.send(ECHO_REQ, b"x", magic=RES)
        err = c.expect(ERROR)
        assert err.args[0] == b"INVALID_MAGIC"
        if server.kind == "gearmand":
            assert err.args[1] == b"Request magic expected"
        if server.kind == "gearmand":
            # gearmand keeps the connection after the ERROR
            c.send(ECHO_REQ, b"again")
            assert c.expect(ECHO_RES).args == (b"again",)
        else:
            # atomnode closes it: what follows a bad header cannot be trusted (issue 2)
            c.expect_closed()
    assert_server_still_serves(server, func)


@pytest.mark.parametrize("type_", [0, 43, 99, 0x7FFFFFFF])
def test_unknown_packet_type_disconnects(server, func, type_) -> None:
    with Conn(server.host, server.port) as c:
        c.send(type_, b"x")
        rest = c.expect_closed()
        # gearmand closes without a word; atomnode may send an ERROR first
        assert rest == b"" or rest.startswith(b"\0RES\0\0\0\x13")
    assert_server_still_serves(server, func)


def test_packet_type_ffffffff(fresh_server, func) -> None:
    """gearmand 1.1.20 crashes on packet type 0xFFFFFFFF (SIGSEGV, whole server gone).

    Checked here so that the finding stays true of the reference; atomnode must survive.
    """
    s = fresh_server
    with Conn(s.host, s.port) as c:
        c.send(0xFFFFFFFF, b"x")
        c.expect_closed()
    if s.kind == "gearmand":
        s.proc.wait(5)
        assert s.proc.returncode != 0
    else:
        assert_server_still_serves(s, func)


def test_bad_binary_magic_disconnects(server, func) -> None:
    with Conn(server.host, server.port) as c:
        c.send_raw(b"\0XYZ" + b"\0" * 8)
        rest = c.expect_closed()
        assert rest == b"" or rest.startswith(b"\0RES\0\0\0\x13")
    assert_server_still_serves(server, func)


def test_text_garbage_gets_err_line(server, func) -> None:
    with Conn(server.host, server.port) as c:
        assert (
            c.admin_line("hello garbage") == b"ERR UNKNOWN_COMMAND Unknown+server+commandhello\r\n"
        )
        assert c.admin_line("\x01\x02").startswith(b"ERR UNKNOWN_COMMAND")
    assert_server_still_serves(server, func)


def test_header_announcing_4gib_body(server, func) -> None:
    """gearmand just waits for the body; atomnode refuses past its max packet size."""
    with Conn(server.host, server.port) as c:
        c.send_raw(b"\0REQ" + struct.pack(">II", SUBMIT_JOB_BG, 0xFFFFFFFF) + b"abc")
        if server.kind == "gearmand":
            with pytest.raises(TimeoutError):
                c.recv(0.3)
        else:
            rest = c.expect_closed()
            assert rest.startswith(b"\0RES\0\0\0\x13"), rest  # ERROR, then closed
        assert_server_still_serves(server, func)  # while that connection hangs or is gone


def test_unique_too_long(server, func) -> None:
    with Conn(server.host, server.port) as c:
        c.send(SUBMIT_JOB_BG, func.encode(), b"u" * 65, b"d")
        assert c.expect(ERROR).args == (b"ARGUMENT_TOO_LARGE", b"Unique value too large")
        try:
            c.send(SUBMIT_JOB_BG, func.encode(), b"u" * 64, b"d")  # 64 is fine
            c.expect(JOB_CREATED)
        except Closed:
            assert server.kind == "atomnode"  # may close after an ERROR
    assert_server_still_serves(server, func + "-b")


def test_function_name_too_long(server, func) -> None:
    """gearmand 1.1.20 accepts long names (4 KiB seen); atomnode enforces gearmand's
    GEARMAN_FUNCTION_MAX_SIZE of 512 bytes with an ERROR."""
    long_name = (func + "-" + "f" * 600).encode()
    with Conn(server.host, server.port) as c:
        c.send(SUBMIT_JOB_BG, long_name, b"", b"d")
        p = c.expect(JOB_CREATED, ERROR)
        if server.kind == "gearmand":
            assert p.type == JOB_CREATED
        else:
            assert p.type == ERROR
    with Conn(server.host, server.port) as c:
        c.send(SUBMIT_JOB_BG, (func + "-").encode() + b"f" * (512 - len(func) - 1), b"", b"d")
        c.expect(JOB_CREATED)  # exactly 512 bytes is accepted by both
    assert_server_still_serves(server, func)


def test_garbage_after_valid_packets_keeps_earlier_effects(server, func) -> None:
    """A background job submitted just before garbage on the same connection survives."""
    with Conn(server.host, server.port) as c:
        c.send_raw(encode(SUBMIT_JOB_BG, func.encode(), b"", b"kept"))
        h = c.expect(JOB_CREATED).args[0]
        c.send(77, b"junk")
        c.expect_closed()
    with RawWorker(server.host, server.port) as w:
        w.can_do(func)
        job = w.wait_job()
        assert job.args[0] == h and job.args[2] == b"kept"
        w.send(WORK_COMPLETE, h, b"")
