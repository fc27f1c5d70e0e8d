"""Worker supervision: pools of worker processes (AtoM's ``php symfony jobs:worker``).

One :class:`Supervisor` runs every configured pool. Each worker slot of a pool is one trio
task that waits for the pool's dependencies, spawns the process, pumps its output into the
log, and restarts it when it exits:

* an exit code in ``planned_exit_codes`` (111: AtoM's ``--max-job-count`` /
  ``--max-mem-usage``) or a stop we asked for (recycle, reload) restarts at once;
* any other exit or a signal backs off exponentially (``backoff_initial`` doubling up to
  ``backoff_max``, reset once a process stayed up for ``stable_after`` seconds); there is
  no permanent give-up.

Job awareness comes from a :class:`WorkerRegistry` (the daemon's ``BrokerRegistry``; see
docs/dev/interfaces.md).
Each Gearman connection is mapped to a worker process: by AtoM's client id
``pid_<PID>_<uniqid>``, otherwise by finding the connection's socket inode among the
file descriptors of the worker's process tree (/proc). Stopping a worker drains it first
(its GRAB_JOB gets NO_JOB), waits until it holds no job (bounded by ``drain_timeout``),
then sends SIGTERM to its process group and SIGKILL after ``stop_grace``. Without a
registry (supervisor-only mode, workers talking to an external gearmand) there is no job
awareness: stop is SIGTERM then SIGKILL, and the recycle limits are not applied.

All timing uses trio's clock, so tests can run it under ``trio.testing.MockClock``.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import math
import random
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import trio

from ..system.names import function_matches
from . import procinfo

if TYPE_CHECKING:  # pragma: no cover
    from ..system.config import PoolConfig, WaitFor

log = logging.getLogger("atomnode.supervisor")  # stable name: operators see it in the journal


@dataclasses.dataclass(frozen=True)
class ConnInfo:
    """One Gearman connection as the supervisor sees it (docs/dev/interfaces.md)."""

    conn_id: Any
    peer: tuple[str, int]
    local: tuple[str, int]
    client_id: str
    abilities: tuple[str, ...]
    jobs: tuple[str, ...]
    jobs_done: int
    draining: bool


class WorkerRegistry(Protocol):
    """What the supervisor needs to know about connections: the daemon's
    ``BrokerRegistry`` implements it over the broker and server; on a worker host
    workers/remote.py does, and also has ``async refresh()``: called, when present, before
    a worker is drained, to get a view taken now rather than at the last poll."""

    def connections(self) -> list[ConnInfo]: ...

    def drain(self, conn_id: Any) -> None: ...

    async def wait_idle(self, conn_id: Any) -> None: ...


#: Seconds a process must stay up before a crash no longer doubles the backoff.
STABLE_AFTER = 60.0
#: How often connections are mapped to processes and recycle limits checked.
CHECK_INTERVAL = 1.0
#: How often a pool waiting for a dependency tries again.
WAIT_RETRY = 5.0
#: Timeout of one dependency probe (TCP connect).
WAIT_CONNECT_TIMEOUT = 2.0
#: Lines per second (sustained) and burst logged per worker; the rest is counted.
LOG_RATE = 200.0
LOG_BURST = 1000.0
#: Bytes per second (sustained) and burst logged per pool, whatever the lines look like
#: (a worker printing megabytes without a newline is cut into MAX_LINE pieces, each one
#: paid for here and in lines). Each line costs its length plus LINE_OVERHEAD.
LOG_BYTES_RATE = 64 * 1024.0
LOG_BYTES_BURST = 512 * 1024.0
LINE_OVERHEAD = 64
#: Longest line logged; longer lines are cut.
MAX_LINE = 8192
#: How often "dropped N lines" is reported while a worker floods.
DROP_REPORT_INTERVAL = 10.0
#: A worker process that has not registered with the server this long after it started
#: no longer counts as capacity (a stale symfony cache can send it to another server).
REGISTER_GRACE = 60.0


def _fmt_seconds(s: float) -> str:
    s = max(0, math.ceil(s - 1e-9))
    if s < 120:
        return f"{s}s"
    if s < 7200:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


class _Worker:
    """One slot of a pool: at most one process at a time."""

    def __init__(self, pool: _Pool, index: int):
        self.pool = pool
        self.index = index
        self.proc: trio.Process | None = None
        self.pid: int | None = None
        self.phase = "starting"  # starting | running | waiting | backing off | stopped
        self.detail = ""
        self.started_at: float | None = None
        self.next_try_at: float | None = None
        self.retiring = False
        self.registered = False  # this process registered with the server
        self.quarantined = False  # the job it held when it died was given up
        self.planned_stop = False
        self.stopping = False
        self.age_limit: float | None = None
        self.conns: dict[Any, Any] = {}
        self.jobs_closed = 0  # jobs done on connections of this process that are gone
        self.conn_jobs: dict[Any, int] = {}
        self.restarts = 0  # processes started after the first
        self.last_exit: dict[str, Any] | None = None  # code, as, kind, at (unix time)
        self.spawned_once = trio.Event()
        self.wake = trio.Event()
        self.done = trio.Event()
        # log pump state
        self.tokens = LOG_BURST
        self.tokens_at = 0.0
        self.dropped = 0
        self.dropped_total = 0
        self.dropped_reported_at = 0.0

    @property
    def name(self) -> str:
        return self.pool.cfg.name

    @property
    def jobs_done(self) -> int:
        return self.jobs_closed + sum(self.conn_jobs.get(c, 0) for c in self.conns)

    @property
    def job(self) -> str | None:
        for c in self.conns.values():
            if c.jobs:
                return c.jobs[0]
        return None


class _Pool:
    def __init__(self, cfg: PoolConfig, log_bytes_burst: float = LOG_BYTES_BURST):
        self.cfg = cfg
        self.workers: list[_Worker] = []
        self.next_index = 0
        self.removed = False
        #: A worker registered one of the pool's ``functions`` since the pool started.
        self.proven = False
        # log volume of all the pool's workers together (bytes)
        self.log_bytes = log_bytes_burst
        self.log_bytes_at = 0.0


class Supervisor:
    """Runs the worker pools. See the module docstring for the policy.

    ``registry`` is a :class:`WorkerRegistry`, or None in supervisor-only mode.
    ``default_servers`` are the servers a pool without ``servers`` talks to (the embedded
    listener); the pool's workers find them in ``$ATOMNODE_SERVERS`` (comma separated)
    and ``{server}`` / ``{servers}`` in the command line are replaced by the first /
    all of them. ``clock`` is only used outside a trio run; inside, trio's clock is used.
    """

    def __init__(
        self,
        pools: Sequence[PoolConfig],
        registry: WorkerRegistry | None,
        *,
        default_servers: tuple[str, ...] = ("127.0.0.1:4730",),
        clock: Callable[[], float] = time.monotonic,
        check_interval: float = CHECK_INTERVAL,
        wait_retry: float = WAIT_RETRY,
        stable_after: float = STABLE_AFTER,
        log_rate: float = LOG_RATE,
        log_burst: float = LOG_BURST,
        log_bytes_rate: float = LOG_BYTES_RATE,
        log_bytes_burst: float = LOG_BYTES_BURST,
        drop_report_interval: float = DROP_REPORT_INTERVAL,
        rng: random.Random | None = None,
        register_grace: float = REGISTER_GRACE,
    ):
        self.registry = registry
        self.default_servers = tuple(default_servers)
        self._clock = clock
        self.check_interval = check_interval
        self.wait_retry = wait_retry
        self.stable_after = stable_after
        self.log_rate = log_rate
        self.log_burst = log_burst
        self.log_bytes_rate = log_bytes_rate
        self.log_bytes_burst = log_bytes_burst
        self.drop_report_interval = drop_report_interval
        self.register_grace = register_grace
        self._rng = rng or random.Random()
        self._pools: dict[str, _Pool] = {}
        self._initial = list(pools)
        self._nursery: trio.Nursery | None = None
        self._changed = trio.lowlevel.ParkingLot()
        self._owner: dict[Any, tuple[_Worker, int] | None] = {}  # conn_id -> (worker, pid)
        self._shutting_down = False
        self._closed = trio.Event()
        #: Recent lifecycle events: (time, pool, index, event, pid, info). For status
        #: displays and tests.
        self.events: collections.deque[tuple[float, str, int, str, int | None, Any]] = (
            collections.deque(maxlen=2000)
        )
        #: Worker exits since start by (pool, kind); kind is planned (an exit code in
        #: planned_exit_codes, a recycle or reload), crash (any other code), signal, or
        #: stopped (the daemon stopped it). For /metrics.
        self.exits: collections.Counter[tuple[str, str]] = collections.Counter()

    # ------------------------------------------------------------------ public API

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Start every pool and supervise until cancelled (or until :meth:`shutdown`
        has stopped everything). ``started()`` once each worker has been spawned or is
        waiting for a dependency / backing off."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for cfg in self._initial:
                self._add_pool(cfg)
            for pool in self._pools.values():
                for w in pool.workers:
                    await w.spawned_once.wait()
            nursery.start_soon(self._monitor)
            task_status.started()
            await self._closed.wait()
            nursery.cancel_scope.cancel()

    async def shutdown(self, timeout: float) -> None:
        """Drain and stop every worker (drain bounded by ``min(timeout, drain_timeout)``,
        then SIGTERM, then SIGKILL after ``stop_grace``); returns when all have exited."""
        self._shutting_down = True
        if self._nursery is None:
            self._closed.set()
            return
        async with trio.open_nursery() as n:
            for pool in list(self._pools.values()):
                for w in list(pool.workers):
                    n.start_soon(self._retire, w, timeout)
        self._closed.set()

    async def reload(self, pools: Sequence[PoolConfig]) -> None:
        """Apply a new pool list: new pools start, removed ones are drained and stopped,
        resized ones grow or shrink, changed ones are replaced one worker at a time.
        Returns once the changes are under way (draining continues in the background)."""
        if self._nursery is None:
            self._initial = list(pools)
            return
        wanted = {p.name: p for p in pools}
        for name, pool in list(self._pools.items()):
            if name not in wanted:
                log.info("pool %s removed; stopping its workers", name)
                pool.removed = True
                del self._pools[name]
                for w in pool.workers:
                    self._nursery.start_soon(self._retire, w, None)
        for name, cfg in wanted.items():
            pool = self._pools.get(name)
            if pool is None:
                log.info("pool %s added (%d workers)", name, cfg.count)
                self._add_pool(cfg)
                continue
            old = pool.cfg
            if old == cfg:
                continue
            pool.cfg = cfg
            if old.functions != cfg.functions:
                pool.proven = False
            active = [w for w in pool.workers if not w.retiring]
            if dataclasses.replace(old, count=cfg.count) != cfg:
                log.info("pool %s changed; replacing its workers one at a time", name)
                self._nursery.start_soon(self._replace_all, list(active))
            if cfg.count > len(active):
                log.info("pool %s grows from %d to %d", name, len(active), cfg.count)
                for _ in range(cfg.count - len(active)):
                    self._add_worker(pool)
            elif cfg.count < len(active):
                log.info("pool %s shrinks from %d to %d", name, len(active), cfg.count)
                for w in sorted(active, key=lambda w: w.index)[cfg.count :]:
                    self._nursery.start_soon(self._retire, w, None)
        self._notify()

    def snapshot(self) -> list[dict]:
        """Per pool: name, configured count and each worker's pid, state, job, jobs done,
        RSS (MiB), uptime (s) and detail."""
        now = self._now()
        out = []
        for pool in self._pools.values():
            workers = []
            for w in sorted(pool.workers, key=lambda w: w.index):
                state, detail = self._state(w, now)
                rss = None
                if w.pid is not None and w.proc is not None:
                    rss = round(procinfo.rss_kb(procinfo.process_tree(w.pid)) / 1024, 1)
                workers.append(
                    {
                        "pid": w.pid if w.proc is not None else None,
                        "state": state,
                        "job": w.job,
                        "jobs_done": w.jobs_done,
                        "rss_mb": rss,
                        "uptime": (
                            round(now - w.started_at, 1)
                            if w.started_at is not None and w.proc is not None
                            else None
                        ),
                        "detail": detail,
                        "restarts": w.restarts,
                        "last_exit": w.last_exit,
                    }
                )
            out.append({"name": pool.cfg.name, "count": pool.cfg.count, "workers": workers})
        return out

    def summary(self) -> str:
        """Short text for systemd's STATUS=, e.g. ``atom 2/2 busy 1; reports backing off 8s``."""
        now = self._now()
        parts = []
        for pool in self._pools.values():
            states = [self._state(w, now) for w in pool.workers if not w.retiring]
            up = sum(1 for w in pool.workers if w.proc is not None and not w.retiring)
            text = f"{pool.cfg.name} {up}/{pool.cfg.count}"
            busy = sum(1 for s, _ in states if s == "busy")
            if busy:
                text += f" busy {busy}"
            backing = [
                w.next_try_at - now
                for w in pool.workers
                if w.phase == "backing off" and w.next_try_at is not None
            ]
            if backing:
                text += f" backing off {_fmt_seconds(min(backing))}"
            waiting = [d for s, d in states if s == "waiting"]
            if waiting:
                text += " " + waiting[0].split(" (")[0]
            draining = sum(1 for s, _ in states if s == "draining")
            if draining:
                text += f" draining {draining}"
            parts.append(text)
        return "; ".join(parts) if parts else "no worker pools"

    # ------------------------------------------------------------------ capacity

    def function_registered(self, name: bytes | str) -> None:
        """A worker registered ``name`` (the broker's CAN_DO hook): if it is one of a
        pool's processes, that pool is proven to serve its functions."""
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        if any(
            not pool.proven and any(function_matches(p, text) for p in pool.cfg.functions)
            for pool in self._pools.values()
        ):
            try:
                self._refresh()  # which process registered it decides which pool is proven
            except Exception:  # pragma: no cover - /proc trouble: the monitor retries
                log.exception("cannot map worker connections to processes")

    def capacity(self, name: bytes | str) -> int:
        """Worker slots of healthy pools that serve ``name``: what `status` reports as
        capable workers while one of them is being replaced (docs/workers.md).

        A pool counts once one of its workers has registered one of its ``functions``;
        a slot counts while its process is restarting after a planned exit or stop,
        running and registered, or started less than ``register_grace`` ago. A slot
        that waits for a dependency, backs off after a crash, or is being retired does
        not count; nothing counts during shutdown."""
        if self._shutting_down:
            return 0
        text = name.decode("utf-8", "replace") if isinstance(name, bytes) else name
        now = self._now()
        n = 0
        for pool in self._pools.values():
            if pool.removed or not pool.proven:
                continue
            if not any(function_matches(p, text) for p in pool.cfg.functions):
                continue
            n += sum(1 for w in pool.workers if self._serving(w, now))
        return n

    def _serving(self, w: _Worker, now: float) -> bool:
        if w.retiring or w.phase not in ("starting", "running"):
            return False
        if w.proc is None or w.registered or w.conns:
            return True  # restarting after a planned exit, or registered
        return w.started_at is not None and now - w.started_at < self.register_grace

    def job_given_up(self, conn_id: Any, client_id: str = "") -> None:
        """The broker gave up the job that connection ``conn_id`` held (its worker died
        on the job's last attempt): the cause is quarantined, so the worker's slot
        restarts at once instead of backing off. The connection is already closed, so it
        is found by the mapping made earlier, or by AtoM's client id ``pid_<PID>_...``."""
        owner = self._owner.get(conn_id)
        w: _Worker | None = owner[0] if owner is not None else None
        if w is None:
            pid = _client_id_pid(client_id)
            w = next((x for x in self._workers() if pid is not None and x.pid == pid), None)
        if w is None:
            return
        w.quarantined = True
        if w.phase == "backing off":
            w.wake.set()
        self._notify()

    def worker_for_connection(self, conn_id: Any) -> tuple[str, int] | None:
        """(pool name, pid) of the worker process that owns a registry connection."""
        owner = self._owner.get(conn_id)
        if owner is None:
            return None
        w, pid = owner
        return (w.name, pid)

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once ``predicate()`` is true; re-checked after each lifecycle event and
        monitor pass. For tests and tools."""
        while not predicate():
            await self._changed.park()

    # ------------------------------------------------------------------ internals

    def _now(self) -> float:
        try:
            return trio.current_time()
        except RuntimeError:
            return self._clock()

    def _notify(self) -> None:
        self._changed.unpark_all()

    def _event(self, w: _Worker, event: str, info: Any = None) -> None:
        self.events.append((self._now(), w.name, w.index, event, w.pid, info))
        self._notify()

    def _state(self, w: _Worker, now: float) -> tuple[str, str]:
        if w.phase == "backing off":
            left = (w.next_try_at or now) - now
            return "backing off", f"next try in {_fmt_seconds(left)}"
        if w.phase in ("waiting", "stopped"):
            return w.phase, w.detail
        if w.proc is None:
            return "starting", w.detail
        if w.stopping:
            return "draining", w.detail
        if self.registry is None or not getattr(self.registry, "aware", True):
            return "running", w.detail
        if w.job is not None:
            return "busy", w.detail
        if w.conns:
            return "idle", w.detail
        return "starting", w.detail

    def _add_pool(self, cfg: PoolConfig) -> None:
        pool = _Pool(cfg, self.log_bytes_burst)
        pool.log_bytes_at = self._now()
        self._pools[cfg.name] = pool
        for _ in range(cfg.count):
            self._add_worker(pool)

    def _add_worker(self, pool: _Pool) -> _Worker:
        assert self._nursery is not None
        w = _Worker(pool, pool.next_index)
        w.tokens = self.log_burst
        pool.next_index += 1
        pool.workers.append(w)
        self._nursery.start_soon(self._run_worker, w)
        return w

    def _servers(self, cfg: PoolConfig) -> tuple[str, ...]:
        return tuple(cfg.servers) or self.default_servers

    # --- the worker loop

    async def _run_worker(self, w: _Worker) -> None:
        delay = w.pool.cfg.backoff_initial
        try:
            while not w.retiring and not self._shutting_down:
                cfg = w.pool.cfg
                down = await self._first_down(cfg.wait_for)
                if down is not None:
                    if w.phase != "waiting":
                        log.warning(
                            "pool %s: waiting for %s (%s) before starting worker %d",
                            cfg.name, down.name, down.where, w.index,
                        )
                    w.phase = "waiting"
                    w.detail = f"waiting for {down.name} ({down.where})"
                    self._event(w, "waiting", down.name)
                    w.spawned_once.set()
                    await self._pause(w, self.wait_retry)
                    continue
                try:
                    proc = await self._spawn(w, cfg)
                except (OSError, KeyError, ValueError, subprocess.SubprocessError) as exc:
                    w.spawned_once.set()
                    log.error("pool %s: cannot start worker: %s; retrying in %s",
                              cfg.name, exc, _fmt_seconds(delay))
                    self._event(w, "spawn-failed", str(exc))
                    await self._back_off(w, delay)
                    delay = min(delay * 2, cfg.backoff_max)
                    continue
                w.spawned_once.set()
                try:
                    if w.retiring or self._shutting_down:
                        # Stopped while it was being spawned (a shutdown during a planned
                        # restart): _stop found no process to stop, so stop it here.
                        w.planned_stop = True
                        await self._terminate(w, proc, min(cfg.stop_grace, 5.0))
                    await self._supervise_process(w, proc)
                finally:
                    if proc.returncode is None:
                        with trio.CancelScope(shield=True):
                            await self._terminate(w, proc, min(cfg.stop_grace, 5.0))
                rc = proc.returncode
                assert rc is not None
                uptime = self._now() - (w.started_at or self._now())
                planned = w.planned_stop or rc in cfg.planned_exit_codes
                w.planned_stop = False
                if not planned and self.registry is not None and w.conns:
                    # Let the server see the connection close first: the job it held may
                    # be given up then (job_given_up), which ends the backoff.
                    with trio.move_on_after(1.0):
                        await self.wait_until(lambda: not self._conns_open(w))
                w.proc = None
                w.stopping = False
                self._forget_conns(w)
                self._event(w, "exited", rc)
                stopped = w.retiring or self._shutting_down
                kind = ("stopped" if stopped else "planned" if planned
                        else "signal" if rc < 0 else "crash")
                self.exits[(cfg.name, kind)] += 1
                w.last_exit = {"code": rc, "as": procinfo.signal_name(rc), "kind": kind,
                               "at": round(time.time(), 3)}
                if not stopped:
                    w.restarts += 1
                if stopped:
                    log.info("[%s pid %d] worker stopped (%s)", cfg.name, w.pid,
                             procinfo.signal_name(rc))
                    break
                if planned:
                    log.info("[%s pid %d] worker exited with %s (planned); restarting",
                             cfg.name, w.pid, procinfo.signal_name(rc))
                    delay = cfg.backoff_initial
                    continue
                if uptime >= self.stable_after:
                    delay = cfg.backoff_initial
                if w.quarantined:
                    w.quarantined = False
                    log.warning("[%s pid %d] worker exited with %s; the job it held was set "
                                "aside (failed for good), so it restarts now",
                                cfg.name, w.pid, procinfo.signal_name(rc))
                    delay = cfg.backoff_initial
                    continue
                log.warning("[%s pid %d] worker exited with %s; restarting in %s",
                            cfg.name, w.pid, procinfo.signal_name(rc), _fmt_seconds(delay))
                await self._back_off(w, delay)
                delay = min(delay * 2, cfg.backoff_max)
        finally:
            w.phase = "stopped"
            w.detail = ""
            w.proc = None
            w.spawned_once.set()
            if w in w.pool.workers:
                w.pool.workers.remove(w)
            w.done.set()
            self._event(w, "stopped")

    async def _pause(self, w: _Worker, seconds: float) -> None:
        w.wake = trio.Event()
        with trio.move_on_after(seconds):
            await w.wake.wait()

    async def _back_off(self, w: _Worker, delay: float) -> None:
        w.phase = "backing off"
        w.next_try_at = self._now() + delay
        self._event(w, "backoff", delay)
        await self._pause(w, delay)
        w.next_try_at = None
        if w.quarantined:
            w.quarantined = False
            log.info("[%s] the job that crashed worker %d was set aside; starting it now",
                     w.name, w.index)

    def _conns_open(self, w: _Worker) -> bool:
        if self.registry is None:
            return False
        live = {c.conn_id for c in self.registry.connections()}
        return any(c in live for c in w.conns)

    async def _first_down(self, deps: Sequence[WaitFor]) -> WaitFor | None:
        return await first_down(deps)

    async def _spawn(self, w: _Worker, cfg: PoolConfig) -> trio.Process:
        servers = self._servers(cfg)
        argv = [
            a.replace("{servers}", ",".join(servers)).replace("{server}", servers[0])
            for a in cfg.command
        ]
        opts = procinfo.spawn_options(
            user=cfg.user, group=cfg.group, directory=cfg.directory,
            environment=cfg.environment, extra_env={"ATOMNODE_SERVERS": ",".join(servers)},
        )
        proc = await trio.lowlevel.open_process(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            **opts,
        )
        w.proc = proc
        w.pid = proc.pid
        w.phase = "running"
        w.detail = ""
        w.started_at = self._now()
        w.conns = {}
        w.conn_jobs = {}
        w.jobs_closed = 0
        w.registered = False
        w.quarantined = False
        w.age_limit = None
        if cfg.max_age:
            j = max(0.0, min(cfg.age_jitter, 1.0))
            w.age_limit = cfg.max_age * self._rng.uniform(1 - j, 1 + j)
        log.info("[%s pid %d] worker started: %s", cfg.name, proc.pid, " ".join(argv))
        self._event(w, "spawned", proc.pid)
        return proc

    async def _supervise_process(self, w: _Worker, proc: trio.Process) -> None:
        async with trio.open_nursery() as n:
            eof = [trio.Event(), trio.Event()]
            n.start_soon(self._pump, w, proc.stdout, logging.INFO, eof[0])
            n.start_soon(self._pump, w, proc.stderr, logging.WARNING, eof[1])
            await proc.wait()
            # Leftover children of the worker would keep the pipes open: end them.
            procinfo.signal_group(proc.pid, signal.SIGKILL)
            with trio.move_on_after(2.0):
                for e in eof:
                    await e.wait()
            n.cancel_scope.cancel()
        self._report_drops(w, force=True)

    async def _terminate(self, w: _Worker, proc: trio.Process, grace: float) -> None:
        procinfo.signal_group(proc.pid, signal.SIGTERM)
        with trio.move_on_after(grace):
            await proc.wait()
            return
        log.warning("[%s pid %d] still running %s after SIGTERM; sending SIGKILL",
                    w.name, proc.pid, _fmt_seconds(grace))
        procinfo.signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()

    async def _stop(self, w: _Worker, drain_timeout: float | None) -> None:
        """Drain, then SIGTERM, then SIGKILL. The exit counts as planned."""
        proc = w.proc
        w.planned_stop = True
        if proc is None:
            w.wake.set()
            return
        cfg = w.pool.cfg
        if drain_timeout is None:
            drain_timeout = cfg.drain_timeout
        w.stopping = True
        self._event(w, "draining")
        if self.registry is not None:
            refresh = getattr(self.registry, "refresh", None)
            if refresh is not None:
                # A worker host's view of the server is polled: take one now, so a
                # connection made since the last poll is drained too.
                await refresh()
            self._refresh()
            conns = list(w.conns)
            for c in conns:
                self.registry.drain(c)
            with trio.move_on_after(drain_timeout) as scope:
                for c in conns:
                    await self.registry.wait_idle(c)
            if scope.cancelled_caught:
                log.warning("[%s pid %d] still busy after %s of draining; stopping it anyway",
                            w.name, proc.pid, _fmt_seconds(drain_timeout))
        if proc.returncode is None:
            self._event(w, "sigterm")
            await self._terminate(w, proc, cfg.stop_grace)

    async def _retire(self, w: _Worker, timeout: float | None) -> None:
        w.retiring = True
        w.wake.set()
        drain = w.pool.cfg.drain_timeout
        if timeout is not None:
            drain = min(drain, timeout)
        if w.proc is not None:
            await self._stop(w, drain)
        await w.done.wait()

    async def _replace_all(self, workers: list[_Worker]) -> None:
        for w in workers:
            if w.retiring or w.done.is_set():
                continue
            if w.proc is None:
                w.wake.set()  # waiting / backing off: try the new config now
                continue
            # The replacement starts (and registers) before the old worker is drained.
            await self._replace(w)

    # --- logs

    async def _pump(self, w: _Worker, stream: Any, level: int, eof: trio.Event) -> None:
        logger = logging.getLogger(f"atomnode.worker.{w.name}")
        pid = w.pid
        name = w.name
        buf = b""
        try:
            while True:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    break
                buf += chunk
                nl = buf.rfind(b"\n")
                if nl < 0:
                    if len(buf) > MAX_LINE:
                        # No newline in sight: log a piece, drop the rest of the run;
                        # the piece pays like any line (bytes and lines).
                        self._emit(w, logger, level, name, pid, self._ration(w, [buf], 1), 1)
                        buf = b""
                    continue
                complete, buf = buf[:nl], buf[nl + 1 :]
                n = complete.count(b"\n") + 1
                allowed = self._take_tokens(w, n)
                lines = complete.split(b"\n", allowed)[:allowed] if allowed else []
                self._emit(w, logger, level, name, pid, self._ration(w, lines, allowed), n)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            if buf:
                self._emit(w, logger, level, name, pid,
                           self._ration(w, [buf], self._take_tokens(w, 1)), 1)
            eof.set()

    def _take_tokens(self, w: _Worker, n: int) -> int:
        now = self._now()
        w.tokens = min(self.log_burst, w.tokens + (now - w.tokens_at) * self.log_rate)
        w.tokens_at = now
        allowed = min(n, int(w.tokens))
        w.tokens -= allowed
        return allowed

    def _ration(self, w: _Worker, lines: list[bytes], allowed: int) -> list[bytes]:
        """The first of ``lines`` (at most ``allowed``) that the pool's byte budget pays
        for; each line costs its logged length (at most MAX_LINE) plus LINE_OVERHEAD."""
        pool = w.pool
        now = self._now()
        pool.log_bytes = min(self.log_bytes_burst,
                             pool.log_bytes + (now - pool.log_bytes_at) * self.log_bytes_rate)
        pool.log_bytes_at = now
        out = []
        for line in lines[:allowed]:
            cost = min(len(line), MAX_LINE) + LINE_OVERHEAD
            if cost > pool.log_bytes:
                break
            pool.log_bytes -= cost
            out.append(line)
        return out

    def _emit(self, w: _Worker, logger: logging.Logger, level: int, name: str,
              pid: int | None, lines: list[bytes], total: int) -> None:
        for raw in lines:
            line = raw[:MAX_LINE].decode("utf-8", "replace").rstrip("\r")
            logger.log(level, "[%s pid %s] %s", name, pid, line)
        if lines:
            self._notify()
        if total > len(lines):
            w.dropped += total - len(lines)
            w.dropped_total += total - len(lines)
        self._report_drops(w)

    def _report_drops(self, w: _Worker, force: bool = False) -> None:
        if not w.dropped:
            return
        now = self._now()
        if force or now - w.dropped_reported_at >= self.drop_report_interval:
            logging.getLogger(f"atomnode.worker.{w.name}").warning(
                "[%s pid %s] dropped %d lines of output (more than %g lines/s per worker "
                "or %g KiB/s per pool)",
                w.name, w.pid, w.dropped, self.log_rate, self.log_bytes_rate / 1024,
            )
            w.dropped = 0
            w.dropped_reported_at = now

    # --- connections and recycling

    def _workers(self) -> list[_Worker]:
        return [w for p in self._pools.values() for w in p.workers]

    def _forget_conns(self, w: _Worker) -> None:
        for c in list(self._owner):
            owner = self._owner[c]
            if owner is not None and owner[0] is w:
                del self._owner[c]
        w.conns = {}

    def _refresh(self) -> None:
        """Map registry connections to worker processes and update each worker's view."""
        if self.registry is None:
            return
        conns = self.registry.connections()
        live = {c.conn_id for c in conns}
        for c in list(self._owner):
            if c not in live:
                del self._owner[c]
        workers = [w for w in self._workers() if w.proc is not None and w.pid is not None]
        by_pid = {w.pid: w for w in workers}
        unresolved = [c for c in conns if c.conn_id not in self._owner]
        if unresolved and workers:
            kids: dict[int, list[int]] | None = None
            trees: dict[int, list[int]] = {}
            need_proc = []
            for c in unresolved:
                owner: _Worker | None = None
                pid = _client_id_pid(c.client_id)
                if pid is not None:
                    owner = by_pid.get(pid)
                    if owner is None:
                        if kids is None:
                            kids = procinfo.children_map()
                            trees = {w.pid: procinfo.process_tree(w.pid, kids)
                                     for w in workers}  # type: ignore[misc]
                        owner = next((by_pid[p] for p, t in trees.items() if pid in t), None)
                if owner is not None:
                    self._owner[c.conn_id] = (owner, owner.pid)  # type: ignore[arg-type]
                else:
                    need_proc.append(c)
            if need_proc:
                if kids is None:
                    kids = procinfo.children_map()
                    trees = {w.pid: procinfo.process_tree(w.pid, kids)  # type: ignore[misc]
                             for w in workers}
                inodes = {p: procinfo.socket_inodes(t) for p, t in trees.items()}
                table = procinfo.tcp_connections()
                for c in need_proc:
                    p = procinfo.find_tcp_owner(c.peer, c.local, inodes, table)
                    self._owner[c.conn_id] = (by_pid[p], p) if p is not None else None
        seen: dict[_Worker, dict[Any, Any]] = {w: {} for w in workers}
        for c in conns:
            owner = self._owner.get(c.conn_id)
            if owner is None:
                continue
            w, pid = owner
            if w.pid != pid or w not in seen:
                continue
            seen[w][c.conn_id] = c
        for w, current in seen.items():
            for gone in set(w.conns) - set(current):
                w.jobs_closed += w.conn_jobs.pop(gone, 0)
            for cid, c in current.items():
                w.conn_jobs[cid] = c.jobs_done
            w.conns = current
            if current and not w.registered and any(c.abilities for c in current.values()):
                w.registered = True
            if current and not w.pool.proven:
                patterns = w.pool.cfg.functions
                w.pool.proven = any(
                    function_matches(p, a) for c in current.values() for a in c.abilities
                    for p in patterns
                )

    def _recycle_reason(self, w: _Worker, now: float) -> str | None:
        cfg = w.pool.cfg
        if cfg.max_jobs and w.jobs_done >= cfg.max_jobs:
            return f"{w.jobs_done} jobs done (max_jobs {cfg.max_jobs})"
        if cfg.max_rss_mb and w.pid is not None:
            rss = procinfo.rss_kb(procinfo.process_tree(w.pid)) / 1024
            if rss > cfg.max_rss_mb:
                return f"RSS {rss:.0f} MiB > max_rss_mb {cfg.max_rss_mb}"
        if w.age_limit is not None and w.started_at is not None:
            age = now - w.started_at
            if age >= w.age_limit:
                return f"up {_fmt_seconds(age)} (max_age {cfg.max_age:g}s with jitter)"
        return None

    async def _recycle(self, w: _Worker, reason: str) -> None:
        log.info("[%s pid %d] recycling worker: %s", w.name, w.pid, reason)
        self._event(w, "recycle", reason)
        await self._replace(w)

    async def _replace(self, w: _Worker) -> None:
        """Replace a running worker, the replacement first: start a new slot, wait until
        its process has registered with the server (bounded by ``register_grace``; not
        if it waits for a dependency or backs off), then drain and stop the old one. The
        pool briefly runs one process more than ``count``."""
        pool = w.pool
        if pool.removed or self._shutting_down or self.registry is None:
            await self._stop(w, None)
            return
        new = self._add_worker(pool)
        self._event(new, "replacement", w.index)
        with trio.move_on_after(self.register_grace):
            await self.wait_until(
                lambda: new.registered
                or new.done.is_set()
                or new.phase in ("waiting", "backing off")
                or w.done.is_set()
            )
        await self._retire(w, None)

    async def _monitor(self) -> None:
        assert self._nursery is not None
        while True:
            try:
                self._refresh()
                now = self._now()
                if self.registry is not None and not self._shutting_down:
                    for w in self._workers():
                        if w.proc is None or w.stopping or w.retiring:
                            continue
                        if self._state(w, now)[0] != "idle":
                            continue
                        reason = self._recycle_reason(w, now)
                        if reason:
                            w.stopping = True  # no second recycle while this one runs
                            self._nursery.start_soon(self._recycle, w, reason)
                for w in self._workers():
                    self._report_drops(w)
            except Exception:  # pragma: no cover - never let a /proc hiccup kill supervision
                log.exception("supervisor monitor pass failed")
            self._notify()
            await trio.sleep(self.check_interval)


async def first_down(deps: Sequence[WaitFor]) -> WaitFor | None:
    """The first of ``deps`` that does not accept a connection now, or None."""
    for dep in deps:
        ok = False
        with trio.move_on_after(WAIT_CONNECT_TIMEOUT):
            try:
                if dep.path:
                    stream = await trio.open_unix_socket(dep.path)
                else:
                    stream = await trio.open_tcp_stream(dep.host, dep.port)
            except OSError:
                pass
            else:
                ok = True
                await stream.aclose()
        if not ok:
            return dep
    return None


def _client_id_pid(client_id: str | None) -> int | None:
    """The pid in AtoM's client id ``pid_<PID>_<uniqid>``, else None."""
    if not client_id or not client_id.startswith("pid_"):
        return None
    part = client_id[4:].split("_", 1)[0]
    return int(part) if part.isdigit() else None
