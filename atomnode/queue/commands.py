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
