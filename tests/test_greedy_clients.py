"""Nobody's greed is another's problem (issue 10, points 8-10), against the real daemon.

Sizes are modest (limits of a few MiB) so the tests are fast, but each one is chosen so
that, without the bound, the daemon would hold several times the limit; the figures are
read from the daemon itself (``atomnode-status`` buffers, /proc VmRSS and VmHWM).
bench/greedy.py measures the same things at full size.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

from daemon_harness import Client, Daemon, Worker

from atomnode.gearman.protocol import HEADER, REQ, T, encode
from atomnode.gearman.server import COALESCE_ROUNDS

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def _wait(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)  # polling the daemon from outside: no event to wait on


def _vm(pid: int, field: str) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(field)


def _slow_reader(port: int) -> socket.socket:
    """A connection that reads nothing and keeps a tiny receive buffer (no autotuning),
    so what the daemon sends it piles up in the daemon."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    return s


def _closed_by_peer(s: socket.socket, timeout: float = 20.0) -> bool:
    """Drain ``s`` until the daemon closes it (True) or nothing comes for ``timeout``."""
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(1 << 20):
                return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


LIMITS = ("max_packet_size: 1MiB\n"
          "limits:\n  output_per_connection: 2MiB\n  output_total: 6MiB\n"
          "  input_total: 4MiB\n")


# ------------------------------------------------------------------ point 8: output
def test_a_client_that_does_not_read_is_closed_at_its_limit(tmp_path: Path) -> None:
    """Results streamed (WORK_DATA) to a client that reads nothing: closed as soon as its
    unread replies pass output_per_connection; the worker and others carry on."""
    d = Daemon(tmp_path, config=LIMITS).start()
    try:
        fn = b"greedy-out"
        slow = _slow_reader(d.port)
        slow.sendall(encode(T.SUBMIT_JOB, fn, b"u1", b"x", request=True))
        w = Worker(d.port, fn)
        job = w.grab()
        assert job is not None
        handle = job.args[0]
        chunk = b"d" * (512 * 1024)
        for _ in range(40):  # 20 MiB, 10x the limit
            w.send(T.WORK_DATA, handle, chunk)
        w.send(T.ECHO_REQ, b"still here")
        assert w.expect(T.ECHO_RES).args[0] == b"still here"
        _wait(lambda: "does not read its replies" in d.log(), "the close")
        line = next(x for x in d.log().splitlines() if "does not read its replies" in x)
        unread = int(line.split("(")[1].split()[0])
        # Closed at the first write that passes the limit: it holds what was unread
        # before (at most the limit) plus that one write, which carries the replies of
        # up to 1 + COALESCE_ROUNDS rounds (a 512 KiB chunk completes in a round at most).
        assert 2 * MiB < unread <= 2 * MiB + (1 + COALESCE_ROUNDS) * (512 * 1024 + 64), line
        assert _closed_by_peer(slow)
        assert d.atomnode_status()["buffers"]["output"] == 0
        w.send(T.WORK_COMPLETE, handle, b"")
        w.close()
    finally:
        assert d.stop() == 0


def test_unread_replies_are_bounded_in_total(tmp_path: Path) -> None:
    """Twelve clients submit and never read, while a worker streams results to all of
    them: without a total they would hold 12 x 2 MiB; the daemon closes the greediest
    until the total is under output_total (6 MiB) and never holds more than that."""
    d = Daemon(tmp_path, config=LIMITS).start()
    try:
        fn = b"greedy-total"
        readers = []
        for i in range(12):
            s = _slow_reader(d.port)
            s.sendall(encode(T.SUBMIT_JOB, fn, b"t%d" % i, b"x", request=True))
            readers.append(s)
        w = Worker(d.port, fn)
        handles = []
        for _ in range(12):
            job = w.grab()
            assert job is not None
            handles.append(job.args[0])
        chunk = b"t" * (256 * 1024)
        for _ in range(8):  # 2 MiB to each of the 12 clients
            for h in handles:
                w.send(T.WORK_DATA, h, chunk)
            w.send(T.ECHO_REQ, b"sync")
            w.expect(T.ECHO_RES)
            assert d.atomnode_status()["buffers"]["output"] <= 6 * MiB
        assert "all connections together hold more than the limit" in d.log()
        closed = sum(_closed_by_peer(s, timeout=0.5) for s in readers)
        assert closed >= 12 - 6 // 2, closed  # each kept one holds at least its share
        for h in handles:
            w.send(T.WORK_COMPLETE, h, b"")
        w.close()
    finally:
        assert d.stop() == 0


def test_a_client_pipelining_without_reading_waits_for_itself(tmp_path: Path) -> None:
    """ECHO_REQs pipelined by a client that reads nothing: the daemon stops reading it
    once about a MiB of its replies is unread, so it holds no more than that (and the
    client is not closed: it is only slow)."""
    d = Daemon(tmp_path, config=LIMITS).start()
    try:
        s = _slow_reader(d.port)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
        s.settimeout(3.0)
        payload = encode(T.ECHO_REQ, b"e" * 65536, request=True)
        sent = 0
        try:
            for _ in range(400):  # 25 MiB offered
                s.sendall(payload)
                sent += len(payload)
        except TimeoutError:
            pass  # the daemon stopped reading us: that is the point
        assert sent < 24 * MiB
        buffers = d.atomnode_status()["buffers"]
        assert buffers["output"] <= 1 * MiB + 512 * 1024, buffers
        assert buffers["input"] <= 256 * 1024 + len(payload), buffers
        assert "does not read its replies" not in d.log()
        s.close()
    finally:
        assert d.stop() == 0


def test_memory_is_given_back_after_greedy_clients_leave(tmp_path: Path) -> None:
    """Eight clients each get a 24 MiB reply they do not read (192 MiB held, within the
    configured limits); once they leave, RSS is back near its value before the load
    within 10 s (the issue's bound: 100 MiB; measured much closer)."""
    config = ("max_packet_size: 32MiB\nlimits:\n  output_per_connection: 40MiB\n"
              "  output_total: 320MiB\n  input_total: 320MiB\n")
    d = Daemon(tmp_path, config=config).start()
    try:
        pid = d.proc.pid
        d.atomnode_status()
        before = _vm(pid, "VmRSS")
        clients = []
        body = b"m" * (24 * MiB)
        for _ in range(8):
            s = _slow_reader(d.port)
            s.sendall(encode(T.ECHO_REQ, body, request=True))
            clients.append(s)
        _wait(lambda: d.atomnode_status()["buffers"]["output"] > 8 * 20 * MiB, "replies held")
        peak = _vm(pid, "VmRSS")
        assert peak - before > 150 * MiB  # the load is real
        for s in clients:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            s.close()  # reset: nothing more is read
        t0 = time.monotonic()
        _wait(lambda: d.atomnode_status()["buffers"]["output"] == 0, "buffers freed", timeout=10)
        _wait(lambda: _vm(pid, "VmRSS") - before < 32 * MiB, "RSS back", timeout=10)
        back_after = time.monotonic() - t0
        assert back_after < 10.0
        print(f"\nRSS before {before / MiB:.0f} MiB, loaded {peak / MiB:.0f} MiB, "
              f"{_vm(pid, 'VmRSS') / MiB:.0f} MiB {back_after:.1f} s after they left")
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------------- point 8: input
def test_unfinished_packets_are_bounded_in_total(tmp_path: Path) -> None:
    """Six connections each send most of a 1 MiB packet and stop: 6 x ~0.9 MiB of
    unfinished input; the total is kept under input_total (4 MiB) by closing the ones
    holding the most, and a complete request on another connection is still served."""
    d = Daemon(tmp_path, config=LIMITS).start()
    try:
        conns = []
        body = 1000 * 1024
        for _ in range(6):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(HEADER.pack(REQ, T.ECHO_REQ, body) + b"p" * (body - 10))
            conns.append(s)
            with d.client() as c:  # a round trip: the daemon has read the bytes above
                assert c.admin("version").startswith(b"OK")
        buffers = d.atomnode_status()["buffers"]
        assert buffers["input"] <= 4 * MiB, buffers
        assert buffers["input"] >= 3 * (body - 10), buffers
        assert "unfinished input packets" in d.log()
        closed = sum(_closed_by_peer(s, timeout=0.5) for s in conns)
        assert closed == 6 - 4, closed
        with Client(d.port) as c:
            c.send(T.ECHO_REQ, b"ok")
            assert c.expect(T.ECHO_RES).args[0] == b"ok"
        for s in conns:
            s.close()
        _wait(lambda: d.atomnode_status()["buffers"]["input"] == 0, "input released")
    finally:
        assert d.stop() == 0


# ------------------------------------------------------------------- point 10
def test_idle_connections_that_never_finish_a_packet_cost_little(tmp_path: Path) -> None:
    """1,000 connections, each holding an unfinished header or admin line: a few KiB of
    daemon memory each, and the daemon serves everybody else as before."""
    d = Daemon(tmp_path).start()
    n = 1000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < n + 200:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, n + 500), hard))
    conns = []
    try:
        pid = d.proc.pid
        # Warm up: the first connections allocate the daemon's own structures.
        for _ in range(50):
            conns.append(socket.create_connection(("127.0.0.1", d.port)))
        d.atomnode_status()
        before = _vm(pid, "VmRSS")
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", d.port))
            s.sendall(b"\0REQ\0\0\0\x07" if i % 2 else b"stat")
            conns.append(s)
        doc = d.atomnode_status()
        assert doc["connections"] >= n + 50
        assert doc["buffers"]["input"] == n // 2 * 8 + n // 2 * 4
        per_conn = (_vm(pid, "VmRSS") - before) / n
        print(f"\n{per_conn / 1024:.2f} KiB of daemon RSS per idle unfinished connection")
        assert per_conn < 4 * 1024, per_conn
        with Client(d.port) as c:
            c.send(T.ECHO_REQ, b"fine")
            assert c.expect(T.ECHO_RES).args[0] == b"fine"
    finally:
        for s in conns:
            s.close()
        assert d.stop() == 0


def test_running_out_of_file_descriptors_is_logged_once(tmp_path: Path) -> None:
    """With its descriptors exhausted the daemon says so once (not ten times a second)
    and accepts again as soon as connections close."""

    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    d = Daemon(tmp_path, preexec_fn=low_fd_limit).start()
    conns = []
    try:
        for _ in range(80):
            conns.append(socket.create_connection(("127.0.0.1", d.port)))
        _wait(lambda: "cannot accept connections" in d.log(), "the EMFILE message")
        # The daemon retries every 100 ms; over 1.5 s the old code logged 15 lines.
        time.sleep(1.5)  # an observation window: we assert nothing more was logged in it
        assert d.log().count("cannot accept connections") == 1
        assert "Too many open files" in d.log()
        for s in conns:
            s.close()
        conns = []
        with Client(d.port) as c:
            assert c.admin("version").startswith(b"OK")
    finally:
        for s in conns:
            s.close()
        assert d.stop() == 0


# ------------------------------------------------------------------- point 9
def test_admin_floods_do_not_stall_workers(tmp_path: Path) -> None:
    """20,000 jobs queued; three clients flood ``show jobs`` (reading it all),
    GET_STATUS_UNIQUE, and ``atomnode-jobs list json`` + ``prioritystatus`` (reading
    nothing). No I/O round of the daemon takes over 20 ms of CPU, a worker's GRAB_JOB p99
    stays under 100 ms, the daemon's buffers stay bounded, and a listing is whole."""
    d = Daemon(tmp_path, config="log_level: warning\n", preexec_fn=lambda: os.nice(-5)).start()
    fn = b"fair"
    floods = []
    try:
        queued = 20000
        with d.client() as c:
            batch = b"".join(encode(T.SUBMIT_JOB_BG, fn, b"u%d" % i, b"x", request=True)
                             for i in range(queued))
            c.sock.sendall(batch)
            for _ in range(queued):
                c.expect(T.JOB_CREATED)
        before = d.atomnode_status()["loop"]["slow_rounds"]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        for kind in ("show", "status", "deaf"):
            floods.append(subprocess.Popen(
                [sys.executable, str(HERE / "greedy_flood.py"), str(d.port), kind], env=env,
                preexec_fn=lambda: os.nice(10)))
        _wait(lambda: d.atomnode_status()["connections"] >= 4, "the flooders")
        # The worker, like the daemon, runs ahead of the flooders (nice): what is measured
        # is what the floods cost inside the daemon, not this machine's other load. A
        # shared machine still stalls any process now and then: the best of up to three
        # runs of 1,000 grabs counts, and the daemon's own CPU per round is asserted
        # exactly (it does not depend on the machine's load).
        p99s = []
        for _ in range(3):
            lat = json.loads(subprocess.run(
                [sys.executable, str(HERE / "greedy_flood.py"), str(d.port), "grab",
                 fn.decode(), "1000"], env=env, preexec_fn=lambda: os.nice(-5), check=True,
                capture_output=True, timeout=120).stdout)
            lat.sort()
            p99s.append(lat[int(len(lat) * 0.99)])
            if p99s[-1] < 0.100:
                break
        doc = d.atomnode_status()
        for p in floods:
            assert p.poll() is None, "a flooder died"
        p99 = min(p99s)
        print(f"\nGRAB_JOB under admin floods: median {statistics.median(lat) * 1000:.1f} ms,"
              f" p99 {p99 * 1000:.1f} ms (runs: {[round(x * 1000) for x in p99s]});"
              f" {doc['buffers']}; {doc['loop']}")
        assert doc["loop"]["slow_rounds"] == before, doc["loop"]
        assert doc["loop"]["longest_round_ms"] < 20, doc["loop"]
        assert p99 < 0.100, p99s
        assert doc["buffers"]["output"] < 2 * MiB, doc["buffers"]
        with d.client() as c:
            listing = c.admin("show jobs")
        assert listing.count(b"\n") == queued - 1000 * len(p99s) + 1
    finally:
        for p in floods:
            p.kill()
            p.wait()
        assert d.stop() == 0


def test_get_status_unique_is_a_lookup(tmp_path: Path) -> None:
    """GET_STATUS_UNIQUE costs the same with 20 and with 20,000 jobs queued."""
    d = Daemon(tmp_path, config="log_level: warning\n").start()
    fn = b"lookup"
    try:
        def timed(c: Client, n: int = 2000) -> float:
            pkt = encode(T.GET_STATUS_UNIQUE, b"u7", request=True)
            t0 = time.perf_counter()
            c.sock.sendall(pkt * n)
            for _ in range(n):
                p = c.expect(T.STATUS_RES_UNIQUE)
            assert p.args[:2] == (b"u7", b"1")
            return (time.perf_counter() - t0) / n

        with d.client() as c:
            for i in range(20):
                c.submit_bg(fn, b"u%d" % i, b"x")
            small = min(timed(c) for _ in range(3))
            batch = b"".join(encode(T.SUBMIT_JOB_BG, fn, b"v%d" % i, b"x", request=True)
                             for i in range(20000))
            c.sock.sendall(batch)
            for _ in range(20000):
                c.expect(T.JOB_CREATED)
            large = min(timed(c) for _ in range(3))
        print(f"\nGET_STATUS_UNIQUE: {small * 1e6:.0f} us with 20 queued, "
              f"{large * 1e6:.0f} us with 20,020 queued")
        # A scan of 20,000 jobs costs ~1 ms; a lookup a few us whatever the queue.
        assert large < small * 3 + 50e-6, (small, large)
    finally:
        assert d.stop() == 0
