"""Greedy clients, side by side: atomnode against gearmand 1.1.20 (issue 10, points 8-10).

    .venv/bin/python bench/greedy.py              # every section, full size
    SCALE=0.1 .venv/bin/python bench/greedy.py    # smoke run
    SECTIONS="readers admin" .venv/bin/python bench/greedy.py

Each server is a fresh process on a free port of 127.0.0.1 with a fresh database, run
with its defaults (atomnode: limits.output_per_connection 96 MiB, output_total 256 MiB,
input_total 256 MiB). Memory is the server's VmRSS / VmHWM from /proc. Sections:

readers   20 clients pipeline 1 MiB ECHO_REQs (32 MiB each) and read nothing; then 20
          clients wait for foreground jobs whose worker streams them 32 MiB of WORK_DATA
          each and read nothing. Peak RSS, and RSS 10 s after they all left.
drain     N background jobs queued then drained by 4 workers: RSS before, full, and
          10 s after the queue is empty.
admin     100k jobs queued (SCALE); 300 x ``show jobs`` pipelined by one client, while a
          worker loops GRAB_JOB -> WORK_COMPLETE: the worker's p99, the server's peak RSS.
unique    GET_STATUS_UNIQUE, 100 of them, at 100k queued.
idle      5,000 connections each holding an unfinished packet header: server RSS per
          connection.

Prints a markdown table with the targets (issue 10) and PASS/FAIL; exit status 0 only if
every atomnode row passes. Results and caveats: docs/durability.md, "Greedy clients".
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from atomnode.gearman.protocol import Decoder, Packet, T, encode  # noqa: E402

MiB = 1024 * 1024
SCALE = float(os.environ.get("SCALE", "1"))
SECTIONS = os.environ.get("SECTIONS", "readers drain admin unique idle").split()
SERVERS = os.environ.get("SERVERS", "gm an").split()
GEARMAND = os.environ.get("GEARMAND", "/usr/sbin/gearmand")
ATOMNODE = os.environ.get("ATOMNODE", str(ROOT / ".venv/bin/atomnode"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def vm(pid: int, field: str = "VmRSS") -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Server:
    def __init__(self, kind: str, tmp: Path):
        self.kind = kind
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(dir=tmp))
        if kind == "gm":
            argv = [GEARMAND, "-L", "127.0.0.1", "-p", str(self.port), "-t", "1",
                    "-l", "stderr", "--verbose", "ERROR"]
        else:
            argv = [ATOMNODE, "run", "--listen", f"127.0.0.1:{self.port}",
                    "--db", str(self.dir / "q.db"), "--log-level", "warning"]
        self.log = open(self.dir / "log", "wb")
        self.proc = subprocess.Popen(argv, stdout=self.log, stderr=self.log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError(f"{kind} did not start") from None
                time.sleep(0.05)

    def rss(self) -> int:
        return vm(self.proc.pid)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


class Conn:
    def __init__(self, port: int, rcvbuf: int | None = None):
        self.sock = socket.socket()
        if rcvbuf:
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        self.sock.connect(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.dec = Decoder(expect_requests=False)

    def send(self, t: int, *args: bytes) -> None:
        self.sock.sendall(encode(t, *args, request=True))

    def recv(self, timeout: float = 120) -> Packet:
        self.sock.settimeout(timeout)
        while True:
            ev = self.dec.next_event()
            if ev is not None:
                return ev  # type: ignore[return-value]
            data = self.sock.recv(1 << 20)
            if not data:
                raise ConnectionError("closed")
            self.dec.feed(data)

    def close(self) -> None:
        self.sock.close()


def fill(port: int, fn: bytes, n: int) -> None:
    c = Conn(port)
    step = 5000
    for i in range(0, n, step):
        c.sock.sendall(b"".join(encode(T.SUBMIT_JOB_BG, fn, b"u%d" % j, b"x" * 50, request=True)
                                for j in range(i, min(n, i + step))))
        for _ in range(min(n, i + step) - i):
            c.recv()
    c.close()


def wait_rss_settles(s: Server, seconds: float = 10.0) -> int:
    time.sleep(seconds)  # the window: RSS 10 s after the load left
    return s.rss()


ROWS: list[tuple[str, str, str, str, str]] = []  # (what, gm, an, target, verdict)


def row(what: str, results: dict[str, float | None], fmt: str, target: str,
        ok: bool | None) -> None:
    def show(k: str) -> str:
        v = results.get(k)
        return "-" if v is None else fmt.format(v)

    verdict = "" if ok is None else ("PASS" if ok else "FAIL")
    ROWS.append((what, show("gm"), show("an"), target, verdict))


# ------------------------------------------------------------------ sections
def section_readers(tmp: Path) -> None:
    per = int(32 * SCALE) or 1
    peak: dict[str, float | None] = {}
    after: dict[str, float | None] = {}
    base: dict[str, float | None] = {}
    for kind in SERVERS:
        s = Server(kind, tmp)
        before = s.rss()
        base[kind] = before / MiB
        # 1) pipelined echoes nobody reads
        readers = [Conn(s.port, rcvbuf=4096) for _ in range(20)]
        body = b"e" * MiB
        pkt = encode(T.ECHO_REQ, body, request=True)

        def pump(c: Conn) -> None:
            c.sock.settimeout(5)
            try:
                for _ in range(per):
                    c.sock.sendall(pkt)
            except OSError:
                pass  # paused by the server (timeout) or closed by it

        threads = [threading.Thread(target=pump, args=(c,)) for c in readers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        # 2) results streamed to clients that read nothing
        fn = b"greedy-readers"
        clients = []
        for i in range(20):
            c = Conn(s.port, rcvbuf=4096)
            c.send(T.SUBMIT_JOB, fn, b"r%d" % i, b"x")
            clients.append(c)
        w = Conn(s.port)
        w.send(T.CAN_DO, fn)
        handles = []
        while len(handles) < 20:
            w.send(T.GRAB_JOB)
            p = w.recv()
            if p.type == T.JOB_ASSIGN:
                handles.append(p.args[0])
            else:
                time.sleep(0.01)
        chunk = b"d" * MiB
        for _ in range(per):
            for h in handles:
                w.send(T.WORK_DATA, h, chunk)
        w.send(T.ECHO_REQ, b"fence")
        while w.recv().type != T.ECHO_RES:
            pass
        peak[kind] = vm(s.proc.pid, "VmHWM") / MiB
        for c in readers + clients:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            c.close()
        for h in handles:
            w.send(T.WORK_COMPLETE, h, b"")
        after[kind] = wait_rss_settles(s) / MiB
        w.close()
        s.stop()
    offered = 2 * 20 * per
    row(f"readers: peak RSS, MiB (40 clients offered {offered} MiB of unread replies)",
        peak, "{:.0f}", "<= base + 256 (output_total) + 64",
        None if "an" not in peak else peak["an"] <= (base["an"] or 0) + 256 + 64)
    row("readers: RSS 10 s after they left, MiB above the RSS before", {
        k: (after[k] or 0) - (base[k] or 0) for k in after}, "{:+.0f}", "< 100",
        None if "an" not in after else (after["an"] or 0) - (base["an"] or 0) < 100)


def section_drain(tmp: Path) -> None:
    n = int(1_000_000 * SCALE)
    res: dict[str, dict[str, float]] = {}
    for kind in SERVERS:
        s = Server(kind, tmp)
        before = s.rss()
        fn = b"greedy-drain"
        fill(s.port, fn, n)
        full = s.rss()
        workers = [Conn(s.port) for _ in range(4)]
        done = [0]
        lock = threading.Lock()

        def work(c: Conn) -> None:
            c.send(T.CAN_DO, fn)
            while True:
                c.send(T.GRAB_JOB)
                p = c.recv()
                if p.type != T.JOB_ASSIGN:
                    return
                c.send(T.WORK_COMPLETE, p.args[0], b"")
                with lock:
                    done[0] += 1

        threads = [threading.Thread(target=work, args=(c,)) for c in workers]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        after = wait_rss_settles(s)
        res[kind] = {"before": before / MiB, "full": full / MiB, "after": after / MiB}
        for c in workers:
            c.close()
        s.stop()
    row(f"drain: RSS with {n:,} jobs queued, MiB", {k: v["full"] for k, v in res.items()},
        "{:.0f}", "", None)
    row("drain: RSS 10 s after the queue is empty, MiB above the RSS before",
        {k: v["after"] - v["before"] for k, v in res.items()}, "{:+.0f}", "< 100",
        None if "an" not in res else res["an"]["after"] - res["an"]["before"] < 100)


def section_admin(tmp: Path) -> None:
    n = int(100_000 * SCALE)
    p99: dict[str, float | None] = {}
    peak: dict[str, float | None] = {}
    for kind in SERVERS:
        s = Server(kind, tmp)
        fn = b"greedy-admin"
        fill(s.port, fn, n)
        flood = socket.create_connection(("127.0.0.1", s.port))
        stop = threading.Event()

        def read_all() -> None:
            flood.settimeout(0.5)
            while not stop.is_set():
                try:
                    if not flood.recv(1 << 20):
                        return
                except OSError:
                    continue

        reader = threading.Thread(target=read_all)
        reader.start()
        flood.sendall(b"show jobs\n" * 300)
        w = Conn(s.port)
        w.send(T.CAN_DO, fn)
        lat = []
        t_end = time.monotonic() + 5
        while time.monotonic() < t_end:
            t0 = time.perf_counter()
            w.send(T.GRAB_JOB)
            p = w.recv()
            lat.append(time.perf_counter() - t0)
            if p.type == T.JOB_ASSIGN:
                w.send(T.WORK_COMPLETE, p.args[0], b"")
        lat.sort()
        p99[kind] = lat[int(len(lat) * 0.99)] * 1000
        peak[kind] = vm(s.proc.pid, "VmHWM") / MiB
        stop.set()
        reader.join()
        flood.close()
        w.close()
        s.stop()
    row(f"admin: worker GRAB_JOB p99, ms, during 300 x show jobs at {n:,} queued", p99,
        "{:.1f}", "< 100", None if "an" not in p99 else (p99["an"] or 0) < 100)
    row("admin: peak RSS, MiB", peak, "{:.0f}", "", None)


def section_unique(tmp: Path) -> None:
    n = int(100_000 * SCALE)
    res: dict[str, float | None] = {}
    for kind in SERVERS:
        s = Server(kind, tmp)
        fill(s.port, b"greedy-unique", n)
        c = Conn(s.port)
        best = float("inf")
        for _ in range(5):
            t0 = time.perf_counter()
            c.sock.sendall(b"".join(encode(T.GET_STATUS_UNIQUE, b"u%d" % (i * 997 % n),
                                           request=True) for i in range(100)))
            for _ in range(100):
                c.recv()
            best = min(best, time.perf_counter() - t0)
        res[kind] = best * 1000
        c.close()
        s.stop()
    row(f"unique: 100 x GET_STATUS_UNIQUE at {n:,} queued, ms", res, "{:.2f}",
        "O(1): <= 2 x gearmand + 1", None if "an" not in res else
        (res["an"] or 0) <= 2 * (res.get("gm") or 1) + 1)


def section_idle(tmp: Path) -> None:
    n = int(5000 * max(SCALE, 0.2))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, n + 1000)), hard))
    res: dict[str, float | None] = {}
    for kind in SERVERS:
        s = Server(kind, tmp)
        warm = [socket.create_connection(("127.0.0.1", s.port)) for _ in range(100)]
        time.sleep(0.5)
        before = s.rss()
        conns = []
        for _ in range(n):
            c = socket.create_connection(("127.0.0.1", s.port))
            c.sendall(b"\0REQ\0\0\0\x10")
            conns.append(c)
        time.sleep(1.0)
        res[kind] = (s.rss() - before) / n / 1024
        for c in conns + warm:
            c.close()
        s.stop()
    row(f"idle: RSS per connection holding an unfinished header, KiB ({n:,})", res,
        "{:.2f}", "< 4", None if "an" not in res else (res["an"] or 0) < 4)


def main() -> int:
    if "gm" in SERVERS and not Path(GEARMAND).exists():
        print(f"{GEARMAND} not found; SERVERS=an to run atomnode alone", file=sys.stderr)
        return 2
    tmp = Path(tempfile.mkdtemp(prefix="atomnode-greedy."))
    try:
        for name in SECTIONS:
            print(f"# section {name} ...", file=sys.stderr, flush=True)
            globals()[f"section_{name}"](tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nGreedy clients (SCALE={SCALE:g}), gm = gearmand 1.1.20 -t 1, an = atomnode\n")
    print("| what | gm | an | target (an) | |")
    print("|---|---|---|---|---|")
    for r in ROWS:
        print("| " + " | ".join(r) + " |")
    print("\nJSON " + json.dumps(ROWS))
    return 0 if all(r[4] != "FAIL" for r in ROWS) else 1


if __name__ == "__main__":
    sys.exit(main())
