"""Flooders for tests/test_greedy_clients.py, run as separate (niced) processes so that
their own CPU does not count against the daemon's latency.

    python greedy_flood.py PORT show|status|deaf
    python greedy_flood.py PORT grab FUNCTION N   (prints N GRAB_JOB latencies, JSON)
"""

from __future__ import annotations

import json
import socket
import sys
import time

from daemon_harness import Client, Worker

from atomnode.gearman.protocol import T, encode


def grab(port: int, fn: bytes, n: int) -> list[float]:
    """GRAB_JOB round trips (completing each job): seconds each."""
    out = []
    w = Worker(port, fn)
    for _ in range(n):
        t0 = time.perf_counter()
        w.send(T.GRAB_JOB)
        p = w.expect(T.JOB_ASSIGN, T.NO_JOB)
        out.append(time.perf_counter() - t0)
        if p.type == T.JOB_ASSIGN:
            w.send(T.WORK_COMPLETE, p.args[0], b"")
    w.close()
    return out


def main(port: int, kind: str, *args: str) -> None:
    if kind == "grab":
        print(json.dumps(grab(port, args[0].encode(), int(args[1]))))
    elif kind == "show":  # reads every listing, as fast as it can
        s = socket.create_connection(("127.0.0.1", port))
        while True:
            s.sendall(b"show jobs\n" * 50)
            buf = b""
            while buf.count(b"\n.\n") < 50:
                chunk = s.recv(1 << 20)
                if not chunk:
                    return
                buf += chunk
    elif kind == "status":  # pipelines GET_STATUS_UNIQUE
        c = Client(port)
        pkt = encode(T.GET_STATUS_UNIQUE, b"u12345", request=True) * 2000
        while True:
            c.sock.sendall(pkt)
            for _ in range(2000):
                c.expect(T.STATUS_RES_UNIQUE)
    elif kind == "deaf":  # asks for the biggest listings and reads nothing
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.sendall(b"atomnode-jobs list json\n" * 100 + b"prioritystatus\n" * 1000)
        time.sleep(3600)
    else:
        raise SystemExit(f"unknown flood {kind!r}")


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], *sys.argv[3:])
