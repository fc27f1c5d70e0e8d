"""Job awareness on a worker host: the supervisor's registry, kept over the network.

A worker host runs atomnode with pools and no listener (``listen: []``); its workers talk
to a central atomnode. To drain before stop and recycle only when idle, the supervisor
needs what :class:`atomnode.daemon.WorkerRegistry` gives it on one box: which connection
holds which job, a way to stop assignments to a connection, and a wait until it is idle.
:class:`RemoteRegistry` provides the same three operations by keeping one admin connection
to every server the pools name, speaking the ``atomnode-host`` extension
(atomnode/gearman/hosts.py, docs/protocol.md):

* every ``poll`` seconds (``fast_poll`` while someone waits for a worker to go idle) it
  reads ``atomnode-host conns``: this host's connections, their jobs and counters;
* ``drain`` sends ``atomnode-host drain ID`` (queued while the link is down);
* ``wait_idle`` returns once a listing read *after* the server acknowledged the drain
  shows the connection holding no job (or gone);
* ``refresh`` waits for a listing taken now (the supervisor calls it before it drains a
  worker, so a connection made since the last poll is not missed);
* every ``report_interval`` seconds it sends ``atomnode-host report`` with the pools'
  snapshot, so the central ``atomnode status`` lists this host's workers.

Connections are matched to worker processes by the supervisor exactly as on one box
(client id, else the socket in /proc/net/tcp of *this* host): the server reports each
connection's addresses as it sees them, which are this host's socket's addresses
reversed.

A server that answers ``ERR UNKNOWN_COMMAND`` is not atomnode (a gearmand, a gearmand
cluster member): the link says so once, :attr:`aware` stays False, and the pools run as
with plain systemd units (stop is SIGTERM, no drain, no recycle limits).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

import trio

from ..system.values import parse_address
from .supervisor import ConnInfo

log = logging.getLogger("atomnode.supervisor")

#: Seconds between two listings of this host's connections on each server.
POLL = 1.0
#: ... while a drain waits for a job to end.
FAST_POLL = 0.1
#: Seconds between two reports of the pools to the server.
REPORT_INTERVAL = 5.0
#: Seconds before a lost or refused admin link is tried again.
RETRY = 5.0
#: Seconds to wait for one answer from the server.
ANSWER_TIMEOUT = 10.0


#: One of this host's connections as a server sees it: the supervisor's ConnInfo, its
#: ``conn_id`` being (server address, the server's connection id).
RemoteConn = ConnInfo


class ServerRefused(Exception):
    pass


class _Link:
    """One admin connection to one server."""

    def __init__(self, address: str):
        self.address = address
        self.host, self.port = parse_address(address)
        self.conns: dict[int, RemoteConn] = {}
        self.connected = False
        self.aware: bool | None = None  # None: not known yet
        self.generation = 0  # listings read so far
        self.updated = trio.Event()
        self.pending: dict[int, str] = {}  # conn id -> "drain" | "release", not yet sent
        self.acked: dict[int, int] = {}  # conn id -> generation when the drain was OK'd
        self.waiters = 0
        self.kick = trio.Event()
        self.error: str | None = None
        self._buf = b""

    def _bump(self) -> None:
        self.generation += 1
        ev, self.updated = self.updated, trio.Event()
        ev.set()

    async def _readline(self, stream: trio.SocketStream) -> bytes:
        while b"\n" not in self._buf:
            chunk = await stream.receive_some(65536)
            if not chunk:
                raise ServerRefused("the server closed the connection")
            self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return line.rstrip(b"\r")

    async def command(self, stream: trio.SocketStream, line: str, listing: bool = False
                      ) -> list[bytes]:
        with trio.fail_after(ANSWER_TIMEOUT):
            await stream.send_all(line.encode() + b"\n")
            first = await self._readline(stream)
            if not listing or first.startswith(b"ERR"):
                return [first]
            out = []
            while first != b".":
                out.append(first)
                first = await self._readline(stream)
            return out

    async def list_conns(self, stream: trio.SocketStream) -> None:
        lines = await self.command(stream, "atomnode-host conns", listing=True)
        if lines and lines[0].startswith(b"ERR"):
            raise _NotAware(lines[0].decode("utf-8", "replace"))
        rows = json.loads(lines[0]) if lines else []
        conns = {}
        for r in rows:
            conns[int(r["id"])] = RemoteConn(
                conn_id=(self.address, int(r["id"])),
                peer=(str(r["peer"][0]), int(r["peer"][1])),
                local=(str(r["local"][0]), int(r["local"][1])),
                client_id=str(r["client_id"]),
                abilities=tuple(r["abilities"]),
                jobs=tuple(r["jobs"]),
                jobs_done=int(r["jobs_done"]),
                draining=bool(r["draining"]),
            )
        self.conns = conns
        self._bump()


class _NotAware(Exception):
    pass


class RemoteRegistry:
    """The supervisor's WorkerRegistry on a worker host. See the module docstring."""

    def __init__(
        self,
        servers: Sequence[str],
        *,
        hostname: str,
        poll: float = POLL,
        fast_poll: float = FAST_POLL,
        report_interval: float = REPORT_INTERVAL,
        retry: float = RETRY,
    ):
        self.links = {a: _Link(a) for a in dict.fromkeys(servers)}
        self.hostname = hostname
        self.poll = poll
        self.fast_poll = fast_poll
        self.report_interval = report_interval
        self.retry = retry
        #: Set by the daemon once the supervisor exists: its ``snapshot()``.
        self.snapshot: Callable[[], list[dict]] | None = None

    # ---------------------------------------------------- WorkerRegistry API
    @property
    def aware(self) -> bool:
        """True when at least one server gives job awareness (an atomnode)."""
        return any(link.aware for link in self.links.values())

    def connections(self) -> list[RemoteConn]:
        return [c for link in self.links.values() for c in link.conns.values()]

    def drain(self, conn_id: Any) -> None:
        address, cid = conn_id
        link = self.links.get(address)
        if link is None:
            return
        link.pending[cid] = "drain"
        link.acked.pop(cid, None)
        link.kick.set()

    def release(self, conn_id: Any) -> None:
        address, cid = conn_id
        link = self.links.get(address)
        if link is not None:
            link.pending[cid] = "release"
            link.kick.set()

    async def wait_idle(self, conn_id: Any) -> None:
        """Return once the server confirmed the drain and the connection holds no job
        (or has gone). Without job awareness (gearmand, or a server never reached)
        returns at once; a link lost after it was up keeps waiting (the supervisor bounds
        the wait with ``drain_timeout``)."""
        address, cid = conn_id
        link = self.links.get(address)
        if link is None:
            return
        link.waiters += 1
        link.kick.set()
        try:
            while True:
                if link.aware is not True:
                    return  # never reached, or not an atomnode: nothing to wait for
                acked = link.acked.get(cid)
                if acked is not None and link.generation > acked:
                    c = link.conns.get(cid)
                    if c is None or not c.jobs:
                        return
                await link.updated.wait()
        finally:
            link.waiters -= 1

    async def refresh(self, timeout: float = 5.0) -> None:
        """Return once every connected link has read a listing that started after this
        call (bounded by ``timeout``): the supervisor calls it before draining a worker."""
        targets = [(link, link.generation) for link in self.links.values()
                   if link.connected and link.aware]
        for link, _ in targets:
            link.waiters += 1
            link.kick.set()
        try:
            with trio.move_on_after(timeout):
                for link, gen in targets:
                    # gen + 1 may be a listing already under way; gen + 2 started after.
                    while link.connected and link.generation < gen + 2:
                        await link.updated.wait()
        finally:
            for link, _ in targets:
                link.waiters -= 1

    def status(self) -> list[dict[str, Any]]:
        """Per server: address, connected, aware, this host's connections, last error."""
        return [
            {"server": a, "connected": link.connected, "aware": link.aware,
             "connections": len(link.conns), "error": link.error}
            for a, link in self.links.items()
        ]

    # ----------------------------------------------------------------- links
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as n:
            for link in self.links.values():
                n.start_soon(self._run_link, link)
            task_status.started()

    async def _run_link(self, link: _Link) -> None:
        last_problem: str | None = None
        while True:
            problem = None
            try:
                with trio.fail_after(ANSWER_TIMEOUT):
                    stream = await trio.open_tcp_stream(link.host, link.port)
                link._buf = b""
                async with stream:
                    await link.list_conns(stream)
                    link.connected = True
                    if link.aware is not True:
                        log.info("job awareness from %s: draining and recycling apply to "
                                 "this host's workers", link.address)
                    link.aware = True
                    link.error = None
                    last_problem = None
                    await self._serve_link(link, stream)
            except _NotAware as e:
                problem = (f"{link.address} is not an atomnode server ({e}): this host's "
                           "workers run without job awareness there (no drain before "
                           "stop, no recycle limits)")
                link.aware = False
                link.conns = {}
                link._bump()
            except ServerRefused:
                problem = (f"{link.address} closed the admin connection at once: is this "
                           "host's address in the allow: list of the server's "
                           "configuration?")
            except (OSError, trio.BrokenResourceError, trio.TooSlowError, ValueError,
                    KeyError, TypeError) as e:
                problem = f"cannot reach {link.address}: {e or type(e).__name__}"
            link.connected = False
            link.error = problem
            link._bump()  # waiters re-check (aware may have changed)
            if problem != last_problem:
                log.warning("%s; retrying every %gs", problem, self.retry)
                last_problem = problem
            await trio.sleep(self.retry)

    async def _serve_link(self, link: _Link, stream: trio.SocketStream) -> None:
        next_report = trio.current_time()
        while True:
            for cid, what in list(link.pending.items()):
                answer = (await link.command(stream, f"atomnode-host {what} {cid}"))[0]
                if not answer.startswith(b"OK"):
                    log.error("server %s refused `atomnode-host %s %d`: %s", link.address,
                              what, cid, answer.decode("utf-8", "replace"))
                if link.pending.get(cid) == what:
                    del link.pending[cid]
                if what == "drain":
                    link.acked[cid] = link.generation
            await link.list_conns(stream)
            if self.snapshot is not None and trio.current_time() >= next_report:
                next_report = trio.current_time() + self.report_interval
                await self._report(link, stream)
            link.kick = trio.Event()
            if link.pending:
                continue
            with trio.move_on_after(self.fast_poll if link.waiters else self.poll):
                await link.kick.wait()

    async def _report(self, link: _Link, stream: trio.SocketStream) -> None:
        assert self.snapshot is not None
        doc = {"host": self.hostname, "aware": True, "pools": self.snapshot()}
        text = json.dumps(doc, separators=(",", ":"))
        if len(text) > 60000:
            for p in doc["pools"]:
                p["workers"] = p["workers"][:20]
            text = json.dumps(doc, separators=(",", ":"))
        answer = (await link.command(stream, "atomnode-host report " + text))[0]
        if not answer.startswith(b"OK"):
            log.debug("report to %s refused: %s", link.address, answer)


__all__ = ["RemoteConn", "RemoteRegistry"]
