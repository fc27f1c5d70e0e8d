"""systemd integration (sd_notify over a real AF_UNIX socket, watchdog and status tasks on
trio's mock clock, socket activation in a subprocess) and the journal-aware log format."""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from atomnode.system import logs, systemd
from atomnode.system.systemd import Notifier, listen_fds, status_task, watchdog_interval, watchdog_task
from daemon_harness import Daemon, NotifySocket

# ----------------------------------------------------------------------------- sd_notify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound AF_UNIX datagram socket named by $NOTIFY_SOCKET (short path: sun_path <= 108)."""
    d = tempfile.mkdtemp(prefix="an-")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    try:
        yield sock
    finally:
        sock.close()
        shutil.rmtree(d, ignore_errors=True)


def received(sock: socket.socket) -> dict[str, str]:
    data = sock.recv(4096).decode()
    assert data.endswith("\n")
    return dict(line.split("=", 1) for line in data.splitlines())


def test_ready_status_stopping_payloads(notify_socket: socket.socket) -> None:
    n = Notifier()
    assert n.enabled
    assert n.ready()
    assert received(notify_socket) == {"READY": "1"}
    assert n.status("3 queued, 1 running\nsecond line")
    assert received(notify_socket) == {"STATUS": "3 queued, 1 running second line"}
    assert n.ready(status="serving")
    assert received(notify_socket) == {"READY": "1", "STATUS": "serving"}
    assert n.watchdog()
    assert received(notify_socket) == {"WATCHDOG": "1"}
    assert n.stopping()
    assert received(notify_socket) == {"STOPPING": "1"}
    assert n.notify(errno=5, extend_timeout_usec=1000)
    assert received(notify_socket) == {"ERRNO": "5", "EXTEND_TIMEOUT_USEC": "1000"}
    n.close()


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert Notifier().reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    msg = received(notify_socket)
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"atomnode-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert Notifier().ready()
        assert received(sock) == {"READY": "1"}
    finally:
        sock.close()


def test_no_notify_socket_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert not n.ready()
    assert not n.status("x")
    assert not n.watchdog()
    assert not n.reloading()
    assert not n.stopping()


def test_send_errors_never_raise_and_are_logged_once(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    n = Notifier()
    with caplog.at_level(logging.WARNING, logger="atomnode.systemd"):
        assert not n.ready()
        assert not n.status("x")
        assert not n.watchdog()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


# ----------------------------------------------------------------------------- watchdog


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "self"}, 30.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}, None),  # someone else's
        ({"WATCHDOG_USEC": "junk"}, None),
        ({"WATCHDOG_USEC": "0"}, None),
    ],
)
def test_watchdog_interval(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], expected: float | None
) -> None:
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, str(os.getpid()) if v == "self" else v)
    assert watchdog_interval() == expected


class RecordingNotifier(Notifier):
    """Records the trio time of each message instead of sending it."""

    def __init__(self) -> None:
        super().__init__()
        self.sent: list[tuple[float, dict[str, object]]] = []

    def notify(self, **fields: object) -> bool:
        self.sent.append((trio.current_time(), fields))
        return True

    def pings(self) -> list[float]:
        return [t for t, f in self.sent if "WATCHDOG" in f]


async def test_watchdog_pings_at_the_interval_and_stops_while_unhealthy(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    n = RecordingNotifier()
    state: dict[str, object] = {"ok": True, "reason": ""}

    def healthy() -> tuple[bool, str]:
        return bool(state["ok"]), str(state["reason"])

    wd_sec = 30.0
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(watchdog_task, n, wd_sec / 3, healthy)
        await trio.sleep(35)  # pings at 10, 20, 30
        assert [t - start for t in n.pings()] == [10, 20, 30]
        state.update(ok=False, reason="store writer stalled for 60s")
        with caplog.at_level(logging.WARNING, logger="atomnode.systemd"):
            await trio.sleep(40)  # would ping at 40, 50, 60, 70
            assert len(n.pings()) == 3
            state["ok"] = True
            await trio.sleep(10)  # 80
        assert [t - start for t in n.pings()] == [10, 20, 30, 80]
        nursery.cancel_scope.cancel()
    withheld = [r for r in caplog.records if "withholding watchdog pings" in r.getMessage()]
    assert len(withheld) == 1  # once per episode, not once per tick
    assert "store writer stalled" in withheld[0].getMessage()
    assert any("pings resumed" in r.getMessage() for r in caplog.records)
    # Every gap between pings while healthy is below half of WatchdogSec.
    pings = n.pings()
    assert all(b - a <= wd_sec / 2 for a, b in itertools.pairwise(pings[:3]))


async def test_watchdog_accepts_plain_bool_and_survives_a_raising_check(
    autojump_clock: trio.testing.MockClock,
) -> None:
    n = RecordingNotifier()
    answers = iter([True, False, RuntimeError("boom"), True])

    def healthy() -> bool:
        a = next(answers)
        if isinstance(a, Exception):
            raise a
        return a

    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(watchdog_task, n, 1.0, healthy)
        await trio.sleep(4.5)
        nursery.cancel_scope.cancel()
    assert [t - start for t in n.pings()] == [1, 4]


async def test_watchdog_task_sends_real_datagrams(
    notify_socket: socket.socket, autojump_clock: trio.testing.MockClock
) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watchdog_task, Notifier(), 5.0, lambda: True)
        await trio.sleep(11)
        nursery.cancel_scope.cancel()
    assert received(notify_socket) == {"WATCHDOG": "1"}
    assert received(notify_socket) == {"WATCHDOG": "1"}


async def test_status_task_refreshes(autojump_clock: trio.testing.MockClock) -> None:
    n = RecordingNotifier()
    counter = iter(range(100))
    async with trio.open_nursery() as nursery:
        start = trio.current_time()
        nursery.start_soon(status_task, n, 5.0, lambda: f"{next(counter)} queued")
        await trio.sleep(12)
        nursery.cancel_scope.cancel()
    assert [(t - start, f["STATUS"]) for t, f in n.sent] == [
        (0, "0 queued"), (5, "1 queued"), (10, "2 queued"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- socket activation

CHILD = r"""
import json, os, socket, sys
from atomnode.system.systemd import listen_fds
socks = listen_fds()
s = socks[0]
s.settimeout(10)
conn, _ = s.accept()
conn.sendall(json.dumps({
    "n": len(socks),
    "fd": s.fileno(),
    "family": int(s.family),
    "type": int(s.type),
    "inheritable": os.get_inheritable(s.fileno()),
    "env": [k for k in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES") if k in os.environ],
}).encode())
conn.close()
"""


def test_listen_fds_takes_a_socket_passed_as_fd_3() -> None:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(5)
    port = listener.getsockname()[1]
    fd = listener.fileno()
    # The launcher moves the socket to fd 3 and sets LISTEN_PID to its own pid, which
    # exec keeps: what systemd does before starting the service.
    launcher = (
        "import os, sys; fd = int(sys.argv[1]); os.dup2(fd, 3); os.close(fd); "
        "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', LISTEN_FDNAMES='gearman'); "
        "os.execv(sys.executable, [sys.executable, '-c', sys.argv[2]])"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, str(fd), CHILD],
        pass_fds=(fd,),
        stderr=subprocess.PIPE,
    )
    try:
        listener.close()  # only the child holds it now
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
                c.settimeout(10)
                raw = c.makefile("rb").read()
        except OSError as e:
            proc.wait(10)
            pytest.fail(f"{e}; child said: {proc.stderr.read().decode() if proc.stderr else ''}")
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
        info = json.loads(raw)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()
    assert info == {
        "n": 1,
        "fd": 3,
        "family": int(socket.AF_INET),
        "type": int(socket.SOCK_STREAM),
        "inheritable": False,
        "env": [],
    }


def test_listen_fds_ignores_another_pids_sockets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert listen_fds() == []
    assert "LISTEN_FDS" not in os.environ and "LISTEN_PID" not in os.environ


def test_listen_fds_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LISTEN_PID", raising=False)
    monkeypatch.delenv("LISTEN_FDS", raising=False)
    assert listen_fds() == []


# ----------------------------------------------------------------------------- logging


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        yield root
    finally:
        for h in list(root.handlers):
            if h not in saved[0]:
                root.removeHandler(h)
        root.setLevel(saved[1])


def _log_everything() -> None:
    lg = logging.getLogger("atomnode.server")
    lg.debug("dbg")
    lg.info("hello")
    lg.warning("careful")
    lg.error("two\nlines")
    lg.critical("down")


def test_journal_format_when_stderr_is_the_journal(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    with open(tmp_path / "journal", "w+") as stream:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        logs.setup_logging("debug", stream=stream)
        _log_everything()
        stream.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines == [
        "<7>atomnode.server: dbg",
        "<6>atomnode.server: hello",
        "<4>atomnode.server: careful",
        "<3>atomnode.server: two",
        "<3>lines",
        "<2>atomnode.server: down",
    ]


def test_terminal_format_otherwise(
    root_logger: logging.Logger, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "1:2")  # someone else's stream
    with open(tmp_path / "terminal", "w+") as stream:
        logs.setup_logging("info", stream=stream)
        logs.setup_logging("warning", stream=stream)  # again: replaces, no duplicate lines
        _log_everything()
        stream.flush()
        stream.seek(0)
        lines = stream.read().splitlines()
    stamp = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d"
    assert len(lines) == 4, lines
    assert re.fullmatch(stamp + r" WARNING atomnode\.server: careful", lines[0])
    assert re.fullmatch(stamp + r" ERROR atomnode\.server: two", lines[1])
    assert lines[2] == "lines"
    assert re.fullmatch(stamp + r" CRITICAL atomnode\.server: down", lines[3])


def test_unknown_level_is_refused(root_logger: logging.Logger) -> None:
    with pytest.raises(ValueError, match="unknown log level 'loud'"):
        logs.setup_logging("loud")


def test_syslog_priorities() -> None:
    assert [logs.syslog_priority(lv) for lv in (5, 10, 20, 30, 40, 50)] == [7, 7, 6, 4, 3, 2]


def test_module_exports() -> None:
    assert systemd.LISTEN_FDS_START == 3


# ----------------------------------------------------------------------------- the real daemon


def _next_message(sock: socket.socket, want: str, seen: list[dict[str, str]]) -> dict[str, str]:
    """Read datagrams until one carries ``want``; everything read is appended to ``seen``."""
    while True:
        msg = received(sock)
        seen.append(msg)
        if want in msg:
            return msg


@contextlib.contextmanager
def running_daemon(
    tmp_path: Path, extra_config: str = "", env: dict[str, str] | None = None
) -> Iterator[tuple[subprocess.Popen[bytes], int, socket.socket, list[dict[str, str]]]]:
    """``atomnode run`` (daemon_harness.Daemon) with a NOTIFY_SOCKET read here; returns once
    it sent READY=1. Yields (process, port, notify socket, messages seen); killed at exit."""
    ns = NotifySocket()
    ns.sock.settimeout(20)
    d = Daemon(tmp_path, config=extra_config or None, env={"NOTIFY_SOCKET": ns.path, **(env or {})})
    seen: list[dict[str, str]] = []
    try:
        d.start(wait=False)
        assert d.proc is not None
        try:
            _next_message(ns.sock, "READY", seen)
        except BaseException:
            print(f"notify messages: {seen}\ndaemon output:\n{d.log()}")
            raise
        yield d.proc, d.port, ns.sock, seen
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.proc.kill()
            d.proc.wait()
        ns.close()


def test_daemon_lifecycle_over_notify_socket(tmp_path: Path) -> None:
    """READY only once the port serves, STATUS, WATCHDOG, RELOADING+READY on SIGHUP,
    STOPPING on SIGTERM, exit 0."""
    env = {"WATCHDOG_USEC": "900000"}  # pings every 0.3 s
    with running_daemon(tmp_path, "status_interval: 0.2\n", env) as (proc, port, sock, seen):
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass  # the port already serves when READY arrives
        status = _next_message(sock, "STATUS", seen)["STATUS"]
        assert "queued 0" in status
        _next_message(sock, "WATCHDOG", seen)
        _next_message(sock, "WATCHDOG", seen)
        proc.send_signal(signal.SIGHUP)
        reloading = _next_message(sock, "RELOADING", seen)
        assert int(reloading["MONOTONIC_USEC"]) > 0
        _next_message(sock, "READY", seen)
        proc.send_signal(signal.SIGTERM)
        _next_message(sock, "STOPPING", seen)
        assert proc.wait(30) == 0
