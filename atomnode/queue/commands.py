"""The store's commands: what the broker and the CLI ask the queue writer to make durable.

A command is a plain tuple whose first item is its kind (one of the constants below); the
rest is laid out as the table says, and the writer (:mod:`atomnode.queue.store`) unpacks
each kind by these names. Tuples, not classes: the broker builds three of them per
background job on the hot path, and a tuple display costs a tenth of a NamedTuple
constructor. Code off the hot path builds them with the constructors below.

==============  ==========================================================================
kind            fields (times are unix floats)
==============  ==========================================================================
``INSERT``      id, function, unique, data, priority, when_to_run, seq, submitted_at, token
``START``       id, attempts, worker, at                       queued -> running
``REQUEUE``     id, attempts, seq, reason                      running -> queued
``DONE``        id, at, result_size                            running -> done
``FAIL``        id, at, reason                                 -> failed
``CANCEL``      id, at                                         queued -> cancelled
``RESERVE_IDS`` upto                                           next start's next_id >= upto
``RETRY``       id, seq, token      failed/cancelled -> queued; sets ``token.job``
``PURGE``       older_than_seconds, token     delete finished jobs; sets ``token.count``
``SAMPLES``     rows          chart samples (each row as ``store.SQL_SAMPLE`` takes it)
==============  ==========================================================================

``token`` is any object the caller wants back: the writer reports it committed (or failed,
with a message) through the store's ``on_result`` callback.

The other way, :meth:`Store.open <atomnode.queue.store.Store.open>` hands the broker the
live jobs it recovered as plain tuples too (:data:`RECOVERED`), for the same reason: a
million of them are read before the daemon serves (the restart budget), and a tuple straight
from SQLite costs nothing more to build.
"""

from __future__ import annotations

from typing import Any

INSERT = "insert"
START = "start"
REQUEUE = "requeue"
DONE = "done"
FAIL = "fail"
CANCEL = "cancel"
RESERVE_IDS = "reserve_ids"
RETRY = "retry"
PURGE = "purge"
SAMPLES = "samples"

#: The fields of a recovered live job, in order. The small numbers travel packed in one
#: integer, ``flags`` (see :func:`recovered_flags`): every column costs the read of a
#: million jobs about 0.16 s in CPython's sqlite3, even for a constant (it releases and
#: takes back the GIL for each value), more than decoding them costs.
RECOVERED = ("id", "function", "unique", "data", "seq", "submitted_at", "flags")
#: ``flags`` of a job due now, never tried, not running, of each priority (0, 1, 2) is
#: just its priority: every other job has ``flags > RECOVERED_PLAIN``.
RECOVERED_PLAIN = 2
#: Bits of ``flags``: priority (2), running (1), attempts (20, capped), when_to_run (the rest).
RECOVERED_ATTEMPTS_MAX = (1 << 20) - 1
RECOVERED_WHEN_MAX = (1 << 40) - 1


def pack_recovered_flags(priority: int, running: bool, attempts: int, when_to_run: int) -> int:
    """``flags`` of a recovered row, as the store's recovery query computes them."""
    attempts = min(max(attempts, 0), RECOVERED_ATTEMPTS_MAX)
    when_to_run = min(max(when_to_run, 0), RECOVERED_WHEN_MAX)
    return priority | (4 if running else 0) | attempts << 3 | when_to_run << 23


def recovered_flags(flags: int) -> tuple[int, bool, int, int]:
    """``(priority, running, attempts, when_to_run)`` from a recovered row's ``flags``:
    ``priority | running << 2 | attempts << 3 | when_to_run << 23``."""
    return flags & 3, bool(flags & 4), (flags >> 3) & RECOVERED_ATTEMPTS_MAX, flags >> 23


#: Commands an operator waits for: on a failed batch they are answered, not kept.
OPERATOR_KINDS = (RETRY, PURGE)


def insert(
    job_id: int, function: bytes, unique: bytes, data: bytes, priority: int, when_to_run: int,
    seq: int, submitted_at: float, token: Any,
) -> tuple:
    """A new background job (the token is reported once the row is committed)."""
    return (INSERT, job_id, function, unique, data, priority, when_to_run, seq, submitted_at,
            token)


def cancel(job_id: int, at: float) -> tuple:
    """An operator cancelled a queued job."""
    return (CANCEL, job_id, at)


def reserve_ids(upto: int) -> tuple:
    """Handle numbers below ``upto`` are taken, even if the daemon stops before using them."""
    return (RESERVE_IDS, upto)


def retry(job_id: int, seq: int, token: Any) -> tuple:
    """Queue a failed or cancelled job again, at the back (``seq``)."""
    return (RETRY, job_id, seq, token)


def purge(older_than: float, token: Any) -> tuple:
    """Delete finished jobs older than ``older_than`` seconds."""
    return (PURGE, older_than, token)


def samples(rows: list[tuple]) -> tuple:
    """Chart samples to store (the console's charts)."""
    return (SAMPLES, rows)
