#!/usr/bin/python3
"""A minimal Gearman client, worker and admin client using only the standard library.

Copied into the test container (which has only python3), where it talks to the
packaged atomnode on 127.0.0.1. Every command has a deadline and exits non-zero
with a message on stderr when it is not met.

Usage:
  gearman_helper.py submit-bg FUNC DATA [COUNT]   queue COUNT background jobs, print handles
                                                  ("{i}" in DATA becomes the job's index)
  gearman_helper.py submit FUNC DATA              run a foreground job, print its result
  gearman_helper.py work FUNC COUNT               do COUNT jobs (result: the payload
                                                  upper-cased), print each payload
  gearman_helper.py admin LINE                    send a text admin command, print the reply
  gearman_helper.py hold-port PORT                listen on 127.0.0.1:PORT until killed
Options (before the command): --host H (127.0.0.1), --port P (4730), --timeout S (20).
"""

from __future__ import annotations

import argparse
import signal
import socket
import struct
import sys
import time

REQ = b"\0REQ"
RES = b"\0RES"
# Packet types (Gearman protocol).
CAN_DO = 1
PRE_SLEEP = 4
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
NO_JOB = 10
JOB_ASSIGN = 11
WORK_COMPLETE = 13
WORK_FAIL = 14
ERROR = 19
SUBMIT_JOB_BG = 18
WORK_EXCEPTION = 25
WORK_DATA = 28
WORK_WARNING = 29
WORK_STATUS = 12


class Conn:
    """A blocking connection that sends requests and reads response packets."""

    def __init__(self, host: str, port: int, deadline: float) -> None:
        self.deadline = deadline
        self.sock = socket.create_connection((host, port), timeout=self._left())
        self.buf = b""

    def _left(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("deadline passed")
        return left

    def send(self, ptype: int, *args: bytes) -> None:
        body = b"\0".join(args)
        self.sock.sendall(REQ + struct.pack(">II", ptype, len(body)) + body)

    def _fill(self, n: int) -> None:
        while len(self.buf) < n:
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError("server closed the connection")
            self.buf += chunk

    def recv(self) -> tuple[int, bytes]:
        self._fill(12)
        magic, ptype, size = self.buf[:4], *struct.unpack(">II", self.buf[4:12])
        if magic != RES:
            raise ValueError(f"bad magic {magic!r}")
        self._fill(12 + size)
        body = self.buf[12 : 12 + size]
        self.buf = self.buf[12 + size :]
        return ptype, body

    def line_reply(self, line: str) -> str:
        """Send a text admin command; read until the '.' line (or one line for short replies)."""
        self.sock.sendall(line.encode() + b"\n")
        single = line.split()[0] in ("version", "maxqueue", "shutdown", "verbose", "getpid")
        while True:
            text = self.buf.decode(errors="replace")
            if single and "\n" in text:
                return text.split("\n", 1)[0] + "\n"
            if text == ".\n" or text.endswith("\n.\n") or text.startswith("ERR"):
                return text
            self.sock.settimeout(self._left())
            chunk = self.sock.recv(65536)
            if not chunk:
                return text
            self.buf += chunk


def submit_bg(c: Conn, func: str, data: str, count: int) -> int:
    for i in range(count):
        c.send(SUBMIT_JOB_BG, func.encode(), b"", data.replace("{i}", str(i)).encode())
        ptype, body = c.recv()
        if ptype != JOB_CREATED:
            print(f"submit-bg: expected JOB_CREATED, got type {ptype}: {body!r}", file=sys.stderr)
            return 1
        print(body.decode())
    return 0


def submit(c: Conn, func: str, data: str) -> int:
    c.send(SUBMIT_JOB, func.encode(), b"", data.encode())
    while True:
        ptype, body = c.recv()
        if ptype in (JOB_CREATED, WORK_DATA, WORK_WARNING, WORK_STATUS):
            continue
        if ptype == WORK_COMPLETE:
            sys.stdout.write(body.split(b"\0", 1)[1].decode(errors="replace"))
            return 0
        print(f"submit: job ended with type {ptype}: {body!r}", file=sys.stderr)
        return 1


def work(c: Conn, func: str, count: int) -> int:
    c.send(CAN_DO, func.encode())
    done = 0
    while done < count:
        c.send(GRAB_JOB)
        ptype, body = c.recv()
        while ptype == NOOP:  # a stale wake-up; the answer to GRAB_JOB follows
            ptype, body = c.recv()
        if ptype == NO_JOB:
            c.send(PRE_SLEEP)
            while True:
                ptype, body = c.recv()
                if ptype == NOOP:
                    break
            continue
        if ptype != JOB_ASSIGN:
            print(f"work: unexpected packet type {ptype}: {body!r}", file=sys.stderr)
            return 1
        handle, _func, data = body.split(b"\0", 2)
        print(data.decode(errors="replace"), flush=True)
        c.send(WORK_COMPLETE, handle, data.upper())
        done += 1
    return 0


def hold_port(port: int) -> int:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    # Like any server: connections of the daemon just stopped may linger in TIME_WAIT.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(1)
    print("listening", flush=True)
    signal.pause()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=4730)
    p.add_argument("--timeout", type=float, default=20.0)
    p.add_argument("command", choices=["submit-bg", "submit", "work", "admin", "hold-port"])
    p.add_argument("args", nargs="*")
    a = p.parse_args(argv)
    if a.command == "hold-port":
        return hold_port(int(a.args[0]))
    deadline = time.monotonic() + a.timeout
    try:
        c = Conn(a.host, a.port, deadline)
        if a.command == "submit-bg":
            return submit_bg(c, a.args[0], a.args[1], int(a.args[2]) if len(a.args) > 2 else 1)
        if a.command == "submit":
            return submit(c, a.args[0], a.args[1] if len(a.args) > 1 else "")
        if a.command == "work":
            return work(c, a.args[0], int(a.args[1]))
        sys.stdout.write(c.line_reply(" ".join(a.args)))
        return 0
    except (OSError, TimeoutError, ValueError) as e:
        print(f"{a.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
