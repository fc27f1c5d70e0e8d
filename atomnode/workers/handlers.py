"""In-process command handlers: serve a Gearman function by running a command per job.

Each of a handler's ``concurrency`` slots is a small Gearman worker that connects over TCP
to the server(s) like any other worker, so it shows in ``status`` / ``workers`` (AtoM's
availability check sees it) and works against an external gearmand as well:

    SET_CLIENT_ID atomnode-handler:<function>:<slot>, CAN_DO <function>, ECHO_REQ
    loop: GRAB_JOB_UNIQ -> JOB_ASSIGN_UNIQ | NO_JOB -> PRE_SLEEP -> NOOP

Per job the command runs in its own process group with the payload on stdin. Exit 0:
stdout is the WORK_COMPLETE result. Non-zero exit or timeout: WORK_EXCEPTION with the
tail of stderr (or "timed out after Ns"). WORK_EXCEPTION alone ends the job: gearmand
(libgearman-server/server.cc) forwards it to clients that sent OPTION_REQ "exceptions",
sends WORK_FAIL to every other client, and frees the job; a WORK_FAIL sent afterwards
would only earn the worker an ERROR "job not found". A timed-out command gets SIGTERM on
its process group, then SIGKILL 5 s later.

On shutdown the slots stop grabbing; running commands get up to the shutdown timeout,
then their process groups are killed and the connection is closed without a result, so
the server puts the job back in the queue.
"""

from __future__ import annotations

import logging
import math
import signal
import subprocess
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import trio

from . import procinfo
from ..gearman.protocol import Decoder, Packet, T, encode
from ..system.values import parse_address

if TYPE_CHECKING:  # pragma: no cover
    from ..system.config import HandlerConfig

log = logging.getLogger("atomnode.handlers")  # stable name: operators see it in the journal

#: Largest command output accepted as a result; more fails the job.
MAX_RESULT = 64 * 1024 * 1024
#: How much of stderr is kept for the failure message.
STDERR_TAIL = 4096
#: SIGTERM -> SIGKILL delay for a timed-out command.
KILL_GRACE = 5.0
RECONNECT_MIN = 0.5
RECONNECT_MAX = 10.0


class ConnectionLost(Exception):
    """The server closed the connection or sent something unexpected."""


class _Abandon(Exception):
    """The job's command was killed by shutdown: close without a result."""


class _Receiver:
    """What the worker side of a connection reads: replies decoded by ``self.decoder``,
    more bytes brought in by the subclass's ``_more`` (raising ConnectionLost when none
    can come)."""

    decoder: Decoder

    async def _more(self) -> None:
        raise NotImplementedError

    async def receive(self, wanted: Iterable[int]) -> Packet:
        """Next packet of one of the ``wanted`` types; NOOPs in between are skipped."""
        wanted = set(wanted)
        while True:
            ev = self.decoder.next_event()
            if ev is None:
                await self._more()
                continue
            assert isinstance(ev, Packet)
            if ev.type in wanted:
                return ev
            if ev.type == T.NOOP:
                continue
            if ev.type == T.ERROR:
                raise ConnectionLost(
                    "server error: " + b": ".join(ev.args).decode("utf-8", "replace"))
            raise ConnectionLost(f"unexpected {ev.name}")


class _Conn(_Receiver):
    """A worker-side Gearman connection (client-side decoder)."""

    def __init__(self, stream: trio.SocketStream):
        self.stream = stream
        self.decoder = Decoder(expect_requests=False)

    @classmethod
    async def connect(cls, server: str) -> _Conn:
        host, port = parse_address(server, default_port=4730)
        return cls(await trio.open_tcp_stream(host, port))

    async def send(self, *packets: bytes) -> None:
        await self.stream.send_all(b"".join(packets))

    async def _more(self) -> None:
        data = await self.stream.receive_some(65536)
        if not data:
            raise ConnectionLost("server closed the connection")
        self.decoder.feed(data)

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


class LocalConn(_Receiver):
    """The same worker-side interface as :class:`_Conn`, for a worker inside the daemon:
    it talks to the broker through the server's in-process connections
    (``Server.attach_local``), so a job costs no TCP round trip to ourselves. It shows
    in ``workers`` (address ``local``) and counts in ``status`` like any worker."""

    def __init__(self, server: Any, client_id: bytes):
        self.server = server
        self.decoder = Decoder(expect_requests=False)
        self._requests = Decoder()
        self._arrived = trio.Event()
        self.closed = False
        self.conn = server.attach_local(self._deliver, client_id)

    def _deliver(self, data: bytes) -> None:
        self.decoder.feed(data)
        self._arrived.set()

    async def send(self, *packets: bytes) -> None:
        if self.closed:
            raise ConnectionLost("connection closed")
        self._requests.feed(b"".join(packets))
        while batch := self._requests.next_events():
            self.server.handle_local(self.conn, batch)

    async def _more(self) -> None:
        if self.closed:
            raise ConnectionLost("connection closed")
        self._arrived = trio.Event()
        await self._arrived.wait()

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            self.server.detach_local(self.conn)
            self._arrived.set()


async def kill_group(proc: trio.Process, grace: float = KILL_GRACE) -> None:
    """SIGTERM to the process group of ``proc``, SIGKILL ``grace`` seconds later if it has
    not exited, then SIGKILL to whatever else is left in the group."""
    procinfo.signal_group(proc.pid, signal.SIGTERM)
    with trio.move_on_after(grace):
        await proc.wait()
    if proc.returncode is None:
        procinfo.signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()
    procinfo.signal_group(proc.pid, signal.SIGKILL)


def _req(type_: int, *args: bytes) -> bytes:
    return encode(type_, *args, request=True)


class HandlerPool:
    """Serves ``cfg.function`` with ``cfg.concurrency`` worker connections.

    ``servers`` are used when the handler config names none (the embedded listener)."""

    def __init__(self, cfg: HandlerConfig, servers: tuple[str, ...]):
        self.cfg = cfg
        self.servers = tuple(cfg.servers) or tuple(servers)
        if not self.servers:
            raise ValueError(f"handler {cfg.function}: no server to connect to")
        self.running = 0
        self.done = 0
        self.failed = 0
        self._stopping = False
        self._grab_scopes: set[trio.CancelScope] = set()
        self._procs: dict[trio.Process, bool] = {}  # process -> killed by shutdown
        self._killing = False  # shutdown has killed the running commands
        self._idle = trio.Event()
        self._idle.set()
        self._finished = trio.Event()
        self._started = False

    # ------------------------------------------------------------------ public API

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run every slot until cancelled or shut down. ``started()`` once every slot has
        registered (CAN_DO sent, ECHO answered) or failed its first connection attempt."""
        self._started = True
        try:
            async with trio.open_nursery() as nursery:
                ready = [trio.Event() for _ in range(max(1, self.cfg.concurrency))]
                for i, ev in enumerate(ready):
                    nursery.start_soon(self._slot, i, ev)
                for ev in ready:
                    await ev.wait()
                task_status.started()
        finally:
            self._finished.set()

    async def shutdown(self, timeout: float) -> None:
        """Stop grabbing jobs; let running commands finish for up to ``timeout`` seconds,
        then kill their process groups (those jobs go back to the server's queue)."""
        self._stopping = True
        for scope in list(self._grab_scopes):
            scope.cancel()
        with trio.move_on_after(timeout):
            await self._idle.wait()
        self._killing = True
        for proc in list(self._procs):
            self._kill_at_shutdown(proc)
        if self._started:
            await self._finished.wait()

    def _kill_at_shutdown(self, proc: trio.Process) -> None:
        if proc.returncode is None:
            log.warning("handler %s: killing command pid %d at shutdown",
                        self.cfg.function, proc.pid)
            self._procs[proc] = True
            procinfo.signal_group(proc.pid, signal.SIGKILL)

    def snapshot(self) -> dict:
        """Function name, configured concurrency, running, done and failed job counts."""
        return {
            "function": self.cfg.function,
            "concurrency": self.cfg.concurrency,
            "running": self.running,
            "done": self.done,
            "failed": self.failed,
        }

    # ------------------------------------------------------------------ slots

    async def _slot(self, index: int, ready: trio.Event) -> None:
        fn = self.cfg.function
        client_id = f"atomnode-handler:{fn}:{index}".encode()
        delay = RECONNECT_MIN
        attempt = index  # spread slots over the servers
        while not self._stopping:
            server = self.servers[attempt % len(self.servers)]
            attempt += 1
            conn: _Conn | None = None
            try:
                conn = await _Conn.connect(server)
                await conn.send(
                    _req(T.SET_CLIENT_ID, client_id),
                    _req(T.CAN_DO, fn.encode()),
                    _req(T.ECHO_REQ, b"atomnode-handler"),
                )
                await conn.receive({T.ECHO_RES})
                if not ready.is_set():
                    log.info("handler %s slot %d registered with %s", fn, index, server)
                ready.set()
                delay = RECONNECT_MIN
                await self._work(conn)
                return  # stopping
            except (OSError, trio.BrokenResourceError, trio.ClosedResourceError,
                    ConnectionLost, _Abandon, ValueError) as exc:
                if self._stopping:
                    return
                log.warning("handler %s slot %d: connection to %s: %s; retrying in %gs",
                            fn, index, server, exc, delay)
            finally:
                if conn is not None:
                    await conn.aclose()
            ready.set()
            with trio.move_on_after(delay) as sleep_scope:
                self._grab_scopes.add(sleep_scope)
                try:
                    await trio.sleep_forever()
                finally:
                    self._grab_scopes.discard(sleep_scope)
            delay = min(delay * 2, RECONNECT_MAX)

    async def _work(self, conn: _Conn) -> None:
        while not self._stopping:
            job: Packet | None = None
            with trio.CancelScope() as scope:
                self._grab_scopes.add(scope)
                try:
                    while job is None:
                        await conn.send(_req(T.GRAB_JOB_UNIQ))
                        pkt = await conn.receive({T.JOB_ASSIGN_UNIQ, T.NO_JOB})
                        if pkt.type == T.NO_JOB:
                            await conn.send(_req(T.PRE_SLEEP))
                            await conn.receive({T.NOOP})
                        else:
                            job = pkt
                finally:
                    self._grab_scopes.discard(scope)
            if job is None:
                return  # shutdown cancelled the wait
            await self._run_job(conn, job)

    async def _run_job(self, conn: _Conn, job: Packet) -> None:
        handle, _func, unique, data = job.args
        self.running += 1
        self._idle = trio.Event()
        try:
            ok, result = await self._execute(handle, unique, data)
        finally:
            self.running -= 1
            if self.running == 0:
                self._idle.set()
        if ok:
            self.done += 1
            await conn.send(_req(T.WORK_COMPLETE, handle, result))
        else:
            self.failed += 1
            log.warning("handler %s: job %s failed: %s", self.cfg.function,
                        handle.decode("utf-8", "replace"),
                        result.decode("utf-8", "replace")[-500:])
            await conn.send(_req(T.WORK_EXCEPTION, handle, result))

    # ------------------------------------------------------------------ commands

    def _argv(self) -> list[str]:
        cmd = list(self.cfg.command)
        if self.cfg.shell:
            return ["/bin/sh", "-c", " ".join(cmd)]
        return cmd

    async def _execute(self, handle: bytes, unique: bytes, data: bytes) -> tuple[bool, bytes]:
        """Run the command for one job: (True, stdout) or (False, failure message).
        Raises _Abandon when shutdown killed it."""
        cfg = self.cfg
        opts = procinfo.spawn_options(
            user=cfg.user, group=cfg.group, directory=cfg.directory,
            environment=cfg.environment,
            extra_env={
                "ATOMNODE_FUNCTION": cfg.function,
                "ATOMNODE_JOB_HANDLE": handle.decode("utf-8", "replace"),
                "ATOMNODE_JOB_UNIQUE": unique.decode("utf-8", "replace"),
            },
        )
        try:
            proc = await trio.lowlevel.open_process(
                self._argv(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                stderr=subprocess.PIPE, **opts,
            )
        except (OSError, KeyError, subprocess.SubprocessError) as exc:
            return False, f"cannot start command: {exc}".encode()
        self._procs[proc] = False
        if self._killing:
            # open_process starts the command from a thread: it may have run (and been
            # seen running) before this task resumed, after shutdown killed the others.
            self._kill_at_shutdown(proc)
        out = bytearray()
        err = bytearray()
        too_big = False
        timed_out = False

        async def feed() -> None:
            assert proc.stdin is not None
            try:
                if data:
                    await proc.stdin.send_all(data)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass  # the command does not read its input
            finally:
                await proc.stdin.aclose()

        async def read_out(done: trio.Event) -> None:
            nonlocal too_big
            assert proc.stdout is not None
            try:
                while chunk := await proc.stdout.receive_some(65536):
                    if len(out) + len(chunk) > MAX_RESULT:
                        too_big = True
                    else:
                        out.extend(chunk)
            finally:
                done.set()

        async def read_err(done: trio.Event) -> None:
            assert proc.stderr is not None
            try:
                while chunk := await proc.stderr.receive_some(65536):
                    err.extend(chunk)
                    if len(err) > STDERR_TAIL:
                        del err[: len(err) - STDERR_TAIL]
            finally:
                done.set()

        try:
            async with trio.open_nursery() as n:
                out_done, err_done = trio.Event(), trio.Event()
                n.start_soon(feed)
                n.start_soon(read_out, out_done)
                n.start_soon(read_err, err_done)
                limit = cfg.timeout if cfg.timeout else math.inf
                with trio.move_on_after(limit) as scope:
                    await proc.wait()
                if scope.cancelled_caught:
                    timed_out = True
                    await self._kill(proc)
                # Background children may hold the pipes: read what is there, then stop.
                with trio.move_on_after(1.0):
                    await out_done.wait()
                    await err_done.wait()
                n.cancel_scope.cancel()
        finally:
            if proc.returncode is None:
                with trio.CancelScope(shield=True):
                    procinfo.signal_group(proc.pid, signal.SIGKILL)
                    await proc.wait()
            killed_by_shutdown = self._procs.pop(proc, False)
        if killed_by_shutdown:
            raise _Abandon("killed at shutdown")
        if timed_out:
            return False, f"timed out after {cfg.timeout:g}s".encode()
        rc = proc.returncode
        if rc != 0:
            tail = bytes(err).strip()
            msg = f"command exited with {procinfo.signal_name(rc)}".encode()
            return False, (msg + b": " + tail) if tail else msg
        if too_big:
            return False, f"result larger than {MAX_RESULT} bytes".encode()
        return True, bytes(out)

    async def _kill(self, proc: trio.Process) -> None:
        await kill_group(proc)
