"""Composition root: builds every part from the Config and runs them in one nursery.

Start order (each step only after the previous one succeeded):
store opened and recovered -> jobs restored into the broker -> writer thread started ->
port bound -> listener serving -> handlers and pools started -> READY=1.
Stop order: STOPPING=1 -> stop accepting -> drain (no new assignments; workers finish
what they hold, bounded by shutdown_timeout; pools drained and stopped) -> writer
flushed -> exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import trio

from . import __version__
from .gearman.admin import Admin
from .gearman.broker import Broker, Conn, Function
from .system.access import (
    is_loopback,
    listen_problem,
    loopback_only,
    parse_networks,
    peer_allowed,
)
from .system.config import (
    Config,
    ConfigError,
    control_socket_path,
    function_matches,
    load_config,
)
from .gearman.server import Server
from .queue import commands
from .queue.reads import StoreReader, StoreReadError
from .queue.store import Store, StoreError, parse_handle
from .system import memory
from .system.values import connectable, format_address
from .workers import keeper, procinfo
from .workers.supervisor import ConnInfo
from .system.systemd import Notifier, listen_fds, status_task, watchdog_interval, watchdog_task

log = logging.getLogger("atomnode")

#: The writer must finish a turn at least this often, or the watchdog pings stop.
WRITER_STALL_LIMIT = 20.0


class BrokerRegistry:
    """The supervisor's :class:`~atomnode.workers.supervisor.WorkerRegistry`, served by the
    broker and the server: which connection holds which job."""

    def __init__(self, server: Server):
        self.server = server

    def connections(self) -> list[ConnInfo]:
        out = []
        for c in self.server.broker.conns.values():
            out.append(ConnInfo(
                conn_id=c.id,
                peer=(c.peer, c.peer_port),
                local=c.local,
                client_id=c.client_id.decode("utf-8", "replace"),
                abilities=tuple(f.name.decode("utf-8", "replace") for f in c.functions),
                jobs=tuple(h.decode() for h in c.held),
                jobs_done=c.jobs_done,
                draining=c.draining,
            ))
        return out

    def drain(self, conn_id: int) -> None:
        conn = self.server.broker.conns.get(conn_id)
        if conn is not None:
            self.server.broker.drain(conn)

    async def wait_idle(self, conn_id: int) -> None:
        conn = self.server.broker.conns.get(conn_id)
        if conn is not None:
            await self.server.wait_idle(conn)


class _WebReply:
    """A console action waiting for the store: set when the writer has committed (or
    refused) it, through :meth:`resolve` (the broker calls it)."""

    def __init__(self, kind: str, handle: str):
        self.kind = kind
        self.handle = handle
        self.ok = False
        self.message = ""
        self.done = trio.Event()

    def resolve(self, ok: bool, detail: str) -> None:
        self.ok = ok
        if not ok:
            self.message = detail
        self.done.set()


class Daemon:
    """One running atomnode. ``run()`` returns the process exit code."""

    def __init__(self, cfg: Config, *, config_path: str | None = None,
                 overrides: dict[str, Any] | None = None):
        self.cfg = cfg
        self.config_path = config_path
        self.overrides = overrides or {}
        self.hostname = socket.gethostname()
        self.notifier = Notifier()
        self.store: Store | None = None
        self.broker: Broker | None = None
        self.server: Server | None = None
        self.supervisor: Any = None
        self.handlers: dict[str, Any] = {}
        self._handler_scopes: dict[str, trio.CancelScope] = {}
        self.runners: dict[str, Any] = {}  # per-job AtoM runners (workers/atom_runner.py)
        self._runner_scopes: dict[str, trio.CancelScope] = {}
        self.shutdown: trio.Event | None = None  # created inside trio.run
        self.graceful = True
        self.ready = False
        self._nursery_for_handlers: trio.Nursery | None = None  # where reloads start handlers
        self._failed_cache: tuple[float, dict[str, int]] | None = None  # (when, per function)
        self._file_sizes: tuple[int | None, int | None] = (None, None)  # database, -wal
        self.admin: Admin | None = None
        self.http_bound: list[tuple[str, int]] = []
        self.started_at = time.time()
        self._last_sample: dict[bytes, tuple[int, int, Any]] = {}
        #: Why the daemon serves loopback only although configured otherwise (issue 14).
        self.access_error: str | None = None
        self.remote_registry: Any = None  # a worker host's RemoteRegistry
        # AtoM job records to mark failed: (marker, AtoM job id, reason), done in a thread.
        self._atom_markers: list[Any] = []
        self._atom_pending: list[tuple[Any, int, str]] = []
        self._atom_wake: trio.Event | None = None
        self._trim_wanted = False  # freed memory to hand back (see _gc_task)
        self._gc_deep = False  # a deep queue froze the collector's view (see _gc_tick)
        self.owner_token = ""  # ATOMNODE_OWNER of this run's processes (workers.keeper)
        self.keeper: Any = None

    # ----------------------------------------------------------------- config
    def max_attempts(self, function: bytes) -> int:
        name = function.decode("utf-8", "replace")
        for pattern, fc in self.cfg.functions.items():
            if fc.max_attempts is not None and function_matches(pattern, name):
                return fc.max_attempts
        return self.cfg.max_attempts

    def _function_defaults(self, fn: Function) -> None:
        name = fn.name.decode("utf-8", "replace")
        for pattern, fc in self.cfg.functions.items():
            if fc.max_queue is not None and function_matches(pattern, name):
                fn.max_queue = fc.max_queue

    def _apply_runtime_config(self) -> None:
        broker = self.broker
        assert broker is not None
        from .ops.atom_jobs import SiteMarker

        old = {(m.root, m.prefix): m for m in self._atom_markers}
        self._atom_markers = [
            old.get((s.root, s.prefix)) or SiteMarker(s.root, s.prefix)
            for s in self.cfg.atom_sites
            if s.mark_failed_jobs
        ]
        broker.set_concurrency(
            (g.name, g.functions, g.max, g.span_sites) for g in self.cfg.concurrency
        )
        for fn in broker.functions.values():
            self._function_defaults(fn)

    def _on_given_up(self, job: Any, conn: Conn | None, reason: str) -> None:
        """The broker gave a job up: its worker's slot restarts at once (the cause is set
        aside), and AtoM's own record of the job is marked failed where configured."""
        if conn is not None and self.supervisor is not None:
            self.supervisor.job_given_up(conn.id, conn.client_id.decode("utf-8", "replace"))
        if job.background:
            self._mark_atom_failed(job.function.name, job.data, job.handle, reason)

    def _mark_atom_failed(self, function: bytes, data: bytes, handle: bytes, reason: str
                          ) -> None:
        """A background job failed for good: mark AtoM's own record of it failed, where
        ``atom_sites`` asks for it (only a record still "in progress" is changed)."""
        if not self._atom_markers:
            return
        from .ops.atom_jobs import atom_job_id

        name = function.decode("utf-8", "replace")
        marker = next((m for m in self._atom_markers if m.owns(name)), None)
        atom_id = atom_job_id(data) if marker is not None else None
        if marker is None or atom_id is None:
            return
        self._atom_pending.append((marker, atom_id, f"{reason} (job {handle.decode()})"))
        if self._atom_wake is not None:
            self._atom_wake.set()

    async def _atom_marker_task(self) -> None:
        """Marks AtoM job records failed, one at a time, in a worker thread."""
        while True:
            self._atom_wake = trio.Event()
            while self._atom_pending:
                marker, atom_id, reason = self._atom_pending.pop(0)
                await trio.to_thread.run_sync(marker.mark_failed, atom_id, reason)
            await self._atom_wake.wait()

    def _pool_servers(self) -> tuple[str, ...]:
        if not self.server or not self.server.bound:
            return ()
        host, port = self.server.bound[0]
        return (format_address(connectable(host), port),)

    # ----------------------------------------------------------------- status
    def status_line(self) -> str:
        b = self.broker
        if b is None:
            return "starting"
        workers = sum(1 for c in b.conns.values() if c.functions)
        parts = [f"queued {b.queued_jobs()}", f"running {b.running_jobs()}",
                 f"workers {workers}"]
        if self.store is not None and not self.store.healthy:
            parts.append(f"QUEUE ERROR: {self.store.last_error}")
        elif self.store is not None and self.store.damage:
            parts.append(f"QUEUE DAMAGED: {self.store.damage}")
        elif self.store is not None and self.store.incident:
            parts.append(f"QUEUE INCIDENT: {self.store.incident}")
        text = ", ".join(parts)
        if self.access_error:
            text = "LOOPBACK ONLY (no allow: list); " + text
        if self.supervisor is not None:
            summary = self.supervisor.summary()
            if summary:
                text += "; " + summary
        for runner in self.runners.values():
            text += "; " + runner.summary()
        return text

    def extra_status(self) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        if self.store is not None:
            failed = self._failed_by_function()
            last = self.store.last_commit_seconds
            doc["queue"] = {
                "failed": None if failed is None else sum(failed.values()),
                "store_healthy": self.store.healthy,
                "store_error": self.store.last_error,
                "store_pending": self.store.pending,
                "store_incident": self.store.incident,
                "store_damage": self.store.damage,
                "database": self.cfg.database,
                "database_size": self._file_sizes[0],
                "wal_size": self._file_sizes[1],
                "last_commit_ms": None if last is None else round(last * 1000, 3),
            }
            if failed is not None:
                doc["failed_by_function"] = failed
        doc["http"] = [format_address(h, p) for h, p in self.http_bound]
        if self.supervisor is not None:
            doc["pools"] = self.supervisor.snapshot()
        if self.handlers:
            doc["handlers"] = [h.snapshot() for h in self.handlers.values()]
        if self.runners:
            doc["runners"] = [r.snapshot() for r in self.runners.values()]
        doc["ready"] = self.ready
        doc["access"] = {"error": self.access_error}
        if self.remote_registry is not None:
            doc["worker_host"] = {"servers": self.remote_registry.status()}
        return doc

    def _failed_by_function(self) -> dict[str, int] | None:
        """Jobs in state failed (quarantined until an operator retries them) per function,
        as last counted by :meth:`_count_failed_task`. Status requests only read this:
        nothing on the event loop touches the disk (an I/O stall would freeze every
        client and worker with it)."""
        return self._failed_cache[1] if self._failed_cache is not None else None

    def _count_failed(self) -> dict[str, int] | None:
        """In a worker thread: a short read-only query; WAL readers never block the writer.
        Out of file descriptors (or any OS error) it says "unknown", never kills the
        daemon."""
        try:
            with StoreReader(self.cfg.database, timeout=0.5) as reader:
                return reader.failed_by_function()
        except (StoreReadError, OSError):
            return None

    async def refresh_failed_count(self) -> None:
        """Count the failed jobs now (after a retry or cancel from the console)."""
        n = await trio.to_thread.run_sync(self._count_failed, abandon_on_cancel=True)
        self._failed_cache = (time.monotonic(), n) if n is not None else None
        db = self.cfg.database
        self._file_sizes = await trio.to_thread.run_sync(
            lambda: (_file_size(db), _file_size(db + "-wal")), abandon_on_cancel=True
        )  # a stat() too can hang on a stalled disk (NFS): never on the event loop

    # --------------------------------------------------------- console hooks
    def status_document(self) -> dict[str, Any]:
        """What ``atomnode status --json`` prints, for the console's /api/status."""
        assert self.admin is not None and self.server is not None
        doc = self.admin.status_document(self.server)
        doc.setdefault("degraded", False)
        return doc

    async def change_jobs(self, verb: str, handles: list[str]) -> list[dict[str, Any]]:
        """The console's retry/cancel: one result per handle (``handle``, ``ok``,
        ``message``), answered once the change is committed (retry) or submitted."""
        from .queue.reads import StoreReader, StoreReadError

        def stored_state(job_id: int) -> str | None:
            with StoreReader(self.cfg.database) as reader:
                return reader.state(job_id)

        broker, server, store = self.broker, self.server, self.store
        assert broker is not None and server is not None and store is not None
        results: list[dict[str, Any]] = []
        waiting: list[_WebReply] = []
        for text in handles:
            try:
                job_id = parse_handle(text)
            except ValueError as e:
                results.append({"handle": text, "ok": False, "message": str(e)})
                continue
            handle = store.handle(job_id)
            live = broker.jobs.get(handle.encode())
            if verb == "cancel" and live is not None:
                ok = broker.cancel(handle.encode())
                results.append({"handle": handle, "ok": ok, "message": "cancelled" if ok else
                                "the job is running; only queued jobs can be cancelled"})
                continue
            if live is not None:
                results.append({"handle": handle, "ok": False,
                                "message": "the job is still queued or running"})
                continue
            if verb == "retry":
                token = _WebReply("retry", handle)
                broker.request_retry(token.resolve, job_id)
                waiting.append(token)
                results.append({"handle": handle, "token": token})
                continue
            # cancel a failed job: it leaves the failed list, kept in history as cancelled
            try:
                state = await trio.to_thread.run_sync(stored_state, job_id)
            except StoreReadError as e:
                results.append({"handle": handle, "ok": False, "message": str(e)})
                continue
            if state != "failed":
                why = "does not exist" if state is None else f"is {state}"
                results.append({"handle": handle, "ok": False,
                                "message": f"job {handle} {why}: only queued or failed jobs "
                                "can be cancelled"})
                continue
            broker.cancel_stored(job_id)
            results.append({"handle": handle, "ok": True, "message": "cancelled"})
        server.flush()
        with trio.move_on_after(30):
            for token in waiting:
                await token.done.wait()
        for r in results:
            token = r.pop("token", None)
            if token is not None:
                r["ok"] = token.ok
                r["message"] = token.message or ("queued again" if token.ok else
                                                 "no answer from the queue writer")
        await self.refresh_failed_count()
        return results

    async def _release_rows(self, batches: list) -> None:
        """Free the rows recovery read (its batches), after READY: a million tuples take
        ~0.1 s to free, which the restart budget need not wait for, nor one round of the
        loop hold."""
        while batches:
            del batches[-4:]
            await trio.sleep(0)
        self._trim_wanted = True  # the memory back to the system (the next _gc_task round)

    async def _integrity_task(self) -> None:
        """Once the daemon serves, in a thread: SQLite's structural check of the whole file
        (``quick_check``), or after an unclean shutdown its full ``integrity_check``
        (indexes against the table too). Recovery itself reads the table and checks the
        queue's index against it (within the restart budget, so no job can be missing
        unnoticed); this reads everything, history included, and reports damage loudly
        (ERROR, status, STATUS=, doctor)."""
        store = self.store
        assert store is not None
        full = store.unclean_shutdown
        what = "integrity check" if full else "quick check"
        t0 = time.monotonic()
        if full:
            log.info("queue database %s: integrity check after an unclean shutdown (in the "
                     "background)", store.path)
        try:
            problems = await trio.to_thread.run_sync(store.check, full,
                                                     abandon_on_cancel=True)
        except Exception as e:  # noqa: BLE001 - a check that cannot run must say so
            log.error("queue database %s: the %s could not run: %s", store.path, what, e)
            return
        # The check's thread freed its SQLite cache and buffers: back to the system with
        # the next _gc_task round (glibc keeps a thread's freed memory otherwise: ~8 MiB
        # of an idle daemon's RSS after a start on an existing database).
        self._trim_wanted = True
        if problems:
            log.error("queue database %s: %s found damage: %s. The jobs in "
                      "memory are served and written on; stop atomnode, restore the file "
                      "or rebuild it (docs/durability.md).", store.path,
                      "integrity_check" if full else "quick_check", "; ".join(problems))
        else:
            log.log(logging.INFO if full else logging.DEBUG,
                    "queue database %s: %s passed in %.1fs", store.path, what,
                    time.monotonic() - t0)

    async def _count_failed_task(self) -> None:
        """Refresh the failed-job count every few seconds, in a thread. A stalled disk
        stalls only this task (it is abandoned at shutdown)."""
        while True:
            await self.refresh_failed_count()
            await trio.sleep(3.0)

    def may_operate(self, ip: str) -> bool:
        """May a peer at ``ip`` change state (retry, cancel) from the console? The admin
        protocol's rule: loopback (a local proxy included: its users have logged in), or
        the admin's operator networks where configured."""
        if self.admin is None:
            return is_loopback(ip)
        return self.admin.is_operator_address(ip)

    def peer_allowed(self, ip: str) -> bool:
        """May a peer at ``ip`` use this daemon's ports (Gearman and the web console)?
        Loopback always, others when ``allow:`` lists them (system/access.py)."""
        allow = self.server.allow if self.server is not None else parse_networks(self.cfg.allow)
        return peer_allowed(ip, allow)

    def healthy(self) -> tuple[bool, str]:
        store = self.store
        if store is None:
            return True, ""
        idle_for = time.monotonic() - store.last_progress
        if idle_for > WRITER_STALL_LIMIT:
            return False, f"the SQLite writer has made no progress for {idle_for:.0f}s"
        return True, ""

    # ------------------------------------------------------------ admin hooks
    def jobs_command(self, server: Server, conn: Conn, args: list[bytes]) -> bytes:
        """``atomnode-jobs retry|cancel HANDLE`` and ``atomnode-jobs purge SECONDS``."""
        if len(args) != 2:
            return (b"ERR INVALID_ARGUMENTS "
                    b"usage:+atomnode-jobs+retry|cancel+HANDLE|purge+SECONDS\r\n")
        verb, arg = args[0].lower(), args[1].decode("utf-8", "replace")
        assert self.broker is not None and self.store is not None
        if verb == b"cancel":
            try:
                handle = self.store.handle(parse_handle(arg)).encode()
            except ValueError as e:
                return f"ERR INVALID_ARGUMENTS {e}\r\n".replace(" ", "+", 2).encode()
            if self.broker.cancel(handle):
                return b"OK\r\n"
            job = self.broker.jobs.get(handle)
            if job is not None:
                return b"ERR JOB_RUNNING the+job+is+running;+only+queued+jobs+can+be+cancelled\r\n"
            return b"ERR UNKNOWN_JOB\r\n"
        if verb == b"retry":
            try:
                job_id = parse_handle(arg)
            except ValueError as e:
                return f"ERR INVALID_ARGUMENTS {e}\r\n".encode()
            if self.broker.jobs.get(self.store.handle(job_id).encode()) is not None:
                return b"ERR JOB_ACTIVE the+job+is+still+queued+or+running\r\n"
            self.broker.request_retry(conn, job_id)
            return b""  # answered when the writer has committed it
        if verb == b"purge":
            try:
                seconds = float(arg)
            except ValueError:
                return b"ERR INVALID_ARGUMENTS purge+needs+a+number+of+seconds\r\n"
            self.broker.request_purge(conn, seconds)
            return b""
        return b"ERR UNKNOWN_COMMAND Unknown+atomnode-jobs+command\r\n"

    def request_shutdown(self, graceful: bool = True) -> None:
        self.graceful = graceful
        if self.shutdown is not None:
            self.shutdown.set()

    # -------------------------------------------------------------------- run
    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
        # Signals are caught from the very start (trio queues them): a SIGTERM or SIGHUP
        # that arrives while the queue is recovered or the pools start must not kill the
        # process with the default action.
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as sigs:
            return await self._run(sigs, task_status)

    async def _run(self, sigs: Any, task_status: Any) -> int:
        cfg = self.cfg
        self.shutdown = trio.Event()
        # Every process this run starts carries its owner token; what an earlier run of
        # this daemon left behind (a kill -9 whose keeper was killed too) goes first.
        self.owner_token = keeper.new_token(cfg.database)
        procinfo.set_owner(self.owner_token)
        keeper.kill_strays(self.owner_token)
        self.store = Store(cfg.database, synchronous=cfg.synchronous,
                           retention_days=cfg.retention_days, hostname=self.hostname)
        # A million recovered jobs are a million long-lived objects: without this the
        # cyclic garbage collector rescans them over and over while they are created.
        gc.disable()
        try:
            # The broker takes the jobs while the store still reads the rest (two cores:
            # the C reader steps SQLite in a thread meanwhile); its counters continue
            # from the store's once the read is complete.
            broker = self.broker = Broker(
                clock=time.time,
                hostname=self.hostname, durable=True, max_attempts=self.max_attempts,
            )
            broker.on_new_function = self._function_defaults
            broker.on_given_up = self._on_given_up
            self._apply_runtime_config()
            t0 = time.monotonic()
            try:
                recovery = self.store.open(on_rows=broker.restore_batch)
            except StoreError as e:
                log.error("%s", e)
                return 1
            broker.next_id = max(broker.next_id, recovery.next_id)
            broker.next_seq = max(broker.next_seq, recovery.next_seq)
            restored = broker.finish_restore()
        finally:
            # Everything start-up made (modules, configuration, the recovered jobs) is
            # long-lived: frozen, a full collection never rescans it (see _gc_task).
            gc.freeze()
            gc.enable()
        self._gc_deep = restored >= self.GC_FREEZE_ABOVE
        if restored:
            log.info("recovered %d queued job(s) from %s in %.2fs", restored, cfg.database,
                     time.monotonic() - t0)
        # The rows are freed once serving, a batch per loop round (_release_rows).
        recovered_rows = recovery.batches or []
        del recovery
        admin = self.admin = Admin(
            extra_status=self.extra_status,
            jobs_command=None,
            on_shutdown=self.request_shutdown,
            operator_networks=cfg.operator_networks,
        )
        server = self.server = Server(
            broker, store=self.store, admin=admin, max_packet_size=cfg.max_packet_size,
            allow=parse_networks(cfg.allow),
            max_output_per_connection=cfg.max_output_per_connection,
            max_output_total=cfg.max_output_total, max_input_total=cfg.max_input_total,
            busy_poll=cfg.busy_poll,
        )
        server.on_memory_freed = self._memory_freed
        admin.jobs_command = lambda conn, args: self.jobs_command(server, conn, args)
        # Durable acknowledgements go store -> server -> broker.
        self.store.start(server.store_listener())
        server.flush()  # restore's requeue/fail ops
        try:
            try:
                activated = listen_fds()
                if activated:
                    # Socket activation: systemd's sockets replace the configured ones.
                    log.info("using %d socket(s) passed by systemd (LISTEN_FDS)",
                             len(activated))
                listen = list(cfg.listen)
                self.access_error = listen_problem(listen, cfg.allow)
                if self.access_error and not activated:
                    # An upgrade must never take a site's job server down: serve loopback
                    # (AtoM on this host keeps working), say loudly what to add.
                    listen = list(loopback_only(listen))
                await server.open_listeners([] if activated else listen, activated)
                if activated and not cfg.allow:
                    open_ = [f"{h}:{p}" for h, p in server.bound]
                    self.access_error = listen_problem(open_, cfg.allow)
                if not cfg.listen and not activated:
                    await server.open_control_socket(control_socket_path(cfg))
            except OSError as e:
                log.error("%s", e.strerror or e)
                return 1
            for host, port in server.bound:
                log.info("listening on %s:%d", host, port)
            if server.control_path:
                log.info("admin commands (atomnode status) on the control socket %s",
                         server.control_path)
            if self.access_error:
                log.error("%s\nUntil then only loopback peers are served; `atomnode doctor` "
                          "and `atomnode status` say so.", self.access_error)
            http_sock = self._open_console_socket()
            if http_sock is False:
                return 1
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve)
                self._nursery_for_handlers = nursery
                await self._start_workers(nursery)
                nursery.start_soon(self._signals, sigs)
                nursery.start_soon(self._gc_task)
                nursery.start_soon(self._count_failed_task)
                nursery.start_soon(self._sample_task)
                if http_sock is not None:
                    await nursery.start(self._serve_console, http_sock)
                nursery.start_soon(self._integrity_task)
                nursery.start_soon(self._release_rows, recovered_rows)
                del recovered_rows
                nursery.start_soon(self._atom_marker_task)
                interval = watchdog_interval()
                if interval:
                    nursery.start_soon(watchdog_task, self.notifier, interval / 3, self.healthy)
                nursery.start_soon(status_task, self.notifier, cfg.status_interval,
                                   self.status_line)
                self.ready = True
                self.notifier.ready(self.status_line())
                log.info("atomnode %s ready (database %s)", __version__, cfg.database)
                task_status.started(server)
                await self.shutdown.wait()
                await self._stop(nursery)
        finally:
            self.store.close()
            self.notifier.close()
            if self.keeper is not None:
                self.keeper.close()
        log.info("stopped")
        return 0

    def _open_console_socket(self) -> Any:
        """Bind the web console's port (before READY, so a bad address is refused at
        start). None: the console is off; False: it cannot start (logged)."""
        listen = self.cfg.http_listen
        if listen is None:
            return None
        from .system.config import DEFAULT_HTTP_LISTEN, parse_address

        host, port = parse_address(listen)
        try:
            from .console import open_socket

            sock = open_socket(host, port)
        except ImportError as e:
            log.error("the web console needs %s (install atomnode's dependencies), or turn "
                      "it off with --http none", e.name)
            return False
        except OSError as e:
            if listen == DEFAULT_HTTP_LISTEN:
                # The default address is taken (another atomnode?): the queue matters more.
                log.warning("web console not started: %s: %s", listen, e.strerror or e)
                return None
            log.error("web console: cannot listen on %s: %s", listen, e.strerror or e)
            return False
        name = sock.getsockname()
        self.http_bound = [(name[0], name[1])]
        log.info("web console on http://%s/", format_address(name[0], name[1]))
        return sock

    async def _serve_console(self, sock: Any, *, task_status: Any = trio.TASK_STATUS_IGNORED,
                             ) -> None:
        from .console import serve

        await serve(self, sock, task_status=task_status)

    def _ensure_keeper(self) -> None:
        """Start the keeper (workers die with the daemon) before the first process."""
        if self.keeper is None:
            try:
                self.keeper = keeper.Keeper(self.owner_token)
            except OSError as e:
                log.warning("cannot start the keeper process (%s): after a kill -9 of the "
                            "daemon its workers would survive until its next start", e)

    async def _start_workers(self, nursery: trio.Nursery) -> None:
        cfg = self.cfg
        if cfg.handlers or cfg.pools:
            self._ensure_keeper()
        if cfg.handlers:
            for h in cfg.handlers:
                await self._start_handler(nursery, h)
        for r in cfg.atom_runners:
            await self._start_runner(nursery, r)
        if cfg.pools:
            from .workers.supervisor import Supervisor

            registry: Any = None
            if self.server and self.server.bound:
                registry = BrokerRegistry(self.server)
            else:
                # A worker host: job awareness comes over the network from the servers
                # its pools talk to (workers/remote.py).
                servers = [a for p in cfg.pools for a in p.servers]
                if servers:
                    from .workers.remote import RemoteRegistry

                    registry = self.remote_registry = RemoteRegistry(
                        servers, hostname=self.hostname)
                    await nursery.start(registry.run)
            self.supervisor = Supervisor(cfg.pools, registry,
                                         default_servers=self._pool_servers())
            if self.remote_registry is not None:
                self.remote_registry.snapshot = self.supervisor.snapshot
            if self.broker is not None and isinstance(registry, BrokerRegistry):
                # `status` counts a healthy pool while it replaces a worker (docs/workers.md).
                self.broker.on_can_do = self.supervisor.function_registered
                self.broker.standby = self.supervisor.capacity
            await nursery.start(self.supervisor.run)

    async def _start_handler(self, nursery: trio.Nursery, h: Any) -> None:
        from .workers.handlers import HandlerPool

        self._ensure_keeper()
        servers = tuple(h.servers) or self._pool_servers()
        await self._start_pool(nursery, self.handlers, self._handler_scopes, h.function,
                               HandlerPool(h, servers))

    async def _start_runner(self, nursery: trio.Nursery, r: Any) -> None:
        from .workers.atom_runner import RunnerPool

        self._ensure_keeper()
        await self._start_pool(nursery, self.runners, self._runner_scopes, r.name,
                               RunnerPool(r, self.server, on_failed=self._mark_atom_failed))

    @staticmethod
    async def _start_pool(nursery: trio.Nursery, pools: dict, scopes: dict, name: str,
                          pool: Any) -> None:
        """Run a handler or runner pool in ``nursery`` under a scope of its own (so a
        reload can cancel it alone), registered under ``name`` in ``pools``."""
        scope = trio.CancelScope()
        pools[name] = pool
        scopes[name] = scope

        async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
            with scope:
                await pool.run(task_status=task_status)

        await nursery.start(run)

    async def _reload_runners(self, old: Config, new: Config) -> None:
        """A changed runner is drained and started again with its new settings."""
        await self._reload_pools({r.name: r for r in old.atom_runners},
                                 {r.name: r for r in new.atom_runners},
                                 self.runners, self._runner_scopes, self._start_runner)

    async def _reload_pools(self, old: dict, new: dict, pools: dict, scopes: dict,
                            start: Callable[[trio.Nursery, Any], Awaitable[None]]) -> None:
        """Handler or runner pools whose settings changed (``old`` and ``new`` map a name
        to its settings) are drained and cancelled; the changed and new ones started."""
        for name, cfg in old.items():
            if new.get(name) != cfg and name in pools:
                await pools[name].shutdown(self.cfg.shutdown_timeout)
                scopes.pop(name).cancel()
                del pools[name]
        added = [cfg for name, cfg in new.items() if old.get(name) != cfg]
        if added and self._nursery_for_handlers is not None:
            for cfg in added:
                await start(self._nursery_for_handlers, cfg)

    async def _stop(self, nursery: trio.Nursery) -> None:
        assert self.server is not None
        self.notifier.stopping()
        self.ready = False
        for runner in self.runners.values():
            runner.stop_taking()  # at once: no job starts after STOPPING=1
        timeout = self.cfg.shutdown_timeout if self.graceful else 0.0
        log.info("shutting down: no new jobs handed out; waiting up to %gs for running jobs",
                 timeout)
        await self.server.stop_accepting()
        async with trio.open_nursery() as n:
            n.start_soon(self.server.drain_all, timeout)
            if self.supervisor is not None:
                n.start_soon(self.supervisor.shutdown, timeout)
            for pool in self.handlers.values():
                n.start_soon(pool.shutdown, timeout)
            for runner in self.runners.values():
                n.start_soon(runner.shutdown, timeout)
        nursery.cancel_scope.cancel()

    #: Seconds between two chart samples (the console's charts; see take_sample).
    SAMPLE_INTERVAL = 60.0

    def take_sample(self) -> list[tuple]:
        """One chart sample per function: jobs completed and failed since the last sample,
        queue depth, running, and the queue wait's p50/p95 over the interval; handed to
        the store's writer (no disk access here). Returns the rows."""
        broker, store = self.broker, self.store
        assert broker is not None and store is not None
        now = time.time()
        rows = []
        last = self._last_sample
        for name, fn in broker.functions.items():
            st = fn.stats
            prev = last.get(name)
            completed = st.completed - (prev[0] if prev else 0)
            failed = st.failed - (prev[1] if prev else 0)
            since = prev[2] if prev else None
            p50 = st.wait.quantile(0.5, since)
            p95 = st.wait.quantile(0.95, since)
            last[name] = (st.completed, st.failed, st.wait.copy())
            if completed or failed or fn.queued or fn.running or prev is None:
                rows.append((round(now, 3), name, completed, failed, fn.queued, fn.running,
                             p50, p95))
        if rows:
            store.submit(commands.samples(rows))
        return rows

    async def _sample_task(self) -> None:
        while True:
            await trio.sleep(self.SAMPLE_INTERVAL)
            self.take_sample()

    #: Above this many live jobs, the garbage collector's view is frozen every second.
    GC_FREEZE_ABOVE = 20000

    def _memory_freed(self) -> None:
        """The server freed many MiB of buffers (greedy clients left): give them back to
        the system now rather than never (glibc keeps freed heap memory)."""
        self._trim_wanted = True

    def _gc_tick(self, live: int) -> None:
        """One round of _gc_task's policy, ``live`` jobs in the broker.

        Deep: collect the young generations and freeze what survives. Short again after a
        deep queue: unfreeze and collect everything once. Otherwise leave the collector
        alone, and in particular leave start-up's freeze in place: unfreezing it costs a
        full collection of the daemon's every object (6-8 ms on the event loop, measured
        one second into serving, when the first round ran) and makes every later full
        collection rescan them, for nothing, since they live as long as the daemon.
        """
        if live >= self.GC_FREEZE_ABOVE:
            gc.collect(1)
            gc.freeze()
            self._gc_deep = True
        elif self._gc_deep:
            gc.unfreeze()
            gc.collect()
            self._gc_deep = False

    async def _gc_task(self) -> None:
        """Keep the cyclic garbage collector off the queued jobs.

        Python's collector rescans every tracked object at each full collection, and a
        deep queue holds millions of them: submit rates fell to half with 500,000 jobs
        queued. While the queue is deep, the young generations are collected and what
        survives is frozen (never rescanned; finished jobs are still freed by reference
        counting, they form no cycles). When the queue is short again everything is
        unfrozen and collected once, so nothing cyclic is kept for good (_gc_tick).
        """
        assert self.broker is not None
        high_water = deepest = len(self.broker.jobs)
        # First (this task starts as the daemon begins to serve): hand back to the system
        # what start-up freed (imports, configuration), 0.3-0.5 MiB of idle RSS.
        memory.trim()
        while True:
            await trio.sleep(1.0)
            live = len(self.broker.jobs)
            # A deep queue drained: the job indexes shrink back to size (Python's dicts
            # never do by themselves), once the queue is short, so that it costs little.
            deepest = max(deepest, live)
            if live < self.GC_FREEZE_ABOVE <= deepest - live:
                self.broker.compact()
                deepest = live
                self._trim_wanted = True
            self._gc_tick(live)
            # Memory back to the system once a deep queue has drained (by a lot: a
            # trim costs a few ms on a large heap) or greedy connections have gone.
            high_water = max(high_water, live)
            if high_water - live >= self.GC_FREEZE_ABOVE:
                self._trim_wanted = True
            if self._trim_wanted:
                high_water = live
                self._trim_wanted = False
                took = memory.trim()
                log.debug("memory handed back to the system in %.1f ms", took * 1000)

    async def _signals(self, sigs: Any) -> None:
        async for signum in sigs:
            if signum == signal.SIGHUP:
                await self.reload()
            else:
                log.info("received %s", signal.Signals(signum).name)
                self.request_shutdown(graceful=True)

    async def reload(self) -> None:
        """SIGHUP: re-read the config; keep the old one if the new one is invalid."""
        self.notifier.reloading()
        try:
            try:
                new = load_config(self.config_path, overrides=self.overrides)
            except ConfigError as e:
                log.error("configuration reload refused; the old configuration stays in "
                          "force:\n%s", e)
                return
            old = self.cfg
            running = bool(self.handlers) or bool(self.runners) or (
                self.supervisor is not None and bool(old.pools))
            if new.empty_file and running:
                log.error(
                    "configuration reload REFUSED: %s is empty (no settings at all: 0 bytes, "
                    "only comments or null); applying it would stop every pool and handler. "
                    "The running configuration stays in force. If you really mean to stop "
                    "them, write an explicit 'pools: []' and 'handlers: []' and reload again.",
                    self.config_path or new.source)
                return
            if new.listen != old.listen or new.database != old.database:
                log.warning("listen and database changes take effect only after a restart")
                new = dataclasses.replace(new, listen=old.listen, database=old.database)
            self.cfg = new
            if new.allow != old.allow and self.server is not None:
                # New connections are checked against the new list; open ones stay.
                self.server.allow = parse_networks(new.allow)
                log.info("allow: now %s", ", ".join(new.allow) or "loopback only")
                if self.access_error and new.allow:
                    log.warning("allow: is set now; restart atomnode to listen on %s",
                                ", ".join(old.listen))
            logging.getLogger().setLevel(new.log_level.upper())
            if self.server is not None:
                self.server.set_busy_poll(new.busy_poll)
            self._apply_runtime_config()
            if self.admin is not None:
                self.admin.operator_networks = parse_networks(new.operator_networks)
            if self.supervisor is not None or new.pools:
                if self.supervisor is None:
                    log.warning("pools added by a reload start after a restart")
                else:
                    await self.supervisor.reload(new.pools)
            await self._reload_handlers(old, new)
            await self._reload_runners(old, new)
            log.info("configuration reloaded from %s", self.config_path or "defaults")
        finally:
            self.notifier.ready(self.status_line())

    async def _reload_handlers(self, old: Config, new: Config) -> None:
        await self._reload_pools({h.function: h for h in old.handlers},
                                 {h.function: h for h in new.handlers},
                                 self.handlers, self._handler_scopes, self._start_handler)


def _file_size(path: str) -> int | None:
    try:
        return os.stat(path).st_size
    except OSError:
        return None


# --------------------------------------------------------------------- CLI
def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "run", help="run the daemon in the foreground",
        description="Run atomnode: the Gearman-compatible listener, the durable queue, "
        "the worker pools and handlers. Flags override the configuration file.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="configuration file (default: $ATOMNODE_CONFIG, else "
                   "/etc/atomnode/atomnode.yml if it exists, else built-in defaults)")
    p.add_argument("--listen", metavar="HOST:PORT", action="append",
                   help="address to listen on (repeatable; default 127.0.0.1:4730)")
    p.add_argument("--db", metavar="FILE", help="SQLite database of the durable queue")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    p.add_argument("--http", metavar="HOST:PORT",
                   help="address of the web console and /metrics (default 127.0.0.1:4731; "
                   "'none' turns it off)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from .system.logs import setup_logging

    overrides: dict[str, Any] = {}
    if args.listen:
        overrides["listen"] = tuple(args.listen)
    if args.db:
        overrides["database"] = args.db
    if args.log_level:
        overrides["log_level"] = args.log_level
    if args.http:
        overrides["http_listen"] = args.http
    try:
        cfg = load_config(args.config, overrides=overrides)
    except ConfigError as e:
        setup_logging("info")
        print(f"atomnode: invalid configuration:\n{e}", file=sys.stderr)
        return 1
    setup_logging(cfg.log_level)
    daemon = Daemon(cfg, config_path=args.config, overrides=overrides)
    return trio.run(daemon.run)
