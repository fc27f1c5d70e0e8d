"""Peer processes for the interop tests (PHP, Perl, gearman CLI...), read as JSON lines."""

from __future__ import annotations

import json
import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

PEERS = Path(__file__).resolve().parent.parent / "peers"


class Peer:
    """A peer process (PHP, Perl, gearman CLI...) whose stdout is read line by line."""

    def __init__(self, argv: list[str], stdin: bytes | None = None) -> None:
        self.argv = argv
        self._buf = b""
        self._err: bytes | None = None
        self.proc = subprocess.Popen(
            argv,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        if stdin is not None:
            assert self.proc.stdin is not None
            self.proc.stdin.write(stdin)
            self.proc.stdin.close()
            self.proc.stdin = None

    def readline(self, timeout: float = 10.0) -> bytes:
        """The next stdout line (bounded wait; fails with stderr if the peer dies first)."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            remaining = deadline - time.monotonic()
            with selectors.DefaultSelector() as sel:
                sel.register(fd, selectors.EVENT_READ)
                ready = sel.select(max(0.0, remaining))
            if not ready:
                self.kill()
                self.proc.wait(5)
                raise AssertionError(
                    f"{self.argv[:4]}: no output line within {timeout}s; "
                    f"got {self._buf[-300:]!r}; stderr: {self.stderr()[-1000:]!r}"
                )
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                self.proc.wait(5)
                raise AssertionError(
                    f"{self.argv[:4]} ended (rc={self.proc.returncode}) without a full line; "
                    f"got {self._buf[-300:]!r}; stderr: {self.stderr()[-1000:]!r}"
                )
            self._buf += chunk
        i = self._buf.index(b"\n") + 1
        line, self._buf = self._buf[:i], self._buf[i:]
        return line

    def event(self, timeout: float = 10.0) -> dict:
        """The next JSON line printed by a peer script."""
        line = self.readline(timeout)
        try:
            return json.loads(line)
        except ValueError:
            raise AssertionError(f"not JSON from {self.argv[:3]}: {line!r}") from None

    def wait_event(self, kind: str, timeout: float = 10.0) -> dict:
        """Skip JSON lines until one with ``"event": kind``."""
        deadline = time.monotonic() + timeout
        while True:
            ev = self.event(max(0.01, deadline - time.monotonic()))
            if ev.get("event") == kind:
                return ev

    def communicate(self, timeout: float = 15.0) -> tuple[bytes, bytes]:
        """Wait for exit; return (stdout, stderr)."""
        try:
            out, err = self.proc.communicate(timeout=timeout)
            out, self._buf = self._buf + out, b""
            return out, err
        except subprocess.TimeoutExpired:
            self.kill()
            out, err = self.proc.communicate()
            raise AssertionError(
                f"{self.argv[:3]} did not exit within {timeout}s; "
                f"stdout {out[-500:]!r} stderr {err[-500:]!r}"
            ) from None

    def stderr(self) -> bytes:
        """The peer's stderr once it has exited (kill it first to read it while running)."""
        if self.proc.poll() is None:
            return b"(still running)"
        assert self.proc.stderr is not None
        if self._err is None:
            self._err = self.proc.stderr.read()
        return self._err

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass

    def cleanup(self) -> None:
        self.kill()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            pass
        for f in (self.proc.stdout, self.proc.stderr):
            if f:
                f.close()


def php(script: str, *args: object) -> list[str]:
    """argv running tests/peers/<script> with PHP."""
    return ["php", str(PEERS / script), *[str(a) for a in args]]


def perl(script: str, *args: object) -> list[str]:
    """argv running tests/peers/<script> with Perl."""
    return ["perl", str(PEERS / script), *[str(a) for a in args]]
