"""Start the real atomnode daemon as a process and talk to it with a minimal client.

Used by the daemon-level tests (durability, lifecycle, systemd notify). The client is
built on atomnode.gearman.protocol's codec; compatibility with independent clients is proven
separately in tests/interop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from atomnode.gearman.protocol import Decoder, Packet, T, encode



def free_port() -> int:
    """A TCP port that was free on 127.0.0.1 a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
                 http: str = "none"):
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
        self.preexec_fn = preexec_fn
        self.proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        argv = [sys.executable, "-m", "atomnode", "run", "--listen", f"127.0.0.1:{self.port}",
                "--db", str(self.db), "--http", self.http]
        if self.config_path is not None:
            argv += ["--config", str(self.config_path)]
        return argv

    def start(self, wait: bool = True) -> Daemon:
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
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not serving after {timeout}s:\n{self.log()}")
            time.sleep(0.02)  # polling a port: no event to wait on from outside

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
