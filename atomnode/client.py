"""Blocking clients for the command line: the text admin protocol and Gearman submits.

Plain stdlib sockets (no trio): the CLI runs one request and exits.
"""

from __future__ import annotations

import socket
from typing import Any
from collections.abc import Callable

from .protocol import Decoder, Packet, ProtocolError, T, encode

#: Admin commands whose answer is a listing ended by a line ".".
LISTING_COMMANDS = frozenset({"status", "workers", "prioritystatus", "show", "atomnode-status"})

START_HINT = "start it with `systemctl start atomnode`, or `atomnode run` in a terminal"



def _recv_chunk(client: Any) -> bytes:
    """Read what the daemon sent on ``client._sock``; a timeout, an error or a closed
    connection closes the client and raises ClientError saying which."""
    try:
        chunk = client._sock.recv(65536)
    except TimeoutError:
        client.close()
        raise ClientError(
            f"atomnode at {client.host}:{client.port} did not answer within "
            f"{client.timeout:g}s"
        ) from None
    except OSError as e:
        client.close()
        raise ClientError(f"connection to {client.host}:{client.port} failed: {e}") from None
    if not chunk:
        client.close()
        raise ClientError(f"{client.host}:{client.port} closed the connection mid-answer")
    return chunk

class ClientError(Exception):
    """Talking to the daemon failed."""


class DaemonUnreachable(ClientError):
    """Nothing answers at the address: the daemon is not running there."""

    def __init__(self, host: str, port: int, reason: str = ""):
        self.host, self.port, self.reason = host, port, reason
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
    try:
        return socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        raise DaemonUnreachable(host, port, "connection refused") from None
    except TimeoutError:
        raise DaemonUnreachable(host, port, "no answer to connect") from None
    except OSError as e:
        raise DaemonUnreachable(host, port, e.strerror or str(e)) from None


class AdminClient:
    """The text admin protocol (``status``, ``workers``, ``atomnode-status``, ...)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4730, timeout: float = 5.0):
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._buf = b""

    def __enter__(self) -> AdminClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next command reconnects)."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        self._buf = b""

    def _readline(self) -> str:
        assert self._sock is not None
        while b"\n" not in self._buf:
            self._buf += _recv_chunk(self)
        line, _, self._buf = self._buf.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def command(self, line: str) -> list[str]:
        """Send one admin command and return its answer, one string per line.

        Listings (status, workers, ...) are read up to the final ``.`` (not returned); other
        commands answer one ``OK ...`` / ``ERR ...`` line. An ``ERR`` line is returned as is
        (callers decide): e.g. ``["ERR UNKNOWN_COMMAND ..."]``.
        Raises DaemonUnreachable if nothing listens, ClientError on a broken answer.
        """
        if self._sock is None:
            self._sock = _connect(self.host, self.port, self.timeout)
        try:
            self._sock.sendall(line.encode() + b"\n")
        except OSError as e:
            self.close()
            raise ClientError(f"cannot send to {self.host}:{self.port}: {e}") from None
        words = line.split()
        first = self._readline()
        if not words or words[0].lower() not in LISTING_COMMANDS:
            return [first]
        if first.startswith("ERR"):
            return [first]
        out: list[str] = []
        while first != ".":
            out.append(first)
            first = self._readline()
        return out


_SUBMIT = {
    ("high", False): T.SUBMIT_JOB_HIGH,
    ("normal", False): T.SUBMIT_JOB,
    ("low", False): T.SUBMIT_JOB_LOW,
    ("high", True): T.SUBMIT_JOB_HIGH_BG,
    ("normal", True): T.SUBMIT_JOB_BG,
    ("low", True): T.SUBMIT_JOB_LOW_BG,
}


class GearmanClient:
    """A minimal Gearman client: one job at a time on one connection."""

    def __init__(self, host: str = "127.0.0.1", port: int = 4730, timeout: float | None = None):
        """``timeout`` bounds each read (None: wait as long as the job runs)."""
        self.host, self.port, self.timeout = host, port, timeout
        self._sock: socket.socket | None = None
        self._decoder = Decoder(expect_requests=False)
        self._exceptions = False

    def __enter__(self) -> GearmanClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _send(self, type_: int, *args: bytes) -> None:
        if self._sock is None:
            self._sock = _connect(self.host, self.port, 5.0)
            self._sock.settimeout(self.timeout)
            self._decoder = Decoder(expect_requests=False)
        try:
            self._sock.sendall(encode(type_, *args, request=True))
        except OSError as e:
            self.close()
            raise ClientError(f"cannot send to {self.host}:{self.port}: {e}") from None

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
            self._decoder.feed(_recv_chunk(self))

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
