"""Tests of the job broker (atomnode.gearman.broker) with plain calls: no sockets, no threads.

Each test builds a :class:`World` (a Broker with an injected clock), opens fake
connections, hands the broker request packets and reads what the broker's outbox owes each
connection through a client-side Decoder (``recv``) and the store commands it produced
(``World.ops``). Expected behaviour follows gearmand
1.1.20 (libgearman-server/server.cc, job.cc) and docs in ../shared/docs/gearman-compat-notes.md.
"""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from atomnode.gearman.broker import HIGH, LOW, NORMAL, Broker, Conn
from atomnode.gearman.protocol import Decoder, Packet, T

FN = b"reverse"


class Clock:
    """A settable wall clock."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


#: Which World each test connection belongs to (for ``recv``).
_WORLD: dict[Conn, World] = {}


class World:
    def __init__(self, *, durable: bool = False, **kw) -> None:
        self.clock = Clock()
        self.b = Broker(hostname="test", durable=durable, clock=self.clock, **kw)
        self.n = 0
        self.inbox: dict[Conn, list[bytes]] = {}
        self._ops: list[tuple] = []
        self._idle: list[Conn] = []

    def pump(self) -> None:
        """Take the broker's outbox, as the server does, into per-connection inboxes and
        the list of store commands."""
        out = self.b.take_outbox()
        for c, data in out.sends.items():
            self.inbox.setdefault(c, []).extend(data)
        self._ops.extend(out.store)
        self._idle.extend(out.idle)

    @property
    def ops(self) -> list[tuple]:
        """Store commands produced so far and not cleared by the test."""
        self.pump()
        return self._ops

    def take_idle(self) -> list[Conn]:
        """Workers the broker reported idle since the last call."""
        self.pump()
        idle, self._idle = self._idle, []
        return idle

    def conn(self, client_id: bytes | None = None) -> Conn:
        self.n += 1
        c = self.b.connect(Conn(self.n, peer="127.0.0.1", fd=100 + self.n))
        _WORLD[c] = self
        if client_id:
            self.send(c, T.SET_CLIENT_ID, client_id)
        return c

    def send(self, c: Conn, t: int, *args: bytes) -> None:
        self.b.handle(c, Packet(t, tuple(args)))

    def worker(self, *functions: bytes, sleep: bool = False, client_id: bytes = b"") -> Conn:
        w = self.conn(client_id or None)
        for f in functions:
            self.send(w, T.CAN_DO, f)
        if sleep:
            self.send(w, T.PRE_SLEEP)
        assert recv(w) == []
        return w

    def submit(self, c: Conn, fn: bytes = FN, unique: bytes = b"", data: bytes = b"x",
               t: int = T.SUBMIT_JOB) -> bytes:
        """Submit and return the handle from the JOB_CREATED (must be the only reply)."""
        self.send(c, t, fn, unique, data)
        out = recv(c)
        assert len(out) == 1 and out[0][0] == T.JOB_CREATED, out
        return out[0][1][0]

    def grab(self, w: Conn, t: int = T.GRAB_JOB) -> tuple:
        """GRAB and return the one reply."""
        self.send(w, t)
        out = recv(w)
        assert len(out) == 1, out
        return out[0]

    def status(self, fn: bytes = FN) -> tuple[int, int, int]:
        f = self.b.functions[fn]
        return f.total, f.running, len(f.workers)


def recv(c: Conn) -> list[tuple[int, tuple[bytes, ...]]]:
    """Decode and consume what the broker queued for ``c``: [(type, args), ...]."""
    w = _WORLD[c]
    w.pump()
    data = b"".join(w.inbox.pop(c, []))
    events = list(Decoder(expect_requests=False).events(data))
    assert all(isinstance(e, Packet) and not e.request for e in events)
    return [(e.type, e.args) for e in events]


def h(n: int) -> bytes:
    return b"H:test:%d" % n


NOOP = (T.NOOP, ())
NO_JOB = (T.NO_JOB, ())


def error(code: bytes, text: bytes) -> tuple:
    return (T.ERROR, (code, text))


# ------------------------------------------------------------------ abilities


def test_can_do_registers_and_grab_gets_the_job():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    assert w.status() == (0, 0, 1)
    hd = w.submit(c, data=b"hello")
    assert hd == h(1)
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(1), FN, b"hello"))
    assert w.status() == (1, 1, 1)


def test_grab_without_abilities_or_work_gets_no_job():
    w = World()
    wk = w.worker()
    assert w.grab(wk) == NO_JOB
    wk2 = w.worker(FN)
    assert w.grab(wk2) == NO_JOB


def test_cant_do_removes_one_ability():
    w = World()
    c = w.conn()
    wk = w.worker(FN, b"other")
    w.send(wk, T.CANT_DO, FN)
    assert recv(wk) == []
    w.submit(c)
    assert w.grab(wk) == NO_JOB
    assert w.status() == (1, 0, 0)
    w.submit(c, fn=b"other")
    assert w.grab(wk)[0] == T.JOB_ASSIGN


def test_reset_abilities_removes_all():
    w = World()
    c = w.conn()
    wk = w.worker(FN, b"other")
    w.send(wk, T.RESET_ABILITIES)
    w.submit(c)
    w.submit(c, fn=b"other")
    assert w.grab(wk) == NO_JOB
    assert w.status() == (1, 0, 0) and w.status(b"other") == (1, 0, 0)


def test_can_do_twice_counts_one_worker():
    w = World()
    wk = w.worker(FN, FN)
    assert w.status() == (0, 0, 1)
    assert wk.functions == [w.b.functions[FN]]


def test_set_client_id():
    w = World()
    wk = w.conn(b"pid_42_abc")
    assert wk.client_id == b"pid_42_abc"


# --------------------------------------------------------------- NOOP / sleep


def test_pre_sleep_then_submit_gives_exactly_one_noop():
    w = World()
    c = w.conn()
    wk = w.worker(FN, sleep=True)
    w.submit(c)
    assert recv(wk) == [NOOP]
    w.submit(c)
    w.submit(c)
    assert recv(wk) == []  # one NOOP per sleep
    assert w.grab(wk)[0] == T.JOB_ASSIGN
    # After a GRAB it must PRE_SLEEP again; work is waiting, so the NOOP comes at once.
    w.send(wk, T.PRE_SLEEP)
    assert recv(wk) == [NOOP]


def test_pre_sleep_with_work_waiting_noops_at_once():
    w = World()
    c = w.conn()
    w.submit(c)
    wk = w.worker(FN)
    w.send(wk, T.PRE_SLEEP)
    assert recv(wk) == [NOOP]


def test_no_noop_to_a_worker_that_is_not_sleeping():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.submit(c)
    assert recv(wk) == []
    # Nor to a sleeping worker of another function.
    other = w.worker(b"other", sleep=True)
    w.submit(c)
    assert recv(other) == []


def test_every_sleeping_worker_of_the_function_is_woken_once():
    w = World()
    c = w.conn()
    w1 = w.worker(FN, sleep=True)
    w2 = w.worker(FN, b"other", sleep=True)
    w.submit(c)
    assert recv(w1) == [NOOP] and recv(w2) == [NOOP]
    w.submit(c, fn=b"other")
    assert recv(w2) == []


def test_sleep_after_no_job_then_work_arrives():
    # AtoM's loop: GRAB_JOB -> NO_JOB -> PRE_SLEEP -> (NOOP) -> GRAB_JOB.
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    assert w.grab(wk) == NO_JOB
    w.send(wk, T.PRE_SLEEP)
    assert recv(wk) == []
    w.submit(c, data=b"p")
    assert recv(wk) == [NOOP]
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(1), FN, b"p"))


# ------------------------------------------------------------------- grabbing


def test_grab_job_uniq_and_grab_job_all():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.submit(c, unique=b"u1", data=b"d1")
    w.submit(c, unique=b"u2", data=b"d2")
    w.submit(c, unique=b"", data=b"d3")
    assert w.grab(wk, T.GRAB_JOB_UNIQ) == (T.JOB_ASSIGN_UNIQ, (h(1), FN, b"u1", b"d1"))
    # gearmand answers GRAB_JOB_ALL with JOB_ASSIGN_UNIQ when the job has no reducer.
    assert w.grab(wk, T.GRAB_JOB_ALL) == (T.JOB_ASSIGN_UNIQ, (h(2), FN, b"u2", b"d2"))
    assert w.grab(wk, T.GRAB_JOB_UNIQ) == (T.JOB_ASSIGN_UNIQ, (h(3), FN, b"", b"d3"))
    assert w.grab(wk, T.GRAB_JOB_ALL) == NO_JOB
    assert w.grab(wk, T.GRAB_JOB_UNIQ) == NO_JOB


def test_grab_job_all_with_a_reducer_gets_job_assign_all():
    w = World()
    c = w.conn()
    wk = w.worker(b"map")
    w.send(c, T.SUBMIT_REDUCE_JOB, b"map", b"u", b"red", b"", b"a b")
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    assert w.grab(wk, T.GRAB_JOB_ALL) == (T.JOB_ASSIGN_ALL, (h(1), b"map", b"u", b"red", b"a b"))


def test_one_worker_may_hold_several_jobs():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.submit(c)
    w.submit(c)
    assert w.grab(wk)[1][0] == h(1)
    assert w.grab(wk)[1][0] == h(2)
    assert set(wk.held) == {h(1), h(2)}
    w.send(wk, T.WORK_COMPLETE, h(2), b"two")
    w.send(wk, T.WORK_COMPLETE, h(1), b"one")
    assert recv(c) == [(T.WORK_COMPLETE, (h(2), b"two")), (T.WORK_COMPLETE, (h(1), b"one"))]


# ------------------------------------------------------------------ priorities


def test_priorities_high_normal_low_fifo_within():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    order = [
        (T.SUBMIT_JOB_LOW, b"l1"), (T.SUBMIT_JOB, b"n1"), (T.SUBMIT_JOB_HIGH, b"h1"),
        (T.SUBMIT_JOB_LOW_BG, b"l2"), (T.SUBMIT_JOB_BG, b"n2"), (T.SUBMIT_JOB_HIGH_BG, b"h2"),
        (T.SUBMIT_JOB_HIGH, b"h3"), (T.SUBMIT_JOB, b"n3"),
    ]
    for t, d in order:
        w.submit(c, data=d, t=t)
    got = [w.grab(wk)[1][2] for _ in order]
    assert got == [b"h1", b"h2", b"h3", b"n1", b"n2", b"n3", b"l1", b"l2"]
    assert w.grab(wk) == NO_JOB


def test_priority_across_functions_of_one_worker():
    w = World()
    c = w.conn()
    wk = w.worker(b"a", b"b")
    w.submit(c, fn=b"a", data=b"a-normal")
    w.submit(c, fn=b"b", data=b"b-high", t=T.SUBMIT_JOB_HIGH)
    w.submit(c, fn=b"b", data=b"b-normal")
    w.submit(c, fn=b"a", data=b"a-low", t=T.SUBMIT_JOB_LOW)
    got = [w.grab(wk)[1][2] for _ in range(4)]
    assert got == [b"b-high", b"a-normal", b"b-normal", b"a-low"]


# ------------------------------------------------------------------ coalescing


def test_same_function_and_unique_coalesce():
    w = World()
    c1, c2 = w.conn(), w.conn()
    wk = w.worker(FN)
    h1 = w.submit(c1, unique=b"same", data=b"first")
    h2 = w.submit(c2, unique=b"same", data=b"second", t=T.SUBMIT_JOB_HIGH)
    assert h1 == h2
    assert w.status() == (1, 0, 1)
    assert w.grab(wk) == (T.JOB_ASSIGN, (h1, FN, b"first"))  # payload of the first
    assert w.grab(wk) == NO_JOB
    w.send(wk, T.WORK_COMPLETE, h1, b"result")
    assert recv(c1) == [(T.WORK_COMPLETE, (h1, b"result"))]
    assert recv(c2) == [(T.WORK_COMPLETE, (h1, b"result"))]


def test_coalescing_onto_a_running_job():
    w = World()
    c1, c2 = w.conn(), w.conn()
    wk = w.worker(FN)
    h1 = w.submit(c1, unique=b"u")
    w.grab(wk)
    assert w.submit(c2, unique=b"u") == h1
    w.send(wk, T.WORK_COMPLETE, h1, b"r")
    assert recv(c1) == recv(c2) == [(T.WORK_COMPLETE, (h1, b"r"))]


def test_same_unique_other_function_does_not_coalesce():
    w = World()
    c = w.conn()
    assert w.submit(c, fn=b"a", unique=b"u") != w.submit(c, fn=b"b", unique=b"u")


def test_empty_unique_never_coalesces():
    w = World()
    c = w.conn()
    handles = {w.submit(c, unique=b"", data=b"same") for _ in range(3)}
    assert len(handles) == 3
    assert w.status() == (3, 0, 0)


def test_dash_unique_coalesces_on_the_payload():
    w = World()
    c = w.conn()
    a = w.submit(c, unique=b"-", data=b"payload-1")
    b = w.submit(c, unique=b"-", data=b"payload-1")
    d = w.submit(c, unique=b"-", data=b"payload-2")
    assert a == b != d
    # An empty payload with "-" has nothing to derive from: no coalescing.
    assert w.submit(c, unique=b"-", data=b"") != w.submit(c, unique=b"-", data=b"")


def test_unique_is_free_again_after_the_job_ends():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    h1 = w.submit(c, unique=b"u")
    w.grab(wk)
    w.send(wk, T.WORK_COMPLETE, h1, b"")
    recv(c)
    h2 = w.submit(c, unique=b"u")
    assert h2 != h1
    w.grab(wk)
    w.send(wk, T.WORK_FAIL, h2)
    recv(c)
    assert w.submit(c, unique=b"u") not in (h1, h2)


def test_foreground_joins_a_queued_background_job():
    w = World()
    c1, c2 = w.conn(), w.conn()
    wk = w.worker(FN)
    hb = w.submit(c1, unique=b"u", t=T.SUBMIT_JOB_BG)
    assert w.submit(c2, unique=b"u") == hb
    w.grab(wk)
    w.send(wk, T.WORK_COMPLETE, hb, b"done")
    assert recv(c2) == [(T.WORK_COMPLETE, (hb, b"done"))]
    assert recv(c1) == []  # the background submitter waits for nothing


def test_background_submission_joining_a_foreground_job_is_durable():
    # JOB_CREATED for a background submission promises a stored job (invariant 2). When it
    # coalesces onto a memory-only foreground job, the job must be stored before the
    # acknowledgement, and must survive its foreground client going away.
    w = World(durable=True)
    fg, bg = w.conn(), w.conn()
    wk = w.worker(FN)
    hf = w.submit(fg, unique=b"u")
    w.ops.clear()
    w.send(bg, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    inserts = [op for op in w.ops if op[0] == "insert"]
    assert inserts, "background submission coalesced onto a foreground job was never stored"
    assert recv(bg) == [], "JOB_CREATED before the commit"
    w.b.committed([op[-1] for op in inserts])
    assert recv(bg) == [(T.JOB_CREATED, (hf,))]
    w.b.disconnect(fg)
    assert w.grab(wk)[0] == T.JOB_ASSIGN


def test_second_background_submission_waits_for_the_same_commit():
    # While the insert of a foreground job promoted to background is not committed, any
    # further background submission joining it must wait for that commit too.
    w = World(durable=True)
    fg, bg1, bg2 = w.conn(), w.conn(), w.conn()
    hf = w.submit(fg, unique=b"u")
    w.send(bg1, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    inserts = [op for op in w.ops if op[0] == "insert"]
    w.send(bg2, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    assert recv(bg1) == [] and recv(bg2) == [], "JOB_CREATED before the insert committed"
    w.b.committed([op[-1] for op in inserts])
    assert recv(bg1) == recv(bg2) == [(T.JOB_CREATED, (hf,))]


def test_promoted_job_finishing_before_its_commit():
    w = World(durable=True)
    fg, bg = w.conn(), w.conn()
    wk = w.worker(FN)
    hf = w.submit(fg, unique=b"u")
    assert w.grab(wk)[1][0] == hf
    w.ops.clear()
    w.send(bg, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    w.send(wk, T.WORK_COMPLETE, hf, b"r")
    kinds = [op[0] for op in w.ops]
    assert kinds == ["insert", "start", "done"]
    assert recv(fg) == [(T.WORK_COMPLETE, (hf, b"r"))]
    assert recv(bg) == []
    w.b.committed([w.ops[0][-1]])
    assert recv(bg) == [(T.JOB_CREATED, (hf,))]
    assert w.status() == (0, 0, 1)


def test_promotion_commit_failure_keeps_the_foreground_job():
    w = World(durable=True)
    fg, bg = w.conn(), w.conn()
    wk = w.worker(FN)
    hf = w.submit(fg, unique=b"u")
    w.ops.clear()
    w.send(bg, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    (insert,) = w.ops
    w.b.commit_failed([(insert[-1], "disk full")])
    assert recv(bg) == [error(b"QUEUE_ERROR", b"disk full")]
    assert w.grab(wk)[1][0] == hf
    w.send(wk, T.WORK_COMPLETE, hf, b"r")
    assert recv(fg) == [(T.WORK_COMPLETE, (hf, b"r"))]


# ----------------------------------------------------------------- results


def _two_clients_one_running_job(exceptions_for_first: bool = False):
    w = World()
    c1, c2 = w.conn(), w.conn()
    if exceptions_for_first:
        w.send(c1, T.OPTION_REQ, b"exceptions")
        assert recv(c1) == [(T.OPTION_RES, (b"exceptions",))]
    wk = w.worker(FN)
    hd = w.submit(c1, unique=b"u")
    w.submit(c2, unique=b"u")
    w.grab(wk)
    return w, c1, c2, wk, hd


def test_work_data_warning_status_reach_every_waiting_client():
    w, c1, c2, wk, hd = _two_clients_one_running_job()
    w.send(wk, T.WORK_DATA, hd, b"chunk\01")
    w.send(wk, T.WORK_WARNING, hd, b"careful")
    w.send(wk, T.WORK_STATUS, hd, b"1", b"4")
    w.send(wk, T.WORK_COMPLETE, hd, b"end")
    expected = [
        (T.WORK_DATA, (hd, b"chunk\01")),
        (T.WORK_WARNING, (hd, b"careful")),
        (T.WORK_STATUS, (hd, b"1", b"4")),
        (T.WORK_COMPLETE, (hd, b"end")),
    ]
    assert recv(c1) == expected
    assert recv(c2) == expected
    assert recv(wk) == []
    assert w.status() == (0, 0, 1)


def test_work_fail_reaches_every_client():
    w, c1, c2, wk, hd = _two_clients_one_running_job()
    w.send(wk, T.WORK_FAIL, hd)
    assert recv(c1) == recv(c2) == [(T.WORK_FAIL, (hd,))]
    assert w.status() == (0, 0, 1)
    assert hd not in w.b.jobs


def test_work_exception_only_to_clients_that_asked():
    w, c1, c2, wk, hd = _two_clients_one_running_job(exceptions_for_first=True)
    w.send(wk, T.WORK_EXCEPTION, hd, b"Traceback")
    assert recv(c1) == [(T.WORK_EXCEPTION, (hd, b"Traceback"))]
    assert recv(c2) == [(T.WORK_FAIL, (hd,))]
    assert w.status() == (0, 0, 1)


def test_work_result_for_a_job_the_worker_does_not_hold():
    w = World()
    c = w.conn()
    wk, other = w.worker(FN), w.worker(FN)
    hd = w.submit(c)
    w.grab(wk)
    for t, args in [(T.WORK_COMPLETE, (hd, b"r")), (T.WORK_FAIL, (hd,)),
                    (T.WORK_DATA, (hd, b"d")), (T.WORK_STATUS, (hd, b"1", b"2")),
                    (T.WORK_COMPLETE, (b"H:test:999", b""))]:
        w.send(other, t, *args)
        out = recv(other)
        assert len(out) == 1 and out[0][0] == T.ERROR and out[0][1][0] == b"JOB_NOT_FOUND"
    assert recv(c) == []
    assert w.status() == (1, 1, 2)


def test_option_req_unknown():
    w = World()
    c = w.conn()
    w.send(c, T.OPTION_REQ, b"frobnicate")
    assert recv(c) == [error(b"UNKNOWN_OPTION", b"Server does not recognize given option")]
    assert not c.exceptions


def test_echo():
    w = World()
    c = w.conn()
    w.send(c, T.ECHO_REQ, b"ping\0pong")
    assert recv(c) == [(T.ECHO_RES, (b"ping\0pong",))]


# ------------------------------------------------------------------- status


def test_get_status_unknown_queued_running():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.send(c, T.GET_STATUS, b"H:test:42")
    assert recv(c) == [(T.STATUS_RES, (b"H:test:42", b"0", b"0", b"0", b"0"))]
    hd = w.submit(c, t=T.SUBMIT_JOB_BG)
    w.send(c, T.GET_STATUS, hd)
    assert recv(c) == [(T.STATUS_RES, (hd, b"1", b"0", b"0", b"0"))]
    w.grab(wk)
    w.send(c, T.GET_STATUS, hd)
    assert recv(c) == [(T.STATUS_RES, (hd, b"1", b"1", b"0", b"0"))]
    w.send(wk, T.WORK_STATUS, hd, b"3", b"4")
    w.send(c, T.GET_STATUS, hd)
    assert recv(c) == [(T.STATUS_RES, (hd, b"1", b"1", b"3", b"4"))]
    w.send(wk, T.WORK_COMPLETE, hd, b"")
    w.send(c, T.GET_STATUS, hd)
    assert recv(c) == [(T.STATUS_RES, (hd, b"0", b"0", b"0", b"0"))]


def test_get_status_unique():
    w = World()
    c1, c2, q = w.conn(), w.conn(), w.conn()
    wk = w.worker(FN)
    w.send(q, T.GET_STATUS_UNIQUE, b"u")
    assert recv(q) == [(T.STATUS_RES_UNIQUE, (b"u", b"0", b"0", b"0", b"0", b"0"))]
    hd = w.submit(c1, unique=b"u")
    w.submit(c2, unique=b"u")
    w.send(q, T.GET_STATUS_UNIQUE, b"u")
    assert recv(q) == [(T.STATUS_RES_UNIQUE, (b"u", b"1", b"0", b"0", b"0", b"2"))]
    w.grab(wk)
    w.send(wk, T.WORK_STATUS, hd, b"5", b"10")
    recv(c1), recv(c2)
    w.send(q, T.GET_STATUS_UNIQUE, b"u")
    assert recv(q) == [(T.STATUS_RES_UNIQUE, (b"u", b"1", b"1", b"5", b"10", b"2"))]


# ---------------------------------------------------------------- epoch / sched


def test_submit_job_epoch_runs_when_due():
    w = World()
    c = w.conn()
    wk = w.worker(FN, sleep=True)
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"", b"1010", b"later")
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    assert recv(wk) == []  # not due: no NOOP
    assert w.b.next_deadline() == 1010
    assert w.grab(wk) == NO_JOB
    w.send(wk, T.PRE_SLEEP)
    assert recv(wk) == []
    w.clock.t = 1009.5
    w.b.tick()
    assert recv(wk) == []
    w.clock.t = 1010
    w.b.tick()
    assert recv(wk) == [NOOP]
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(1), FN, b"later"))
    assert w.b.next_deadline() is None


def test_submit_job_epoch_in_the_past_is_queued_at_once():
    w = World()
    c = w.conn()
    wk = w.worker(FN, sleep=True)
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"", b"10", b"now")
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    assert recv(wk) == [NOOP]


def test_epoch_job_is_a_background_job():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"", b"1010", b"later")
    recv(c)
    w.b.disconnect(c)
    w.clock.t = 1010
    w.b.tick()
    assert w.grab(wk)[0] == T.JOB_ASSIGN


def test_submit_job_sched_is_refused_as_gearmand_does():
    w = World()
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_SCHED, FN, b"u", b"0", b"0", b"1", b"1", b"0", b"x")
    assert recv(c) == [error(b"INVALID_COMMAND", b"Command not expected")]
    assert FN not in w.b.functions or w.status() == (0, 0, 0)


# ------------------------------------------------------------------ limits


def test_unique_longer_than_64_bytes():
    w = World()
    c = w.conn()
    w.send(c, T.SUBMIT_JOB, FN, b"u" * 65, b"x")
    assert recv(c) == [error(b"ARGUMENT_TOO_LARGE", b"Unique value too large")]
    w.send(c, T.SUBMIT_JOB_BG, FN, b"u" * 65, b"x")
    assert recv(c) == [error(b"ARGUMENT_TOO_LARGE", b"Unique value too large")]
    assert w.submit(c, unique=b"u" * 64) == h(1)


def test_function_name_longer_than_512_bytes():
    w = World()
    c = w.conn()
    w.send(c, T.SUBMIT_JOB, b"f" * 513, b"", b"x")
    out = recv(c)
    assert len(out) == 1 and out[0][0] == T.ERROR and out[0][1][0] == b"ARGUMENT_TOO_LARGE"
    assert w.submit(c, fn=b"f" * 512)


def test_maxqueue_refuses_when_full_and_connection_stays_usable():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.b.function(FN).max_queue = 2
    w.submit(c)
    w.submit(c, t=T.SUBMIT_JOB_BG)
    for t in (T.SUBMIT_JOB, T.SUBMIT_JOB_BG, T.SUBMIT_JOB_HIGH, T.SUBMIT_JOB_LOW_BG):
        w.send(c, t, FN, b"", b"x")
        assert recv(c) == [error(b"QUEUE_ERROR", b"Job queue is full")]
    w.grab(wk)  # running still counts
    w.send(c, T.SUBMIT_JOB, FN, b"", b"x")
    assert recv(c) == [error(b"QUEUE_ERROR", b"Job queue is full")]
    w.send(c, T.ECHO_REQ, b"still here")
    assert recv(c) == [(T.ECHO_RES, (b"still here",))]
    w.send(wk, T.WORK_COMPLETE, h(1), b"")
    recv(c)
    assert w.submit(c) == h(3)


def test_maxqueue_does_not_refuse_a_coalescing_submission():
    # gearmand finds the existing unique before it checks the queue size.
    w = World()
    c = w.conn()
    w.b.function(FN).max_queue = 1
    hd = w.submit(c, unique=b"k")
    assert w.submit(c, unique=b"k") == hd
    w.send(c, T.SUBMIT_JOB, FN, b"other", b"x")
    assert recv(c) == [error(b"QUEUE_ERROR", b"Job queue is full")]


def test_maxqueue_zero_is_unlimited():
    w = World()
    c = w.conn()
    w.b.function(FN).max_queue = 0
    for _ in range(50):
        w.submit(c, t=T.SUBMIT_JOB_BG)


# --------------------------------------------------------- worker failures


def test_worker_disconnect_requeues_at_the_back_and_the_client_gets_the_result():
    w = World()
    c = w.conn()
    w1, w2 = w.worker(FN), w.worker(FN)
    ha = w.submit(c, data=b"a")
    hb = w.submit(c, data=b"b")
    assert w.grab(w1)[1][0] == ha
    w.send(w1, T.WORK_STATUS, ha, b"1", b"2")
    recv(c)
    w.b.disconnect(w1)
    assert recv(c) == []  # foreground clients are told nothing
    job = w.b.jobs[ha]
    assert job.attempts == 1
    assert w.status() == (2, 0, 1)
    assert w.grab(w2)[1][0] == hb  # a went to the back
    assert w.grab(w2) == (T.JOB_ASSIGN, (ha, FN, b"a"))
    assert job.attempts == 2
    w.send(w2, T.WORK_COMPLETE, ha, b"ok")
    assert recv(c) == [(T.WORK_COMPLETE, (ha, b"ok"))]


def test_requeued_job_wakes_a_sleeping_worker():
    w = World()
    c = w.conn()
    w1 = w.worker(FN)
    w.submit(c)
    w.grab(w1)
    w2 = w.worker(FN, sleep=True)
    w.b.disconnect(w1)
    assert recv(w2) == [NOOP]


def test_past_max_attempts_the_job_fails():
    w = World(max_attempts=2)
    c = w.conn()
    hd = w.submit(c)
    for _ in range(2):
        wk = w.worker(FN)
        assert w.grab(wk)[1][0] == hd
        w.b.disconnect(wk)
    assert recv(c) == [(T.WORK_FAIL, (hd,))]
    assert hd not in w.b.jobs
    assert w.status() == (0, 0, 0)
    assert w.grab(w.worker(FN)) == NO_JOB


def test_max_attempts_per_function():
    w = World(max_attempts=lambda f: 1 if f == b"fragile" else 5)
    c = w.conn()
    hd = w.submit(c, fn=b"fragile")
    wk = w.worker(b"fragile")
    w.grab(wk)
    w.b.disconnect(wk)
    assert recv(c) == [(T.WORK_FAIL, (hd,))]


def test_background_job_past_max_attempts_records_a_fail_op():
    w = World(durable=True, max_attempts=2)
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_BG, FN, b"", b"x")
    (insert,) = [op for op in w.ops if op[0] == "insert"]
    w.b.committed([insert[-1]])
    hd = recv(c)[0][1][0]
    job_id = insert[1]
    w.ops.clear()
    wk = w.worker(FN, client_id=b"pid_1_a")
    w.grab(wk)
    w.clock.t = 1001
    w.b.disconnect(wk)
    assert w.ops[0] == ("start", job_id, 1, "pid_1_a", 1000.0)
    assert w.ops[1][:3] == ("requeue", job_id, 1)
    assert w.ops[1][4] == "worker disconnected"
    w.ops.clear()
    wk = w.worker(FN)
    w.grab(wk)
    w.b.disconnect(wk)
    assert w.ops[0][:3] == ("start", job_id, 2)
    kind, fid, at, reason = w.ops[1]
    assert (kind, fid, at) == ("fail", job_id, 1001)
    assert "worker disconnected" in reason and "2 attempts" in reason
    assert hd not in w.b.jobs


def test_can_do_timeout_requeues_via_tick():
    w = World()
    c = w.conn()
    w1 = w.conn()
    w.send(w1, T.CAN_DO_TIMEOUT, FN, b"10")
    w2 = w.worker(FN, sleep=True)
    hd = w.submit(c)
    recv(w2)
    assert w.grab(w1)[1][0] == hd
    w.send(w2, T.PRE_SLEEP)
    assert recv(w2) == []
    assert w.b.next_deadline() == 1010
    w.b.tick()
    assert hd in w1.held
    w.clock.t = 1010
    w.b.tick()
    assert hd not in w1.held
    assert recv(w2) == [NOOP]
    assert w.grab(w2)[1][0] == hd
    assert w.b.jobs[hd].attempts == 2
    # The late worker's result is refused; the client gets the new worker's.
    w.send(w1, T.WORK_COMPLETE, hd, b"late")
    assert recv(w1)[0][1][0] == b"JOB_NOT_FOUND"
    w.send(w2, T.WORK_COMPLETE, hd, b"good")
    assert recv(c) == [(T.WORK_COMPLETE, (hd, b"good"))]


def test_can_do_timeout_not_applied_after_completion():
    w = World()
    c = w.conn()
    wk = w.conn()
    w.send(wk, T.CAN_DO_TIMEOUT, FN, b"5")
    hd = w.submit(c)
    w.grab(wk)
    w.send(wk, T.WORK_COMPLETE, hd, b"r")
    w.b.tick()
    assert recv(c) == [(T.WORK_COMPLETE, (hd, b"r"))]
    assert w.b.next_deadline() is None


# ------------------------------------------------------------ client leaves


def test_client_disconnect_drops_its_queued_foreground_job():
    w = World()
    c, other = w.conn(), w.conn()
    wk = w.worker(FN)
    w.submit(c, data=b"fg")
    hb = w.submit(c, data=b"bg", t=T.SUBMIT_JOB_BG)
    w.submit(other, data=b"other")
    w.b.disconnect(c)
    assert w.status() == (2, 0, 1)
    assert w.grab(wk)[1] == (hb, FN, b"bg")
    assert w.grab(wk)[1][2] == b"other"
    assert w.grab(wk) == NO_JOB


def test_client_disconnect_keeps_a_job_another_client_waits_for():
    w = World()
    c1, c2 = w.conn(), w.conn()
    wk = w.worker(FN)
    hd = w.submit(c1, unique=b"u")
    w.submit(c2, unique=b"u")
    w.b.disconnect(c1)
    assert w.grab(wk)[1][0] == hd
    w.send(wk, T.WORK_COMPLETE, hd, b"r")
    assert recv(c2) == [(T.WORK_COMPLETE, (hd, b"r"))]
    assert recv(c1) == []


def test_client_disconnect_while_running_lets_the_job_finish():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    hd = w.submit(c)
    w.grab(wk)
    w.b.disconnect(c)
    w.send(wk, T.WORK_COMPLETE, hd, b"r")
    assert recv(wk) == []
    assert w.status() == (0, 0, 1)


def test_background_job_whose_submitter_closed_before_the_commit():
    # AtoM's PHP client closes right after SUBMIT_JOB_BG without reading JOB_CREATED.
    w = World(durable=True)
    c = w.conn()
    wk = w.worker(FN, sleep=True)
    w.send(c, T.SUBMIT_JOB_BG, FN, b"atom-1", b'{"id":1,"name":"arObjectMoveJob"}')
    (insert,) = [op for op in w.ops if op[0] == "insert"]
    w.b.disconnect(c)
    assert recv(wk) == []  # not committed yet: not offered
    w.b.committed([insert[-1]])
    assert recv(c) == []  # nothing written to a closed connection
    assert recv(wk) == [NOOP]
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(1), FN, b'{"id":1,"name":"arObjectMoveJob"}'))


# --------------------------------------------------------- durable contract


def test_background_job_acknowledged_only_after_commit():
    w = World(durable=True)
    assert w.ops == [("reserve_ids", 10001)]
    w.ops.clear()
    c = w.conn()
    wk = w.worker(FN, sleep=True, client_id=b"pid_7_w")
    w.send(c, T.SUBMIT_JOB_LOW_BG, FN, b"u1", b"payload")
    assert recv(c) == []
    assert recv(wk) == []
    ((kind, jid, fn, uniq, data, prio, when, seq, at, token),) = w.ops
    assert (kind, jid, fn, uniq, data, prio, when, seq, at) == (
        "insert", 1, FN, b"u1", b"payload", LOW, 0, 1, 1000.0)
    # Pending: not offered, not known to GET_STATUS.
    w.send(c, T.GET_STATUS, h(1))
    assert recv(c) == [(T.STATUS_RES, (h(1), b"0", b"0", b"0", b"0"))]
    w.ops.clear()
    w.b.committed([token])
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    assert recv(wk) == [NOOP]
    w.clock.t = 1002
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(1), FN, b"payload"))
    assert w.ops == [("start", 1, 1, "pid_7_w", 1002.0)]
    w.ops.clear()
    w.clock.t = 1003
    w.send(wk, T.WORK_COMPLETE, h(1), b"12345")
    assert w.ops == [("done", 1, 1003.0, 5)]


def test_durable_work_fail_and_exception_ops():
    w = World(durable=True)
    c = w.conn()
    wk = w.worker(FN)
    for _ in range(2):
        w.send(c, T.SUBMIT_JOB_BG, FN, b"", b"x")
    w.b.committed([op[-1] for op in w.ops if op[0] == "insert"])
    recv(c)
    w.grab(wk)
    w.grab(wk)
    w.ops.clear()
    w.send(wk, T.WORK_FAIL, h(1))
    w.send(wk, T.WORK_EXCEPTION, h(2), b"boom")
    (k1, i1, _, r1), (k2, i2, _, r2) = w.ops
    assert (k1, i1, k2, i2) == ("fail", 1, "fail", 2)
    assert "WORK_FAIL" in r1 and "boom" in r2


def test_foreground_jobs_are_not_stored():
    w = World(durable=True)
    w.ops.clear()
    c = w.conn()
    wk = w.worker(FN)
    hd = w.submit(c)  # JOB_CREATED at once
    w.grab(wk)
    w.send(wk, T.WORK_COMPLETE, hd, b"")
    assert w.ops == []


def test_commit_failed_reports_and_forgets():
    w = World(durable=True)
    c = w.conn()
    wk = w.worker(FN)
    w.send(c, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    (insert,) = [op for op in w.ops if op[0] == "insert"]
    w.b.commit_failed([(insert[-1], "database or disk is full: /var/lib/atomnode/atomnode.db")])
    assert recv(c) == [
        error(b"QUEUE_ERROR", b"database or disk is full: /var/lib/atomnode/atomnode.db")]
    assert w.status() == (0, 0, 1)
    assert w.grab(wk) == NO_JOB
    # The unique is free: a new submission is a new job.
    w.send(c, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    assert [op[0] for op in w.ops].count("insert") == 2


def test_coalescing_onto_a_pending_background_job_waits_for_the_commit():
    w = World(durable=True)
    c1, c2 = w.conn(), w.conn()
    w.send(c1, T.SUBMIT_JOB_BG, FN, b"u", b"x")
    w.send(c2, T.SUBMIT_JOB_BG, FN, b"u", b"y")
    inserts = [op for op in w.ops if op[0] == "insert"]
    assert len(inserts) == 1
    assert recv(c1) == recv(c2) == []
    w.b.committed([inserts[0][-1]])
    assert recv(c1) == recv(c2) == [(T.JOB_CREATED, (h(1),))]


def test_committed_twice_or_after_cancel_is_harmless():
    w = World(durable=True)
    c = w.conn()
    wk = w.worker(FN)
    w.send(c, T.SUBMIT_JOB_BG, FN, b"", b"x")
    (insert,) = [op for op in w.ops if op[0] == "insert"]
    w.b.committed([insert[-1]])
    w.b.committed([insert[-1]])
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    assert w.status() == (1, 0, 1)
    w.grab(wk)
    assert w.grab(wk) == NO_JOB


def test_handle_ids_never_reused_and_reserved_ahead():
    w = World(durable=True, id_reserve_block=10, first_id=5)
    reserved = 0
    seen: list[int] = []
    c = w.conn()
    wk = w.worker(FN)

    def take_ops():
        nonlocal reserved
        for op in w.ops:
            if op[0] == "reserve_ids":
                assert op[1] > reserved
                reserved = op[1]
        w.ops.clear()

    take_ops()
    for i in range(40):
        bg = i % 2 == 0
        w.send(c, T.SUBMIT_JOB_BG if bg else T.SUBMIT_JOB, FN, b"", b"x")
        ops = list(w.ops)
        take_ops()  # reservations that came with this submission were emitted before use
        if bg:
            w.b.committed([op[-1] for op in ops if op[0] == "insert"])
        hd = recv(c)[0][1][0]
        n = int(hd.rsplit(b":", 1)[1])
        assert n < reserved, (n, reserved)
        seen.append(n)
        w.grab(wk)
        w.send(wk, T.WORK_COMPLETE, hd, b"")
        recv(c)
        take_ops()
    assert seen == list(range(5, 45))


def test_handles_without_durability_are_sequential_and_not_reused():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    got = []
    for _ in range(5):
        hd = w.submit(c)
        got.append(hd)
        w.grab(wk)
        w.send(wk, T.WORK_COMPLETE, hd, b"")
        recv(c)
    assert got == [h(i) for i in range(1, 6)]
    assert w.ops == []


# ------------------------------------------------------ concurrency groups

ATOM_MOVE = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
ATOM_IMPORT = b"0123456789abcdef0123456789abcdef-arFileImportJob"


@pytest.mark.parametrize("configure_first", [True, False])
def test_concurrency_group_serialises_and_wakes(configure_first):
    w = World()
    if configure_first:
        w.b.set_concurrency([("serial-moves", ["arObjectMoveJob", "arFileImportJob"], 1)])
    c = w.conn()
    w1 = w.worker(ATOM_MOVE, ATOM_IMPORT)
    w2 = w.worker(ATOM_MOVE, ATOM_IMPORT)
    if not configure_first:
        w.b.set_concurrency([("serial-moves", ["arObjectMoveJob", "arFileImportJob"], 1)])
    h1 = w.submit(c, fn=ATOM_MOVE, t=T.SUBMIT_JOB_BG)
    h2 = w.submit(c, fn=ATOM_IMPORT, t=T.SUBMIT_JOB_BG)
    h3 = w.submit(c, fn=ATOM_MOVE, t=T.SUBMIT_JOB_BG)
    assert w.grab(w1)[1][0] == h1
    assert w.grab(w2) == NO_JOB
    w.send(w2, T.PRE_SLEEP)
    assert recv(w2) == []  # nothing it may run yet
    w.send(w1, T.WORK_COMPLETE, h1, b"")
    assert recv(w2) == [NOOP]
    assert w.grab(w2)[1][0] == h2
    assert w.grab(w1) == NO_JOB
    w.send(w2, T.WORK_COMPLETE, h2, b"")
    assert w.grab(w1)[1][0] == h3


def test_concurrency_group_does_not_touch_other_functions():
    w = World()
    w.b.set_concurrency([("moves", ["arObjectMoveJob"], 1)])
    c = w.conn()
    other = b"0123456789abcdef0123456789abcdef-arFindingAidJob"
    wk = w.worker(ATOM_MOVE, other)
    w.submit(c, fn=ATOM_MOVE)
    w.submit(c, fn=ATOM_MOVE)
    w.submit(c, fn=other)
    w.submit(c, fn=other)
    got = [w.grab(wk)[1][1] for _ in range(3)]
    assert got == [ATOM_MOVE, other, other]
    assert w.grab(wk) == NO_JOB


def test_concurrency_slot_freed_when_the_worker_dies():
    w = World()
    w.b.set_concurrency([("moves", ["arObjectMoveJob"], 1)])
    c = w.conn()
    w1 = w.worker(ATOM_MOVE)
    h1 = w.submit(c, fn=ATOM_MOVE)
    w.submit(c, fn=ATOM_MOVE)
    w.grab(w1)
    w2 = w.worker(ATOM_MOVE, sleep=True)
    w.b.disconnect(w1)
    assert recv(w2) == [NOOP]
    assert w.grab(w2)[1][0] != h1  # the requeued one went to the back
    assert w.grab(w2) == NO_JOB  # the group is full again


def test_concurrency_limit_two():
    w = World()
    w.b.set_concurrency([("pair", ["arObjectMoveJob"], 2)])
    c = w.conn()
    wk = w.worker(ATOM_MOVE)
    for _ in range(3):
        w.submit(c, fn=ATOM_MOVE)
    assert w.grab(wk)[0] == T.JOB_ASSIGN
    assert w.grab(wk)[0] == T.JOB_ASSIGN
    assert w.grab(wk) == NO_JOB


def test_concurrency_group_applies_per_atom_site_unless_it_spans_sites():
    # Two AtoM sites (md5 prefixes, and a 2.2 site's "ROOT - " prefix) share the server:
    # each site's moves are serialised, but one site's move does not hold up another's.
    site_a = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
    site_b = b"fedcba9876543210fedcba9876543210-arObjectMoveJob"
    site_c = b"/srv/atom 2.2 - arObjectMoveJob"
    for span, expected in ((False, 3), (True, 1)):
        w = World()
        w.b.set_concurrency([("moves", ["arObjectMoveJob"], 1, span)])
        c = w.conn()
        wk = w.worker(site_a, site_b, site_c)
        for fn in (site_a, site_a, site_b, site_c):
            w.submit(c, fn=fn)
        got = []
        while (r := w.grab(wk))[0] == T.JOB_ASSIGN:
            got.append(r[1][1])
        assert len(got) == expected, (span, got)
        if not span:
            assert sorted(got) == sorted([site_a, site_b, site_c])
            assert len(w.b.groups) == 3
            assert {g.site for g in w.b.groups} == {
                "0123456789abcdef0123456789abcdef-", "fedcba9876543210fedcba9876543210-",
                "/srv/atom 2.2 - "}


def test_hooks_for_registration_and_given_up_jobs():
    seen: list = []
    w = World(max_attempts=1)
    w.b.on_can_do = lambda name: seen.append(("can_do", name))
    w.b.on_given_up = lambda job, conn, reason: seen.append(("given_up", job.handle, conn, reason))
    c = w.conn()
    wk = w.worker(FN)
    w.worker(FN)  # a second registration of FN by another worker is reported too
    handle = w.submit(c, t=T.SUBMIT_JOB_BG)
    w.grab(wk)
    w.b.disconnect(wk)
    assert seen == [("can_do", FN), ("can_do", FN),
                    ("given_up", handle, wk, "worker disconnected; gave up after 1 attempts")]


# --------------------------------------------------------- operator actions


def test_drain_gets_no_job_and_no_noop():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.submit(c)
    w.b.drain(wk)
    assert w.grab(wk) == NO_JOB
    w.send(wk, T.PRE_SLEEP)
    w.submit(c)
    assert recv(wk) == []
    other = w.worker(FN)
    assert w.grab(other)[0] == T.JOB_ASSIGN


def test_drain_lets_held_jobs_finish():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    hd = w.submit(c)
    w.grab(wk)
    w.b.drain(wk)
    w.send(wk, T.WORK_COMPLETE, hd, b"r")
    assert recv(c) == [(T.WORK_COMPLETE, (hd, b"r"))]
    assert wk in w.take_idle()


def test_cancel_queued_job():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    hd = w.submit(c)
    hb = w.submit(c, t=T.SUBMIT_JOB_BG)
    assert w.b.cancel(hd) is True
    assert recv(c) == [(T.WORK_FAIL, (hd,))]
    assert w.b.cancel(hd) is False
    assert w.b.cancel(b"H:test:999") is False
    assert w.status() == (1, 0, 1)
    assert w.grab(wk)[1][0] == hb
    assert w.b.cancel(hb) is False  # running jobs are not cancelled
    assert w.grab(wk) == NO_JOB


def test_cancel_durable_and_scheduled():
    w = World(durable=True)
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"u", b"5000", b"x")
    (insert,) = [op for op in w.ops if op[0] == "insert"]
    w.b.committed([insert[-1]])
    hd = recv(c)[0][1][0]
    w.ops.clear()
    assert w.b.cancel(hd)
    assert w.ops == [("cancel", insert[1], 1000.0)]
    assert w.b.next_deadline() is None
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"u", b"5000", b"x")  # unique free again
    assert [op[0] for op in w.ops].count("insert") == 1


def test_cancelled_unique_is_free():
    w = World()
    c = w.conn()
    hd = w.submit(c, unique=b"u")
    w.b.cancel(hd)
    recv(c)
    assert w.submit(c, unique=b"u") != hd


# ------------------------------------------------------------------ restore


def stored(id, *, function=FN, unique=b"", data=b"d", priority=NORMAL, when=0, seq=None,
           attempts=0, state="queued"):
    return SimpleNamespace(
        id=id, function=function, unique=unique, data=data, priority=priority,
        when_to_run=when, seq=seq if seq is not None else id, attempts=attempts, state=state,
        submitted_at=900.0,
    )


def test_restore_queued_and_running_jobs():
    w = World(durable=True, max_attempts=3, first_id=20, first_seq=20)
    w.ops.clear()
    jobs = [
        stored(3, priority=HIGH, data=b"high"),
        stored(1, data=b"n1", unique=b"u1"),
        stored(2, data=b"n2", state="running", attempts=1),
        stored(4, data=b"poison", state="running", attempts=3),
        stored(5, data=b"low", priority=LOW),
        stored(6, data=b"later", when=2000),
    ]
    assert w.b.restore(jobs) == 5
    ops = w.ops
    requeue = [op for op in ops if op[0] == "requeue"]
    assert len(requeue) == 1
    _kind, jid, attempts, seq, reason = requeue[0]
    assert (jid, attempts, reason) == (2, 1, "daemon restarted")
    assert seq >= 20
    fail = [op for op in ops if op[0] == "fail"]
    assert len(fail) == 1 and fail[0][1] == 4 and "3 attempts" in fail[0][3]
    assert ops[-1][0] == "reserve_ids"
    wk = w.worker(FN)
    w.send(wk, T.PRE_SLEEP)
    assert recv(wk) == [NOOP]  # restored work is waiting
    got = [w.grab(wk)[1] for _ in range(4)]
    assert [g[2] for g in got] == [b"high", b"n1", b"n2", b"low"]
    assert got[0][0] == h(3)
    assert w.grab(wk) == NO_JOB
    assert w.b.jobs[h(2)].attempts == 2
    # The epoch job runs when due.
    w.clock.t = 2000
    w.b.tick()
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(6), FN, b"later"))
    # New jobs continue after the restored ids; the restored unique still coalesces.
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_BG, FN, b"", b"new")
    (ins,) = [op for op in w.ops if op[0] == "insert"]
    assert ins[1] == 20


def test_restored_unique_coalesces():
    w = World(durable=True, first_id=10, first_seq=10)
    w.b.restore([stored(1, unique=b"atom-7"), stored(2, unique=b"-", data=b"same")])
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_BG, FN, b"atom-7", b"x")
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    w.send(c, T.SUBMIT_JOB, FN, b"-", b"same")
    assert recv(c) == [(T.JOB_CREATED, (h(2),))]


def test_restore_with_default_counters_keeps_seqs_unique():
    # restore() must not hand a requeued job a seq that a later stored job already has.
    w = World(durable=True)
    w.ops.clear()
    w.b.restore([stored(1, seq=1, state="running", attempts=1), stored(2, seq=2),
                 stored(3, seq=3)])
    seqs = {2, 3}
    (rq,) = [op for op in w.ops if op[0] == "requeue"]
    assert rq[3] not in seqs
    assert w.b.next_seq > max(seqs | {rq[3]})


def test_restore_past_max_attempts_sends_nothing_to_workers():
    w = World(durable=True, max_attempts=1)
    w.b.restore([stored(1, state="running", attempts=1)])
    wk = w.worker(FN)
    assert w.grab(wk) == NO_JOB
    assert h(1) not in w.b.jobs


def test_compact_shrinks_the_indexes_and_keeps_every_live_job():
    w = World(durable=True)
    w.b.restore([stored(i, unique=b"u%d" % i) for i in range(1, 5001)])
    jobs, uniques = w.b.jobs, w.b.uniques
    wk = w.worker(FN)
    for _ in range(4990):
        handle = w.grab(wk)[1][0]
        w.send(wk, T.WORK_COMPLETE, handle, b"")
    full = sys.getsizeof(jobs)
    w.b.compact()
    assert w.b.jobs is jobs and w.b.uniques is uniques  # the same objects, smaller
    assert sys.getsizeof(jobs) < full / 10
    assert sorted(jobs) == [h(i) for i in range(4991, 5001)]
    assert sorted(uniques) == [b"u%d" % i for i in range(4991, 5001)]
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_BG, FN, b"u5000", b"x")  # still coalesces
    assert recv(c) == [(T.JOB_CREATED, (h(5000),))]


def test_enqueue_stored_puts_a_retried_job_back():
    w = World(durable=True, first_id=10, first_seq=10)
    wk = w.worker(FN, sleep=True)
    job = w.b.enqueue_stored(stored(3, data=b"again", attempts=5, seq=50, unique=b"u"))
    assert job.handle == h(3)
    assert recv(wk) == [NOOP]
    assert w.grab(wk) == (T.JOB_ASSIGN, (h(3), FN, b"again"))
    assert job.attempts == 6
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_BG, FN, b"u", b"x")  # coalesces with the retried job
    assert recv(c) == [(T.JOB_CREATED, (h(3),))]
    w.send(c, T.SUBMIT_JOB_BG, FN, b"", b"x")
    (ins,) = [op for op in w.ops if op[0] == "insert"]
    assert ins[1] == 10 and ins[7] > 50  # new ids and seqs continue past it


# ------------------------------------------------------------------- misc


def test_set_concurrency_counts_jobs_already_running():
    w = World()
    c = w.conn()
    wk = w.worker(ATOM_MOVE)
    w.submit(c, fn=ATOM_MOVE)
    w.submit(c, fn=ATOM_MOVE)
    w.grab(wk)
    w.b.set_concurrency([("moves", ["arObjectMoveJob"], 1)])
    assert w.grab(wk) == NO_JOB
    w.b.set_concurrency([])
    assert w.grab(wk)[0] == T.JOB_ASSIGN


def test_take_idle_reports_workers_whose_last_job_ended():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    h1, h2 = w.submit(c), w.submit(c)
    w.grab(wk)
    w.grab(wk)
    w.take_idle()
    w.send(wk, T.WORK_COMPLETE, h1, b"")
    assert wk not in w.take_idle()
    w.send(wk, T.WORK_FAIL, h2)
    assert wk in w.take_idle()
    assert w.take_idle() == []
    recv(c)
    other = w.worker(FN)
    w.submit(c)
    w.grab(other)
    w.b.disconnect(other)
    assert other in w.take_idle()


def test_shutdown_drain_all():
    w = World()
    c = w.conn()
    wk = w.worker(FN)
    w.submit(c)
    w.b.shutdown_drain_all()
    assert w.grab(wk) == NO_JOB
    assert w.b.queued_jobs() == 1 and w.b.running_jobs() == 0




def test_all_yours_is_accepted_silently():
    w = World()
    wk = w.worker(FN)
    w.send(wk, T.ALL_YOURS)
    assert recv(wk) == []


def test_counters_stay_consistent_through_a_busy_sequence():
    w = World(max_attempts=3)
    c1, c2 = w.conn(), w.conn()
    ws = [w.worker(FN) for _ in range(3)]
    handles = [w.submit(c, unique=b"u%d" % (i % 4), data=b"%d" % i)
               for i, c in enumerate([c1, c2] * 5)]
    assert len(set(handles)) == 4
    w.grab(ws[0])
    w.grab(ws[1])
    w.b.disconnect(ws[0])
    w.b.disconnect(c1)
    fn = w.b.functions[FN]
    live = [j for j in w.b.jobs.values()]
    assert fn.total == len(live)
    assert fn.running == sum(1 for j in live if j.state == "running")
    assert fn.queued == sum(1 for j in live if j.state == "queued")


# ------------------------------------------------------------ random walks

_FNS = [FN, ATOM_MOVE, ATOM_IMPORT]
_ACTIONS = st.lists(
    st.tuples(
        st.sampled_from([
            "submit", "submit_bg", "submit_high", "submit_low_bg", "epoch", "grab", "grab_uniq",
            "grab_all", "pre_sleep", "complete", "fail", "exception", "data", "can_do",
            "can_do_timeout", "cant_do", "reset", "disconnect", "commit", "commit_fail",
            "tick", "cancel", "drain", "get_status", "admin",
        ]),
        st.integers(min_value=0, max_value=3),  # connection
        st.integers(min_value=0, max_value=2),  # function
        st.sampled_from([b"", b"u1", b"u2", b"-"]),
        st.integers(min_value=0, max_value=30),  # time step / index
    ),
    min_size=5,
    max_size=80,
)


def _check_invariants(w: World) -> None:
    b = w.b
    live = list(b.jobs.values())
    for f in b.functions.values():
        mine = [j for j in live if j.function is f]
        assert f.total == len(mine), f.name
        assert f.running == sum(1 for j in mine if j.state == "running"), f.name
        assert f.queued == sum(1 for j in mine if j.state == "queued"), f.name
        assert f.by_priority == [sum(1 for j in mine if j.state == "queued" and j.priority == p)
                                 for p in range(3)], f.name
        assert f.queued >= 0 and f.running >= 0
        for c in f.workers:
            assert f in c.functions and not c.closed
    for g in b.groups:
        assert g.running == sum(f.running for f in g.functions)
        assert g.running <= g.limit
    for j in live:
        if j.state == "running":
            assert j.worker is not None and j.worker.held.get(j.handle) is j
            assert not j.worker.closed
        else:
            assert j.worker is None
        for c in j.clients:
            assert j in c.waiting
    for c in b.conns.values():
        for hd, j in c.held.items():
            assert b.jobs.get(hd) is j and j.worker is c
    indexed = 0
    for (fname, key), j in b.unique_index():
        assert b.jobs.get(j.handle) is j and j.function.name == fname and j.key == key
        indexed += 1
    assert indexed == len({(j.function.name, j.key) for j in live if j.key is not None})
    assert b.scheduled_count == sum(1 for j in live if j.state == "scheduled")
    assert b.sleepers == sum(1 for c in b.conns.values() if c.sleeping and not c.noop_sent)


def _admin_listings_are_well_formed(w: World) -> None:
    from atomnode.gearman.admin import Admin

    server = SimpleNamespace(broker=w.b, peers={}, bound=[], started_at=0.0)
    admin = Admin()
    me = w.conn()
    for line in (b"status", b"workers", b"prioritystatus", b"show jobs", b"show unique jobs",
                 b"atomnode-status", b"atomnode-jobs list", b"atomnode-jobs list json"):
        reply = admin(server, me, line)
        assert reply.endswith(b".\n"), (line, reply)
    status = admin(server, me, b"status").split(b"\n")[:-2]
    for row in status:
        name, total, running, workers = row.split(b"\t")
        f = w.b.functions[name]
        assert (int(total), int(running), int(workers)) == (f.total, f.running, len(f.workers))
    w.b.disconnect(me)


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(_ACTIONS, st.booleans())
def test_random_walks_keep_the_books_straight(actions, durable):
    w = World(durable=durable, max_attempts=3)
    w.b.set_concurrency([("moves", ["arObjectMoveJob", "arFileImportJob"], 1)])
    conns: dict[int, Conn] = {}
    tokens: list = []
    noops: dict[int, int] = {}
    added_while_asleep: set[Conn] = set()
    asleep: set[Conn] = set()
    unanswered: dict[int, int] = {}  # each connection's GRAB_JOBs minus their answers
    grab_answers = {T.NO_JOB, T.JOB_ASSIGN, T.JOB_ASSIGN_UNIQ, T.JOB_ASSIGN_ALL}

    def conn(i: int) -> Conn:
        c = conns.get(i)
        if c is None or c.closed:
            c = conns[i] = w.conn()
            unanswered[i] = 0
            if i < 2:  # connections 0 and 1 start as workers of every function
                for f in _FNS:
                    w.send(c, T.CAN_DO, f)
        return c

    for action, ci, fi, unique, k in actions:
        if action in ("complete", "fail", "exception", "data"):
            # Results come from whichever connection holds work.
            holders = [i for i, cc in sorted(conns.items()) if cc.held and not cc.closed]
            ci = holders[ci % len(holders)] if holders else ci
        elif action.startswith("grab"):
            ci %= 2
        c = conn(ci)
        fn = _FNS[fi]
        held = list(c.held)
        if action in ("submit", "submit_bg", "submit_high", "submit_low_bg"):
            t = {"submit": T.SUBMIT_JOB, "submit_bg": T.SUBMIT_JOB_BG,
                 "submit_high": T.SUBMIT_JOB_HIGH, "submit_low_bg": T.SUBMIT_JOB_LOW_BG}[action]
            w.send(c, t, fn, unique, b"data%d" % k)
        elif action == "epoch":
            w.send(c, T.SUBMIT_JOB_EPOCH, fn, unique, b"%d" % (w.clock.t + k), b"e")
        elif action in ("grab", "grab_uniq", "grab_all"):
            unanswered[ci] += 1
            w.send(c, {"grab": T.GRAB_JOB, "grab_uniq": T.GRAB_JOB_UNIQ,
                       "grab_all": T.GRAB_JOB_ALL}[action])
        elif action == "pre_sleep":
            w.send(c, T.PRE_SLEEP)
        elif action in ("complete", "fail", "exception", "data") and held:
            hd = held[k % len(held)]
            if action == "complete":
                w.send(c, T.WORK_COMPLETE, hd, b"r")
            elif action == "fail":
                w.send(c, T.WORK_FAIL, hd)
            elif action == "exception":
                w.send(c, T.WORK_EXCEPTION, hd, b"x")
            else:
                w.send(c, T.WORK_DATA, hd, b"d")
        elif action == "can_do":
            w.send(c, T.CAN_DO, fn)
        elif action == "can_do_timeout":
            w.send(c, T.CAN_DO_TIMEOUT, fn, b"%d" % (k % 5 + 1))
        if action in ("can_do", "can_do_timeout") and c.sleeping:
            added_while_asleep.add(c)
        elif action.startswith("grab") or action == "pre_sleep":
            added_while_asleep.discard(c)
        elif action == "cant_do":
            w.send(c, T.CANT_DO, fn)
        elif action == "reset":
            w.send(c, T.RESET_ABILITIES)
        elif action == "disconnect":
            w.b.disconnect(c)
        elif action in ("commit", "commit_fail"):
            tokens += [op[-1] for op in w.ops if op[0] == "insert"]
            if tokens:
                tok = tokens.pop(k % len(tokens))
                if action == "commit":
                    w.b.committed([tok])
                else:
                    w.b.commit_failed([(tok, "disk full")])
        elif action == "tick":
            w.clock.t += k
            w.b.tick()
        elif action == "cancel":
            w.b.cancel(h(k % 8 + 1))
        elif action == "drain":
            w.b.drain(c)
        elif action == "get_status":
            w.send(c, T.GET_STATUS, h(k % 8 + 1))
        elif action == "admin":
            _admin_listings_are_well_formed(w)
        if not durable:
            w.ops.clear()
        else:
            tokens += [op[-1] for op in w.ops if op[0] == "insert"]
            w.ops.clear()
        _check_invariants(w)
        # Output is always well-formed; a worker gets at most one NOOP per PRE_SLEEP, and
        # none it has not asked for.
        if action.startswith("grab"):
            asleep.discard(c)
            noops[ci] = 0
        elif action == "pre_sleep":
            asleep.add(c)
            noops[ci] = 0
        for cid, cc in list(conns.items()):
            got = recv(cc)
            # Every GRAB_JOB is answered at once: nothing on a worker's path waits on the
            # disk (not even for a job whose commit is in flight; docs/performance.md).
            unanswered[cid] -= sum(1 for t, _args in got if t in grab_answers)
            if not cc.closed:
                assert unanswered[cid] == 0, f"GRAB_JOB of connection {cid} unanswered"
            n = sum(1 for t, _args in got if t == T.NOOP)
            if n:
                assert cc in asleep, f"NOOP to connection {cid}, which did not PRE_SLEEP"
                noops[cid] = noops.get(cid, 0) + n
                assert noops[cid] <= 1, f"more than one NOOP to connection {cid}"
        # No missed wake-up: a worker asleep and not woken has nothing it could run (exempt:
        # one that added an ability while asleep; gearmand does not wake it either).
        for cid, cc in conns.items():
            if (cc in asleep and not noops.get(cid) and not cc.closed and not cc.draining
                    and cc not in added_while_asleep):
                assert w.b._peek(cc) is None, f"connection {cid} sleeps while work is queued"


def test_epoch_and_timeout_values_are_range_checked_at_the_packet():
    """Every value that reaches the store fits SQLite's 64-bit integers: out-of-range epoch
    times and CAN_DO_TIMEOUTs are refused with their own ERROR, before any store op."""
    w = World()
    c = w.conn()
    w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"a", b"253402300799", b"x")  # 9999-12-31: accepted
    assert recv(c) == [(T.JOB_CREATED, (h(1),))]
    w.ops.clear()
    for bad in (b"253402300800", str(2**63).encode(), b"-1", b"12x", b"1" * 30):
        w.send(c, T.SUBMIT_JOB_EPOCH, FN, b"b", bad, b"x")
        [(t, args)] = recv(c)
        assert t == T.ERROR and args[0] == b"INVALID_PACKET", (bad, args)
    assert not [op for op in w.ops if op[0] == "insert"]
    wk = w.conn()
    w.send(wk, T.CAN_DO_TIMEOUT, FN, b"2147483647")
    assert recv(wk) == []
    for bad in (b"2147483648", str(2**63).encode(), b"-5", b"soon"):
        w.send(wk, T.CAN_DO_TIMEOUT, b"other", bad)
        [(t, args)] = recv(wk)
        assert t == T.ERROR and b"from 0 to 2147483647" in args[1], (bad, args)
    assert [f.name for f in wk.functions] == [FN]
