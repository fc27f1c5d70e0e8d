"""Tests of the text admin commands (atomnode.gearman.admin) against a stand-in server.

Expected bytes follow gearmand 1.1.20 (libgearman-server/text.cc): OK/ERR lines end with
CRLF, listings with LF and a final ".". AtoM's web app and gearadmin parse them strictly.
"""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

from atomnode import __version__
from atomnode.gearman.admin import Admin
from atomnode.gearman.broker import Broker, Conn
from atomnode.gearman.protocol import Decoder, Packet, T
from atomnode.system.access import RefusalLog, is_loopback

FN = b"reverse"


class Env:
    """A broker, a stand-in server and helpers to drive them."""

    def __init__(self, *, durable: bool = False, admin: Admin | None = None) -> None:
        self.now = 1000.0
        self.b = Broker(hostname="test", durable=durable, clock=lambda: self.now)
        self.server = SimpleNamespace(
            broker=self.b, bound=[("127.0.0.1", 4730), ("::1", 4730)],
            started_at=self.now - 60, allow=(), refusals=RefusalLog(),
        )
        self.admin = admin or Admin()
        self.n = 0

    def conn(self, *, loopback: bool | None = None, peer: str | None = None) -> Conn:
        """A connection from ``peer`` (default: loopback, or a LAN address with
        ``loopback=False``); whether it is loopback follows from the address."""
        if peer is None:
            peer = "10.0.0.99" if loopback is False else "127.0.0.1"
        assert loopback is None or is_loopback(peer) == loopback, (peer, loopback)
        self.n += 1
        return self.b.connect(Conn(self.n, peer=peer, fd=20 + self.n))

    def take(self, c: Conn) -> bytes:
        """What the broker's outbox owes ``c`` (the rest of the outbox is dropped)."""
        return b"".join(self.b.take_outbox().sends.get(c, []))

    def send(self, c: Conn, t: int, *args: bytes) -> None:
        self.b.handle(c, Packet(t, tuple(args)))
        self.b.take_outbox()

    def cmd(self, line: bytes, conn: Conn | None = None) -> bytes:
        if conn is None:
            conn = self.conn()
        return self.admin(self.server, conn, line)

    def bg(self, c: Conn, fn: bytes = FN, unique: bytes = b"", t: int = T.SUBMIT_JOB_BG) -> None:
        self.b.handle(c, Packet(t, (fn, unique, b"x")))
        self.b.committed([op[-1] for op in self.b.take_outbox().store if op[0] == "insert"])
        self.b.take_outbox()


def h(n: int) -> bytes:
    return b"H:test:%d" % n


# ------------------------------------------------------------------- status


def test_status_empty():
    assert Env().cmd(b"status") == b".\n"


def test_status_counts_total_running_workers():
    e = Env()
    c = e.conn()
    w = e.conn()
    e.send(w, T.CAN_DO, b"F")
    e.bg(c, b"F")
    e.bg(c, b"F")
    e.send(w, T.GRAB_JOB)
    e.bg(c, b"G")  # no worker for G
    assert e.cmd(b"status") == b"F\t2\t1\t1\nG\t1\t0\t0\n.\n"
    # Upper case works too (gearmand compares case-insensitively).
    assert e.cmd(b"STATUS") == e.cmd(b"status")


def test_status_keeps_idle_functions():
    e = Env()
    w = e.conn()
    e.send(w, T.CAN_DO, b"F")
    assert e.cmd(b"status") == b"F\t0\t0\t1\n.\n"
    e.b.disconnect(w)
    assert e.cmd(b"status") == b"F\t0\t0\t0\n.\n"


def test_status_atom_availability_check_format():
    # AtoM splits each line on TAB into exactly 4 fields and needs workers > 0.
    e = Env()
    w = e.conn()
    fn = b"0123456789abcdef0123456789abcdef-arObjectMoveJob"
    e.send(w, T.CAN_DO, fn)
    reply = e.cmd(b"status\r")
    lines = reply.split(b"\n")
    assert lines[-2:] == [b".", b""]
    fields = lines[0].split(b"\t")
    assert len(fields) == 4 and fields[0] == fn and int(fields[3]) == 1


# ------------------------------------------------------------------ workers


def test_workers_lists_every_connection():
    e = Env()
    w = e.conn()
    e.send(w, T.SET_CLIENT_ID, b"pid_42_5f2")
    e.send(w, T.CAN_DO, b"F")
    e.send(w, T.CAN_DO, b"G")
    client = e.conn(peer="10.0.0.7")
    admin = e.conn()
    assert e.cmd(b"workers", admin) == (
        b"21 127.0.0.1 pid_42_5f2 : F G\n"
        b"22 10.0.0.7 - :\n"
        b"23 127.0.0.1 - :\n"
        b".\n"
    )
    e.b.disconnect(client)
    assert b"10.0.0.7" not in e.cmd(b"workers", admin)


# ----------------------------------------------------------- prioritystatus


def test_prioritystatus_counts_queued_only():
    e = Env()
    c = e.conn()
    w = e.conn()
    e.send(w, T.CAN_DO, b"F")
    e.bg(c, b"F", t=T.SUBMIT_JOB_HIGH_BG)
    e.bg(c, b"F", t=T.SUBMIT_JOB_HIGH_BG)
    e.bg(c, b"F", t=T.SUBMIT_JOB_BG)
    e.bg(c, b"F", t=T.SUBMIT_JOB_LOW_BG)
    e.send(w, T.GRAB_JOB)  # one high is running: not counted
    e.bg(c, b"G", t=T.SUBMIT_JOB_LOW_BG)
    assert e.cmd(b"prioritystatus") == b"F\t1\t1\t1\t1\nG\t0\t0\t1\t0\n.\n"


def test_prioritystatus_skips_cancelled_jobs():
    e = Env()
    c = e.conn()
    e.bg(c, b"F")
    e.bg(c, b"F")
    assert e.cmd(b"cancel job " + h(1)) == b"OK\r\n"
    assert e.cmd(b"prioritystatus") == b"F\t0\t1\t0\t0\n.\n"
    assert e.cmd(b"status") == b"F\t1\t0\t0\n.\n"


# --------------------------------------------------------------- show jobs


def test_show_jobs():
    e = Env(durable=True)
    c = e.conn()
    w = e.conn()
    e.send(w, T.CAN_DO, FN)
    e.bg(c)  # H:test:1, durable background: queued flag 1
    e.send(c, T.SUBMIT_JOB, FN, b"", b"x")  # H:test:2, foreground: not in the store
    # A pending (uncommitted) job is not shown.
    e.send(c, T.SUBMIT_JOB_BG, FN, b"", b"x")
    e.b.take_outbox()
    assert e.cmd(b"show jobs") == b"H:test:1\t0\t0\t1\nH:test:2\t0\t0\t0\n.\n"
    # A job whose worker died counts a retry.
    e.send(w, T.GRAB_JOB)
    e.b.disconnect(w)
    assert e.cmd(b"show jobs").startswith(b"H:test:1\t1\t0\t1\n")
    assert e.cmd(b"SHOW JOBS") == e.cmd(b"show jobs")


def test_show_unique_jobs():
    e = Env()
    c = e.conn()
    e.bg(c, unique=b"atom-1")
    e.bg(c, unique=b"atom-2")
    e.bg(c, unique=b"")  # as gearmand 1.1.20 (see the interop test): an empty line
    assert e.cmd(b"show unique jobs") == b"atom-1\natom-2\n\n.\n"


def test_show_bad_arguments():
    e = Env()
    assert e.cmd(b"show") == b"ERR UNKNOWN_COMMAND Unknown+server+commandshow\r\n"
    assert e.cmd(b"show stuff") == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"
    assert e.cmd(b"show unique things") == b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"


# -------------------------------------------------------------- cancel job


def test_cancel_job():
    e = Env()
    c = e.conn()
    w = e.conn()
    e.send(w, T.CAN_DO, FN)
    e.send(c, T.SUBMIT_JOB, FN, b"", b"x")
    e.bg(c)
    assert e.cmd(b"cancel job " + h(1)) == b"OK\r\n"
    assert list(Decoder(expect_requests=False).events(e.take(c))) == [
        Packet(T.WORK_FAIL, (h(1),), False)]
    assert e.cmd(b"cancel job " + h(1)) == b"ERR UNKNOWN_JOB\r\n"
    assert e.cmd(b"cancel job H:test:999") == b"ERR UNKNOWN_JOB\r\n"
    assert e.cmd(b"cancel job " + h(2) + b" now") == b"ERR UNKNOWN_ERROR\r\n"
    assert e.cmd(b"cancel jobs " + h(2)) == b"ERR UNKNOWN_ERROR\r\n"
    assert e.cmd(b"cancel") == b"ERR UNKNOWN_COMMAND Unknown+server+commandcancel\r\n"
    assert e.cmd(b"status") == b"reverse\t1\t0\t1\n.\n"


# ------------------------------------------------------ create/drop function


def test_create_function():
    e = Env()
    assert e.cmd(b"create function F") == b"OK\r\n"
    assert e.cmd(b"status") == b"F\t0\t0\t0\n.\n"
    assert e.cmd(b"create function F") == b"OK\r\n"
    assert e.cmd(b"status") == b"F\t0\t0\t0\n.\n"
    assert e.cmd(b"create") == (
        b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+create\r\n"
    )


def test_drop_function():
    e = Env()
    e.cmd(b"create function F")
    assert e.cmd(b"drop function F") == b"OK\r\n"
    assert e.cmd(b"status") == b".\n"
    assert e.cmd(b"drop function F") == b"ERR function not found\r\n"
    w = e.conn()
    e.send(w, T.CAN_DO, b"G")
    assert e.cmd(b"drop function G") == (
        b"ERR there are still connected workers or executing clients\r\n")
    assert e.cmd(b"drop") == (
        b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+drop\r\n"
    )


# ----------------------------------------------------------------- maxqueue


def test_maxqueue():
    e = Env()
    c = e.conn()
    e.cmd(b"create function F")
    assert e.cmd(b"maxqueue F 1") == b"OK\r\n"
    assert e.b.functions[b"F"].max_queue == 1
    e.bg(c, b"F")
    e.b.handle(c, Packet(T.SUBMIT_JOB_BG, (b"F", b"", b"x")))
    assert b"Job queue is full" in e.take(c)
    # Missing, zero or negative N: unlimited.
    assert e.cmd(b"maxqueue F") == b"OK\r\n"
    assert e.b.functions[b"F"].max_queue == 0
    assert e.cmd(b"maxqueue F -3") == b"OK\r\n"
    assert e.b.functions[b"F"].max_queue == 0
    assert e.cmd(b"maxqueue F 0") == b"OK\r\n"
    assert e.b.functions[b"F"].max_queue == 0


def test_maxqueue_unknown_function_is_ok_and_creates_nothing():
    e = Env()
    assert e.cmd(b"maxqueue nosuch 5") == b"OK\r\n"
    assert b"nosuch" not in e.b.functions
    assert e.cmd(b"status") == b".\n"


def test_maxqueue_without_arguments():
    assert Env().cmd(b"maxqueue") == (
        b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+maxqueue"
        b"\r\n"
    )


# ------------------------------------------------------ small commands


def test_getpid():
    assert Env().cmd(b"getpid") == b"OK %d\n" % os.getpid()


def test_version():
    reply = Env().cmd(b"version")
    assert reply.startswith(b"OK 1.1.20")
    assert reply.endswith(b"\n") and not reply.endswith(b"\r\n")
    assert reply.count(b"\n") == 1


def test_verbose():
    assert Env().cmd(b"verbose") == b"OK ERROR\n"
    assert Env(admin=Admin(verbose="INFO")).cmd(b"verbose") == b"OK INFO\n"


def test_unknown_command():
    assert Env().cmd(b"frobnicate") == b"ERR UNKNOWN_COMMAND Unknown+server+commandfrobnicate\r\n"
    assert Env().cmd(b"frobnicate now") == (
        b"ERR UNKNOWN_COMMAND Unknown+server+commandfrobnicate\r\n")


def test_empty_line():
    assert Env().cmd(b"") == b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"
    assert Env().cmd(b"   ") == b"ERR UNKNOWN_COMMAND Unknown+server+command\r\n"


# ----------------------------------------------------------------- shutdown


def test_shutdown_only_from_loopback():
    calls: list[bool] = []
    e = Env(admin=Admin(on_shutdown=calls.append))
    remote = e.conn(peer="10.0.0.9")
    reply = e.cmd(b"shutdown", remote)
    assert reply.startswith(b"ERR ") and reply.endswith(b"\r\n")
    assert calls == []
    # IPv4-mapped non-loopback addresses are remote too.
    assert e.cmd(b"shutdown", e.conn(peer="::ffff:10.0.0.9")).startswith(b"ERR ")
    assert calls == []
    local = e.conn()
    assert e.cmd(b"shutdown graceful", local) == b"OK\r\n"
    assert e.cmd(b"shutdown", local) == b"OK\r\n"
    assert calls == [True, False]
    assert e.cmd(b"shutdown now", local) == (
        b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+shutdown"
        b"\r\n")
    assert calls == [True, False]


# ---------------------------------------------------------- atomnode extras


def test_atomnode_status_json_shape():
    e = Env(admin=Admin(extra_status=lambda: {"pools": [{"name": "atom"}],
                                              "queue": {"store_pending": 3}}))
    e.b.set_concurrency([("moves", ["arObjectMoveJob"], 1)])
    c = e.conn()
    w = e.conn()
    e.send(w, T.CAN_DO, b"F")
    e.bg(c, b"F")
    e.bg(c, b"F")
    e.send(w, T.GRAB_JOB)
    reply = e.cmd(b"atomnode-status")
    assert reply.endswith(b"\n.\n") and reply.count(b"\n") == 2
    doc = json.loads(reply[:-3])
    assert doc["version"] == __version__
    assert doc["pid"] == os.getpid()
    assert 59 <= doc["uptime"] <= 3600
    assert doc["listen"] == ["127.0.0.1:4730", "::1:4730"]
    q = doc["queue"]
    assert (q["queued"], q["running"], q["scheduled"], q["durable"]) == (1, 1, 0, False)
    assert q["store_pending"] == 3 and q["store_healthy"] is True  # merged, not replaced
    assert doc["connections"] == 3
    assert doc["functions"] == [
        {"name": "F", "job_class": "F", "site": None, "queued": 1, "running": 1, "workers": 1,
         "max_queue": 0}]
    assert doc["concurrency"] == [
        {"name": "moves", "max": 1, "running": 0, "functions": ["arObjectMoveJob"]}]
    assert doc["pools"] == [{"name": "atom"}]
    assert doc["handlers"] == []
    assert doc["stats"]["submitted"] == 2


def test_atomnode_jobs_list():
    e = Env()
    c = e.conn()
    w = e.conn()
    e.send(w, T.SET_CLIENT_ID, b"pid_9_x")
    e.send(w, T.CAN_DO, b"F")
    e.bg(c, b"F", unique=b"u1")
    e.bg(c, b"F", t=T.SUBMIT_JOB_LOW_BG)
    e.send(w, T.GRAB_JOB)
    text = e.cmd(b"atomnode-jobs list")
    lines = text.split(b"\n")
    assert lines[-2:] == [b".", b""]
    rows = [ln.split(b"\t") for ln in lines[:-2]]
    assert [r[:4] for r in rows] == [
        [h(1), b"F", b"running", b"normal"],
        [h(2), b"F", b"queued", b"low"],
    ]
    assert [r[5:] for r in rows] == [[b"1", b"pid_9_x"], [b"0", b"None"]]
    reply = e.cmd(b"atomnode-jobs list json")
    assert reply.endswith(b"\n.\n")
    docs = json.loads(reply[:-3])
    assert [(d["handle"], d["unique"], d["state"], d["worker"], d["background"])
            for d in docs] == [
        ("H:test:1", "u1", "running", "pid_9_x", True),
        ("H:test:2", "", "queued", None, True),
    ]


def test_atomnode_jobs_other_commands_go_to_the_hook():
    e = Env()
    assert e.cmd(b"atomnode-jobs retry H:test:1") == b"ERR UNAVAILABLE no+durable+queue\r\n"
    seen = []

    def hook(conn, args):
        seen.append(args)
        return b"OK\r\n"

    e2 = Env(admin=Admin(jobs_command=hook))
    assert e2.cmd(b"atomnode-jobs retry H:test:1") == b"OK\r\n"
    assert seen == [[b"retry", b"H:test:1"]]
