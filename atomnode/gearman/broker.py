"""The job broker: functions, queues, workers and clients, as pure state.

No sockets, no threads, no SQLite. The server feeds it packets per connection
(:meth:`Broker.handle`), connection events (:meth:`Broker.connect`,
:meth:`Broker.disconnect`), timer ticks (:meth:`Broker.tick`) and the store's reports
(:meth:`Broker.committed`, :meth:`Broker.commit_failed`). Everything the broker has to say
goes into one :class:`Outbox`: encoded packets per connection, store commands (tuples, see
:mod:`atomnode.queue.commands`), workers that became idle, and whether a timer may now be
due earlier. The server takes the whole outbox in one call (:meth:`Broker.take_outbox`)
after each read batch and acts on it; there is no other side channel.

Background jobs are durable: a new one is *pending* until the store reports its insert
committed (:meth:`Broker.committed`); only then is JOB_CREATED sent and the job offered to
workers. Foreground jobs are memory only, as in gearmand.

Time enters in one way only: the ``clock`` given to the constructor (wall-clock seconds: the
daemon passes :func:`time.time`, tests a settable one). Timers (epoch jobs,
CAN_DO_TIMEOUT) fire when the server calls :meth:`Broker.tick`; the server arms its wake-up
from :meth:`Broker.next_deadline` against the same clock.
"""

from __future__ import annotations

import heapq
import logging
import operator
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any, Final

from ..queue import commands
from ..system.names import function_matches, split_atom_prefix
from ..system.stats import FunctionStats
from .protocol import (
    MAX_FUNCTION_SIZE,
    MAX_UNIQUE_SIZE,
    Packet,
    T,
    encode,
    error_packet,
    pack_size,
    response_prefix,
)

log = logging.getLogger("atomnode.broker")

HIGH, NORMAL, LOW = 0, 1, 2
PRIORITY_NAMES = ("high", "normal", "low")

# Job states.
PENDING = "pending"  # background job waiting for its commit
SCHEDULED = "scheduled"  # epoch job not yet due
QUEUED = "queued"
RUNNING = "running"
DONE = "done"  # finished, failed, cancelled or dropped: no longer in the broker

_SUBMIT: dict[int, tuple[int, bool]] = {
    T.SUBMIT_JOB: (NORMAL, False),
    T.SUBMIT_JOB_BG: (NORMAL, True),
    T.SUBMIT_JOB_HIGH: (HIGH, False),
    T.SUBMIT_JOB_HIGH_BG: (HIGH, True),
    T.SUBMIT_JOB_LOW: (LOW, False),
    T.SUBMIT_JOB_LOW_BG: (LOW, True),
}

#: Largest SUBMIT_JOB_EPOCH time accepted: 9999-12-31 23:59:59 UTC. Every value a packet
#: may carry is checked before it reaches the store: SQLite integers are 64-bit, and one
#: value it cannot take must never join (and fail) a batch of other clients' jobs.
MAX_EPOCH = 253402300799
#: Largest CAN_DO_TIMEOUT, in seconds (gearmand reads it into a 32-bit int).
MAX_TIMEOUT = 2**31 - 1


def _parse_count(raw: bytes, limit: int) -> int | None:
    """A decimal number from 0 to ``limit`` (empty = 0; trailing NULs ignored, as some
    clients send them), else None."""
    raw = raw.rstrip(b"\0").strip()
    if not raw:
        return 0
    if not raw.isdigit() or len(raw) > 20:
        return None
    value = int(raw)
    return value if value <= limit else None


_ROW_ID = operator.itemgetter(0)  # of a commands.RECOVERED row
_ROW_SEQ = operator.itemgetter(4)

NOOP: Final = encode(T.NOOP)
NO_JOB: Final = encode(T.NO_JOB)

# The hot path (submit, grab, complete) compares packet types with plain ints and builds
# its replies from pre-encoded headers: an IntEnum member lookup costs more than the
# comparison, and encode() more than the bytes it joins. Final: compiled (setup.py), these
# are C constants instead of a lookup in the module's dict at every use.
_GRAB_JOB: Final = 9
_GRAB_JOB_UNIQ: Final = 30
_GRAB_JOB_ALL: Final = 39
_PRE_SLEEP: Final = 4
_SUBMIT_JOB: Final = 7
_WORK_COMPLETE: Final = 13
_WORK_EXCEPTION: Final = 25
assert (_GRAB_JOB, _GRAB_JOB_UNIQ, _GRAB_JOB_ALL, _PRE_SLEEP, _SUBMIT_JOB, _WORK_COMPLETE,
        _WORK_EXCEPTION) == (T.GRAB_JOB, T.GRAB_JOB_UNIQ, T.GRAB_JOB_ALL, T.PRE_SLEEP,
                             T.SUBMIT_JOB, T.WORK_COMPLETE, T.WORK_EXCEPTION)
_P_JOB_CREATED: Final = response_prefix(T.JOB_CREATED)
_P_JOB_ASSIGN: Final = response_prefix(T.JOB_ASSIGN)
_P_JOB_ASSIGN_UNIQ: Final = response_prefix(T.JOB_ASSIGN_UNIQ)
_P_WORK_COMPLETE: Final = response_prefix(T.WORK_COMPLETE)
_join: Final = b"".join
_NUL: Final = b"\0"
_pack_size: Final = pack_size


def _job_created(handle: bytes) -> bytes:
    return _join((_P_JOB_CREATED, _pack_size(len(handle)), handle))
_BAD_EPOCH = error_packet(
    "INVALID_PACKET",
    f"SUBMIT_JOB_EPOCH needs a unix time from 0 to {MAX_EPOCH} (9999-12-31); job not queued",
)
_BAD_TIMEOUT = error_packet(
    "INVALID_PACKET",
    f"CAN_DO_TIMEOUT needs a number of seconds from 0 to {MAX_TIMEOUT}; ability not registered",
)


class Conn:
    """One connection as the broker sees it: a client, a worker, or both."""

    __slots__ = (
        "id", "peer", "peer_port", "local", "fd", "client_id", "functions", "timeouts", "sleeping",
        "noop_sent", "held", "waiting", "exceptions", "draining", "jobs_done", "closed",
        "connected_at",
    )

    def __init__(
        self, conn_id: int, peer: str = "-", fd: int = -1, local: tuple[str, int] = ("-", 0)
    ):
        self.id = conn_id
        self.peer = peer
        self.peer_port = 0
        self.local = local
        self.fd = fd
        self.client_id = b"-"
        self.functions: list[Function] = []  # abilities, in CAN_DO order
        self.timeouts: dict[bytes, int] = {}
        self.sleeping = False
        self.noop_sent = False
        self.held: dict[bytes, Job] = {}  # jobs assigned to this worker, by handle
        self.waiting: list[Job] = []  # foreground jobs this client waits on
        self.exceptions = False
        self.draining = False
        self.jobs_done = 0
        self.closed = False
        self.connected_at = 0.0

    def __repr__(self) -> str:
        return f"<Conn {self.id} {self.peer} {self.client_id!r}>"


class Job:
    """A job known to the broker (pending, scheduled, queued or running)."""

    __slots__ = (
        "id", "handle", "function", "unique", "key", "data", "priority", "background",
        "when", "seq", "attempts", "state", "worker", "clients", "acks", "submitted_at",
        "started_at", "numerator", "denominator", "reducer", "deadline", "unstored",
    )

    def __init__(
        self, job_id: int, handle: bytes, function: Function, unique: bytes, key: bytes | None,
        data: bytes, priority: int, background: bool, when: int, seq: int, submitted_at: float,
    ):
        self.id = job_id
        self.handle = handle
        self.function = function
        self.unique = unique
        self.key = key  # coalescing key (None: never coalesces)
        self.data = data
        self.priority = priority
        self.background = background
        self.when = when
        self.seq = seq
        self.attempts = 0
        self.state = PENDING
        self.worker: Conn | None = None
        # Foreground clients waiting for the result, and connections owed a JOB_CREATED
        # after the commit. An empty tuple until needed: a million queued background
        # jobs should not carry two empty lists each.
        self.clients: list[Conn] | tuple[()] = ()
        self.acks: list[Conn] | tuple[()] = ()
        self.submitted_at = submitted_at
        self.started_at = 0.0
        self.numerator = b"0"
        self.denominator = b"0"
        self.reducer = b""
        self.deadline = 0.0
        self.unstored = False  # an insert is on its way to the store, not committed yet

    def __lt__(self, other: Job) -> bool:  # for heaps
        return self.seq < other.seq

    def __hash__(self) -> int:
        # By identity, as any object. Spelled out because a compiled class (setup.py) that
        # defines a comparison inherits no hash: jobs are kept in sets and as dict keys.
        return object.__hash__(self)

    def __repr__(self) -> str:
        return f"<Job {self.handle!r} {self.function.name!r} {self.state}>"


class Function:
    """A function name: its queues (one deque per priority), workers and counters."""

    __slots__ = ("name", "queues", "queued", "by_priority", "running", "total", "workers",
                 "max_queue", "groups", "stats")

    def __init__(self, name: bytes):
        self.name = name
        self.queues: tuple[deque[Job], deque[Job], deque[Job]] = (deque(), deque(), deque())
        self.queued = 0  # jobs in state QUEUED
        self.by_priority = [0, 0, 0]  # the same, per priority (prioritystatus in O(1))
        self.running = 0
        self.total = 0  # every live job: pending, scheduled, queued, running
        self.workers: dict[Conn, None] = {}
        self.max_queue = 0  # 0 = unlimited (gearmand's maxqueue)
        self.groups: list[GroupState] = []
        self.stats = FunctionStats()  # counters and histograms for /metrics and charts

    def counts_by_priority(self) -> list[int]:
        return list(self.by_priority)


class GroupState:
    """A concurrency group at run time (configured by ``config.ConcurrencyGroup``): at most
    ``limit`` jobs of the member functions run at once; ``running`` counts them. A configured
    group has one GroupState per AtoM site (function-name prefix ``site``) unless it spans
    sites (then ``site`` is None)."""

    __slots__ = ("name", "patterns", "limit", "running", "functions", "site")

    def __init__(self, name: str, patterns: Iterable[str], limit: int, site: str | None = None):
        self.name = name
        self.patterns = tuple(patterns)
        self.limit = limit
        self.running = 0
        self.functions: list[Function] = []
        self.site = site

    def full(self) -> bool:
        return self.running >= self.limit


class Outbox:
    """What the broker produced since the server last took it (see the module docstring).

    ``sends`` maps each connection to the encoded packets it is owed, in order; ``store``
    holds store commands in order; ``idle`` the workers whose last held job just ended;
    ``timers`` is True when a new timer may be due before the one the server armed.
    """

    __slots__ = ("sends", "store", "idle", "timers")

    def __init__(self) -> None:
        self.sends: dict[Conn, list[bytes]] = {}
        self.store: list[tuple] = []
        self.idle: list[Conn] = []
        self.timers = False

    def __bool__(self) -> bool:
        return bool(self.sends or self.store or self.idle or self.timers)


#: Who asked for an operator command: an admin connection (answered ``OK ...`` or
#: ``ERR FAILED ...``), or a callable ``(ok, detail)`` (detail: the retried job's handle, the
#: purged count, or why it failed).
ReplyTo = Conn | Callable[[bool, str], None]


class _OperatorReply:
    """Token of an operator command (retry, purge) answered once the store committed it.
    The store sets ``job`` (retry) or ``count`` (purge) on it."""

    __slots__ = ("reply_to", "kind", "job", "count")

    def __init__(self, reply_to: ReplyTo, kind: str):
        self.reply_to = reply_to
        self.kind = kind
        self.job: Any = None
        self.count = 0

    def answer(self, broker: Broker, ok: bool, detail: str) -> None:
        if isinstance(self.reply_to, Conn):
            line = f"OK {detail}" if ok else "ERR FAILED " + detail.replace(" ", "+")
            broker.send(self.reply_to, line.encode() + b"\r\n")
        else:
            self.reply_to(ok, detail)


def pattern_matches(pattern: str, function: bytes) -> bool:
    """A concurrency-group pattern names this function (AtoM site prefix optional)."""
    return function_matches(pattern, function.decode("utf-8", "replace"))


class Broker:
    """All job and worker state. See the module docstring for the I/O contract."""

    def __init__(
        self,
        *,
        hostname: str = "localhost",
        durable: bool = True,
        max_attempts: int | Callable[[bytes], int] = 5,
        clock: Callable[[], float],
        first_id: int = 1,
        first_seq: int = 1,
        id_reserve_block: int = 10000,
    ):
        self.handle_prefix = f"H:{hostname}:".encode()
        self.durable = durable
        if callable(max_attempts):
            self.max_attempts: Callable[[bytes], int] = max_attempts
        else:
            limit = max_attempts
            self.max_attempts = lambda _f: limit
        self.clock = clock
        self.next_id = first_id
        self.next_seq = first_seq
        # A recovery handed over in batches (restore_batch): what waits for
        # finish_restore, and how many were restored so far.
        self._restore_later: list[tuple] = []
        self._restored = 0
        self.id_reserve_block = id_reserve_block
        self.id_reserved = first_id  # persisted high-water mark, refreshed ahead of use
        self.functions: dict[bytes, Function] = {}
        self.conns: dict[int, Conn] = {}
        self.jobs: dict[bytes, Job] = {}  # live jobs by handle
        # Coalescing index: unique key -> the live job of that key (a Job), or, in the rare
        # case several functions use the same key, a dict function name -> Job. Keyed by
        # the unique alone so GET_STATUS_UNIQUE (which names no function) is one lookup.
        self.uniques: dict[bytes, Job | dict[bytes, Job]] = {}
        self.scheduled_count = 0  # jobs in state SCHEDULED
        self.groups: list[GroupState] = []
        self.group_specs: list[tuple[str, tuple[str, ...], int, bool]] = []
        self._group_index: dict[tuple[int, str | None], GroupState] = {}
        self.on_new_function: Callable[[Function], None] | None = None
        #: Called when a worker registers a function (CAN_DO), with its name.
        self.on_can_do: Callable[[bytes], None] | None = None
        #: Called when a job is given up (failed for good by the broker, not by its
        #: worker): (job, the connection that last held it or None, reason).
        self.on_given_up: Callable[[Job, Conn | None, str], None] | None = None
        #: Capacity that `status` adds for a function while its workers are replaced
        #: (see docs/workers.md): function name -> worker slots of healthy pools.
        self.standby: Callable[[bytes], int] | None = None
        self.scheduled: list[tuple[int, int, Job]] = []  # heap of (when, seq, job)
        self.deadlines: list[tuple[float, int, Job, int]] = []  # (deadline, seq, job, attempt)
        self.out = Outbox()
        self._spare = Outbox()
        #: Workers asleep and not yet woken (``sleeping and not noop_sent``): a submission
        #: looks for one to wake only while there are any.
        self.sleepers = 0
        self.stats = {"submitted": 0, "completed": 0, "failed": 0, "requeued": 0}
        #: What worker hosts reported about their pools (``atomnode-host report``), by
        #: address: {"host", "pools", "aware", "reported_at"}. For status and the console.
        self.remote_hosts: dict[str, dict[str, Any]] = {}
        self._reserve_ids()

    # ------------------------------------------------------------------ helpers
    def take_outbox(self) -> Outbox:
        """Everything produced since the last call. The returned outbox is the caller's
        until the next call, when the broker empties and reuses it (two outboxes take
        turns: no allocation per server round)."""
        out = self.out
        spare = self._spare
        if spare.sends:
            spare.sends.clear()
        if spare.store:
            spare.store = []  # the list itself may have been handed on
        if spare.idle:
            spare.idle = []
        spare.timers = False
        self.out = spare
        self._spare = out
        return out

    def send(self, conn: Conn, data: bytes) -> None:
        """Queue ``data`` (encoded packets or an admin reply) for ``conn``, after whatever
        the broker already owes it. Nothing is queued for a closed connection."""
        if not conn.closed:
            sends = self.out.sends
            pending = sends.get(conn)
            if pending is None:
                sends[conn] = [data]
            else:
                pending.append(data)


    def function(self, name: bytes) -> Function:
        fn = self.functions.get(name)
        if fn is None:
            fn = self.functions[name] = Function(name)
            if self.on_new_function is not None:
                self.on_new_function(fn)
            self._join_groups(fn)
        return fn

    def _join_groups(self, fn: Function) -> None:
        for i, (gname, patterns, limit, span) in enumerate(self.group_specs):
            if not any(pattern_matches(p, fn.name) for p in patterns):
                continue
            site = None if span else split_atom_prefix(fn.name.decode("utf-8", "replace"))[0]
            g = self._group_index.get((i, site))
            if g is None:
                g = self._group_index[(i, site)] = GroupState(gname, patterns, limit, site)
                self.groups.append(g)
            g.functions.append(fn)
            fn.groups.append(g)

    def _new_id(self) -> int:
        n = self.next_id
        self.next_id = n + 1
        if self.durable and self.next_id + self.id_reserve_block // 2 > self.id_reserved:
            self._reserve_ids()
        return n

    def _reserve_ids(self) -> None:
        if self.durable:
            self.id_reserved = self.next_id + self.id_reserve_block
            self.out.store.append((commands.RESERVE_IDS, self.id_reserved))

    def _new_seq(self) -> int:
        n = self.next_seq
        self.next_seq = n + 1
        return n

    def set_concurrency(self, groups: Iterable[tuple[Any, ...]]) -> None:
        """Replace the concurrency groups: (name, function patterns, limit[, span_sites]).
        Unless ``span_sites``, a group applies per AtoM site (function-name prefix): two
        sites sharing this server do not wait for each other."""
        for fn in self.functions.values():
            fn.groups = []
        self.group_specs = [
            (g[0], tuple(g[1]), g[2], bool(g[3]) if len(g) > 3 else False) for g in groups
        ]
        self.groups = []
        self._group_index = {}
        for fn in self.functions.values():
            self._join_groups(fn)
        for g in self.groups:
            g.running = sum(f.running for f in g.functions)

    # -------------------------------------------------------------- connections
    def connect(self, conn: Conn) -> Conn:
        conn.connected_at = self.clock()
        self.conns[conn.id] = conn
        return conn

    def disconnect(self, conn: Conn) -> None:
        """A connection closed: requeue what it held, drop what only it waited for."""
        if conn.closed:
            return
        conn.closed = True
        if conn.sleeping and not conn.noop_sent:
            self.sleepers -= 1
            conn.sleeping = False
        self.conns.pop(conn.id, None)
        self.out.sends.pop(conn, None)
        for job in list(conn.held.values()):
            self._requeue(job, "worker disconnected")
        conn.held.clear()
        for fn in conn.functions:
            fn.workers.pop(conn, None)
        conn.functions = []
        for job in conn.waiting:
            try:
                job.clients.remove(conn)  # type: ignore[union-attr]  # a list: conn is in it
            except ValueError:
                pass
            if not job.clients and not job.background and job.state in (QUEUED, SCHEDULED):
                # gearmand drops a queued foreground job whose client has gone.
                self._forget(job)
        conn.waiting = []
        self.out.idle.append(conn)

    # ------------------------------------------------------------------ packets
    def handle(self, conn: Conn, packet: Packet) -> None:
        """Process one request packet from ``conn`` (dispatched by type, see ``_HANDLERS``)."""
        t = packet.type
        _HANDLERS.get(t, Broker._on_unexpected)(self, conn, packet.args, t)

    def handle_many(self, conn: Conn, packets: list[Packet]) -> None:
        """Process request packets from ``conn`` in order (what :meth:`handle` does for
        each, in one call: the server's path for a decoded read). The packets of a job's
        round trip are called directly, the others through the table."""
        for packet in packets:
            t = packet[0]
            args = packet[1]
            if t == _GRAB_JOB_UNIQ or t == _GRAB_JOB:
                self._grab(conn, args, t)
            elif t == _WORK_COMPLETE:
                self._work_end(conn, args[0], t, args[1])
            elif t == _SUBMIT_JOB:
                self.submit(conn, args[0], args[1], args[2], NORMAL, False)
            elif t == _PRE_SLEEP:
                self._on_pre_sleep(conn, args, t)
            else:
                _HANDLERS.get(t, Broker._on_unexpected)(self, conn, args, t)

    # One method per request type, all (self, conn, args, type): the table at the end of
    # the module maps each packet type to one of them.
    def _on_pre_sleep(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        if conn.sleeping and not conn.noop_sent:
            self.sleepers -= 1
        if not conn.draining and self._peek(conn):
            conn.sleeping = False
            self.send(conn, NOOP)
        else:
            conn.sleeping = True
            conn.noop_sent = False
            self.sleepers += 1

    def _on_work_complete(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._work_end(conn, args[0], t, args[1])

    def _on_work_fail(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._work_end(conn, args[0], t, b"")

    def _on_work_exception(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._work_end(conn, args[0], t, args[1])

    def _on_submit(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        prio, bg = _SUBMIT[t]
        self.submit(conn, args[0], args[1], args[2], prio, bg)

    def _number_arg(self, conn: Conn, raw: bytes, limit: int, refusal: bytes) -> int | None:
        """``raw`` as a number from 0 to ``limit``, or None after sending ``refusal``."""
        value = _parse_count(raw, limit)
        if value is None:
            self.send(conn, refusal)
        return value

    def _on_submit_epoch(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        when = self._number_arg(conn, args[2], MAX_EPOCH, _BAD_EPOCH)
        if when is None:
            return
        self.submit(conn, args[0], args[1], args[3], NORMAL, True, when=when)

    def _on_submit_reduce(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self.submit(
            conn, args[0], args[1], args[4], NORMAL, t == T.SUBMIT_REDUCE_JOB_BACKGROUND,
            reducer=args[2],
        )

    def _on_work_status(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        job = self._held(conn, args[0])
        if job is not None:
            job.numerator, job.denominator = args[1], args[2]
            pkt = encode(T.WORK_STATUS, *args)
            for c in job.clients:
                self.send(c, pkt)

    def _on_work_data(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        """WORK_DATA and WORK_WARNING: passed on to the waiting clients."""
        job = self._held(conn, args[0])
        if job is not None:
            pkt = encode(t, *args)
            for c in job.clients:
                self.send(c, pkt)

    def _on_can_do(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._can_do(conn, args[0], 0)

    def _on_can_do_timeout(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        timeout = self._number_arg(conn, args[1], MAX_TIMEOUT, _BAD_TIMEOUT)
        if timeout is None:
            return
        self._can_do(conn, args[0], timeout)

    def _on_cant_do(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        fn = self.functions.get(args[0])
        if fn is not None and fn in conn.functions:
            conn.functions.remove(fn)
            fn.workers.pop(conn, None)
            conn.timeouts.pop(fn.name, None)

    def _on_reset_abilities(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        for fn in conn.functions:
            fn.workers.pop(conn, None)
        conn.functions = []
        conn.timeouts.clear()

    def _on_set_client_id(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        conn.client_id = args[0] or b"-"

    def _on_echo(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self.send(conn, encode(T.ECHO_RES, args[0]))

    def _on_option(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        if args[0].rstrip(b"\0").lower() == b"exceptions":
            conn.exceptions = True
            self.send(conn, encode(T.OPTION_RES, args[0]))
        else:
            self.send(
                conn, error_packet("UNKNOWN_OPTION", "Server does not recognize given option")
            )

    def _on_get_status(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._get_status(conn, args[0])

    def _on_get_status_unique(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        self._get_status_unique(conn, args[0])

    def _on_ignored(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        """ALL_YOURS: accepted and ignored, as gearmand does."""

    def _on_unexpected(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        # SUBMIT_JOB_SCHED and anything else gearmand does not serve.
        self.send(conn, error_packet("INVALID_COMMAND", "Command not expected"))

    # ------------------------------------------------------------ submissions
    def submit(
        self, conn: Conn | None, function: bytes, unique: bytes, data: bytes, priority: int,
        background: bool, *, when: int = 0, reducer: bytes = b"",
    ) -> Job | None:
        """A client submits a job. Returns the job (new or joined), or None on error."""
        if len(unique) > MAX_UNIQUE_SIZE:
            if conn is not None:
                self.send(conn, error_packet("ARGUMENT_TOO_LARGE", "Unique value too large"))
            return None
        if len(function) > MAX_FUNCTION_SIZE or not function:
            if conn is not None:
                self.send(
                    conn,
                    error_packet("ARGUMENT_TOO_LARGE", "Function name is empty or too large"),
                )
            return None
        fn = self.functions.get(function) or self.function(function)
        if unique == b"-":
            key: bytes | None = data if data else None
        else:
            key = unique or None
        job = self._unique_get(function, key) if key is not None else None
        if job is not None:
            # Coalesce: same handle, payload and priority of the new submission ignored.
            if background and self.durable and not job.background:
                # A background submission joins a foreground job: from now on the job
                # must survive a restart, so it is stored and acknowledged on commit.
                job.background = True
                if job.state is not PENDING:
                    job.unstored = True
                    self.out.store.append((
                        commands.INSERT, job.id, function, job.unique, job.data, job.priority,
                        job.when, job.seq, job.submitted_at, job,
                    ))
                    if job.state is RUNNING:
                        worker = job.worker
                        self.out.store.append((
                            commands.START, job.id, job.attempts,
                            worker.client_id.decode("utf-8", "replace") if worker else "-",
                            job.started_at,
                        ))
                    if conn is not None:
                        job.acks = [*job.acks, conn]
                    return job
            if conn is not None:
                if not background:
                    job.clients = [*job.clients, conn]
                    conn.waiting.append(job)
                if job.state is PENDING or (background and job.unstored):
                    job.acks = [*job.acks, conn]
                else:
                    self.send(conn, _job_created(job.handle))
            return job
        if fn.max_queue and fn.total >= fn.max_queue:
            if conn is not None:
                self.send(conn, error_packet("QUEUE_ERROR", "Job queue is full"))
            return None
        now = self.clock()
        job_id = self._new_id()
        seq = self.next_seq
        self.next_seq = seq + 1
        handle = self.handle_prefix + str(job_id).encode()
        job = Job(
            job_id, handle, fn, unique, key, data, priority, background, when, seq, now,
        )
        if reducer:
            job.reducer = reducer
        self.stats["submitted"] += 1
        fn.stats.submitted += 1
        fn.total += 1
        self.jobs[handle] = job
        if key is not None:
            self._unique_add(job)
        if conn is not None and not background:
            job.clients = [conn]
            conn.waiting.append(job)
        if background and self.durable:
            if conn is not None:
                job.acks = [conn]
            self.out.store.append(
                (commands.INSERT, job_id, function, unique, data, priority, when, seq, now, job)
            )
            return job
        if conn is not None:
            self.send(conn, _job_created(handle))
        self._enqueue(job)
        return job

    def committed(self, tokens: Iterable[Any]) -> None:
        """The store committed these commands: acknowledge and release the inserted jobs,
        answer the operator commands (:meth:`request_retry`, :meth:`request_purge`)."""
        for job in tokens:
            if type(job) is not Job:
                if type(job) is _OperatorReply:
                    self._operator_done(job)
                continue
            job.unstored = False
            if job.acks:
                created = _job_created(job.handle)
                for c in job.acks:
                    self.send(c, created)
                job.acks = ()
            if job.state is PENDING:
                self._enqueue(job)

    def commit_failed(self, failures: Iterable[tuple[Any, str]]) -> None:
        """The store could not commit these commands: tell the submitters (and forget
        their jobs) and the operators who asked."""
        for job, message in failures:
            if type(job) is not Job:
                if type(job) is _OperatorReply:
                    job.answer(self, False, message)
                continue
            err = error_packet("QUEUE_ERROR", message)
            if job.state is not PENDING:
                # A foreground job a background submission tried to join: it goes on
                # as the foreground job it was; the background submitter gets the error.
                for c in job.acks:
                    self.send(c, err)
                job.acks = ()
                job.background = False
                job.unstored = False
                continue
            for c in job.acks:
                self.send(c, err)
            for c in job.clients:
                if c not in job.acks:
                    self.send(c, encode(T.WORK_FAIL, job.handle))
            job.acks = ()
            self._forget(job)

    # ------------------------------------------------------ operator commands
    def request_retry(self, reply_to: ReplyTo, job_id: int) -> None:
        """Ask the store to queue failed or cancelled job ``job_id`` again; once committed
        the job is queued here too. ``reply_to`` (see :data:`ReplyTo`) gets its handle, or
        why not."""
        reply = _OperatorReply(reply_to, "retry")
        self.out.store.append(commands.retry(job_id, self._new_seq(), reply))

    def request_purge(self, reply_to: ReplyTo, older_than: float) -> None:
        """Ask the store to delete finished jobs older than ``older_than`` seconds;
        ``reply_to`` gets how many, or why not."""
        self.out.store.append(commands.purge(older_than, _OperatorReply(reply_to, "purge")))

    def cancel_stored(self, job_id: int) -> None:
        """Ask the store to mark a job the broker does not hold (a failed one) cancelled."""
        self.out.store.append(commands.cancel(job_id, self.clock()))

    def _operator_done(self, reply: _OperatorReply) -> None:
        if reply.kind == "retry" and reply.job is not None:
            job = self.enqueue_stored(reply.job)
            reply.answer(self, True, job.handle.decode())
        else:
            reply.answer(self, True, str(reply.count))

    def restore(self, stored: Iterable[Any], *, requeue_reason: str = "daemon restarted") -> int:
        """Load jobs recovered from the store, given as objects with the fields of
        :class:`StoredJob <atomnode.queue.store.StoredJob>`, in queue order within each
        priority. See :meth:`restore_rows`."""
        pack = commands.pack_recovered_flags
        return self.restore_rows(
            [(s.id, s.function, s.unique, s.data, s.seq, s.submitted_at,
              pack(s.priority, s.state == RUNNING, s.attempts, s.when_to_run)) for s in stored],
            requeue_reason=requeue_reason,
        )

    def restore_rows(self, rows: list[tuple], *, requeue_reason: str = "daemon restarted"
                     ) -> int:
        """Load the live jobs recovered from the store: :data:`commands.RECOVERED
        <atomnode.queue.commands.RECOVERED>` tuples, in any order (each queue ends in
        seq order). Jobs that were running when the daemon stopped go back to the end of
        their queue with their attempt counted, or fail if that was their last attempt.
        Returns the number restored. The same as :meth:`restore_batch` with all the rows,
        then :meth:`finish_restore`.

        A million jobs come through here before the daemon serves (the restart budget), so
        a plain job (due now, never tried) costs only its Job, its handle, its place in the
        indexes and its queue; the others take :meth:`_restore_other` once every stored
        number is known, and the functions' counters are added up once per call.
        """
        self.restore_batch(rows)
        return self.finish_restore(requeue_reason=requeue_reason)

    def restore_batch(self, rows: list[tuple]) -> None:
        """Part of the live jobs, handed over while the store still reads the rest
        (:meth:`Store.open <atomnode.queue.store.Store.open>` with ``on_rows``), in any
        order. The plain jobs are restored at once; the others (running, tried before,
        scheduled) wait for :meth:`finish_restore`, when every stored number is known:
        a running job is requeued with a seq above all of them."""
        self._restore_counters(rows)
        self._restored += self._restore(rows, self._restore_later, "")

    def finish_restore(self, *, requeue_reason: str = "daemon restarted") -> int:
        """After the last :meth:`restore_batch`: restore the jobs that waited, put each
        queue in seq order (batches come in id order, and a job requeued before the
        restart has a later seq than its id says), reserve ids. Returns the number of
        jobs restored by the batches and here."""
        later = self._restore_later
        self._restore_later = []
        restored = self._restored + self._restore(later, None, requeue_reason)
        self._restored = 0
        for fn in self.functions.values():
            for queue in fn.queues:
                last = -1
                for job in queue:
                    if job.seq < last:
                        ordered = sorted(queue)  # Job orders by seq
                        queue.clear()
                        queue.extend(ordered)
                        break
                    last = job.seq
        self._reserve_ids()
        return restored

    def _restore_counters(self, rows: list[tuple]) -> None:
        # Every stored number first: a running job requeued gets a fresh seq.
        if rows:
            self.next_id = max(self.next_id, max(map(_ROW_ID, rows)) + 1)
            self.next_seq = max(self.next_seq, max(map(_ROW_SEQ, rows)) + 1)

    def _restore(self, rows: list[tuple], later: list[tuple] | None,
                 requeue_reason: str) -> int:
        """Restore ``rows``; with ``later``, the jobs that are not plain are put there
        instead. Returns the number restored (not counting those put in ``later``)."""
        now = self.clock()
        handle_format = self.handle_prefix + b"%d"
        jobs, uniques = self.jobs, self.uniques
        functions = self.functions
        # Queue lengths before, to count what was appended at the end.
        before = {fn: tuple(map(len, fn.queues)) for fn in functions.values()}
        plain = commands.RECOVERED_PLAIN
        given_up = 0
        deferred = 0
        fn_name: bytes | None = None
        fn: Function | None = None
        queues: Any = None
        for row in rows:
            job_id, name, unique, data, seq, at, flags = row
            if flags > plain and later is not None:
                later.append(row)
                deferred += 1
                continue
            if name != fn_name:
                fn_name = name
                fn = functions.get(name) or self.function(name)
                queues = fn.queues
            key = (data or None) if unique == b"-" else (unique or None)
            handle = handle_format % job_id
            job = Job(job_id, handle, fn,  # type: ignore[arg-type]  # set at the first row
                      unique, key, data, flags & 3, True, 0, seq, at)
            if flags > plain:
                if not self._restore_other(job, flags, now, requeue_reason):
                    given_up += 1
                continue
            job.state = QUEUED
            jobs[handle] = job
            if key is not None and uniques.setdefault(key, job) is not job:
                self._unique_add(job)
            queues[flags].append(job)
        for fn in functions.values():
            lengths = before.get(fn, (0, 0, 0))
            added = 0
            for priority, queue in enumerate(fn.queues):
                more = len(queue) - lengths[priority]
                fn.by_priority[priority] += more
                added += more
            fn.queued += added
            fn.total += added
        return len(rows) - given_up - deferred

    def _restore_other(self, job: Job, flags: int, now: float, requeue_reason: str) -> bool:
        """Restore a recovered job that is not plain: tried before, running when the
        daemon stopped, or scheduled. False if it is given up instead (its last attempt
        was running)."""
        _priority, running, attempts, when = commands.recovered_flags(flags)
        fn = job.function
        job.attempts = attempts
        job.when = when
        if running:
            if attempts >= self.max_attempts(fn.name):
                msg = f"{requeue_reason} while running; gave up after {attempts} attempts"
                self.out.store.append((commands.FAIL, job.id, self.clock(), msg))
                self.stats["failed"] += 1
                fn.stats.failed += 1
                if self.on_given_up is not None:
                    self.on_given_up(job, None, msg)
                return False
            job.seq = self._new_seq()
            self.out.store.append((commands.REQUEUE, job.id, attempts, job.seq, requeue_reason))
        self.jobs[job.handle] = job
        if job.key is not None:
            self._unique_add(job)
        if when and when > now:
            fn.total += 1  # queued ones are counted at the end of restore_rows
            self._enqueue(job, wake=False)  # scheduled
        else:
            job.state = QUEUED
            fn.queues[job.priority].append(job)
        return True

    def enqueue_stored(self, s: Any) -> Job:
        """Put back a job the store re-queued (operator retry)."""
        fn = self.function(s.function)
        key = (s.data or None) if s.unique == b"-" else (s.unique or None)
        job = Job(
            s.id, self.handle_prefix + str(s.id).encode(), fn, s.unique, key, s.data,
            s.priority, True, s.when_to_run, s.seq, s.submitted_at,
        )
        job.attempts = s.attempts
        if s.seq >= self.next_seq:
            self.next_seq = s.seq + 1
        fn.total += 1
        self.jobs[job.handle] = job
        if key is not None:
            self._unique_add(job)
        self._enqueue(job)
        return job

    # ----------------------------------------------------------- unique index
    def _unique_get(self, function: bytes, key: bytes) -> Job | None:
        entry = self.uniques.get(key)
        if entry is None:
            return None
        if isinstance(entry, dict):
            return entry.get(function)
        return entry if entry.function.name == function else None

    def _unique_add(self, job: Job) -> None:
        """Index ``job`` under its key unless a live job of its function has it already."""
        key = job.key
        assert key is not None
        entry = self.uniques.get(key)
        if entry is None:
            self.uniques[key] = job
        elif isinstance(entry, dict):
            entry.setdefault(job.function.name, job)
        elif entry.function is not job.function:
            self.uniques[key] = {entry.function.name: entry, job.function.name: job}

    def _unique_del(self, job: Job) -> None:
        key = job.key
        entry = self.uniques.get(key)  # type: ignore[arg-type]
        if entry is job:
            del self.uniques[key]  # type: ignore[arg-type]
        elif isinstance(entry, dict) and entry.get(job.function.name) is job:
            del entry[job.function.name]
            if len(entry) == 1:
                self.uniques[key] = next(iter(entry.values()))  # type: ignore[index]

    def unique_index(self) -> Iterator[tuple[tuple[bytes, bytes], Job]]:
        """Every indexed job as ((function name, key), job): for checks and tools."""
        for key, entry in self.uniques.items():
            if isinstance(entry, dict):
                for name, job in entry.items():
                    yield (name, key), job
            else:
                yield (entry.function.name, key), entry

    # ------------------------------------------------------------ queue state
    def _enqueue(self, job: Job, wake: bool = True) -> None:
        fn = job.function
        if job.when and job.when > self.clock():
            job.state = SCHEDULED
            self.scheduled_count += 1
            heapq.heappush(self.scheduled, (job.when, job.seq, job))
            self.out.timers = True
            return
        job.state = QUEUED
        fn.queues[job.priority].append(job)
        fn.queued += 1
        fn.by_priority[job.priority] += 1
        if wake:
            self._wake(fn)

    def _wake(self, fn: Function) -> None:
        if not self.sleepers or (fn.groups and any(g.full() for g in fn.groups)):
            return
        for w in fn.workers:
            if w.sleeping and not w.noop_sent and not w.draining:
                w.noop_sent = True
                self.sleepers -= 1
                self.send(w, NOOP)

    def _forget(self, job: Job) -> None:
        """Remove a job from every index (it is finished, failed, cancelled or dropped)."""
        fn = job.function
        if job.state is QUEUED:
            fn.queued -= 1  # its deque entry is skipped lazily
            fn.by_priority[job.priority] -= 1
        elif job.state is SCHEDULED:
            self.scheduled_count -= 1
        elif job.state is RUNNING:
            fn.running -= 1
            for g in fn.groups:
                g.running -= 1
                self._wake_group(g)
        job.state = DONE
        fn.total -= 1
        self.jobs.pop(job.handle, None)
        if job.key is not None:
            self._unique_del(job)
        for c in job.clients:
            try:
                c.waiting.remove(job)
            except ValueError:
                pass
        job.clients = ()

    def _wake_group(self, g: GroupState) -> None:
        if not g.full():
            for fn in g.functions:
                if fn.queued:
                    self._wake(fn)

    def _requeue(self, job: Job, reason: str) -> None:
        """A running job lost its worker: queue it again, or fail it past max attempts."""
        fn = job.function
        worker = job.worker
        if worker is not None:
            worker.held.pop(job.handle, None)
            if not worker.held:
                self.out.idle.append(worker)
        job.worker = None
        fn.running -= 1
        for g in fn.groups:
            g.running -= 1
        job.state = QUEUED  # transiently, for the accounting below
        fn.queued += 1
        fn.by_priority[job.priority] += 1
        limit = self.max_attempts(fn.name)
        if limit and job.attempts >= limit:
            msg = f"{reason}; gave up after {job.attempts} attempts"
            log.warning("job %s (%s) failed: %s", job.handle.decode(), fn.name.decode(
                "utf-8", "replace"), msg)
            fail = encode(T.WORK_FAIL, job.handle)
            for c in job.clients:
                self.send(c, fail)
            if job.background and self.durable:
                self.out.store.append((commands.FAIL, job.id, self.clock(), msg))
            self.stats["failed"] += 1
            fn.stats.failed += 1
            if self.on_given_up is not None:
                self.on_given_up(job, worker, msg)
            self._forget(job)
            for g in fn.groups:
                self._wake_group(g)
            return
        log.info("job %s (%s) requeued: %s (attempt %d)", job.handle.decode(),
                 fn.name.decode("utf-8", "replace"), reason, job.attempts)
        self.stats["requeued"] += 1
        fn.stats.retried += 1
        job.seq = self._new_seq()
        job.numerator = job.denominator = b"0"
        if job.background and self.durable:
            self.out.store.append((commands.REQUEUE, job.id, job.attempts, job.seq, reason))
        fn.queues[job.priority].append(job)
        self._wake(fn)
        for g in fn.groups:
            self._wake_group(g)

    # ---------------------------------------------------------------- workers
    def _can_do(self, conn: Conn, name: bytes, timeout: int) -> None:
        if len(name) > MAX_FUNCTION_SIZE or not name:
            self.send(
                conn, error_packet("ARGUMENT_TOO_LARGE", "Function name is empty or too large")
            )
            return
        fn = self.function(name)
        if fn not in conn.functions:
            conn.functions.append(fn)
            fn.workers[conn] = None
            if self.on_can_do is not None:
                self.on_can_do(name)
        if timeout:
            conn.timeouts[name] = timeout
        else:
            conn.timeouts.pop(name, None)
        if conn.sleeping and not conn.noop_sent and not conn.draining and self._runnable(fn):
            # A sleeping worker that gains an ability with work waiting is woken now,
            # not at the next submission.
            conn.noop_sent = True
            self.sleepers -= 1
            self.send(conn, NOOP)

    def _runnable(self, fn: Function) -> bool:
        if not fn.queued:
            return False
        if fn.groups:
            for g in fn.groups:
                if g.full():
                    return False
        return True

    def _head(self, fn: Function) -> Job | None:
        for q in fn.queues:
            while q:
                job = q[0]
                if job.state is QUEUED and job.function is fn:
                    return job
                q.popleft()  # stale entry (cancelled / dropped / re-queued elsewhere)
        return None

    def _peek(self, conn: Conn) -> Job | None:
        best: Job | None = None
        for fn in conn.functions:
            if not self._runnable(fn):
                continue
            job = self._head(fn)
            if job is not None and (
                best is None or (job.priority, job.seq) < (best.priority, best.seq)
            ):
                best = job
                if job.priority == HIGH:
                    break
        return best

    def _grab(self, conn: Conn, args: tuple[bytes, ...], t: int) -> None:
        if conn.sleeping:
            if not conn.noop_sent:
                self.sleepers -= 1
            conn.sleeping = False
        conn.noop_sent = False
        if conn.draining:
            self.send(conn, NO_JOB)
            return
        functions = conn.functions
        if len(functions) == 1:
            fn = functions[0]
            if fn.queued and not fn.groups:
                job = self._head(fn)
            else:
                job = self._head(fn) if self._runnable(fn) else None
        else:
            job = self._peek(conn)
        if job is None:
            self.send(conn, NO_JOB)
            return
        fn = job.function
        fn.queues[job.priority].popleft()
        fn.queued -= 1
        fn.by_priority[job.priority] -= 1
        fn.running += 1
        for g in fn.groups:
            g.running += 1
        job.state = RUNNING
        job.worker = conn
        job.attempts += 1
        now = self.clock()
        job.started_at = now
        if job.attempts == 1:
            h = fn.stats.wait  # Histogram.observe, inlined: this is the job path
            waited = now - job.submitted_at
            h.counts[bisect_left(h.bounds, waited)] += 1
            h.sum += waited
        handle = job.handle
        conn.held[handle] = job
        if t == _GRAB_JOB_UNIQ or (t == _GRAB_JOB_ALL and not job.reducer):
            # As gearmand: without a reducer GRAB_JOB_ALL is answered with JOB_ASSIGN_UNIQ.
            body = _NUL.join((handle, fn.name, job.unique, job.data))
            pkt = _join((_P_JOB_ASSIGN_UNIQ, _pack_size(len(body)), body))
        elif t == _GRAB_JOB_ALL:
            pkt = encode(T.JOB_ASSIGN_ALL, handle, fn.name, job.unique, job.reducer, job.data)
        else:
            body = _NUL.join((handle, fn.name, job.data))
            pkt = _join((_P_JOB_ASSIGN, _pack_size(len(body)), body))
        self.send(conn, pkt)
        if job.background and self.durable:
            self.out.store.append(
                (commands.START, job.id, job.attempts,
                 conn.client_id.decode("utf-8", "replace"), now)
            )
        timeout = conn.timeouts.get(fn.name) if conn.timeouts else None
        if timeout:
            job.deadline = now + timeout
            heapq.heappush(self.deadlines, (job.deadline, job.seq, job, job.attempts))
            self.out.timers = True

    def _held(self, conn: Conn, handle: bytes) -> Job | None:
        job = conn.held.get(handle)
        if job is None:
            self.send(
                conn, error_packet("JOB_NOT_FOUND", "Job given in work result not found")
            )
        return job

    def _work_end(self, conn: Conn, handle: bytes, t: int, data: bytes) -> None:
        held = conn.held
        job = held.pop(handle, None)
        if job is None:
            self._held(conn, handle)  # answers JOB_NOT_FOUND
            return
        conn.jobs_done += 1
        stats = job.function.stats
        now = self.clock()
        h = stats.run  # Histogram.observe, inlined: this is the job path
        ran = now - job.started_at
        h.counts[bisect_left(h.bounds, ran)] += 1
        h.sum += ran
        if t == _WORK_COMPLETE:
            stats.completed += 1
            if job.clients:
                pkt = _join((_P_WORK_COMPLETE, _pack_size(len(handle) + 1 + len(data)),
                             handle, _NUL, data))
                for c in job.clients:
                    self.send(c, pkt)
            self.stats["completed"] += 1
            if job.background and self.durable:
                self.out.store.append((commands.DONE, job.id, now, len(data)))
        else:
            fail = encode(T.WORK_FAIL, handle)
            if t == _WORK_EXCEPTION:
                exc = encode(T.WORK_EXCEPTION, handle, data)
                for c in job.clients:
                    self.send(c, exc if c.exceptions else fail)
                reason = "WORK_EXCEPTION from worker: " + data[:200].decode("utf-8", "replace")
            else:
                for c in job.clients:
                    self.send(c, fail)
                reason = "WORK_FAIL from worker"
            stats.failed += 1
            self.stats["failed"] += 1
            if job.background and self.durable:
                self.out.store.append((commands.FAIL, job.id, now, reason))
        # _forget(job), inlined for a running job: this is the job path.
        job.worker = None
        job.state = DONE
        fn = job.function
        fn.running -= 1
        fn.total -= 1
        self.jobs.pop(handle, None)
        key = job.key
        if key is not None:
            if self.uniques.get(key) is job:
                del self.uniques[key]
            else:
                self._unique_del(job)
        if job.clients:
            for c in job.clients:
                try:
                    c.waiting.remove(job)
                except ValueError:
                    pass
            job.clients = ()
        if fn.groups:
            for g in fn.groups:
                g.running -= 1
                self._wake_group(g)
        if not held:
            self.out.idle.append(conn)

    # ----------------------------------------------------------------- status
    def _get_status(self, conn: Conn, handle: bytes) -> None:
        job = self.jobs.get(handle)
        if job is None or job.state is PENDING:
            self.send(conn, encode(T.STATUS_RES, handle, b"0", b"0", b"0", b"0"))
        else:
            self.send(conn, encode(
                T.STATUS_RES, handle, b"1", b"1" if job.state is RUNNING else b"0",
                job.numerator, job.denominator,
            ))

    def _get_status_unique(self, conn: Conn, unique: bytes) -> None:
        job = None
        entry = self.uniques.get(unique)
        if type(entry) is dict:
            job = next((j for j in entry.values() if j.state is not PENDING), None)
        elif entry is not None and entry.state is not PENDING:  # type: ignore[union-attr]
            job = entry  # type: ignore[assignment]
        if job is None:
            self.send(conn, encode(T.STATUS_RES_UNIQUE, unique, b"0", b"0", b"0", b"0", b"0"))
        else:
            self.send(conn, encode(
                T.STATUS_RES_UNIQUE, unique, b"1", b"1" if job.state is RUNNING else b"0",
                job.numerator, job.denominator, str(len(job.clients)).encode(),
            ))

    # ------------------------------------------------------------------ timers
    def next_deadline(self) -> float | None:
        """Wall-clock time of the next timer (epoch job due, CAN_DO_TIMEOUT), if any."""
        t: float | None = None
        while self.deadlines and self._stale_deadline(self.deadlines[0]):
            heapq.heappop(self.deadlines)
        if self.deadlines:
            t = self.deadlines[0][0]
        while self.scheduled and self.scheduled[0][2].state is not SCHEDULED:
            heapq.heappop(self.scheduled)
        if self.scheduled:
            w = float(self.scheduled[0][0])
            t = w if t is None else min(t, w)
        return t

    @staticmethod
    def _stale_deadline(entry: tuple[float, int, Job, int]) -> bool:
        _d, _s, job, attempt = entry
        return job.state is not RUNNING or job.attempts != attempt

    def tick(self, now: float | None = None) -> None:
        """Run due timers: release epoch jobs, requeue jobs past their CAN_DO_TIMEOUT."""
        if now is None:
            now = self.clock()
        while self.scheduled and self.scheduled[0][0] <= now:
            _w, _s, job = heapq.heappop(self.scheduled)
            if job.state is SCHEDULED:
                job.state = QUEUED
                self.scheduled_count -= 1
                fn = job.function
                fn.queues[job.priority].append(job)
                fn.queued += 1
                fn.by_priority[job.priority] += 1
                self._wake(fn)
        while self.deadlines and self.deadlines[0][0] <= now:
            entry = heapq.heappop(self.deadlines)
            if self._stale_deadline(entry):
                continue
            job = entry[2]
            timeout = entry[0] - job.started_at
            self._requeue(job, f"timed out after {timeout:g}s (CAN_DO_TIMEOUT)")

    # ------------------------------------------------------------- operators
    def cancel(self, handle: bytes) -> bool:
        """Cancel a queued (not running) job. True if it was cancelled."""
        job = self.jobs.get(handle)
        if job is None or job.state not in (QUEUED, SCHEDULED):
            return False
        fail = encode(T.WORK_FAIL, handle)
        for c in job.clients:
            self.send(c, fail)
        if job.background and self.durable:
            self.out.store.append((commands.CANCEL, job.id, self.clock()))
        job.function.stats.cancelled += 1
        self._forget(job)
        return True

    def release(self, conn: Conn, handle: bytes, reason: str) -> bool:
        """A worker gives back a job it holds without a result (atomnode's own workers:
        a job process timed out or was stopped): the job is queued again with ``reason``,
        or fails past its max attempts, as when a worker disconnects. False if ``conn``
        does not hold it."""
        job = conn.held.get(handle)
        if job is None:
            return False
        self._requeue(job, reason)
        return True

    def drain(self, conn: Conn) -> None:
        """From now on this worker's GRAB_JOB gets NO_JOB."""
        conn.draining = True

    def wake_worker(self, conn: Conn) -> None:
        """A sleeping worker that may take jobs again (released from a drain) gets a
        NOOP if one of its functions has work."""
        if conn.sleeping and not conn.noop_sent and not conn.draining and self._peek(conn):
            conn.noop_sent = True
            self.sleepers -= 1
            self.send(conn, NOOP)

    def report_host(self, address: str, report: dict[str, Any]) -> None:
        """A worker host at ``address`` reported its pools (see gearman/hosts.py)."""
        self.remote_hosts[address] = {**report, "reported_at": self.clock()}

    def drop_function(self, name: bytes) -> str | None:
        """gearmand's `drop function`: None on success, else the error text."""
        fn = self.functions.get(name)
        if fn is None:
            return "function not found"
        if fn.workers or fn.running or fn.total:
            return "there are still connected workers or executing clients"
        del self.functions[name]
        for g in fn.groups:
            g.functions.remove(fn)
        return None

    def shutdown_drain_all(self) -> None:
        for c in self.conns.values():
            c.draining = True

    def compact(self) -> None:
        """Shrink the job indexes after a deep queue drained. A Python dict never shrinks
        as entries leave: after a million jobs ran, ``jobs`` and ``uniques`` would keep
        tables sized for a million (tens of MiB) for good. Rebuilt in place (the same
        objects), O(live jobs): the daemon calls it when the queue fell by a lot."""
        jobs = dict(self.jobs)
        self.jobs.clear()
        self.jobs.update(jobs)
        uniques = dict(self.uniques)
        self.uniques.clear()
        self.uniques.update(uniques)

    def running_jobs(self) -> int:
        return sum(fn.running for fn in self.functions.values())

    def queued_jobs(self) -> int:
        return sum(fn.queued for fn in self.functions.values())



#: Request packet type -> handler (the broker's dispatch table; unknown types get
#: ``_on_unexpected``).
_HANDLERS: dict[int, Callable[[Broker, Conn, tuple[bytes, ...], int], None]] = {
    T.GRAB_JOB: Broker._grab,
    T.GRAB_JOB_UNIQ: Broker._grab,
    T.GRAB_JOB_ALL: Broker._grab,
    T.PRE_SLEEP: Broker._on_pre_sleep,
    T.WORK_COMPLETE: Broker._on_work_complete,
    **{t: Broker._on_submit for t in _SUBMIT},
    T.WORK_STATUS: Broker._on_work_status,
    T.WORK_DATA: Broker._on_work_data,
    T.WORK_WARNING: Broker._on_work_data,
    T.WORK_FAIL: Broker._on_work_fail,
    T.WORK_EXCEPTION: Broker._on_work_exception,
    T.CAN_DO: Broker._on_can_do,
    T.CAN_DO_TIMEOUT: Broker._on_can_do_timeout,
    T.CANT_DO: Broker._on_cant_do,
    T.RESET_ABILITIES: Broker._on_reset_abilities,
    T.SET_CLIENT_ID: Broker._on_set_client_id,
    T.ECHO_REQ: Broker._on_echo,
    T.OPTION_REQ: Broker._on_option,
    T.GET_STATUS: Broker._on_get_status,
    T.GET_STATUS_UNIQUE: Broker._on_get_status_unique,
    T.SUBMIT_JOB_EPOCH: Broker._on_submit_epoch,
    T.SUBMIT_REDUCE_JOB: Broker._on_submit_reduce,
    T.SUBMIT_REDUCE_JOB_BACKGROUND: Broker._on_submit_reduce,
    T.ALL_YOURS: Broker._on_ignored,
}
