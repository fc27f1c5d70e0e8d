"""Command handlers (atomnode.workers.handlers) against a real gearmand 1.1.20 and real commands."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing

from atomnode.system.config import HandlerConfig
from atomnode.workers.handlers import HandlerPool
from atomnode.gearman.protocol import Decoder, Packet, T, encode
from daemon_harness import GEARMAND, free_port, start_gearmand


pytestmark = pytest.mark.interop


class Gearmand:
    def __init__(self, port: int):
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self.proc = start_gearmand(port, "-l", "stderr", "--verbose", "ERROR")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(5)


@pytest.fixture
def gearmand() -> Iterator[Gearmand]:
    if not os.access(GEARMAND, os.X_OK):
        pytest.fail(f"{GEARMAND} missing (scripts/sysdeps.sh test installs it)")
    g = Gearmand(free_port())
    try:
        yield g
    finally:
        g.stop()


# ---------------------------------------------------------------- tiny async client


class RawClient:
    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.dec = Decoder(expect_requests=False)

    @classmethod
    async def connect(cls, port: int) -> RawClient:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def send(self, type_: int, *args: bytes) -> None:
        await self.stream.send_all(encode(type_, *args, request=True))

    async def recv(self) -> Packet:
        while True:
            ev = self.dec.next_event()
            if ev is not None:
                assert isinstance(ev, Packet)
                return ev
            data = await self.stream.receive_some(65536)
            assert data, "server closed the connection"
            self.dec.feed(data)

    async def submit(self, fn: str, data: bytes, *, exceptions: bool = False) -> Packet:
        """Foreground job: return its final packet (WORK_COMPLETE / _FAIL / _EXCEPTION)."""
        if exceptions:
            await self.send(T.OPTION_REQ, b"exceptions")
            assert (await self.recv()).type == T.OPTION_RES
        await self.send(T.SUBMIT_JOB, fn.encode(), b"", data)
        assert (await self.recv()).type == T.JOB_CREATED
        while True:
            p = await self.recv()
            if p.type in (T.WORK_COMPLETE, T.WORK_FAIL, T.WORK_EXCEPTION):
                return p

    async def submit_bg(self, fn: str, data: bytes) -> None:
        await self.send(T.SUBMIT_JOB_BG, fn.encode(), b"", data)
        assert (await self.recv()).type == T.JOB_CREATED


async def admin(port: int, command: str) -> list[str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(command.encode() + b"\n")
        buf = b""
        while not (buf == b".\n" or buf.endswith(b"\n.\n")):
            data = await stream.receive_some(65536)
            assert data
            buf += data
    return buf.decode().splitlines()[:-1]


async def status(port: int) -> dict[str, tuple[int, int, int]]:
    out = {}
    for line in await admin(port, "status"):
        fn, total, running, workers = line.split("\t")
        out[fn] = (int(total), int(running), int(workers))
    return out



async def exits(pid: int) -> None:
    """Return once ``pid`` has exited (pidfd: an event, not a poll)."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        await trio.lowlevel.wait_readable(fd)
    finally:
        os.close(fd)


async def read_lines(fifo: Path, n: int) -> None:
    """Read ``n`` lines from a FIFO that several commands write to. Opened read-write, so
    it never reports EOF between writers and no line is lost."""
    stream = trio.lowlevel.FdStream(os.open(fifo, os.O_RDWR | os.O_NONBLOCK))
    async with stream:
        buf = b""
        while buf.count(b"\n") < n:
            buf += await stream.receive_some(4096)


# ---------------------------------------------------------------- tests


async def test_payload_on_stdin_result_on_stdout_via_gearman_cli(gearmand: Gearmand) -> None:
    cfg = HandlerConfig(function="h-upper", command=("tr", "a-z", "A-Z"), concurrency=1)
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        r = await trio.run_process(
            ["gearman", "-h", "127.0.0.1", "-p", str(gearmand.port), "-f", "h-upper",
             "hello world"], capture_stdout=True, capture_stderr=True)
        assert r.stdout == b"HELLO WORLD"
        assert pool.snapshot() == {"function": "h-upper", "concurrency": 1, "running": 0,
                                   "done": 1, "failed": 0}
        await pool.shutdown(1)


async def test_binary_payload_and_environment(gearmand: Gearmand, tmp_path: Path) -> None:
    cfg = HandlerConfig(
        function="h-env", shell=True, directory=str(tmp_path),
        command=('printf "%s|%s|%s|" "$ATOMNODE_FUNCTION" "$GREETING" "$(pwd)"; od -An -tx1',),
        environment={"GREETING": "hi"},
    )
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        c = await RawClient.connect(gearmand.port)
        p = await c.submit("h-env", b"\x00\x01\xff")
        assert p.type == T.WORK_COMPLETE
        assert p.args[1].split() == [f"h-env|hi|{tmp_path}|".encode(), b"00", b"01", b"ff"]
        await pool.shutdown(1)


async def test_nonzero_exit_fails_the_job(gearmand: Gearmand) -> None:
    cfg = HandlerConfig(function="h-fail", shell=True,
                        command=('cat >/dev/null; echo "it broke: $$" >&2; exit 3',))
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        plain = await RawClient.connect(gearmand.port)
        p = await plain.submit("h-fail", b"x")
        # gearmand turns the handler's WORK_EXCEPTION into WORK_FAIL for this client.
        assert p.type == T.WORK_FAIL
        wants_exc = await RawClient.connect(gearmand.port)
        p = await wants_exc.submit("h-fail", b"x", exceptions=True)
        assert p.type == T.WORK_EXCEPTION
        assert b"exited with code 3: it broke:" in p.args[1]
        assert pool.snapshot()["failed"] == 2
        # The job is over in the server and the handler's connection is still good.
        assert (await status(gearmand.port))["h-fail"] == (0, 0, 1)
        await pool.shutdown(1)
    assert pool.snapshot()["done"] == 0


async def test_timeout_kills_the_process_group(gearmand: Gearmand, tmp_path: Path) -> None:
    pidfile = tmp_path / "pids"
    cfg = HandlerConfig(
        function="h-hang", shell=True, timeout=0.5,
        command=(f"sleep 1000 & echo $! >> {pidfile}; echo $$ >> {pidfile}; wait",),
    )
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        c = await RawClient.connect(gearmand.port)
        p = await c.submit("h-hang", b"", exceptions=True)
        assert p.type == T.WORK_EXCEPTION
        assert p.args[1] == b"timed out after 0.5s"
        pids = [int(x) for x in pidfile.read_text().split()]
        assert len(pids) == 2
        with trio.fail_after(5):
            for pid in pids:
                await exits(pid)
        await pool.shutdown(1)


async def test_concurrency_runs_n_at_once_and_shows_in_status(
    gearmand: Gearmand, tmp_path: Path
) -> None:
    fifo = tmp_path / "started"
    os.mkfifo(fifo)
    cfg = HandlerConfig(function="h-conc", shell=True, concurrency=3,
                        command=(f"echo started > {fifo}; exec sleep 1000",))
    pool = HandlerPool(cfg, (gearmand.address,))

    async with trio.open_nursery() as n:
        await n.start(pool.run)
        st = await status(gearmand.port)
        assert st["h-conc"] == (0, 0, 3)
        workers = await admin(gearmand.port, "workers")
        ids = sorted(line.split()[2] for line in workers if "h-conc" in line)
        assert ids == [f"atomnode-handler:h-conc:{i}" for i in range(3)]
        c = await RawClient.connect(gearmand.port)
        for i in range(4):
            await c.submit_bg("h-conc", b"%d" % i)
        with trio.fail_after(10):
            await read_lines(fifo, 3)
        assert pool.snapshot()["running"] == 3
        assert (await status(gearmand.port))["h-conc"] == (4, 3, 3)
        # Shutdown with no grace: the commands are killed, their jobs go back to the queue.
        with trio.fail_after(10):
            await pool.shutdown(0)
    st = await status(gearmand.port)
    assert st["h-conc"] == (4, 0, 0)
    assert pool.snapshot()["done"] == 0


async def test_shutdown_kills_a_command_that_was_still_starting(
    gearmand: Gearmand, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """open_process starts the command from a thread, so a command can run before its
    slot knows it. A shutdown in that moment must still kill it when the slot resumes,
    not wait for it forever (it used to: 1 run in 6-10 of the test above hung so)."""
    real_open = trio.lowlevel.open_process
    spawned = trio.Event()
    resume = trio.Event()

    async def slow_open(*args, **kwargs):
        proc = await real_open(*args, **kwargs)
        spawned.set()
        await resume.wait()  # the slot resumes only after shutdown killed the others
        return proc

    monkeypatch.setattr(trio.lowlevel, "open_process", slow_open)
    cfg = HandlerConfig(function="h-start", shell=True, concurrency=1,
                        command=("exec sleep 1000",))
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        c = await RawClient.connect(gearmand.port)
        await c.submit_bg("h-start", b"x")
        with trio.fail_after(10):
            await spawned.wait()
        n.start_soon(pool.shutdown, 0)
        await trio.testing.wait_all_tasks_blocked()  # shutdown waits for the slot now
        resume.set()
        with trio.fail_after(10):
            await pool._finished.wait()
    assert (await status(gearmand.port))["h-start"] == (1, 0, 0)


async def test_reconnects_when_the_server_comes_back(gearmand: Gearmand) -> None:
    cfg = HandlerConfig(function="h-back", command=("cat",), concurrency=1)
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        gearmand.stop()
        g2 = await trio.to_thread.run_sync(Gearmand, gearmand.port)
        try:
            with trio.fail_after(15):
                c = await RawClient.connect(g2.port)
                p = await c.submit("h-back", b"again")
            assert p.type == T.WORK_COMPLETE and p.args[1] == b"again"
            await pool.shutdown(1)
        finally:
            g2.stop()


async def test_runs_as_another_user(gearmand: Gearmand) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root")
    cfg = HandlerConfig(function="h-user", command=("id", "-un"), user="nobody")
    pool = HandlerPool(cfg, (gearmand.address,))
    async with trio.open_nursery() as n:
        await n.start(pool.run)
        c = await RawClient.connect(gearmand.port)
        p = await c.submit("h-user", b"")
        assert p.args[1] == b"nobody\n"
        await pool.shutdown(1)


async def test_shutdown_lets_running_commands_finish(gearmand: Gearmand, tmp_path: Path) -> None:
    started, go = tmp_path / "started", tmp_path / "go"
    os.mkfifo(started)
    os.mkfifo(go)
    cfg = HandlerConfig(function="h-finish", shell=True,
                        command=(f"echo up > {started}; cat {go}",))
    pool = HandlerPool(cfg, (gearmand.address,))
    result: list[Packet] = []

    async def client() -> None:
        c = await RawClient.connect(gearmand.port)
        result.append(await c.submit("h-finish", b""))

    def wait_started() -> None:
        with open(started) as f:
            f.read()

    def release() -> None:
        with open(go, "w") as f:
            f.write("finished")

    async with trio.open_nursery() as n:
        await n.start(pool.run)
        n.start_soon(client)
        with trio.fail_after(10):
            await trio.to_thread.run_sync(wait_started)
        async with trio.open_nursery() as inner:
            inner.start_soon(pool.shutdown, 30)
            await trio.to_thread.run_sync(release)
    assert result and result[0].type == T.WORK_COMPLETE and result[0].args[1] == b"finished"
    assert pool.snapshot()["done"] == 1
