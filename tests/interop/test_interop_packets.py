"""Less common packets on raw connections: EPOCH, SCHED, OPTION_REQ, ECHO, abilities,
GRAB_JOB_ALL, GET_STATUS / GET_STATUS_UNIQUE, CAN_DO_TIMEOUT, a worker dying mid-job."""

from __future__ import annotations

import time

from gearwire import (
    CAN_DO_TIMEOUT,
    CANT_DO,
    ECHO_REQ,
    ECHO_RES,
    ERROR,
    GET_STATUS,
    GET_STATUS_UNIQUE,
    GRAB_JOB,
    GRAB_JOB_ALL,
    JOB_ASSIGN,
    JOB_ASSIGN_ALL,
    JOB_ASSIGN_UNIQ,
    JOB_CREATED,
    NO_JOB,
    NOOP,
    OPTION_RES,
    PRE_SLEEP,
    RESET_ABILITIES,
    STATUS_RES,
    STATUS_RES_UNIQUE,
    SUBMIT_JOB_EPOCH,
    SUBMIT_JOB_SCHED,
    WORK_COMPLETE,
    WORK_STATUS,
    Conn,
    RawWorker,
    status_table,
    wait_for,
)


def sync(w: Conn) -> None:
    """Round-trip an ECHO so that everything sent before has been processed."""
    w.send(ECHO_REQ, b"sync")
    w.expect(ECHO_RES)


def test_echo_with_binary_data(server) -> None:
    with Conn(server.host, server.port) as c:
        c.send(ECHO_REQ, b"a\0b\0\xff" * 1000)
        assert c.expect(ECHO_RES).args == (b"a\0b\0\xff" * 1000,)


def test_option_req(server) -> None:
    with Conn(server.host, server.port) as c:
        assert c.option(b"exceptions") == (b"\0RES", OPTION_RES, (b"exceptions",))
        p = c.option(b"frobnicate")
        assert p.type == ERROR
        assert p.args == (b"UNKNOWN_OPTION", b"Server does not recognize given option")
        sync(c)  # still usable


def test_submit_job_sched_refused(server, func) -> None:
    with Conn(server.host, server.port) as c:
        c.send(SUBMIT_JOB_SCHED, func.encode(), b"", b"0", b"0", b"1", b"1", b"2030", b"data")
        assert c.expect(ERROR).args == (b"INVALID_COMMAND", b"Command not expected")
    assert (
        func not in status_table(server.host, server.port)
        or status_table(server.host, server.port)[func][0] == 0
    )


def test_submit_job_epoch_runs_only_when_due(server, func) -> None:
    """A job due 2 s ahead is not handed out before then, and is handed out after.

    The worker polls like AtoM's (GRAB_JOB, NO_JOB, PRE_SLEEP, NOOP or 0.25 s), since gearmand
    does not wake sleepers when a scheduled job becomes due (atomnode does).
    """
    with Conn(server.host, server.port) as c, RawWorker(server.host, server.port) as w:
        w.can_do(func)
        due = int(time.time()) + 2
        c.send(SUBMIT_JOB_EPOCH, func.encode(), b"", str(due).encode(), b"later")
        h = c.expect(JOB_CREATED).args[0]
        deadline = time.monotonic() + 6
        while True:
            w.send(GRAB_JOB)
            p = w.recv()
            while p.type == NOOP:
                # The wake-up for the job becoming due came after the 0.25 s wait below
                # gave up: it arrives ahead of the grab's answer (a race of this poller).
                p = w.recv()
            assert p.type in (NO_JOB, JOB_ASSIGN), p.name
            if p.type == JOB_ASSIGN:
                taken_at = time.time()
                break
            assert time.monotonic() < deadline, "epoch job never ran"
            w.send(PRE_SLEEP)
            try:
                w.expect(NOOP, timeout=0.25)
            except TimeoutError:
                pass
        assert p.args == (h, func.encode(), b"later")
        assert taken_at >= due - 0.01, f"ran {due - taken_at:.3f}s early"
        w.send(WORK_COMPLETE, h, b"")


def test_grab_job_all(server, func) -> None:
    with Conn(server.host, server.port) as c, RawWorker(server.host, server.port) as w:
        w.can_do(func)
        assert w.grab(GRAB_JOB_ALL).type == NO_JOB
        h = c.submit(func, b"pay\0load", "u-all", background=True)
        p = w.grab(GRAB_JOB_ALL)
        if p.type == JOB_ASSIGN_ALL:
            # handle, function, unique, reducer (empty), payload
            assert p.args == (h, func.encode(), b"u-all", b"", b"pay\0load")
        else:
            # gearmand 1.1.20 answers a job without reducer with JOB_ASSIGN_UNIQ (libgearman
            # workers take both)
            assert p.type == JOB_ASSIGN_UNIQ, p.name
            assert p.args == (h, func.encode(), b"u-all", b"pay\0load")
        w.send(WORK_COMPLETE, h, b"")


def test_cant_do_and_reset_abilities(server, func) -> None:
    f1, f2 = func + "-1", func + "-2"
    with RawWorker(server.host, server.port) as w:
        w.can_do(f1, f2)
        sync(w)
        st = status_table(server.host, server.port)
        assert st[f1][2] == 1 and st[f2][2] == 1
        w.send(CANT_DO, f1.encode())
        sync(w)
        st = status_table(server.host, server.port)
        assert st[f1][2] == 0 and st[f2][2] == 1
        with Conn(server.host, server.port) as c:
            c.submit(f1, b"x", b"", background=True)
        assert w.grab().type == NO_JOB  # no longer able to do f1
        w.send(RESET_ABILITIES)
        sync(w)
        st = status_table(server.host, server.port)
        assert st[f1][2] == 0 and st[f2][2] == 0


def test_get_status_and_get_status_unique(server, func) -> None:
    with Conn(server.host, server.port) as c, Conn(server.host, server.port) as fg:
        h = c.submit(func, b"x", "st-uniq", background=True)
        assert fg.submit(func, b"y", "st-uniq") == h  # a foreground client joins it
        c.send(GET_STATUS, h)
        assert c.expect(STATUS_RES).args == (h, b"1", b"0", b"0", b"0")
        c.send(GET_STATUS_UNIQUE, b"st-uniq")
        # unique, known, running, numerator, denominator, waiting clients
        assert c.expect(STATUS_RES_UNIQUE).args == (b"st-uniq", b"1", b"0", b"0", b"0", b"1")
        with RawWorker(server.host, server.port) as w:
            w.can_do(func)
            assert w.grab().args[0] == h
            w.send(WORK_STATUS, h, b"3", b"7")
            assert fg.expect(WORK_STATUS).args == (h, b"3", b"7")
            c.send(GET_STATUS, h)
            assert c.expect(STATUS_RES).args == (h, b"1", b"1", b"3", b"7")
            c.send(GET_STATUS_UNIQUE, b"st-uniq")
            assert c.expect(STATUS_RES_UNIQUE).args == (b"st-uniq", b"1", b"1", b"3", b"7", b"1")
            w.send(WORK_COMPLETE, h, b"r")
            fg.expect(WORK_COMPLETE)
        c.send(GET_STATUS, h)
        assert c.expect(STATUS_RES).args == (h, b"0", b"0", b"0", b"0")
        c.send(GET_STATUS, b"H:nowhere:1")
        assert c.expect(STATUS_RES).args == (b"H:nowhere:1", b"0", b"0", b"0", b"0")
        c.send(GET_STATUS_UNIQUE, b"never-seen")
        assert c.expect(STATUS_RES_UNIQUE).args == (b"never-seen", b"0", b"0", b"0", b"0", b"0")


def test_can_do_timeout_requeues_job(server, func) -> None:
    """A worker past its CAN_DO_TIMEOUT loses the job; the next worker runs it and the
    foreground client gets that result (gearmand tells the client nothing meanwhile)."""
    with Conn(server.host, server.port) as c, RawWorker(server.host, server.port) as slow:
        slow.send(CAN_DO_TIMEOUT, func.encode() + b"\x001")
        h = c.submit(func, b"x")
        assert slow.grab().args[0] == h
        with RawWorker(server.host, server.port) as w2:
            w2.can_do(func)

            def grabbed():
                q = w2.grab()
                return q if q.type == JOB_ASSIGN else None

            p = wait_for(
                grabbed, timeout=5, interval=0.05, what="the timed-out job to be handed out again"
            )
            assert p.args[0] == h
            w2.send(WORK_COMPLETE, h, b"second")
            assert c.expect(WORK_COMPLETE).args == (h, b"second")


def test_worker_disconnect_mid_job_requeues(server, func) -> None:
    with Conn(server.host, server.port) as c:
        h = c.submit(func, b"again")
        w1 = RawWorker(server.host, server.port)
        w1.can_do(func)
        assert w1.grab().args[0] == h
        w1.close()
        with RawWorker(server.host, server.port) as w2:
            w2.can_do(func)
            p = w2.wait_job()
            assert p.args == (h, func.encode(), b"again")
            w2.send(WORK_COMPLETE, h, b"ok")
        assert c.expect(WORK_COMPLETE).args == (h, b"ok")
