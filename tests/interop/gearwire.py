"""A tiny, independent Gearman wire client for the interop tests (blocking sockets).

Deliberately does not use ``atomnode.gearman.protocol``: the point of these tests is to check atomnode
against an implementation written from the protocol description and gearmand's behaviour.
"""

from __future__ import annotations

import socket
import struct
import time
from typing import NamedTuple

REQ = b"\0REQ"
RES = b"\0RES"

# Packet types (numbered as on the wire).
CAN_DO = 1
CANT_DO = 2
RESET_ABILITIES = 3
PRE_SLEEP = 4
NOOP = 6
SUBMIT_JOB = 7
JOB_CREATED = 8
GRAB_JOB = 9
NO_JOB = 10
JOB_ASSIGN = 11
WORK_STATUS = 12
WORK_COMPLETE = 13
WORK_FAIL = 14
GET_STATUS = 15
ECHO_REQ = 16
ECHO_RES = 17
SUBMIT_JOB_BG = 18
ERROR = 19
STATUS_RES = 20
SUBMIT_JOB_HIGH = 21
SET_CLIENT_ID = 22
CAN_DO_TIMEOUT = 23
ALL_YOURS = 24
WORK_EXCEPTION = 25
OPTION_REQ = 26
OPTION_RES = 27
WORK_DATA = 28
WORK_WARNING = 29
GRAB_JOB_UNIQ = 30
JOB_ASSIGN_UNIQ = 31
SUBMIT_JOB_HIGH_BG = 32
SUBMIT_JOB_LOW = 33
SUBMIT_JOB_LOW_BG = 34
SUBMIT_JOB_SCHED = 35
SUBMIT_JOB_EPOCH = 36
SUBMIT_REDUCE_JOB = 37
SUBMIT_REDUCE_JOB_BACKGROUND = 38
GRAB_JOB_ALL = 39
JOB_ASSIGN_ALL = 40
GET_STATUS_UNIQUE = 41
STATUS_RES_UNIQUE = 42

NAMES = {v: k for k, v in list(globals().items()) if k.isupper() and isinstance(v, int)}

#: Number of NUL-separated arguments of each response type (the last one may hold NULs).
RES_ARGS = {
    NOOP: 0,
    NO_JOB: 0,
    JOB_CREATED: 1,
    JOB_ASSIGN: 3,
    JOB_ASSIGN_UNIQ: 4,
    JOB_ASSIGN_ALL: 5,
    WORK_STATUS: 3,
    WORK_COMPLETE: 2,
    WORK_FAIL: 1,
    WORK_EXCEPTION: 2,
    WORK_DATA: 2,
    WORK_WARNING: 2,
    ECHO_RES: 1,
    ERROR: 2,
    STATUS_RES: 5,
    STATUS_RES_UNIQUE: 6,
    OPTION_RES: 1,
}

PRIORITY_BG = {"high": SUBMIT_JOB_HIGH_BG, "normal": SUBMIT_JOB_BG, "low": SUBMIT_JOB_LOW_BG}
PRIORITY_FG = {"high": SUBMIT_JOB_HIGH, "normal": SUBMIT_JOB, "low": SUBMIT_JOB_LOW}


class Packet(NamedTuple):
    """One packet read off the wire."""

    magic: bytes
    type: int
    args: tuple[bytes, ...]

    @property
    def name(self) -> str:
        return NAMES.get(self.type, str(self.type))


def encode(type_: int, *args: bytes, magic: bytes = REQ) -> bytes:
    """Frame a packet: magic, type, size, NUL-joined arguments."""
    body = b"\0".join(args)
    return magic + struct.pack(">II", type_, len(body)) + body


class Closed(Exception):
    """The server closed the connection."""


class Conn:
    """A blocking connection to a Gearman server, speaking binary or admin text."""

    def __init__(self, host: str, port: int, timeout: float = 5.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.timeout = timeout
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Conn:  # noqa: PYI034
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- low level
    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send(self, type_: int, *args: bytes, magic: bytes = REQ) -> None:
        self.sock.sendall(encode(type_, *args, magic=magic))

    def _fill(self, deadline: float) -> None:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError("no data from server in time")
        self.sock.settimeout(remaining)
        try:
            chunk = self.sock.recv(1 << 20)
        except TimeoutError as e:
            raise TimeoutError("no data from server in time") from e
        except ConnectionResetError as e:
            raise Closed("connection reset") from e
        if not chunk:
            raise Closed("connection closed by server")
        self.buf += chunk

    def _read_exact(self, n: int, deadline: float) -> bytes:
        while len(self.buf) < n:
            self._fill(deadline)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def recv(self, timeout: float | None = None) -> Packet:
        """Read one binary packet (raises TimeoutError or Closed)."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        header = self._read_exact(12, deadline)
        magic, type_, size = struct.unpack(">4sII", header)
        body = self._read_exact(size, deadline)
        n = RES_ARGS.get(type_)
        if n is None:
            args: tuple[bytes, ...] = (body,)
        elif n == 0:
            args = ()
        else:
            args = tuple(body.split(b"\0", n - 1))
        return Packet(magic, type_, args)

    def expect(self, *types: int, timeout: float | None = None) -> Packet:
        """Read one packet and check its type is one of ``types``."""
        p = self.recv(timeout)
        assert p.type in types, f"expected {[NAMES[t] for t in types]}, got {p.name} {p.args!r}"
        return p

    def expect_closed(self, timeout: float = 2.0) -> bytes:
        """Read until the server closes the connection; return what came before."""
        deadline = time.monotonic() + timeout
        try:
            while True:
                self._fill(deadline)
        except Closed:
            data, self.buf = self.buf, b""
            return data

    def read_until(self, terminator: bytes, timeout: float | None = None) -> bytes:
        """Read text until ``terminator`` appears; return everything up to and including it."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        while terminator not in self.buf:
            self._fill(deadline)
        i = self.buf.index(terminator) + len(terminator)
        data, self.buf = self.buf[:i], self.buf[i:]
        return data

    def read_available(self, quiet: float = 0.2) -> bytes:
        """Read whatever arrives until ``quiet`` seconds pass with nothing new."""
        while True:
            try:
                self._fill(time.monotonic() + quiet)
            except TimeoutError:
                break
        data, self.buf = self.buf, b""
        return data

    # -- admin
    def admin_line(self, command: str) -> bytes:
        """Send an admin command answered by one line; return the raw line."""
        self.send_raw(command.encode() + b"\n")
        return self.read_until(b"\n")

    def admin_list(self, command: str) -> bytes:
        """Send an admin command answered by a listing; return it raw, final ``.\\n`` included."""
        self.send_raw(command.encode() + b"\n")
        data = b""
        while True:
            line = self.read_until(b"\n")
            data += line
            if line == b".\n" or line.startswith(b"ERR"):
                return data

    # -- client helpers
    def submit(
        self,
        func: str | bytes,
        payload: bytes = b"",
        unique: str | bytes = b"",
        *,
        background: bool = False,
        priority: str = "normal",
    ) -> bytes:
        """Submit a job and return its handle (reads JOB_CREATED)."""
        table = PRIORITY_BG if background else PRIORITY_FG
        self.send(table[priority], _b(func), _b(unique), payload)
        return self.expect(JOB_CREATED).args[0]

    def option(self, name: bytes) -> Packet:
        self.send(OPTION_REQ, name)
        return self.recv()


def _b(s: str | bytes) -> bytes:
    return s.encode() if isinstance(s, str) else s


class RawWorker(Conn):
    """A worker on a raw connection."""

    def can_do(self, *funcs: str | bytes) -> None:
        for f in funcs:
            self.send(CAN_DO, _b(f))

    def grab(self, kind: int = GRAB_JOB, timeout: float | None = None) -> Packet:
        """One GRAB_JOB (or _UNIQ/_ALL); returns NO_JOB or the JOB_ASSIGN* packet."""
        self.send(kind)
        return self.expect(NO_JOB, JOB_ASSIGN, JOB_ASSIGN_UNIQ, JOB_ASSIGN_ALL, timeout=timeout)

    def wait_job(self, kind: int = GRAB_JOB, timeout: float = 5.0) -> Packet:
        """Grab, sleeping with PRE_SLEEP/NOOP between tries, until a job comes (bounded)."""
        deadline = time.monotonic() + timeout
        while True:
            p = self.grab(kind, timeout=max(0.01, deadline - time.monotonic()))
            if p.type != NO_JOB:
                return p
            self.send(PRE_SLEEP)
            self.expect(NOOP, timeout=max(0.01, deadline - time.monotonic()))


def wait_for(cond, timeout: float = 5.0, interval: float = 0.01, what: str = "condition"):
    """Poll ``cond()`` until it returns something truthy (bounded); return that value."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def status_table(host: str, port: int) -> dict[str, tuple[int, int, int]]:
    """Admin ``status`` parsed: function -> (total, running, workers)."""
    with Conn(host, port) as c:
        raw = c.admin_list("status")
    out = {}
    for line in raw.decode().splitlines():
        if line == ".":
            break
        f, total, running, workers = line.split("\t")
        out[f] = (int(total), int(running), int(workers))
    return out


def wait_status(host: str, port: int, func: str, pred, timeout: float = 5.0):
    """Wait until ``pred((total, running, workers))`` holds for ``func`` in admin ``status``."""

    def check():
        row = status_table(host, port).get(func)
        return row if row is not None and pred(row) else None

    return wait_for(check, timeout=timeout, what=f"status of {func}")
