"""The daemon's life as systemd and an operator see it: READY only when serving, STATUS,
WATCHDOG pings that stop when the loop is frozen, RELOADING/READY around SIGHUP, a
drained SIGTERM that exits 0, and clear refusals."""

from __future__ import annotations

import os
import signal
import socket
import time

from atomnode.gearman.protocol import T
from daemon_harness import Client, Daemon, NotifySocket


def test_systemd_notify_protocol(tmp_path):
    ns = NotifySocket(str(tmp_path / "notify.sock"))
    d = Daemon(tmp_path, env={"NOTIFY_SOCKET": ns.path, "WATCHDOG_USEC": "600000"},
               config="status_interval: 0.2\n")
    d.start(wait=False)
    try:
        ready, before = ns.wait_for("READY")
        # READY only once the port serves.
        with Client(d.port, timeout=2) as c:
            c.send(T.ECHO_REQ, b"ping")
            assert c.expect(T.ECHO_RES).args[0] == b"ping"
        assert "STATUS" in ready and "queued 0" in ready["STATUS"]
        assert all("WATCHDOG" not in m for m in before)

        # Watchdog pings at WATCHDOG_USEC/2 or faster, STATUS refreshed.
        t0 = time.monotonic()
        pings = statuses = 0
        while time.monotonic() - t0 < 1.5:
            msg = ns.recv(0.5)
            if msg:
                pings += "WATCHDOG" in msg
                statuses += "STATUS" in msg
        assert pings >= 4, pings
        assert statuses >= 3, statuses

        # A frozen daemon (its loop cannot run) sends no pings; they resume after.
        os.kill(d.proc.pid, signal.SIGSTOP)
        try:
            while ns.recv(0.05) is not None:  # drain what was already queued
                pass
            assert ns.recv(1.0) is None
        finally:
            os.kill(d.proc.pid, signal.SIGCONT)
        ns.wait_for("WATCHDOG", timeout=5)

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1.
        d.proc.send_signal(signal.SIGHUP)
        reloading, _ = ns.wait_for("RELOADING")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        ns.wait_for("READY")

        # SIGTERM: STOPPING=1, exit 0.
        d.proc.send_signal(signal.SIGTERM)
        ns.wait_for("STOPPING")
        assert d.proc.wait(15) == 0
    finally:
        if d.proc.poll() is None:
            d.proc.kill()
        ns.close()


def test_no_notify_socket_is_fine(tmp_path):
    d = Daemon(tmp_path, notify=False).start()
    assert d.stop() == 0
    assert "ready" in d.log()


def test_sigterm_drains_running_jobs_before_exit(tmp_path):
    """SIGTERM: no new jobs are handed out, the worker finishes the job it holds, the
    waiting client gets its result, then the daemon exits 0."""
    d = Daemon(tmp_path, config="shutdown_timeout: 20\n").start()
    client = d.client()
    client.send(T.SUBMIT_JOB, b"slow", b"", b"work")
    handle = client.expect(T.JOB_CREATED).args[0]
    with d.client() as c:
        c.submit_bg(b"other", b"queued-one", b"later")
    w = d.worker(b"slow")
    p = w.grab()
    assert p is not None and p.args[0] == handle
    d.proc.send_signal(signal.SIGTERM)
    # Stopped accepting new connections...
    deadline = time.monotonic() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", d.port), timeout=1).close()
        except ConnectionRefusedError:
            break
        assert time.monotonic() < deadline, "still accepting after SIGTERM"
        time.sleep(0.02)  # polling from outside: no event to wait on
    # ...but open connections are served: a submit is still acknowledged (durable),
    # and nothing is handed out any more.
    client.send(T.SUBMIT_JOB_BG, b"slow", b"after-term", b"x")
    client.expect(T.JOB_CREATED)
    w.send(T.GRAB_JOB_UNIQ)
    assert w.expect(T.NO_JOB, T.JOB_ASSIGN_UNIQ).type == T.NO_JOB
    assert d.proc.poll() is None
    w.complete(handle, b"finished")
    assert client.expect(T.WORK_COMPLETE).args == (handle, b"finished")
    assert d.proc.wait(15) == 0
    client.close()
    w.close()
    # The queued background job is still there after a restart.
    d.start()
    status = d.status()
    assert status["other"][0] == 1 and status["slow"][0] == 1
    d.stop()


def test_port_in_use_is_explained(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        rc, log = Daemon(tmp_path, port=port).run_to_exit()
    finally:
        blocker.close()
    assert rc == 1
    assert f"127.0.0.1:{port}" in log and "already in use" in log


def test_admin_shutdown_from_loopback(tmp_path):
    d = Daemon(tmp_path).start()
    with d.client() as c:
        assert c.admin("shutdown graceful") == b"OK\r\n"
    assert d.proc.wait(15) == 0


def test_bad_input_costs_one_connection_only(tmp_path):
    """Garbage, a response-magic request, an oversized header: each closes its own
    connection with an ERROR; a client and a worker on other connections carry on."""
    d = Daemon(tmp_path).start()
    w = d.worker(b"steady")
    c = d.client()
    for garbage in (b"\0RES\0\0\0\x07\0\0\0\0", b"\0REQ\0\0\0\xff\0\0\0\0",
                    b"\0REQ\0\0\0\x07\xff\xff\xff\xff", b"\0XYZ" + b"\0" * 8):
        with Client(d.port) as bad:
            bad.sock.sendall(garbage)
            p = bad.expect(T.ERROR)
            assert p.args[0] in (b"INVALID_MAGIC", b"INVALID_COMMAND", b"PACKET_TOO_LARGE")
            bad.sock.settimeout(5)
            assert bad.sock.recv(100) == b""  # closed
    c.send(T.SUBMIT_JOB, b"steady", b"", b"abc")
    handle = c.expect(T.JOB_CREATED).args[0]
    p = w.grab()
    assert p is not None
    w.complete(p.args[0], b"ABC")
    assert c.expect(T.WORK_COMPLETE).args == (handle, b"ABC")
    c.close()
    w.close()
    assert d.stop() == 0


def test_writer_stall_withholds_watchdog():
    """Daemon.healthy() turns false when the SQLite writer makes no progress."""
    from atomnode.system.config import Config
    from atomnode.daemon import WRITER_STALL_LIMIT, Daemon as RealDaemon

    class FakeStore:
        last_progress = time.monotonic()

    daemon = RealDaemon(Config())
    daemon.store = FakeStore()  # type: ignore[assignment]
    assert daemon.healthy()[0] is True
    FakeStore.last_progress = time.monotonic() - WRITER_STALL_LIMIT - 1
    ok, reason = daemon.healthy()
    assert ok is False and "writer" in reason


def test_gc_keeps_start_up_frozen_and_unfreezes_only_after_a_deep_queue():
    """The collector's policy round by round: a short queue leaves start-up's freeze in
    place (unfreezing it is a full collection of the daemon's every object on the event
    loop, for objects that live as long as it does); a deep queue freezes; the queue
    short again after that unfreezes and collects once, then leaves the collector alone."""
    import gc

    from atomnode.system.config import Config
    from atomnode.daemon import Daemon as RealDaemon

    daemon = RealDaemon(Config())
    above = daemon.GC_FREEZE_ABOVE
    was_frozen = gc.get_freeze_count()
    gc.freeze()
    try:
        start_up = gc.get_freeze_count()
        assert start_up > 0
        daemon._gc_tick(0)
        daemon._gc_tick(above - 1)
        assert gc.get_freeze_count() >= start_up  # start-up's freeze stays
        daemon._gc_tick(above)
        assert daemon._gc_deep is True and gc.get_freeze_count() >= start_up
        daemon._gc_tick(above - 1)  # short again: unfrozen, collected
        assert daemon._gc_deep is False and gc.get_freeze_count() == 0
        gc.freeze()  # (stands for objects frozen later by someone else)
        daemon._gc_tick(0)
        assert gc.get_freeze_count() > 0  # no second unfreeze without a deep queue
    finally:
        gc.unfreeze()
        if was_frozen:
            gc.freeze()


def test_socket_activation_replaces_configured_listeners(tmp_path):
    """LISTEN_FDS/LISTEN_PID: the daemon serves the socket it was handed on fd 3 and
    binds nothing itself."""
    import subprocess
    import sys

    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen()
    port = lsock.getsockname()[1]
    unused = Daemon(tmp_path).port  # the configured address, which must stay unbound
    code = (
        "import os, sys; os.dup2(int(sys.argv[1]), 3); "
        "os.environ['LISTEN_FDS'] = '1'; os.environ['LISTEN_PID'] = str(os.getpid()); "
        "os.execv(sys.executable, [sys.executable, '-m', 'atomnode', 'run', "
        f"'--listen', '127.0.0.1:{unused}', '--db', {str(tmp_path / 'q.db')!r}])"
    )
    log = open(tmp_path / "act.log", "wb")
    proc = subprocess.Popen([sys.executable, "-c", code, str(lsock.fileno())],
                            pass_fds=(lsock.fileno(),), stdout=log, stderr=log)
    lsock.close()
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with Client(port, timeout=2) as c:
                    c.send(T.ECHO_REQ, b"activated")
                    assert c.expect(T.ECHO_RES).args[0] == b"activated"
                    break
            except (ConnectionError, OSError):
                assert proc.poll() is None, (tmp_path / "act.log").read_text()
                assert time.monotonic() < deadline
                time.sleep(0.05)  # polling a port: no event to wait on
        with socket.socket() as probe:
            assert probe.connect_ex(("127.0.0.1", unused)) != 0
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        log.close()


def test_listens_on_several_addresses_ipv4_and_ipv6(tmp_path):
    from daemon_harness import free_port

    with socket.socket(socket.AF_INET6) as s6:
        s6.bind(("::1", 0))
        port6 = s6.getsockname()[1]
    d = Daemon(tmp_path)
    extra = free_port()
    d.argv = lambda: [  # type: ignore[method-assign]
        *Daemon.argv(d), "--listen", f"[::1]:{port6}", "--listen", f"127.0.0.1:{extra}",
    ]
    d.start()
    for family, addr in ((socket.AF_INET, ("127.0.0.1", d.port)),
                         (socket.AF_INET6, ("::1", port6)),
                         (socket.AF_INET, ("127.0.0.1", extra))):
        with socket.socket(family) as s:
            s.settimeout(5)
            s.connect(addr)
            s.sendall(b"version\n")
            assert s.recv(100).startswith(b"OK 1.1.20")
    assert d.stop() == 0
