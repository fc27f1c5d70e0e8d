"""Blocking clients for the command line: the text admin protocol and Gearman submits.

Plain stdlib sockets (no trio): the CLI runs one request and exits.
"""

from __future__ import annotations

import socket
import time
from typing import Self
from collections.abc import Callable

from ..gearman.protocol import Decoder, Packet, ProtocolError, T, encode

#: Admin commands whose answer is a listing ended by a line ".".
LISTING_COMMANDS = frozenset({"status", "workers", "prioritystatus", "show", "atomnode-status"})

START_HINT = "start it with `systemctl start atomnode`, or `atomnode run` in a terminal"




class ClientError(Exception):
    """Talking to the daemon failed."""


class DaemonUnreachable(ClientError):
    """Nothing answers at the address: the daemon is not running there."""

    def __init__(self, host: str, port: int, reason: str = ""):
        self.host, self.port, self.reason = host, port, reason
        if host.startswith("/"):
            addr = f"the control socket {host}"
        else:
            addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        why = f" ({reason})" if reason else ""
        super().__init__(
            f"nothing answers at {addr}{why}: the atomnode daemon is not running there; "
            + START_HINT
        )


class GearmanError(ClientError):
    """The server answered with an ERROR packet."""

    def __init__(self, code: str, text: str):
        self.code, self.text = code, text
        super().__init__(f"server error {code}: {text}")


class JobFailed(ClientError):
    """The job ended with WORK_FAIL."""


class JobException(ClientError):
    """The job ended with WORK_EXCEPTION; ``data`` is what the worker sent."""

    def __init__(self, data: bytes):
        self.data = data
        super().__init__(f"job raised an exception: {data.decode('utf-8', 'replace')}")


def _connect(host: str, port: int, timeout: float | None) -> socket.socket:
    """A TCP connection, or a unix socket when ``host`` is a path (a worker host's
    control socket)."""
    if host.startswith("/"):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(host)
        except OSError as e:
            s.close()
            raise DaemonUnreachable(host, 0, e.strerror or str(e)) from None
        return s
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise DaemonUnreachable(host, port, "connection refused") from None
    except TimeoutError:
        raise DaemonUnreachable(host, port, "no answer to connect") from None
    except OSError as e:
        raise DaemonUnreachable(host, port, e.strerror or str(e)) from None


class _Connection:
    """One TCP connection to the daemon, opened on first use; closed on any error so the
    next call reconnects."""

    #: Seconds allowed for connecting, whatever the read timeout.
    connect_timeout: float = 5.0

    def __init__(self, host: str, port: int, timeout: float | None):
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call reconnects)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._reset()

    def _reset(self) -> None:
        """Forget per-connection parsing state (subclasses)."""

    def _sendall(self, data: bytes) -> None:
        if self._sock is None:
            self._sock = _connect(self.host, self.port, self.connect_timeout)
            self._sock.settimeout(self.timeout)
            self._reset()
        try:
            self._sock.sendall(data)
        except OSError as e:
            self.close()
            raise ClientError(f"cannot send to {self.host}:{self.port}: {e}") from None

    def _recv_chunk(self) -> bytes:
        """What the daemon sent; a timeout, an error or a closed connection closes this
        connection and raises ClientError saying which."""
        assert self._sock is not None
        try:
            chunk = self._sock.recv(65536)
        except TimeoutError:
            self.close()
            raise ClientError(
                f"atomnode at {self.host}:{self.port} did not answer within {self.timeout:g}s"
            ) from None
        except OSError as e:
            self.close()
            raise ClientError(f"connection to {self.host}:{self.port} failed: {e}") from None
        if not chunk:
            self.close()
            raise ClientError(f"{self.host}:{self.port} closed the connection mid-answer")
        return chunk


class AdminClient(_Connection):
    """The text admin protocol (``status``, ``workers``, ``atomnode-status``, ...)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4730, timeout: float = 5.0):
        super().__init__(host, port, timeout)
        self._buf = b""

    def _reset(self) -> None:
        self._buf = b""

    def _readline(self) -> str:
        while b"\n" not in self._buf:
            self._buf += self._recv_chunk()
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def command(self, line: str) -> list[str]:
        """Send one admin command and return its answer, one string per line.

        Listings (status, workers, ...) are read up to the final ``.`` (not returned); other
        commands answer one ``OK ...`` / ``ERR ...`` line. An ``ERR`` line is returned as is
        (callers decide): e.g. ``["ERR UNKNOWN_COMMAND ..."]``.
        Raises DaemonUnreachable if nothing listens, ClientError on a broken answer.
        """
        self._sendall(line.encode() + b"\n")
        words = line.split()
        first = self._readline()
        listing = bool(words) and (words[0].lower() in LISTING_COMMANDS or (
            words[0].lower() == "atomnode-host" and words[1:2] == ["conns"]))
        if not listing:
            return [first]
        if first.startswith("ERR"):
            return [first]
        out: list[str] = []
        while first != ".":
            out.append(first)
            first = self._readline()
        return out


_BG_SUBMIT = {0: T.SUBMIT_JOB_HIGH_BG, 1: T.SUBMIT_JOB_BG, 2: T.SUBMIT_JOB_LOW_BG}

_SUBMIT = {
    ("high", False): T.SUBMIT_JOB_HIGH,
    ("normal", False): T.SUBMIT_JOB,
    ("low", False): T.SUBMIT_JOB_LOW,
    ("high", True): T.SUBMIT_JOB_HIGH_BG,
    ("normal", True): T.SUBMIT_JOB_BG,
    ("low", True): T.SUBMIT_JOB_LOW_BG,
}


class GearmanClient(_Connection):
    """A minimal Gearman client: one job at a time on one connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4730, timeout: float | None = None):
        """``timeout`` bounds each read (None: wait as long as the job runs)."""
        super().__init__(host, port, timeout)
        self._decoder = Decoder(expect_requests=False)
        self._exceptions = False

    def _reset(self) -> None:
        self._decoder = Decoder(expect_requests=False)
        self._exceptions = False  # OPTION_REQ holds for one connection only

    def _send(self, type_: int, *args: bytes) -> None:
        self._sendall(encode(type_, *args, request=True))

    def _recv(self) -> Packet:
        assert self._sock is not None
        while True:
            try:
                ev = self._decoder.next_event()
            except ProtocolError as e:
                self.close()
                raise ClientError(f"bad answer from {self.host}:{self.port}: {e}") from None
            if ev is not None:
                assert isinstance(ev, Packet)
                if ev.type == T.ERROR:
                    code, text = (ev.args + (b"", b""))[:2]
                    raise GearmanError(
                        code.decode("utf-8", "replace"), text.decode("utf-8", "replace")
                    )
                return ev
            self._decoder.feed(self._recv_chunk())

    def _enable_exceptions(self) -> None:
        if self._exceptions:
            return
        self._send(T.OPTION_REQ, b"exceptions")
        try:
            self._recv()  # OPTION_RES
        except GearmanError:
            pass  # a server without the option: failures arrive as WORK_FAIL
        self._exceptions = True

    def submit(
        self,
        function: str,
        data: bytes = b"",
        unique: bytes = b"",
        background: bool = False,
        priority: str = "normal",
        on_status: Callable[[int, int], None] | None = None,
        on_data: Callable[[bytes], None] | None = None,
        on_warning: Callable[[bytes], None] | None = None,
    ) -> bytes | str:
        """Submit a job. Background: returns the job handle (str) once JOB_CREATED arrives.
        Foreground: returns the WORK_COMPLETE result; WORK_STATUS goes to ``on_status(num,
        den)``, WORK_DATA to ``on_data``, WORK_WARNING to ``on_warning``.
        Raises JobFailed, JobException, GearmanError, DaemonUnreachable, ClientError.
        """
        try:
            type_ = _SUBMIT[(priority, background)]
        except KeyError:
            raise ValueError(f"priority must be high, normal or low, not {priority!r}") from None
        if not background:
            self._enable_exceptions()
        self._send(type_, function.encode(), unique, data)
        pkt = self._recv()
        if pkt.type != T.JOB_CREATED:
            raise ClientError(f"expected JOB_CREATED, got {pkt.name}")
        handle = pkt.args[0]
        if background:
            return handle.decode("utf-8", "replace")
        while True:
            pkt = self._recv()
            if pkt.args[:1] != (handle,):
                continue  # not our job
            if pkt.type == T.WORK_COMPLETE:
                return pkt.args[1]
            if pkt.type == T.WORK_FAIL:
                raise JobFailed(f"job {handle.decode()} failed")
            if pkt.type == T.WORK_EXCEPTION:
                raise JobException(pkt.args[1])
            if pkt.type == T.WORK_STATUS and on_status is not None:
                try:
                    on_status(int(pkt.args[1] or 0), int(pkt.args[2] or 0))
                except ValueError:
                    pass
            elif pkt.type == T.WORK_DATA and on_data is not None:
                on_data(pkt.args[1])
            elif pkt.type == T.WORK_WARNING and on_warning is not None:
                on_warning(pkt.args[1])

    def submit_background_many(
        self, jobs: list[tuple[bytes, bytes, int, bytes, int]], *, window: int = 256
    ) -> tuple[int, list[str]]:
        """Submit background jobs ``(function, unique, priority 0-2, data, when_to_run)``,
        pipelined (up to ``window`` awaiting JOB_CREATED); a future ``when_to_run`` uses
        SUBMIT_JOB_EPOCH. Returns (jobs created, error messages), one answer per job.
        Raises DaemonUnreachable, ClientError (connection lost: how far it got)."""
        now = time.time()
        created, errors = 0, []
        sent = answered = 0
        while answered < len(jobs):
            while sent < len(jobs) and sent - answered < window:
                function, unique, prio, data, when = jobs[sent]
                if when > now:
                    self._send(T.SUBMIT_JOB_EPOCH, function, unique, str(when).encode(), data)
                else:
                    self._send(_BG_SUBMIT[prio], function, unique, data)
                sent += 1
            try:
                pkt = self._recv()
            except GearmanError as e:
                errors.append(f"{e.code}: {e.text}")
                answered += 1
                continue
            except ClientError as e:
                raise ClientError(f"{e} (after {answered} of {len(jobs)} jobs)") from None
            if pkt.type == T.JOB_CREATED:
                created += 1
                answered += 1
        return created, errors
