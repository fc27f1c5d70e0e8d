"""The text admin protocol: gearadmin's view of it, and exact bytes on a raw socket."""

from __future__ import annotations

import re
import subprocess

from gearwire import (
    ECHO_REQ,
    ECHO_RES,
    ERROR,
    JOB_CREATED,
    SET_CLIENT_ID,
    SUBMIT_JOB,
    SUBMIT_JOB_BG,
    Conn,
    RawWorker,
    status_table,
)


def gearadmin(server, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["gearadmin", "-h", server.host, "-p", str(server.port), *args],
        capture_output=True,
        timeout=10,
        check=False,
    )


def registered_worker(server, client_id: bytes, *funcs: str) -> RawWorker:
    """A raw worker whose CAN_DOs the server has processed (an ECHO round trip follows them)."""
    w = RawWorker(server.host, server.port)
    w.send(SET_CLIENT_ID, client_id)
    w.can_do(*funcs)
    w.send(ECHO_REQ, b"sync")
    w.expect(ECHO_RES)
    return w


def test_gearadmin_status_and_priority_status(fresh_server, func) -> None:
    s = fresh_server
    with registered_worker(s, b"w-1", func), Conn(s.host, s.port) as c:
        c.submit(func, b"a", b"", background=True, priority="high")
        c.submit(func, b"b", b"", background=True)
        c.submit(func, b"c", b"", background=True)
        out = gearadmin(s, "--status").stdout
        assert out == f"{func}\t3\t0\t1\n.\n".encode()
        out = gearadmin(s, "--priority-status").stdout
        assert out == f"{func}\t1\t2\t0\t1\n.\n".encode()


def test_gearadmin_workers_lists_every_connection(fresh_server, func) -> None:
    s = fresh_server
    with registered_worker(s, b"my-worker", func, func + "-b"):
        out = gearadmin(s, "--workers").stdout.decode()
    lines = out.split("\n")
    assert lines[-2:] == [".", ""]
    pattern = re.compile(r"^\d+ 127\.0\.0\.1 (\S+) :(( \S+)*)$")
    parsed = {}
    for line in lines[:-2]:
        m = pattern.match(line)
        assert m, f"bad workers line {line!r}"
        parsed.setdefault(m.group(1), []).append(sorted(m.group(2).split()))
    assert parsed["my-worker"] == [sorted([func, func + "-b"])]
    assert ["-"] != list(parsed) and [] in parsed["-"]  # the admin connection itself, no id


def test_gearadmin_show_jobs_and_unique_jobs(fresh_server, func) -> None:
    s = fresh_server
    with Conn(s.host, s.port) as c:
        h1 = c.submit(func, b"a", "uniq-1", background=True)
        h2 = c.submit(func, b"b", b"", background=True)
    out = gearadmin(s, "--show-jobs").stdout.decode()
    lines = out.split("\n")
    assert lines[-2:] == [".", ""]
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in lines[:-2]}
    assert rows == {h1.decode(): ["0", "0", "1"], h2.decode(): ["0", "0", "1"]}
    out = gearadmin(s, "--show-unique-jobs").stdout.decode()
    assert sorted(out.split("\n")[:-2]) == ["", "uniq-1"]  # the empty unique shows as ""
    assert out.endswith("\n.\n")


def test_gearadmin_getpid_and_version(server) -> None:
    pid = gearadmin(server, "--getpid").stdout
    assert pid == f"{server.proc.pid}\n".encode()
    version = gearadmin(server, "--server-version").stdout.decode()
    # gearmand: "1.1.20+ds"; atomnode: "1.1.20-atomnode..." -- both start with a version.
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?\S*( \S.*)?\n", version), version


def test_gearadmin_create_and_drop_function(fresh_server, func) -> None:
    s = fresh_server
    r = gearadmin(s, "--create-function", func)
    assert r.stdout == b"OK\n"
    assert status_table(s.host, s.port)[func] == (0, 0, 0)
    r = gearadmin(s, "--drop-function", func)
    assert r.stdout == b"OK\n"
    assert func not in status_table(s.host, s.port)
    r = gearadmin(s, "--drop-function", func)
    assert r.stdout == b"" and b"function not found" in r.stderr


def test_drop_function_refused_while_workers_connected(fresh_server, func) -> None:
    s = fresh_server
    with registered_worker(s, b"w", func), Conn(s.host, s.port) as c:
        assert c.admin_line(f"drop function {func}") == (
            b"ERR there are still connected workers or executing clients\r\n"
        )
    # gearmand strips one character too many when the line ends in a bare LF (it assumes
    # CRLF); "create function" therefore takes "\r\n" here, as gearadmin sends.


def test_gearadmin_cancel_job(fresh_server, func) -> None:
    s = fresh_server
    with Conn(s.host, s.port) as c:
        h = c.submit(func, b"a", b"", background=True)
        keep = c.submit(func, b"b", b"", background=True)
    assert gearadmin(s, "--cancel-job", h.decode()).stdout == b"OK\n"
    if s.kind == "gearmand":
        # gearmand only flags the job ignored (show jobs: IGNORE 1, QUEUED 0); status still
        # counts it until a worker would have taken it.
        assert status_table(s.host, s.port)[func] == (2, 0, 0)
        assert f"{h.decode()}\t0\t1\t0\n".encode() in gearadmin(s, "--show-jobs").stdout
    else:
        # atomnode removes a cancelled job: counts and listings stop showing it at once.
        assert status_table(s.host, s.port)[func] == (1, 0, 0)
        assert h not in gearadmin(s, "--show-jobs").stdout
    with RawWorker(s.host, s.port) as w:
        w.can_do(func)
        assert w.grab().args[0] == keep
    with Conn(s.host, s.port) as c:
        assert c.admin_line(f"cancel job {h.decode()}X") == b"ERR UNKNOWN_JOB\r\n"


def test_raw_status_workers_prioritystatus_bytes(fresh_server, func) -> None:
    s = fresh_server
    with registered_worker(s, b"raw-w", func), Conn(s.host, s.port) as c:
        c.submit(func, b"x", b"", background=True, priority="low")
        assert c.admin_list("status") == f"{func}\t1\t0\t1\n.\n".encode()
        assert c.admin_list("prioritystatus") == f"{func}\t0\t0\t1\t1\n.\n".encode()
        workers = c.admin_list("workers")
        assert workers.endswith(b"\n.\n") and b"\r" not in workers
        assert re.search(
            rb"(?m)^\d+ 127\.0\.0\.1 raw-w : " + re.escape(func.encode()) + rb"$", workers
        )
        # admin commands are case-insensitive and accept CRLF
        c.send_raw(b"STATUS\r\n")
        assert c.read_until(b".\n") == f"{func}\t1\t0\t1\n.\n".encode()


def test_raw_one_line_replies_and_line_endings(server) -> None:
    with Conn(server.host, server.port) as c:
        assert re.fullmatch(rb"OK \d+\.\d+\S*( [^\r\n]*)?\n", c.admin_line("version"))
        assert c.admin_line("getpid") == f"OK {server.proc.pid}\n".encode()
        assert re.fullmatch(rb"OK [A-Z]+\n", c.admin_line("verbose"))
        assert c.admin_line("frobnicate now") == (
            b"ERR UNKNOWN_COMMAND Unknown+server+commandfrobnicate\r\n"
        )
        assert c.admin_line("maxqueue") == (
            b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command"
            b"+maxqueue\r\n"
        )
        # after errors the connection still serves commands
        assert c.admin_list("status").endswith(b".\n")


def test_maxqueue_limits_submissions_and_connection_survives(server, func) -> None:
    with registered_worker(server, b"mq", func), Conn(server.host, server.port) as c:
        assert c.admin_line(f"maxqueue {func} 2") == b"OK\r\n"
        c.submit(func, b"1", b"", background=True)
        c.submit(func, b"2", b"", background=True)
        for type_ in (SUBMIT_JOB_BG, SUBMIT_JOB):
            c.send(type_, func.encode(), b"", b"3")
            assert c.expect(ERROR).args == (b"QUEUE_ERROR", b"Job queue is full")
        c.send(ECHO_REQ, b"still here")
        assert c.expect(ECHO_RES).args == (b"still here",)
        assert c.admin_line(f"maxqueue {func} 0") == b"OK\r\n"  # 0 = unlimited
        c.send(SUBMIT_JOB_BG, func.encode(), b"", b"3")
        c.expect(JOB_CREATED)
        assert status_table(server.host, server.port)[func][0] == 3
