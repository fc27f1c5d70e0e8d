"""Start the real atomnode daemon as a process and talk to it with a minimal client.

The one place tests start servers and find free ports: the daemon-level tests (durability,
lifecycle, systemd notify) use :class:`Daemon`, conftest's ``server`` fixtures and the
interop tests use :func:`start_gearmand` for the reference server. A daemon is waited for
the way systemd waits for it: its ``READY=1`` on a notify socket of our own. The client is
built on atomnode.gearman.protocol's codec; compatibility with independent clients is proven
separately in tests/interop.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atomnode.gearman.protocol import Decoder, Packet, T, encode

GEARMAND = os.environ.get("ATOMNODE_TEST_GEARMAND", "/usr/sbin/gearmand")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class NotifySocket:
    """A real AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET. Its path is
    short (a sun_path holds 108 bytes): a fresh temporary directory."""

    def __init__(self, path: str | None = None):
        self._dir = None if path else tempfile.mkdtemp(prefix="an-notify-")
        self.path = path or os.path.join(self._dir, "notify.sock")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)

    def recv(self, timeout: float) -> dict[str, str] | None:
        """The next message as fields, None if none came within ``timeout`` (0: only what
        is already there)."""
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, BlockingIOError):
            return None
        fields = {}
        for line in data.decode().splitlines():
            k, _, v = line.partition("=")
            fields[k] = v
        return fields

    def wait_for(self, key: str, timeout: float = 15.0,
                 proc: subprocess.Popen | None = None) -> tuple[dict[str, str], list[dict]]:
        """Messages until one has ``key``; returns it and everything seen before. With
        ``proc``, fails as soon as that process has exited instead."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no {key} within {timeout}s; saw {seen}"
            # Short slices only to notice a process that died before saying anything.
            msg = self.recv(min(left, 0.25) if proc is not None else left)
            if msg is None:
                if proc is not None and proc.poll() is not None:
                    raise AssertionError(f"exited with {proc.returncode} before {key}")
                continue
            if key in msg:
                return msg, seen
            seen.append(msg)

    def close(self) -> None:
        self.sock.close()
        try:
            os.unlink(self.path)
            if self._dir:
                os.rmdir(self._dir)
        except OSError:
            pass


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    """Until 127.0.0.1:``port`` accepts connections; fails if ``proc`` exits first. The one
    place that polls a port: for gearmand (it sends no readiness event) and for a daemon
    started without a notify socket on purpose."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise AssertionError(f"exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"nothing listening on {port} after {timeout}s")
        time.sleep(0.02)  # polling a port: there is no event to wait on


def start_gearmand(port: int, *args: str, log: Path | None = None,
                   timeout: float = 10.0) -> subprocess.Popen:
    """The reference gearmand 1.1.20 on 127.0.0.1:``port`` (extra ``args`` appended), in
    its own session, once it accepts connections."""
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115
    try:
        proc = subprocess.Popen(
            [GEARMAND, "-L", "127.0.0.1", "-p", str(port), "-t", "1", *args],
            stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
        )
    finally:
        if log:
            out.close()
    try:
        wait_listening(port, proc, timeout)
    except AssertionError as e:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)
        raise AssertionError(f"gearmand: {e}") from None
    return proc


class Client:
    """A blocking Gearman connection (client or worker side)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.decoder = Decoder(expect_requests=False)
        self.timeout = timeout

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def send(self, type_: int, *args: bytes) -> None:
        self.sock.sendall(encode(type_, *args, request=True))

    def recv(self, timeout: float | None = None) -> Packet:
        self.sock.settimeout(timeout or self.timeout)
        while True:
            ev = self.decoder.next_event()
            if ev is not None:
                assert isinstance(ev, Packet)
                return ev
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("server closed the connection")
            self.decoder.feed(data)

    def expect(self, *types: int, timeout: float | None = None) -> Packet:
        p = self.recv(timeout)
        assert p.type in types, f"expected {[T(t).name for t in types]}, got {p.name} {p.args}"
        return p

    def submit_bg(self, function: bytes, unique: bytes, data: bytes,
                  type_: int = T.SUBMIT_JOB_BG) -> bytes:
        self.send(type_, function, unique, data)
        return self.expect(T.JOB_CREATED).args[0]

    def admin(self, line: str) -> bytes:
        """One admin command; reads until a line '.' or one OK/ERR line."""
        self.sock.settimeout(self.timeout)
        self.sock.sendall(line.encode() + b"\n")
        buf = b""
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                return buf
            buf += chunk
            if buf.endswith(b"\n.\n") or buf == b".\n" or (
                buf.endswith(b"\r\n") and (buf.startswith(b"OK") or buf.startswith(b"ERR"))
            ) or (buf.startswith(b"OK") and buf.endswith(b"\n") and b"\n" not in buf[:-1]):
                return buf


class Worker(Client):
    def __init__(self, port: int, *functions: bytes, client_id: bytes | None = None):
        super().__init__(port)
        if client_id:
            self.send(T.SET_CLIENT_ID, client_id)
        for f in functions:
            self.send(T.CAN_DO, f)

    def grab(self, timeout: float = 10.0) -> Packet | None:
        """GRAB_JOB_UNIQ; on NO_JOB sleep (PRE_SLEEP) until NOOP, up to ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            self.send(T.GRAB_JOB_UNIQ)
            p = self.expect(T.JOB_ASSIGN_UNIQ, T.NO_JOB)
            if p.type == T.JOB_ASSIGN_UNIQ:
                return p
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            self.send(T.PRE_SLEEP)
            try:
                self.expect(T.NOOP, timeout=left)
            except TimeoutError:
                return None

    def complete(self, handle: bytes, result: bytes = b"") -> None:
        self.send(T.WORK_COMPLETE, handle, result)


class Daemon:
    """An atomnode daemon process on a free port, with its database in ``workdir``."""

    def __init__(self, workdir: Path, *, config: str | None = None, env: dict | None = None,
                 port: int | None = None, db: Path | None = None, preexec_fn=None,
                 http: str = "none", notify: bool = True):
        """``notify``: give the daemon a NOTIFY_SOCKET of ours and wait for its READY=1
        (unless ``env`` names another NOTIFY_SOCKET: then the test reads it itself)."""
        self.workdir = workdir
        self.http = http  # the web console: off unless a test asks for it
        self.port = port or free_port()
        self.db = db or workdir / "queue.db"
        self.log_path = workdir / f"daemon-{self.port}-{time.monotonic_ns()}.log"
        self.config_path: Path | None = None
        if config is not None:
            self.config_path = workdir / "atomnode.yml"
            self.config_path.write_text(config)
        self.env = dict(os.environ)
        for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                    "LISTEN_PID", "ATOMNODE_CONFIG"):
            self.env.pop(var, None)
        self.env.update(env or {})
        self.notify: NotifySocket | None = None
        self._own_notify = notify and "NOTIFY_SOCKET" not in self.env
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "atomnode", "run", "--listen", f"127.0.0.1:{self.port}",
                "--db", str(self.db), "--http", self.http]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self, wait: bool = True) -> Daemon:
        if self._own_notify:
            if self.notify is None:
                self.notify = NotifySocket()
                self.env["NOTIFY_SOCKET"] = self.notify.path
            while self.notify.recv(0) is not None:  # what an earlier run said
                pass
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.argv(), stdin=subprocess.DEVNULL, stdout=log, stderr=log, env=self.env,
            cwd=self.workdir, preexec_fn=self.preexec_fn,
        )
        log.close()
        if wait:
            self.wait_serving()
        return self

    def wait_serving(self, timeout: float = 15.0) -> None:
        """Until the daemon says READY=1 (it serves its port by then)."""
        assert self.proc is not None
        if self.notify is None:
            assert "NOTIFY_SOCKET" not in self.env, "the test reads its own NOTIFY_SOCKET"
            # Without a notify socket (notify=False) the port is the only sign.
            wait_listening(self.port, self.proc, timeout)
            return
        try:
            self.notify.wait_for("READY", timeout, proc=self.proc)
        except AssertionError as e:
            raise AssertionError(f"daemon not ready: {e}:\n{self.log()}") from None

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return self.proc.returncode

    def run_to_exit(self, timeout: float = 15.0) -> tuple[int, str]:
        """Start and wait for the process to exit by itself (for refusal tests)."""
        self.start(wait=False)
        assert self.proc is not None
        rc = self.proc.wait(timeout)
        return rc, self.log()

    def client(self) -> Client:
        return Client(self.port)

    def worker(self, *functions: bytes, client_id: bytes | None = None) -> Worker:
        return Worker(self.port, *functions, client_id=client_id)

    def atomnode_status(self) -> dict:
        """The daemon's own figures: ``atomnode-status`` (buffers, loop, connections...)."""
        with self.client() as c:
            return json.loads(c.admin("atomnode-status").split(b"\n")[0])

    def status(self) -> dict[str, tuple[int, int, int]]:
        with self.client() as c:
            out = c.admin("status")
        table = {}
        for line in out.decode().splitlines():
            if line == ".":
                break
            name, total, running, workers = line.split("\t")
            table[name] = (int(total), int(running), int(workers))
        return table
