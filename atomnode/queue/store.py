"""Durable job queue on SQLite: schema, migrations, group-commit writer, recovery.

One writer thread owns the database. The rest of the daemon hands it *ops*: the store's
commands, plain tuples named and laid out in :mod:`atomnode.queue.commands`, with
:meth:`Store.submit`, which never blocks and never touches the disk. The writer wakes,
takes everything pending, applies it in one transaction with one commit (group commit), and
then reports through the ``on_result`` callback which token-carrying ops are now durable and
which could not be stored. A background job is acknowledged (JOB_CREATED) only once its
insert is reported committed.

A failed batch (disk full, read-only, I/O error, locked) is rolled back: its inserts and
operator commands (retry, purge) are reported failed, every other op is a fact about work
that already happened and is kept and retried with a backoff, so nothing is lost. The
writer reports ``healthy`` False meanwhile and recovers by itself when the cause is gone.

Only :meth:`Store.open` (before the writer starts) and the writer thread use the
connection. Readers open their own read-only connections (:mod:`atomnode.queue.reads`);
WAL keeps them from blocking the writer.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import gc
import logging
import operator
import os
import queue
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from ..system.doorbell import Doorbell
from ..system.stats import Histogram
from .commands import (
    CANCEL,
    DONE,
    FAIL,
    INSERT,
    OPERATOR_KINDS,
    RECOVERED_ATTEMPTS_MAX,
    RECOVERED_WHEN_MAX,
    PURGE,
    REQUEUE,
    RESERVE_IDS,
    RETRY,
    SAMPLES,
    START,
    recovered_flags,
)
from .walcheck import check_wal_file

log = logging.getLogger("atomnode.store")  # stable name: operators see it in the journal

#: ``PRAGMA application_id`` of every atomnode database ("ATOM" in ASCII).
APPLICATION_ID = 0x41544F4D
#: ``PRAGMA user_version``: the schema version this code writes.
SCHEMA_VERSION = 3

#: Buckets of the commit-latency histogram (seconds): an fsync on an SSD takes ~1 ms,
#: on a busy disk or a VM tens of ms.
COMMIT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

ACTIVE_STATES = ("queued", "running")
FINISHED_STATES = ("done", "failed", "cancelled")
STATES = ACTIVE_STATES + FINISHED_STATES

_SYNCHRONOUS = ("full", "normal", "off")
#: Ops whose commit someone is told about (a client's JOB_CREATED, an operator's answer)
#: or that a restart relies on (the id reservation, an operator's cancel). A batch of
#: none of them holds only facts about work already done (start, done, fail, requeue,
#: samples); under ``synchronous: full`` it commits without its own fsync (see
#: Store._write_batch).
_ACKNOWLEDGED_KINDS = frozenset({INSERT, RESERVE_IDS, CANCEL, *OPERATOR_KINDS})
_SQLITE_MAGIC = b"SQLite format 3\x00"
#: A batch of facts this large goes to the disk at once; a smaller one waits up to
#: ``Store.fact_delay`` for an acknowledged op to share its transaction (_hold_facts).
FACT_BATCH = 64

#: Schema step 1's table: the statement sqlite-utils' ``create_table`` wrote for it
#: (tests/test_store.py re-derives it with sqlite-utils and compares). Kept as SQL because
#: importing sqlite-utils costs a daemon ~8 MiB of RSS for the rest of its life, and a
#: first start would otherwise pay it for creating one table.
SQL_CREATE_JOBS = """CREATE TABLE "jobs" (
   "id" INTEGER PRIMARY KEY,
   "function" BLOB NOT NULL,
   "unique_key" BLOB NOT NULL,
   "data" BLOB NOT NULL,
   "priority" INTEGER NOT NULL,
   "when_to_run" INTEGER NOT NULL DEFAULT 0,
   "seq" INTEGER NOT NULL,
   "state" TEXT NOT NULL,
   "attempts" INTEGER NOT NULL DEFAULT 0,
   "worker" TEXT,
   "submitted_at" REAL NOT NULL,
   "started_at" REAL,
   "finished_at" REAL,
   "result_size" INTEGER,
   "reason" TEXT
)"""
# The columns: id = handle number (H:<host>:<id>); unique_key = the client's, never part
# of identity; priority 0 high, 1 normal, 2 low; seq = FIFO order within a priority.


#: Schema history. Step N brings a database from user_version N-1 to N; never change what a
#: shipped step creates, add a step. A step is a list of SQL statements and functions of the
#: connection, all plain SQL (the jobs table as sqlite-utils defined it: SQL_CREATE_JOBS).
MIGRATIONS: dict[int, list[str | Callable[[sqlite3.Connection], None]]] = {
    1: [
        SQL_CREATE_JOBS,
        # Recovery reads the live jobs in queue order straight off this index.
        "CREATE INDEX jobs_active ON jobs(priority, seq) WHERE state IN ('queued', 'running')",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    ],
    2: [
        # History pruning walks finished jobs by age.
        "CREATE INDEX jobs_finished ON jobs(finished_at)"
        " WHERE state IN ('done', 'failed', 'cancelled')",
    ],
    3: [
        # The console's charts: one row per function per sampling interval (a minute),
        # pruned with the history (queue.retention_days).
        """
        CREATE TABLE samples (
            at           REAL NOT NULL,         -- end of the interval (unix time)
            function     BLOB NOT NULL,
            completed    INTEGER NOT NULL,      -- jobs completed in the interval
            failed       INTEGER NOT NULL,      -- jobs failed in the interval
            queued       INTEGER NOT NULL,      -- queue depth at the end
            running      INTEGER NOT NULL,
            wait_p50     REAL,                  -- seconds from submission to start
            wait_p95     REAL
        )""",
        "CREATE INDEX samples_at ON samples(at)",
    ],
}


def migrate_step(conn: sqlite3.Connection, step: int) -> None:
    """Apply schema step ``step`` (the caller owns the transaction and user_version)."""
    for statement in MIGRATIONS[step]:
        if callable(statement):
            statement(conn)
        else:
            conn.execute(statement)


_COLUMNS = (
    "id, function, unique_key, data, priority, when_to_run, seq, attempts, state,"
    " submitted_at, worker, started_at, finished_at, result_size, reason"
)

#: The live jobs, read from the table (NOT INDEXED: see Store._recover_rows), as
#: ``commands.RECOVERED`` tuples: only what the broker needs, the small numbers packed in
#: one (``commands.pack_recovered_flags``). A plain job (queued, never tried, due now) is
#: just its priority; only the others pay for the arithmetic, and for capping a value out
#: of its range (which atomnode never writes, and which would spill into the next field).
#: Function, unique and data come back as bytes even where SQLite holds TEXT (left by
#: hand or by another tool): both readers return TEXT as its bytes (:func:`read_live`).
SQL_RECOVER = f"""
    SELECT id, function, unique_key, data, seq, submitted_at,
           CASE WHEN state = 'queued' AND attempts = 0 AND when_to_run = 0 THEN priority
           ELSE priority + (state = 'running') * 4
                + min(max(attempts, 0), {RECOVERED_ATTEMPTS_MAX}) * 8
                + min(max(when_to_run, 0), {RECOVERED_WHEN_MAX}) * 8388608 END
    FROM jobs NOT INDEXED
    WHERE state IN ('queued', 'running')
"""
_ID_COLUMN = operator.itemgetter(0)
_SEQ_COLUMN = operator.itemgetter(4)
_FUNCTION_COLUMN = 1
try:  # setup.py builds it where it can
    from ._rowreader import read_batches as _c_read_batches, read_rows as _c_read_rows
except ImportError:  # pragma: no cover - pure-Python installs (ATOMNODE_PURE_PYTHON=1)
    _c_read_rows = _c_read_batches = None
#: Rows per batch handed to ``on_rows`` while recovery reads (Store.open).
RECOVERY_BATCH = 5000


def read_live(conn: sqlite3.Connection, path: str, busy_timeout_ms: int,
              fast: bool = True) -> list[tuple]:
    """The rows of :data:`SQL_RECOVER`. With the C reader (``atomnode.queue._rowreader``,
    about twice as fast for a million jobs) on a connection of its own to ``path``; else,
    or with ``fast=False``, through ``conn`` and the sqlite3 module. Both return TEXT as
    bytes, and the same rows (tests/test_rowreader.py). Raises sqlite3.DatabaseError."""
    if fast and _c_read_rows is not None:
        return _c_read_rows(path, SQL_RECOVER, int(busy_timeout_ms), _FUNCTION_COLUMN)
    factory = conn.text_factory
    conn.text_factory = bytes
    try:
        return conn.execute(SQL_RECOVER).fetchall()
    finally:
        conn.text_factory = factory

#: What the jobs_active index lists, reduced to numbers the table's rows must match.
_SUM_MOD = 1_000_000_007
_SQL_ACTIVE_INDEX_SUMS = f"""
    SELECT count(*), sum(id % {_SUM_MOD}), sum(seq % {_SUM_MOD})
    FROM jobs INDEXED BY jobs_active WHERE state IN ('queued', 'running')
"""
_SQL_ACTIVE_INDEX_IDS = """
    SELECT id FROM jobs INDEXED BY jobs_active WHERE state IN ('queued', 'running')
"""
SQL_INSERT = """
    INSERT INTO jobs (id, function, unique_key, data, priority, when_to_run, seq,
                      submitted_at, state, attempts)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'queued', 0)
"""
SQL_START = """
    UPDATE jobs SET state = 'running', attempts = ?, worker = ?, started_at = ? WHERE id = ?
"""
SQL_REQUEUE = """
    UPDATE jobs SET state = 'queued', attempts = ?, seq = ?, reason = ?, worker = NULL
    WHERE id = ?
"""
SQL_DONE = """
    UPDATE jobs SET state = 'done', finished_at = ?, result_size = ? WHERE id = ?
"""
SQL_FAIL = "UPDATE jobs SET state = 'failed', finished_at = ?, reason = ? WHERE id = ?"
#: A job's start and its end in one batch (see _merge_start_done): one statement.
SQL_START_DONE = """
    UPDATE jobs SET state = 'done', attempts = ?, worker = ?, started_at = ?, finished_at = ?,
                    result_size = ?
    WHERE id = ?
"""
#: The store's own op kind for a START and a DONE merged (never sent by the broker).
_START_DONE = "start+done"
#: Ops after which a START of the same job can no longer be merged with a later DONE.
_ENDS_MERGE = frozenset({REQUEUE, FAIL, CANCEL, RETRY})
SQL_CANCEL = "UPDATE jobs SET state = 'cancelled', finished_at = ? WHERE id = ?"
SQL_RETRY = """
    UPDATE jobs SET state = 'queued', attempts = 0, seq = ?, worker = NULL, started_at = NULL,
                    finished_at = NULL, result_size = NULL, reason = NULL
    WHERE id = ? AND state IN ('failed', 'cancelled')
"""
SQL_PURGE = """
    DELETE FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ?
"""
SQL_PRUNE = """
    DELETE FROM jobs WHERE id IN (
        SELECT id FROM jobs WHERE state IN ('done', 'failed', 'cancelled') AND finished_at < ?
        LIMIT ?)
"""
SQL_SAMPLE = """
    INSERT INTO samples (at, function, completed, failed, queued, running, wait_p50, wait_p95)
    VALUES (?, ?, ?, ?, ?, ?, ?, ?)
"""
SQL_PRUNE_SAMPLES = "DELETE FROM samples WHERE at < ?"
SQL_RESERVE = """
    INSERT INTO meta (key, value) VALUES ('next_id', ?)
    ON CONFLICT (key) DO UPDATE SET value = max(value, excluded.value)
"""


@dataclass(slots=True)
class StoredJob:
    """One row of the ``jobs`` table."""

    id: int  # handle number; handle text is f"H:{hostname}:{id}"
    function: bytes
    unique: bytes
    data: bytes
    priority: int  # 0 high, 1 normal, 2 low
    when_to_run: int  # unix seconds; 0 = now
    seq: int  # FIFO order within a priority, monotonic across restarts
    attempts: int  # times handed to a worker so far
    state: str  # 'queued' | 'running' | 'done' | 'failed' | 'cancelled'
    submitted_at: float
    worker: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result_size: int | None = None
    reason: str | None = None


@dataclass
class Recovery:
    """What :meth:`Store.open` found: the live jobs and the counters to continue from.

    ``rows`` holds every queued or running job as a :data:`commands.RECOVERED
    <atomnode.queue.commands.RECOVERED>` tuple, ordered by seq (so each priority's jobs are
    in queue order). Running ones are returned as running (``running`` = 1): the broker
    decides (requeue with the attempt counted, or fail past max attempts) and submits the
    ops for that.
    """

    rows: list[tuple]
    next_id: int  # first handle number never used before (persisted high-water mark)
    next_seq: int
    #: With ``on_rows``: the batches handed over (rows is then empty), kept so that the
    #: caller frees them when it likes (after READY: a million tuples take ~0.1 s).
    batches: list[list[tuple]] | None = None

    @property
    def jobs(self) -> list[StoredJob]:
        """The same jobs as :class:`StoredJob` objects ordered by (priority, seq), for tools
        and tests (the daemon takes ``rows``). Only what recovery reads is set."""
        jobs = []
        for job_id, function, unique, data, seq, submitted_at, flags in self.rows:
            priority, running, attempts, when = recovered_flags(flags)
            jobs.append(StoredJob(job_id, function, unique, data, priority, when, seq,
                                  attempts, "running" if running else "queued", submitted_at))
        jobs.sort(key=lambda j: (j.priority, j.seq))
        return jobs


#: Errors that come from one op's values, not from the database: they fail that op alone.
_VALUE_ERRORS = (
    OverflowError, ValueError, TypeError, sqlite3.InterfaceError, sqlite3.IntegrityError,
    sqlite3.ProgrammingError, sqlite3.DataError,
)


class StoreError(Exception):
    """A queue database problem; the message is for humans and names the file."""


class _PathMoved(Exception):
    """The configured path no longer leads to the open database (writer-internal)."""


class StoreOpenError(StoreError):
    """The database cannot be used: corrupt, foreign, locked by another atomnode, or
    unwritable. The daemon must refuse to start."""


def parse_handle(text: str) -> int:
    """Job number of a handle: ``H:host:123`` or ``123``. Raises ValueError."""
    text = text.strip()
    tail = text.rsplit(":", 1)[-1] if text.startswith("H:") else text
    if not tail.isdigit():
        raise ValueError(f"not a job handle: {text!r} (expected H:host:NUMBER or NUMBER)")
    return int(tail)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``; on any exception ``ROLLBACK`` (whose own failure
    is ignored: SQLite may have rolled back already) and re-raise. The one place that
    opens, commits and abandons a write transaction."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        try:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
        except sqlite3.Error:
            pass
        raise


def _human_error(path: str, exc: BaseException) -> str:
    """One-line explanation of a failed write, naming the file (no newlines: it goes into
    a Gearman ERROR packet)."""
    name = getattr(exc, "sqlite_errorname", "")
    text = str(exc)
    if name.startswith("SQLITE_FULL") or "disk is full" in text:
        what = "disk full"
    elif name.startswith("SQLITE_READONLY") or "readonly" in text:
        what = "database is read-only"
    elif name.startswith("SQLITE_BUSY") or "locked" in text:
        what = "database is locked by another process"
    elif name.startswith("SQLITE_IOERR") or "I/O" in text:
        what = "I/O error"
    else:
        what = "write failed"
    return f"queue database {path}: {what} ({text})".replace("\n", " ")


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the file at ``path``, None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def _unwritable_reason(path: str) -> str | None:
    """Why ``path`` (or the WAL files beside it) cannot be written, if we can tell."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        pass
    if os.path.exists(path) and not os.access(path, os.W_OK):
        return "the file is read-only"
    if not os.access(directory, os.W_OK):
        return f"directory {directory} is read-only (SQLite needs it for its WAL files)"
    return None


def _merge_start_done(ops: list[tuple]) -> list[tuple]:
    """``ops`` (in order, inserts taken out) with each START whose job's DONE comes later
    in the same batch, and nothing else about that job in between, merged into one op at
    the START's place. One UPDATE instead of two, and the row leaves the queue index once:
    when workers outrun the disk and batches grow, the writer does half the work per job
    and catches up (a drain of 1,000,000 jobs no longer leaves a million facts waiting in
    memory). Ops about other jobs touch other rows, so the order between them is free."""
    out: list[tuple] = []
    started: dict[int, int] = {}  # job id -> index in out of its START, still mergeable
    for op in ops:
        kind = op[0]
        if kind == START:
            started[op[1]] = len(out)
        elif kind == DONE:
            i = started.pop(op[1], None)
            if i is not None:
                _, job_id, attempts, worker, at = out[i]
                out[i] = (_START_DONE, job_id, attempts, worker, at, op[2], op[3])
                continue
        elif kind in _ENDS_MERGE:
            started.pop(op[1], None)
        out.append(op)
    return out


class Store:
    """The durable queue. See the module docstring for the ops and the contract."""

    def __init__(
        self,
        path: str,
        *,
        synchronous: str = "full",
        retention_days: float = 7.0,
        hostname: str | None = None,
    ) -> None:
        if synchronous not in _SYNCHRONOUS:
            raise ValueError(f"synchronous must be one of {', '.join(_SYNCHRONOUS)}")
        self.path = path
        self.synchronous = synchronous
        self.retention_days = retention_days
        self.hostname = hostname or socket.gethostname()
        self.last_progress = time.monotonic()
        self.pending = 0
        self.healthy = True
        self.last_error: str | None = None
        # Tunables, kept off the public signature; tests lower them.
        self.busy_timeout_ms = 5000
        self.prune_interval = 60.0  # seconds between pruning chunks when caught up
        self.prune_chunk = 2000
        self.prune_catchup_interval = 1.0  # between chunks while a backlog remains
        self.backoff_initial = 0.1
        self.backoff_max = 5.0
        # How long the idle writer sleeps between looks at its path and the pruning
        # (work wakes it at once, through its doorbell).
        self.idle_poll = 1.0
        # How long a batch of facts only (no acknowledged op: see _ACKNOWLEDGED_KINDS)
        # waits for an acknowledged op to share its transaction (see _hold_facts).
        self.fact_delay = 0.02
        self._conn: sqlite3.Connection | None = None
        self._lock_fd: int | None = None
        self._mutex = threading.Lock()
        self._queue: list[tuple] = []
        self._wake = Doorbell()  # rung by submit(); the writer waits on it
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._on_result: Callable[[list, list[tuple[object, str]]], None] | None = None
        self._next_prune = 0.0
        # Where the open database and its WAL are (device, inode), to notice when the
        # configured path stops leading to them (deleted, renamed, replaced).
        self._db_id: tuple[int, int] | None = None
        self._wal_id: tuple[int, int] | None = None
        self._fault: str | None = None  # the path is broken and not yet repaired
        # The connection's PRAGMA synchronous now (the writer lowers it to NORMAL for
        # batches of facts only; see _write_batch). None: as configured.
        self._sync_now: str | None = None
        self._rebuilds = 0
        #: The last repaired fault, for status and doctor (None if there was none).
        self.incident: str | None = None
        #: Seconds from BEGIN to COMMIT of each batch (written by the writer thread only).
        self.commit_seconds = Histogram(COMMIT_BUCKETS)
        self.last_commit_seconds: float | None = None
        #: What the background integrity check found (None: nothing, or not run).
        self.damage: str | None = None
        #: The database was not closed by a clean shutdown last time (kill -9, crash, power).
        self.unclean_shutdown = False

    # -- helpers ---------------------------------------------------------------------------

    def handle(self, job_id: int) -> str:
        """Handle text of job ``job_id``."""
        return f"H:{self.hostname}:{job_id}"

    @staticmethod
    def is_locked(path: str) -> bool:
        """True if an atomnode process holds the database at ``path`` (for the CLI)."""
        try:
            fd = os.open(path + ".lock", os.O_RDONLY)
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return True
        finally:
            os.close(fd)  # closing drops our shared lock, if we got it
        return False

    # -- open and recover ------------------------------------------------------------------

    def open(self, on_rows: Callable[[list[tuple]], None] | None = None) -> Recovery:
        """Lock, check, migrate and read the database; return the live jobs.

        With ``on_rows``, the live jobs are handed to it in batches while the rest are
        still read (in id order, not seq order), and ``Recovery.rows`` is empty; where the
        C reader is built, it reads the next batch in a thread while ``on_rows`` works
        on this one (a restart with a million jobs takes ~0.9 s less on two cores). The
        checks are the same: if they refuse the file, batches were handed over already,
        and the caller must not serve them.

        Raises :class:`StoreOpenError` (naming the file) if it is locked by another atomnode,
        unwritable, corrupt, or not an atomnode database. Never starts empty on a bad file.
        """
        if self._conn is not None:
            raise StoreError(f"queue database {self.path}: already open")
        self._take_lock()
        try:
            self._conn = self._connect()
            self._sync_now = None
            self._watch_start()
            return self._recover(on_rows)
        except BaseException:
            self._close_conn()
            self._release_lock()
            raise

    def _take_lock(self) -> None:
        path = self.path
        directory = os.path.dirname(os.path.abspath(path))
        try:
            os.makedirs(directory, exist_ok=True)
            try:
                fd = os.open(path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                    raise
                # An existing lock file can still be locked read-only; the database's own
                # write check then says precisely what is wrong.
                fd = os.open(path + ".lock", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise StoreOpenError(
                f"queue database {path}: cannot create {path}.lock: {e.strerror}"
            ) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = ""
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                who = f" (pid {holder})" if holder.isdigit() else ""
                raise StoreOpenError(
                    f"queue database {path} is in use by another atomnode{who}; "
                    "stop it first or use another database"
                ) from e
            raise StoreOpenError(f"queue database {path}: cannot lock: {e.strerror}") from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:
            pass  # the pid is only a courtesy for the error message above
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        try:
            with open(path, "rb") as f:
                header = f.read(16)
        except FileNotFoundError:
            wal = path + "-wal"
            if os.path.exists(wal) and os.path.getsize(wal) > 0:
                # SQLite would replay that log onto the new database.
                raise StoreOpenError(
                    f"queue database {path} does not exist, but its write-ahead log {wal} "
                    "does: the database was deleted (the log alone cannot bring it back). "
                    "Refusing to start. Restore the database from a backup, or, for a new "
                    f"empty queue, delete {wal} too."
                ) from None
            # A new install: the database is built aside and renamed into place, so a crash
            # never leaves an empty file behind (an empty file is refused below).
            self._create_new()
            with open(path, "rb") as f:
                header = f.read(16)
        except OSError as e:
            raise StoreOpenError(f"queue database {path}: cannot read: {e.strerror}") from e
        if not header:
            raise StoreOpenError(
                f"queue database {path} is an empty file (0 bytes): atomnode never leaves one "
                "(a new database is built aside and renamed into place), so this one was "
                "truncated or created by something else, and the queue it held is gone. "
                "Refusing to start. Restore it from a backup, or, if no jobs were queued, "
                "delete it and atomnode creates a new database."
            )
        if header != _SQLITE_MAGIC:
            raise StoreOpenError(
                f"queue database {path} is not an SQLite database (corrupt or another kind "
                "of file); refusing to start. Move it aside or point 'database' elsewhere."
            )
        self._check_wal()
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, cached_statements=64
            )
        except sqlite3.Error as e:
            raise StoreOpenError(f"queue database {path}: cannot open: {e}") from e
        try:
            self._check_and_migrate(conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_wal(self) -> None:
        """Before SQLite replays a write-ahead log left by a crash: refuse one damaged in
        the middle (SQLite would stop at the damage and drop every later commit without
        a word), after keeping a copy for the operator. A torn tail is normal."""
        path = self.path
        wal = path + "-wal"
        t0 = time.monotonic()
        try:
            scan = check_wal_file(wal)
        except OSError as e:
            raise StoreOpenError(f"queue database {path}: cannot read {wal}: {e.strerror}") from e
        if scan is None:
            return
        log.debug("queue database %s: write-ahead log checked in %.3fs (%d frames)",
                  path, time.monotonic() - t0, scan.frames)
        if not scan.damaged:
            return
        assert scan.first_bad is not None
        keep = f"{path}.damaged-{time.strftime('%Y%m%dT%H%M%S')}"
        try:
            os.makedirs(keep, exist_ok=True)
            for src in (path, wal):
                shutil.copy2(src, os.path.join(keep, os.path.basename(src)))
            kept = f"A copy of both files is in {keep}/ (open only a copy of that copy: " \
                   "SQLite rewrites a database it opens)."
        except OSError as e:
            kept = f"Could not keep a copy ({e.strerror}): copy {path} and {wal} first."
        bad_at = scan.offset(scan.first_bad)
        raise StoreOpenError(
            f"queue database {path}: its write-ahead log {wal} is damaged: frame "
            f"{scan.first_bad + 1} (byte {bad_at}) fails its checksum, yet {scan.intact_after}"
            f" later frames holding {scan.commits_after} committed transactions are intact. "
            "SQLite would stop at the damage and silently drop those transactions (jobs "
            f"already acknowledged among them), so atomnode refuses to start. {kept} "
            "Restore the queue from a backup, or, to start with what precedes the damage "
            f"and lose the transactions after it: truncate -s {bad_at} {wal}"
        )

    def _create_new(self) -> None:
        """Create the database at a temporary name beside ``path``, complete (schema,
        markers, WAL checkpointed away, fsynced), then rename it into place."""
        path = self.path
        tmp = f"{path}.new-{os.getpid()}"
        for leftover in (tmp, tmp + "-wal", tmp + "-shm", tmp + "-journal"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        log.info("queue database %s does not exist: creating it", path)
        try:
            conn = sqlite3.connect(tmp, isolation_level=None, check_same_thread=False)
            try:
                self._check_and_migrate(conn)
                # Nothing has run on it yet: its first open is not "after an unclean
                # shutdown" (which would also cost a full integrity check for nothing).
                conn.execute("UPDATE meta SET value = 1 WHERE key = 'clean_shutdown'")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                conn.close()
            _fsync_file(tmp)
            os.rename(tmp, path)
            _fsync_dir(os.path.dirname(os.path.abspath(path)))
        except sqlite3.Error as e:
            raise StoreOpenError(f"queue database {path}: cannot create it: {e}") from e
        except OSError as e:
            raise StoreOpenError(
                f"queue database {path}: cannot create it: {e.strerror or e}"
            ) from e
        finally:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(leftover)

    def _check_and_migrate(self, conn: sqlite3.Connection) -> None:
        path = self.path
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            app_id = conn.execute("PRAGMA application_id").fetchone()[0]
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = [
                r[0]
                for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name"
                )
            ]
        except sqlite3.DatabaseError as e:
            if getattr(e, "sqlite_errorname", "") == "SQLITE_CANTOPEN":
                why = _unwritable_reason(path) or "cannot open it"
                raise StoreOpenError(
                    f"queue database {path}: {why} ({e}); refusing to start"
                ) from e
            raise StoreOpenError(
                f"queue database {path} is corrupt or not a database ({e}); refusing to start"
            ) from e
        if app_id != APPLICATION_ID and (app_id != 0 or tables or version):
            listed = ", ".join(tables[:5]) or "none"
            raise StoreOpenError(
                f"queue database {path} is not an atomnode database (application_id "
                f"{app_id}, tables: {listed}); refusing to use it. Point 'database' at "
                "another file (to bring over a gearmand queue use "
                "'atomnode import-gearmand-queue')."
            )
        if version > SCHEMA_VERSION:
            raise StoreOpenError(
                f"queue database {path} has schema version {version}, written by a newer "
                f"atomnode (this one knows up to {SCHEMA_VERSION}); refusing to start. Was "
                "atomnode downgraded? Install the newer version again (the queue is "
                "untouched), or restore a copy of the database taken before the upgrade"
            )
        try:
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise sqlite3.OperationalError(f"journal_mode stayed {mode}")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            if version:
                if version < SCHEMA_VERSION:
                    # Never migrate a damaged file. (Otherwise the structural check runs
                    # beside the recovery read: see _recover_rows.)
                    self._quick_check(conn)
                row = conn.execute(
                    "SELECT value FROM meta WHERE key = 'clean_shutdown'"
                ).fetchone()
                self.unclean_shutdown = not (row and row[0] == 1)
            with transaction(conn):
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    log.info("queue database %s: migrating schema to version %d", path, step)
                    migrate_step(conn, step)
                    conn.execute(f"PRAGMA user_version = {step}")
                conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                # Proves the file is writable now, not at the first submission.
                conn.execute(
                    "INSERT INTO meta (key, value) VALUES ('opened_at', ?), "
                    "('clean_shutdown', 0) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (time.time(),),
                )
        except StoreOpenError:
            raise
        except sqlite3.DatabaseError as e:
            if "malformed" in str(e) or getattr(e, "sqlite_errorname", "") == "SQLITE_CORRUPT":
                raise StoreOpenError(
                    f"queue database {path} is corrupt ({e}); refusing to start"
                ) from e
            why = _unwritable_reason(path)
            if why:
                raise StoreOpenError(
                    f"queue database {path}: {why} ({e}); refusing to start"
                ) from e
            raise StoreOpenError(f"{_human_error(path, e)}; refusing to start") from e

    def _recover(self, on_rows: Callable[[list[tuple]], None] | None = None) -> Recovery:
        conn = self._conn
        assert conn is not None
        # A million queued jobs are two million new objects: the cyclic GC would rescan
        # them over and over while they are built (it more than doubles the time).
        gc_was_enabled = gc.isenabled()
        gc.disable()
        try:
            return self._recover_rows(conn, on_rows)
        finally:
            if gc_was_enabled:
                gc.enable()

    def _quick_check(self, conn: sqlite3.Connection) -> None:
        """SQLite's structural check (every page, no index cross-check): refuses a damaged
        file instead of serving half a queue."""
        problems = [r[0] for r in conn.execute("PRAGMA quick_check(5)")]
        if problems != ["ok"]:
            raise StoreOpenError(
                f"queue database {self.path} is corrupt ({'; '.join(problems)}); refusing "
                "to start. Restore it from a backup or move it aside."
            )

    def _index_sums(self) -> tuple[int, int, int]:
        """In a helper thread, on its own connection, while the jobs are read: what the
        ``jobs_active`` index lists (count and checksums of ids and seqs; SQLite reads
        only the index for it). SQLite runs it without the GIL, so on a machine with two
        cores it costs the restart almost nothing."""
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            row = conn.execute(_SQL_ACTIVE_INDEX_SUMS).fetchone()
            return int(row[0]), int(row[1] or 0), int(row[2] or 0)
        finally:
            conn.close()

    def _recover_rows(self, conn: sqlite3.Connection,
                      on_rows: Callable[[list[tuple]], None] | None = None) -> Recovery:
        """Read the live jobs from the table itself, not through an index: a lost write in
        an index page passes quick_check, and a read through the index would then miss jobs
        without a word. The ``jobs_active`` index, a separate b-tree, is checked against
        the table: one that lists fewer jobs (or stale ones) is rebuilt from the table
        before serving; live jobs that the index lists and the table lacks mean the table
        lost them, and the start is refused (:meth:`_reconcile_index`). SQLite's structural
        checks run after the daemon serves (:meth:`check`): a file they find damaged is
        reported, but no job can be missing unnoticed, since that takes both b-trees
        damaged alike. (``on_rows``: see :meth:`open`.)"""
        beside: list = []

        def run_beside() -> None:
            try:
                beside.append(self._index_sums())
            except BaseException as e:  # noqa: BLE001 - re-raised in the opening thread
                beside.append(e)

        helper = threading.Thread(target=run_beside, name="atomnode-store-check")
        helper.start()
        batches: list[list[tuple]] | None = None
        try:
            max_id = conn.execute("SELECT max(id) FROM jobs").fetchone()[0] or 0
            meta = dict(conn.execute("SELECT key, value FROM meta"))
            if on_rows is None:
                rows = read_live(conn, self.path, self.busy_timeout_ms)
            else:
                rows = []
                batches = self._read_batches(conn, on_rows)
        except sqlite3.DatabaseError as e:
            helper.join()
            raise StoreOpenError(
                f"queue database {self.path} is corrupt ({e}); refusing to start"
            ) from e
        finally:
            helper.join()
        found = beside[0]
        if isinstance(found, sqlite3.DatabaseError):
            # The index cannot be read: the table is the record, the index is rebuilt.
            found = (-1, -1, -1)
        elif isinstance(found, BaseException):
            raise found
        if batches is None:
            # Seq order is queue order within each priority, which is all the broker
            # needs; the table is nearly in that order already (ids and seqs grow
            # together).
            rows.sort(key=_SEQ_COLUMN)
            parts = [rows]
        else:
            parts = batches
        # (sum of x mod M) mod M == (sum of x) mod M: the table side sums at C speed.
        count = id_sum = seq_sum = 0
        max_seq = 0
        for part in parts:
            if part:
                count += len(part)
                id_sum += sum(map(_ID_COLUMN, part))
                seqs = list(map(_SEQ_COLUMN, part))
                seq_sum += sum(seqs)
                max_seq = max(max_seq, max(seqs))
        table = (count, id_sum % _SUM_MOD, seq_sum % _SUM_MOD)
        if (found[0], found[1] % _SUM_MOD, found[2] % _SUM_MOD) != table:
            self._reconcile_index(conn, [r for part in parts for r in part])
        next_id = max(int(meta.get("next_id") or 1), max_id + 1)
        next_seq = max(max_seq + 1, int(meta.get("next_seq") or 1))
        log.info(
            "queue database %s: %d live jobs recovered, next id %d%s", self.path, count,
            next_id, " (after an unclean shutdown)" if self.unclean_shutdown else "",
        )  # fmt: skip
        return Recovery(rows=rows, next_id=next_id, next_seq=next_seq, batches=batches)

    def _read_batches(self, conn: sqlite3.Connection,
                      on_rows: Callable[[list[tuple]], None]) -> list[list[tuple]]:
        """Read the live jobs, handing each batch to ``on_rows`` (in this thread) while
        the C reader reads the next one in a thread of its own (it steps SQLite without
        the GIL). Without the C reader: one batch, read here. Returns the batches."""
        if _c_read_batches is None:
            rows = read_live(conn, self.path, self.busy_timeout_ms)
            on_rows(rows)
            return [rows]
        handed: queue.Queue = queue.Queue(maxsize=2)
        stop = threading.Event()
        end = object()

        def deliver(batch: list[tuple]) -> None:
            while not stop.is_set():
                try:
                    handed.put(batch, timeout=0.5)
                    return
                except queue.Full:
                    continue
            raise RuntimeError("recovery read abandoned")

        def read() -> None:
            try:
                _c_read_batches(self.path, SQL_RECOVER, int(self.busy_timeout_ms),
                                _FUNCTION_COLUMN, RECOVERY_BATCH, deliver)
                result: object = end
            except BaseException as e:  # noqa: BLE001 - raised again in the opening thread
                result = e
            if not stop.is_set():
                handed.put(result)

        reader = threading.Thread(target=read, name="atomnode-store-read", daemon=True)
        reader.start()
        batches: list[list[tuple]] = []
        try:
            while True:
                item = handed.get()
                if item is end:
                    return batches
                if isinstance(item, BaseException):
                    raise item
                batches.append(item)  # type: ignore[arg-type]
                on_rows(item)  # type: ignore[arg-type]
        finally:
            stop.set()
            reader.join()

    def _reconcile_index(self, conn: sqlite3.Connection, rows: list[tuple]) -> None:
        """The ``jobs_active`` index and the table disagree about the live jobs. Live in
        the table but not listed (or listed with another seq): the index lost a write,
        and is rebuilt from the table. Listed but not live in the table: a job the index
        still calls live that the table holds as finished means a stale index page
        (rebuilt too); one the table does not hold at all was lost from the table, and the
        start is refused, naming them."""
        try:
            listed = [r[0] for r in conn.execute(_SQL_ACTIVE_INDEX_IDS)]
        except sqlite3.DatabaseError:
            listed = []  # unreadable: rebuilt below like any index that lists too little
        live = set(map(_ID_COLUMN, rows))
        extra = [i for i in listed if i not in live]
        if extra:
            held = set()
            for chunk in range(0, len(extra), 500):
                part = extra[chunk:chunk + 500]
                marks = ",".join("?" * len(part))
                held.update(r[0] for r in conn.execute(
                    f"SELECT id FROM jobs NOT INDEXED WHERE id IN ({marks})", part))
            lost = [i for i in extra if i not in held]
            if lost:
                shown = ", ".join(self.handle(i) for i in lost[:10])
                more = f" and {len(lost) - 10} more" if len(lost) > 10 else ""
                raise StoreOpenError(
                    f"queue database {self.path} is damaged: its index jobs_active lists "
                    f"{len(lost)} live job(s) that the jobs table does not hold ({shown}"
                    f"{more}): the table lost them (a lost or torn write?). Refusing to "
                    "start rather than serve without them. Restore the file from a backup; "
                    "or, to start without those jobs, rebuild the index from the table "
                    f"(sqlite3 {self.path} 'REINDEX jobs') after copying the file."
                )
        self._rebuild_index(conn, len(listed), len(rows))

    def check(self, full: bool = False) -> list[str]:
        """SQLite's structural check of the whole file on a read-only connection of its
        own: ``quick_check`` (every page and b-tree), or with ``full`` the complete
        ``integrity_check`` (every index against its table too); [] if all is well, else
        the problems, also kept in :attr:`damage`. It reads the whole file (seconds for a
        big queue and its history): the daemon runs it in a thread once it serves, the
        full one after an unclean shutdown (see docs/durability.md)."""
        from urllib.parse import quote

        pragma = "integrity_check" if full else "quick_check"
        conn = sqlite3.connect(f"file:{quote(self.path)}?mode=ro", uri=True,
                               check_same_thread=False)
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            problems = [str(r[0]) for r in conn.execute(f"PRAGMA {pragma}(20)")]
        finally:
            conn.close()
        if problems == ["ok"]:
            return []
        self.damage = f"{pragma}: {'; '.join(problems[:3])}"
        return problems

    def integrity_check(self) -> list[str]:
        """``check(full=True)``."""
        return self.check(full=True)

    def _rebuild_index(self, conn: sqlite3.Connection, listed: int, live: int) -> None:
        """The jobs_active index disagrees with the table (a lost or torn write in one of
        its pages): the table is the record, the index is rebuilt from it."""
        log.error(
            "queue database %s: the index jobs_active disagrees with the table (it lists %d "
            "live jobs, the table holds %d): the file was damaged (a lost write?). The %d "
            "jobs of the table are kept and the index is rebuilt; check the disk, and run "
            "'sqlite3 %s \"PRAGMA integrity_check\"' on a copy.",
            self.path, listed, live, live, self.path,
        )  # fmt: skip
        try:
            with transaction(conn):
                conn.execute("REINDEX jobs")
        except sqlite3.Error as e:
            raise StoreOpenError(
                f"queue database {self.path}: its index jobs_active is damaged and cannot be "
                f"rebuilt ({e}); refusing to start. Restore it from a backup."
            ) from e
        self.incident = (f"{time.strftime('%Y-%m-%d %H:%M:%S')}: index jobs_active was damaged "
                         f"(listed {listed} of {live} live jobs); rebuilt from the table, "
                         "every job kept")

    # -- the writer ------------------------------------------------------------------------

    def start(self, on_result: Callable[[list, list[tuple[object, str]]], None]) -> None:
        """Start the writer thread. After each batch that carried tokens it calls
        ``on_result(committed_tokens, failed)`` *from the writer thread*; ``failed`` is a
        list of (token, human message)."""
        if self._conn is None:
            raise StoreError(f"queue database {self.path}: start() before open()")
        if self._thread is not None:
            raise StoreError(f"queue database {self.path}: writer already started")
        self._on_result = on_result
        self._stop.clear()
        self._presize_wal()
        self._thread = threading.Thread(target=self._run, name="atomnode-store", daemon=True)
        self._thread.start()

    def _presize_wal(self) -> None:
        """Give the write-ahead log the size it will have once in use, before any commit.

        A commit is an append to the log and an fdatasync. While the log grows (from
        empty at every start, since a clean stop truncates it, until the first automatic
        checkpoint ~1,000 frames later) each fdatasync must also journal the file's new
        size; measured on the bench's disk (3 frames per commit, paced at 200/s) that
        costs ~100 us at the median and doubles the p99, for the first ~300 acknowledged
        jobs after every start. Once the log has its size, SQLite rewrites it from the
        start after each checkpoint and never truncates it while open.

        Safe by the log's format: SQLite replays frames from the start and stops at the
        first whose salts and checksum do not continue the chain, so zeros past the last
        frame are never replayed (nor taken for damage by :mod:`.walcheck`: they belong
        to no log generation). Only done before the writer starts, so nothing writes the
        log meanwhile. Failure policy: an optimisation only; if the disk cannot hold the
        zeros the log is cut back to its size and the daemon goes on as before.
        """
        conn = self._conn
        assert conn is not None
        try:
            frames = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
        except sqlite3.Error:
            return
        if frames <= 0:
            return
        # A commit that crosses the checkpoint threshold ends past it: some slack.
        want = 32 + (frames + 64) * (page_size + 24)
        try:
            fd = os.open(self.path + "-wal", os.O_WRONLY | os.O_CLOEXEC)
        except OSError:
            return  # no log yet (SQLite creates it at the first write): nothing to size
        try:
            size = os.fstat(fd).st_size
            if size >= want:
                return
            zeros = bytes(1 << 20)
            try:
                offset = size
                while offset < want:
                    offset += os.pwrite(fd, zeros[: want - offset], offset)
                os.fsync(fd)
            except OSError as e:
                with contextlib.suppress(OSError):
                    os.ftruncate(fd, size)
                log.info("queue database %s: write-ahead log not pre-sized (%s)",
                         self.path, e.strerror or e)
        finally:
            os.close(fd)

    def submit(self, op: tuple) -> None:
        """Queue one op for the writer. Thread-safe; never blocks on I/O."""
        with self._mutex:
            self._queue.append(op)
            self.pending += 1
        self._wake.ring()

    def submit_many(self, ops: list[tuple]) -> None:
        """Queue several ops, in order."""
        if not ops:
            return
        with self._mutex:
            self._queue.extend(ops)
            self.pending += len(ops)
        self._wake.ring()

    def close(self) -> None:
        """Write everything pending, stop the writer, close the database, release the lock."""
        if self._thread is not None:
            self._stop.set()
            self._wake.ring()
            self._thread.join()
            self._thread = None
        elif self._conn is not None:
            # Never started: flush what was submitted anyway.
            self._drain_final()
        if self._conn is not None:
            try:
                if self._fault is None:
                    # The next start may skip the background integrity check.
                    self._conn.execute(
                        "UPDATE meta SET value = 1 WHERE key = 'clean_shutdown'"
                    )
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as e:
                log.warning("queue database %s: checkpoint at close failed: %s", self.path, e)
        self._close_conn()
        self._release_lock()

    def _close_conn(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            except sqlite3.Error:
                pass
            self._conn = None

    def _take(self) -> list[tuple]:
        with self._mutex:
            ops, self._queue = self._queue, []
        return ops

    def _run(self) -> None:
        carry: list[tuple] = []  # facts from a failed batch, retried first
        backoff = 0.0
        while True:
            self.last_progress = time.monotonic()
            if backoff:
                # Wait out the backoff in short slices so the watchdog sees us alive.
                deadline = time.monotonic() + backoff
                while not self._stop.is_set():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self._stop.wait(min(left, 1.0))
                    self.last_progress = time.monotonic()
            elif not carry:
                self._wake.wait(self.idle_poll)
            stopping = self._stop.is_set()
            batch = carry + self._take()
            if batch and not carry and not stopping and self.fact_delay > 0:
                batch = self._hold_facts(batch)
                stopping = self._stop.is_set()
            if batch:
                carry = self._write_batch(batch)
                if carry:
                    backoff = min(max(backoff * 2, self.backoff_initial), self.backoff_max)
                else:
                    backoff = 0.0
            if not carry:
                # After a committed batch _write_batch has checked the path already.
                if self._fault is not None or (not batch and self._path_fault() is not None):
                    self._repair_path()
                self._maybe_prune()
            if stopping:
                if carry or self._queue:
                    self._drain_final(carry)
                return

    def _hold_facts(self, batch: list[tuple]) -> list[tuple]:
        """Let a batch of facts only wait up to ``fact_delay`` for an acknowledged op.

        Facts (a job started, finished, was requeued) commit without an fsync and nobody
        waits for them; an insert does both. Committed alone, a job's facts cost a
        transaction of their own, and an insert that arrives meanwhile waits behind it.
        Held, they ride in the next acknowledged batch's transaction (its one fsync then
        covers them too) or, if none comes, go alone after the delay. A crash of the
        daemon within the delay loses them: those jobs run again after the restart, as
        any job that was running at a crash does (docs/durability.md). A batch of
        ``FACT_BATCH`` or more already shares its transaction widely and goes at once.
        """
        acked = _ACKNOWLEDGED_KINDS
        deadline = time.monotonic() + self.fact_delay
        new = batch  # the ops not looked at yet
        while len(batch) < FACT_BATCH and not any(op[0] in acked for op in new):
            left = deadline - time.monotonic()
            if left <= 0 or self._stop.is_set():
                break
            self._wake.wait(left)
            new = self._take()
            batch += new
        return batch

    def _drain_final(self, carry: list[tuple] | None = None) -> None:
        """Last writes at close: a few attempts, then give up loudly."""
        batch = (carry or []) + self._take()
        delay = self.backoff_initial
        for _ in range(5):
            if not batch:
                return
            batch = self._write_batch(batch) + self._take()
            if batch:
                time.sleep(delay)
                delay *= 2
        if batch:
            log.error(
                "queue database %s: %d state changes could not be written at shutdown (%s); "
                "running jobs will run again after restart",
                self.path, len(batch), self.last_error,
            )  # fmt: skip

    def _write_batch(self, batch: list[tuple], depth: int = 0) -> list[tuple]:
        """Apply ``batch`` in one transaction and report. Returns the ops to retry.

        Failure policy: an error of the database (disk full, read-only, I/O, locked) rolls
        the batch back; its inserts and operator commands are reported failed, every other
        op is a fact about work that already happened and is returned to be retried. An
        error of one op's *values* (an integer SQLite cannot hold, a duplicate id: a bug
        upstream, since the broker validates every value) must not fail the others: the
        batch is then applied again one op at a time, and only the bad op is refused.
        """
        conn = self._conn
        assert conn is not None
        inserts: list[tuple] = []
        others: list[tuple] = []
        insert_tokens: list = []
        acknowledged = False
        for op in batch:
            kind = op[0]
            if kind == INSERT:
                _kind, *row, token = op
                inserts.append(row)
                insert_tokens.append(token)
            else:
                others.append(op)
                if kind in _ACKNOWLEDGED_KINDS:
                    acknowledged = True
        if inserts:
            acknowledged = True
        retried: list[tuple[object, StoredJob]] = []  # (token, row) for committed retries
        refused: list[tuple[object, str]] = []
        purged: list[tuple[object, int]] = []
        committed: list = []
        t0 = time.perf_counter()
        try:
            if self.synchronous == "full":
                # Durability policy: a batch that acknowledges something is fsynced at
                # its commit (synchronous FULL). A batch of facts only commits with
                # synchronous NORMAL: in WAL mode it survives a crash of the daemon, and
                # only a power cut before the next fsync (the next acknowledged batch's
                # or a checkpoint's, which cover everything written before them) can
                # lose it: the job then runs again, as after any crash while it ran
                # (docs/durability.md). So a client's submit never waits behind the fsync
                # of a batch that no client waits for.
                wanted = "full" if acknowledged else "normal"
                if self._sync_now != wanted:
                    conn.execute(f"PRAGMA synchronous = {wanted.upper()}")
                    self._sync_now = wanted
            try:
                # The path is checked inside the transaction, before COMMIT (not before
                # BEGIN as well: a stat() pair per check, and this one is what counts).
                with transaction(conn):
                    # An insert is always the first op for its job, so inserts may go first
                    # as one executemany; the rest keeps its order (start/done for one job
                    # in one batch).
                    if inserts:
                        conn.executemany(SQL_INSERT, inserts)
                    others = _merge_start_done(others)
                    i, n = 0, len(others)
                    while i < n:
                        kind = others[i][0]
                        j = i + 1
                        while j < n and others[j][0] == kind:
                            j += 1
                        self._apply_run(conn, kind, others[i:j], retried, refused, purged)
                        i = j
                    committed = list(insert_tokens)
                    self._path_guard()
            except _VALUE_ERRORS:
                retried, refused, purged = [], [], []
                with transaction(conn):
                    committed = self._apply_one_by_one(batch, retried, refused, purged)
                    self._path_guard()
            took = time.perf_counter() - t0
            self.commit_seconds.observe(took)
            self.last_commit_seconds = took
        except Exception as e:  # sqlite3.Error, but also anything unexpected: never die
            # (the transaction is rolled back already)
            if isinstance(e, _PathMoved):
                if depth < 3 and self._repair_path():
                    return self._write_batch(batch, depth + 1)  # on the rebuilt database
                message = self.last_error or str(e)
            else:
                message = _human_error(self.path, e)
            if self.healthy or message != self.last_error:
                log.error("%s; %d ops will be retried", message, len(others))
            self.healthy = False
            self.last_error = message
            failed: list[tuple[object, str]] = [(t, message) for t in insert_tokens]
            keep: list[tuple] = []
            for op in others:
                if op[0] in OPERATOR_KINDS:
                    failed.append((op[-1], message))  # operator commands: answer, don't keep
                else:
                    keep.append(op)
            with self._mutex:
                self.pending -= len(batch) - len(keep)
            self._report([], failed)
            return keep
        if self._path_fault() is not None:
            # Moved during the commit: what was just committed is in the open file, and
            # the rebuild copies it to the configured path before anyone is told.
            self._repair_path()
        if not self.healthy and self._fault is None:
            log.warning("queue database %s: writes succeed again", self.path)
        if self._fault is None:
            self.healthy = True
            self.last_error = None
        with self._mutex:
            self.pending -= len(batch)
        for token, job in retried:
            token.job = job  # type: ignore[attr-defined]
            committed.append(token)
        for token, count in purged:
            token.count = count  # type: ignore[attr-defined]
            committed.append(token)
        self._report(committed, refused)
        return []

    # -- the database's path ----------------------------------------------------------------

    def _watch_start(self) -> None:
        self._db_id = _identity(self.path)
        self._wal_id = _identity(self.path + "-wal")

    def _path_fault(self) -> str | None:
        """Why the configured path no longer leads to the open database, if it does not.
        Two stat() calls: cheap enough for every batch."""
        if self._db_id is None:
            return None
        now = _identity(self.path)
        if now != self._db_id:
            what = "deleted or renamed" if now is None else "replaced by another file"
            return f"queue database {self.path} was {what} while atomnode had it open"
        if self._wal_id is not None and _identity(self.path + "-wal") != self._wal_id:
            return (f"queue database {self.path}: its write-ahead log {self.path}-wal was "
                    "deleted or replaced while atomnode had it open")
        return None

    def _path_guard(self) -> None:
        if self._fault is not None or self._path_fault() is not None:
            raise _PathMoved(self._fault or "queue database path changed")

    def _repair_path(self) -> bool:
        """The path no longer leads to the open database: SQLite would go on writing to a
        file no restart can find. Copy the open database (every job, history too) to a new
        file beside the path and rename it into place; another file found at the path is
        kept, renamed. True once the path leads to the open database again."""
        fault = self._path_fault()
        if fault is None and self._fault is None:
            return True
        if self._fault is None:
            self._fault = fault
            log.error(
                "%s: a restart would find the queue missing. Rebuilding the database at %s "
                "from the open copy; new jobs wait until it is back.", fault, self.path,
            )  # fmt: skip
        self.healthy = False
        if not self.last_error or not self.last_error.startswith(self._fault):
            self.last_error = f"{self._fault}; rebuilding it"
        try:
            live, moved = self._rebuild()
        except (OSError, sqlite3.Error) as e:
            message = f"{self._fault}; cannot rebuild it: {e}".replace("\n", " ")
            if message != self.last_error:
                log.error("%s (retrying)", message)
            self.last_error = message
            return False
        when = time.strftime("%Y-%m-%d %H:%M:%S")
        kept = f"; the file found at the path was kept as {moved}" if moved else ""
        self.incident = (f"{when}: {self._fault}; rebuilt from the open copy with {live} "
                         f"live jobs and the history{kept}")
        log.error("queue database %s rebuilt from the open copy: %d live jobs and the "
                  "history kept%s. Find what removed it.", self.path, live, kept)
        self._fault = None
        self.healthy = True
        self.last_error = None
        return True

    def _rebuild(self) -> tuple[int, str | None]:
        """Back up the open database aside, close it, rename the copy into place, open it.
        Returns (live jobs copied, where a foreign file at the path was moved)."""
        path = self.path
        old = self._conn
        assert old is not None
        self._rebuilds += 1
        tmp = f"{path}.rebuild-{os.getpid()}-{self._rebuilds}"
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        try:
            new = sqlite3.connect(tmp, isolation_level=None, check_same_thread=False)
            try:
                old.backup(new)
                live = new.execute(
                    "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
                ).fetchone()[0]
                new.execute("PRAGMA journal_mode = WAL")
                new.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            finally:
                new.close()
            _fsync_file(tmp)
        except BaseException:
            for leftover in (tmp, tmp + "-wal", tmp + "-shm"):
                with contextlib.suppress(OSError):
                    os.unlink(leftover)
            raise
        # The old connection closes first: SQLite then removes *its* -wal by name, which
        # must not be the new database's.
        self._conn = None
        with contextlib.suppress(sqlite3.Error):
            old.close()
        moved = None
        try:
            if os.path.lexists(path):
                moved = f"{path}.replaced-{time.strftime('%Y%m%dT%H%M%S')}"
                os.rename(path, moved)
            for stale in (path + "-wal", path + "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(stale)
            os.rename(tmp, path)
            _fsync_dir(directory)
        finally:
            # Whatever happened, the writer needs a connection to the jobs.
            target = path if not os.path.exists(tmp) else tmp
            conn = sqlite3.connect(
                target, isolation_level=None, check_same_thread=False, cached_statements=64
            )
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self.synchronous.upper()}")
            self._sync_now = None
            self._conn = conn
        self._watch_start()
        self._relock()
        return live, moved

    def _relock(self) -> None:
        """If the lock file went with the database, lock a new one (so a second atomnode
        still cannot open the same path)."""
        if self._lock_fd is None:
            return
        st = os.fstat(self._lock_fd)
        if _identity(self.path + ".lock") == (st.st_dev, st.st_ino):
            return
        try:
            fd = os.open(self.path + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            log.error("queue database %s: cannot create a new lock file: %s", self.path, e)
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            log.error("queue database %s: its lock file was replaced and is held by another "
                      "process", self.path)
            return
        with contextlib.suppress(OSError):
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.close(self._lock_fd)
        self._lock_fd = fd

    def _apply_one_by_one(
        self, batch: list[tuple], retried: list, refused: list, purged: list
    ) -> list:
        """The batch again (in the caller's transaction), each op in its own savepoint: an op whose
        values cannot be stored is rolled back alone and refused (inserts and operator
        commands are answered with the reason; a bad fact is logged and dropped, since
        retrying it could never succeed). Returns the committed insert tokens."""
        conn = self._conn
        assert conn is not None
        committed: list = []
        for op in batch:
            conn.execute("SAVEPOINT one_op")
            try:
                if op[0] == INSERT:
                    _kind, *row, _token = op
                    conn.execute(SQL_INSERT, row)
                else:
                    self._apply_run(conn, op[0], [op], retried, refused, purged)
            except _VALUE_ERRORS as e:
                conn.execute("ROLLBACK TO one_op")
                conn.execute("RELEASE one_op")
                reason = f"queue database {self.path}: a value of this job cannot be " \
                         f"stored ({type(e).__name__}: {e})".replace("\n", " ")
                if op[0] == INSERT or op[0] in OPERATOR_KINDS:
                    refused.append((op[-1], reason))  # the token is always last
                else:
                    log.error("%s; op %r dropped", reason, op[:2])
                continue
            conn.execute("RELEASE one_op")
            if op[0] == INSERT:
                committed.append(op[-1])
        return committed

    def _apply_run(
        self,
        conn: sqlite3.Connection,
        kind: str,
        ops: list[tuple],
        retried: list,
        retry_refused: list,
        purged: list,
    ) -> None:
        # Each kind's fields by name, in the order of atomnode.queue.commands.
        if kind == START:
            conn.executemany(SQL_START, [
                (attempts, worker, at, job_id) for _, job_id, attempts, worker, at in ops
            ])
        elif kind == DONE:
            conn.executemany(SQL_DONE, [
                (at, result_size, job_id) for _, job_id, at, result_size in ops
            ])
        elif kind == _START_DONE:
            conn.executemany(SQL_START_DONE, [
                (attempts, worker, started, at, result_size, job_id)
                for _, job_id, attempts, worker, started, at, result_size in ops
            ])
        elif kind == REQUEUE:
            conn.executemany(SQL_REQUEUE, [
                (attempts, seq, reason, job_id) for _, job_id, attempts, seq, reason in ops
            ])
        elif kind == FAIL:
            conn.executemany(SQL_FAIL, [(at, reason, job_id) for _, job_id, at, reason in ops])
        elif kind == CANCEL:
            conn.executemany(SQL_CANCEL, [(at, job_id) for _, job_id, at in ops])
        elif kind == SAMPLES:
            conn.executemany(SQL_SAMPLE, [row for _, rows in ops for row in rows])
        elif kind == RESERVE_IDS:
            conn.execute(SQL_RESERVE, (max(upto for _, upto in ops),))
        elif kind == RETRY:
            for _, job_id, seq, token in ops:
                if conn.execute(SQL_RETRY, (seq, job_id)).rowcount == 1:
                    row = conn.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,))
                    retried.append((token, StoredJob(*row.fetchone())))
                    conn.execute(
                        "INSERT INTO meta (key, value) VALUES ('next_seq', ?) ON CONFLICT (key)"
                        " DO UPDATE SET value = max(value, excluded.value)",
                        (seq + 1,),
                    )
                else:
                    row = conn.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
                    why = f"is {row[0]}" if row else "does not exist"
                    retry_refused.append(
                        (token, f"job {self.handle(job_id)} {why}: only failed or cancelled "
                                "jobs can be retried")
                    )  # fmt: skip
        elif kind == PURGE:
            for _, older_than, token in ops:
                purged.append(
                    (token, conn.execute(SQL_PURGE, (time.time() - older_than,)).rowcount)
                )
        else:
            # A programming error in the caller; it must not poison the batch forever.
            log.error("queue database %s: unknown op kind %r ignored", self.path, kind)

    def _report(self, committed: list, failed: list[tuple[object, str]]) -> None:
        if not (committed or failed) or self._on_result is None:
            return
        try:
            self._on_result(committed, failed)
        except Exception:
            log.exception("queue database %s: on_result callback failed", self.path)

    def _maybe_prune(self) -> None:
        """Delete one small chunk of expired history, at most once per prune_interval (sooner
        while catching up), in its own short transaction."""
        if not self.retention_days or self.retention_days <= 0:
            return
        now = time.monotonic()
        if now < self._next_prune:
            return
        conn = self._conn
        assert conn is not None
        cutoff = time.time() - self.retention_days * 86400.0
        try:
            with transaction(conn):
                deleted = conn.execute(SQL_PRUNE, (cutoff, self.prune_chunk)).rowcount
                conn.execute(SQL_PRUNE_SAMPLES, (cutoff,))
        except sqlite3.Error as e:
            log.warning("queue database %s: pruning history failed: %s", self.path, e)
            self._next_prune = now + self.prune_interval
            return
        if deleted:
            log.debug("queue database %s: pruned %d finished jobs", self.path, deleted)
        # A full chunk means more is waiting: come back soon, but let batches through first.
        self._next_prune = now + (
            self.prune_catchup_interval if deleted >= self.prune_chunk else self.prune_interval
        )
