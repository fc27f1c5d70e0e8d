"""kill -9 campaign: acknowledged means kept, under load, across many crashes.

Starts atomnode on a fresh database on a free port of 127.0.0.1, then KILLS times: lets
clients submit background jobs (pipelined) and workers run them (GRAB_JOB_UNIQ ->
WORK_COMPLETE) for a random 0.2 to 1.2 s, kills the daemon with SIGKILL (by the PID this
script started) and restarts it on the same database. Clients and workers reconnect by
themselves. After the last kill the daemon is started once more, the submitters stop, and
the workers drain the queue. Then it reports, per unique id:

  acknowledged   the client received JOB_CREATED
  delivered      handed to a worker at least once
  duplicated     handed to a worker more than once (at-least-once delivery: a job running,
                 or finished but not yet recorded, when the daemon died runs again)
  unacked        delivered but never acknowledged (committed just before a kill took the
                 JOB_CREATED with it): allowed
  missing        acknowledged and never delivered: MUST be 0
  foreign        delivered but never submitted: MUST be 0

and prints one RESULT line (bench/run.sh format). Exit status 0 only if missing and
foreign are 0 and the final queue is empty.

    .venv/bin/python bench/killcampaign.py --kills 100 [--clients 4 --workers 2 --window 16]
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from atomnode.gearman.protocol import Decoder, T, encode  # noqa: E402

FUNC = b"bench-campaign"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Conn:
    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(expect_requests=False)

    def send(self, *packets: bytes) -> None:
        self.sock.sendall(b"".join(packets))

    def recv(self, timeout: float = 5.0):
        self.sock.settimeout(timeout)
        while True:
            ev = self.decoder.next_event()
            if ev is not None:
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("closed")
            self.decoder.feed(data)

    def close(self) -> None:
        self.sock.close()


class Campaign:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="atomnode-campaign.")
        self.db = os.path.join(self.tmp, "q.db")
        self.log = open(os.path.join(self.tmp, "daemon.log"), "ab")
        self.proc: subprocess.Popen | None = None
        self.lock = threading.Lock()
        self.sent: set[bytes] = set()
        self.acked: set[bytes] = set()
        self.refused = 0
        self.delivered: Counter[bytes] = Counter()
        self.stop_submit = threading.Event()
        self.stop_work = threading.Event()
        self.counter = 0
        self.restarts: list[float] = []

    # -- the daemon -----------------------------------------------------------------------
    def start(self) -> None:
        t0 = time.monotonic()
        self.proc = subprocess.Popen(
            [self.args.atomnode, "run", "--listen", f"127.0.0.1:{self.port}", "--db", self.db],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log,
        )
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"atomnode exited with {self.proc.returncode}; log in {self.tmp}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    break
            except OSError:
                time.sleep(0.02)
        self.restarts.append(time.monotonic() - t0)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(30)

    # -- load -----------------------------------------------------------------------------
    def connect(self, stop: threading.Event) -> Conn | None:
        while not stop.is_set():
            try:
                return Conn(self.port)
            except OSError:
                time.sleep(0.02)
        return None

    def submitter(self, k: int) -> None:
        window = self.args.window
        while not self.stop_submit.is_set():
            c = self.connect(self.stop_submit)
            if c is None:
                return
            try:
                while not self.stop_submit.is_set():
                    batch = []
                    with self.lock:
                        for _ in range(window):
                            self.counter += 1
                            u = b"c%d-%d" % (k, self.counter)
                            self.sent.add(u)
                            batch.append(u)
                    c.send(*(encode(T.SUBMIT_JOB_BG, FUNC, u, b"payload-" + u, request=True)
                             for u in batch))
                    for u in batch:
                        p = c.recv()
                        with self.lock:
                            if p.type == T.JOB_CREATED:
                                self.acked.add(u)
                            else:
                                self.refused += 1
            except (OSError, ConnectionError):
                pass
            finally:
                c.close()

    def worker(self) -> None:
        while not self.stop_work.is_set():
            c = self.connect(self.stop_work)
            if c is None:
                return
            try:
                c.send(encode(T.CAN_DO, FUNC, request=True))
                while not self.stop_work.is_set():
                    c.send(encode(T.GRAB_JOB_UNIQ, request=True))
                    p = c.recv()
                    if p.type == T.JOB_ASSIGN_UNIQ:
                        handle, _f, unique, _data = p.args
                        with self.lock:
                            self.delivered[unique] += 1
                        c.send(encode(T.WORK_COMPLETE, handle, b"ok", request=True))
                    elif p.type == T.NO_JOB:
                        c.send(encode(T.PRE_SLEEP, request=True))
                        try:
                            c.recv(timeout=0.5)  # NOOP
                        except TimeoutError:
                            pass
            except (OSError, ConnectionError):
                pass
            finally:
                c.close()

    def queued(self) -> int:
        c = Conn(self.port)
        try:
            c.sock.sendall(b"status\n")
            buf = b""
            while not buf.endswith(b".\n"):
                chunk = c.sock.recv(65536)
                if not chunk:
                    break
                buf += chunk
        finally:
            c.close()
        for line in buf.decode().splitlines():
            parts = line.split("\t")
            if parts[0] == FUNC.decode():
                return int(parts[1])
        return 0

    # -- the campaign ---------------------------------------------------------------------
    def run(self) -> int:
        a = self.args
        rng = random.Random(a.seed)
        self.start()
        subs = [threading.Thread(target=self.submitter, args=(k,), daemon=True)
                for k in range(a.clients)]
        works = [threading.Thread(target=self.worker, daemon=True) for _ in range(a.workers)]
        for t in subs + works:
            t.start()
        t_start = time.monotonic()
        for k in range(a.kills):
            time.sleep(rng.uniform(0.2, 1.2))
            self.kill()
            if (k + 1) % 10 == 0:
                with self.lock:
                    print(f"{k + 1} kills: {len(self.acked)} acknowledged, "
                          f"{len(self.delivered)} delivered so far", file=sys.stderr)
            self.start()
        self.stop_submit.set()
        for t in subs:
            t.join(30)
        deadline = time.monotonic() + a.drain_timeout
        while self.queued() > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        left = self.queued()
        self.stop_work.set()
        for t in works:
            t.join(30)
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(60)
        elapsed = time.monotonic() - t_start

        delivered = set(self.delivered)
        missing = self.acked - delivered
        foreign = delivered - self.sent
        duplicated = sum(1 for n in self.delivered.values() if n > 1)
        unacked = len(delivered - self.acked)
        restarts = sorted(self.restarts[1:])
        p50 = restarts[len(restarts) // 2] if restarts else 0.0
        print(
            f"RESULT workload=kill-campaign label=an/kill-campaign kills={a.kills} "
            f"acknowledged={len(self.acked)} delivered={len(delivered)} "
            f"duplicated={duplicated} unacked_delivered={unacked} missing={len(missing)} "
            f"foreign={len(foreign)} refused={self.refused} left_queued={left} "
            f"restart_p50_s={p50:.3f} restart_max_s={max(restarts, default=0):.3f} "
            f"seconds={elapsed:.1f}"
        )
        if missing:
            print(f"MISSING (acknowledged, never delivered): {sorted(missing)[:20]}",
                  file=sys.stderr)
        ok = not missing and not foreign and left == 0
        if ok and not a.keep:
            import shutil

            shutil.rmtree(self.tmp, ignore_errors=True)
        else:
            print(f"state kept in {self.tmp}", file=sys.stderr)
        return 0 if ok else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kills", type=int, default=100)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--window", type=int, default=16, help="submissions in flight per client")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--drain-timeout", type=float, default=600.0)
    p.add_argument("--keep", action="store_true", help="keep the database and log")
    p.add_argument("--atomnode", default=os.path.join(os.path.dirname(HERE), ".venv", "bin",
                                                      "atomnode"))
    return Campaign(p.parse_args()).run()


if __name__ == "__main__":
    sys.exit(main())
