"""Shared test harness: start Gearman servers (the reference gearmand and atomnode) on free ports.

Fixtures
--------
``server``        module-scoped, parametrized ``gearmand`` / ``atomnode``: reuse it for tests that
                  only touch their own (uniquely named) functions.
``fresh_server``  function-scoped, same params: a clean server for tests that look at global
                  state (status counts, coalescing, handles).

Both yield a :class:`ServerProc` with ``.host``, ``.port``, ``.kind``, ``.proc`` and
``.stderr_text()``. Test ids carry the kind, so ``pytest -k gearmand`` runs only the reference
and ``pytest -k atomnode`` only ours. Each kind is also a marker (``-m gearmand``).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

GEARMAND = os.environ.get("ATOMNODE_TEST_GEARMAND", "/usr/sbin/gearmand")
SERVER_KINDS = ("gearmand", "atomnode")
START_TIMEOUT = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """Return a TCP port that was free on ``host`` a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


class ServerProc:
    """A Gearman server process started for the tests."""

    def __init__(self, kind: str, workdir: Path, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.host = host
        self.port = free_port(host)
        self.workdir = workdir
        self._stderr_path = workdir / f"{kind}-{self.port}.stderr"
        self._stderr = open(self._stderr_path, "wb")  # noqa: SIM115 -- lives as long as the server
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=workdir,
            start_new_session=True,
        )

    def command(self) -> list[str]:
        """The argv that starts this kind of server on ``self.port``."""
        if self.kind == "gearmand":
            return [
                GEARMAND,
                "--listen", self.host,
                "--port", str(self.port),
                "--threads", "1",
                "--log-file", "stderr",
                "--verbose", "ERROR",
                "--pid-file", str(self.workdir / f"gearmand-{self.port}.pid"),
            ]  # fmt: skip
        if self.kind == "atomnode":
            return [
                sys.executable, "-m", "atomnode", "run",
                "--listen", f"{self.host}:{self.port}",
                "--db", str(self.workdir / f"q-{self.port}.db"),
                "--http", "none",
            ]  # fmt: skip
        raise ValueError(f"unknown server kind {self.kind!r}")

    @property
    def address(self) -> str:
        """``host:port`` as clients take it."""
        return f"{self.host}:{self.port}"

    def stderr_text(self) -> str:
        """Everything the server wrote to stdout/stderr so far."""
        self._stderr.flush()
        try:
            return self._stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Poll until the port accepts connections; fail with the server's output if not."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"{self.kind} exited with {self.proc.returncode} before serving "
                    f"{self.address}:\n{self.stderr_text()}",
                    pytrace=False,
                )
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"{self.kind} did not serve {self.address} within {timeout}s:\n"
                    f"{self.stderr_text()}",
                    pytrace=False,
                )
            time.sleep(0.02)  # polling a port: there is no event to wait on

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL after 5 s) and close its log."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(5)
        self._stderr.close()

    def __repr__(self) -> str:
        return f"<ServerProc {self.kind} {self.address} pid={self.proc.pid}>"


def _start(kind: str, workdir: Path) -> ServerProc:
    if kind == "gearmand" and not os.access(GEARMAND, os.X_OK):
        pytest.fail(f"{GEARMAND} not installed (scripts/sysdeps.sh test installs it)")
    srv = ServerProc(kind, workdir)
    srv.wait_ready()
    return srv


def pytest_configure(config: pytest.Config) -> None:
    for kind in SERVER_KINDS:
        config.addinivalue_line("markers", f"{kind}: runs against the {kind} server")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each server-parametrized test with its kind (``-m gearmand``)."""
    for item in items:
        callspec = getattr(item, "callspec", None)
        if callspec is None:
            continue
        for name in ("server", "fresh_server"):
            kind = callspec.params.get(name)
            if kind in SERVER_KINDS:
                item.add_marker(getattr(pytest.mark, kind))


@pytest.fixture(scope="session")
def server_workdir() -> Iterator[Path]:
    """A scratch directory for server logs and databases, removed at the end of the session."""
    d = Path(tempfile.mkdtemp(prefix="atomnode-tests-"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module", params=SERVER_KINDS)
def server(request: pytest.FixtureRequest, server_workdir: Path) -> Iterator[ServerProc]:
    """A server shared by the tests of one module (use unique function names)."""
    srv = _start(request.param, server_workdir)
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(params=SERVER_KINDS)
def fresh_server(request: pytest.FixtureRequest, server_workdir: Path) -> Iterator[ServerProc]:
    """A server of its own for one test."""
    srv = _start(request.param, server_workdir)
    try:
        yield srv
    finally:
        srv.stop()
