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
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from daemon_harness import GEARMAND, NotifySocket, free_port, wait_listening

#: The modules setup.py compiles with mypyc (the build leaves ``NAME.cpython-*.so`` beside
#: ``NAME.py``, and Python imports the .so). A .py edited after its build would not be
#: what the tests run: refuse, rather than test stale code.
HOT_MODULES = ("protocol", "broker", "server")
_GEARMAN = Path(__file__).resolve().parent.parent / "atomnode" / "gearman"


def _stale_compiled() -> list[str]:
    stale = []
    for name in HOT_MODULES:
        source = _GEARMAN / f"{name}.py"
        for built in _GEARMAN.glob(f"{name}.*.so"):
            if source.stat().st_mtime > built.stat().st_mtime:
                stale.append(f"{source.name} is newer than {built.name}")
    return stale


def pytest_sessionstart(session: pytest.Session) -> None:
    stale = _stale_compiled()
    if stale:
        pytest.exit("compiled hot path out of date (" + "; ".join(stale) + "): run `make venv` "
                    "to rebuild it, or delete atomnode/gearman/*.so to test pure Python", 4)

SERVER_KINDS = ("gearmand", "atomnode")
START_TIMEOUT = 10.0


class ServerProc:
    """A Gearman server process started for the tests."""

    def __init__(self, kind: str, workdir: Path, host: str = "127.0.0.1") -> None:
        self.kind = kind
        self.host = host
        self.port = free_port(host)
        self.workdir = workdir
        self._stderr_path = workdir / f"{kind}-{self.port}.stderr"
        self._stderr = open(self._stderr_path, "wb")  # noqa: SIM115 -- lives as long as the server
        # atomnode says READY=1 when it serves, as to systemd; gearmand says nothing.
        self.notify = NotifySocket() if kind == "atomnode" else None
        env = dict(os.environ)
        env.pop("NOTIFY_SOCKET", None)
        if self.notify is not None:
            env["NOTIFY_SOCKET"] = self.notify.path
        self.proc = subprocess.Popen(
            self.command(),
            stdin=subprocess.DEVNULL,
            stdout=self._stderr,
            stderr=self._stderr,
            cwd=workdir,
            env=env,
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
        """Until atomnode's READY=1 (gearmand: until its port accepts); fail with the
        server's output if it does not come."""
        try:
            if self.notify is not None:
                self.notify.wait_for("READY", timeout, proc=self.proc)
            else:
                wait_listening(self.port, self.proc, timeout)
        except AssertionError as e:
            self.stop()
            pytest.fail(f"{self.kind} did not serve {self.address}: {e}\n{self.stderr_text()}",
                        pytrace=False)

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
        if self.notify is not None:
            self.notify.close()

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
