"""Read-only queries the web console needs: job history, counts and chart samples.

Every function opens its own read-only connection (WAL: readers never block the writer)
and is blocking: the console calls them in a worker thread (``trio.to_thread``), never on
the trio thread that serves Gearman.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from . import reads
from .reads import StoreReadError
from .store import StoredJob

_COLUMNS = (
    "id, function, unique_key, data, priority, when_to_run, seq, attempts, state,"
    " submitted_at, worker, started_at, finished_at, result_size, reason"
)
#: Columns of a listing: everything but the payload (its size instead).
_LIST_COLUMNS = _COLUMNS.replace("data,", "length(data),")


#: The read API's error: the console catches it under this name.
ReadError = StoreReadError


def connect_ro(path: str) -> sqlite3.Connection:
    """A read-only connection (see :func:`atomnode.queue.reads.connect_ro`)."""
    return reads.connect_ro(path, timeout=2.0)


def _filters(state: str | None, function: str | None, since: float | None,
             until: float | None, search: str | None) -> tuple[str, list[Any]]:
    where: list[str] = []
    params: list[Any] = []
    if state:
        where.append("state = ?")
        params.append(state)
    if function:
        where.append("function = ?")
        params.append(function.encode())
    if since is not None:
        where.append("coalesce(finished_at, submitted_at) >= ?")
        params.append(since)
    if until is not None:
        where.append("coalesce(finished_at, submitted_at) < ?")
        params.append(until)
    if search:
        # Function, unique key, reason, worker and the payload's text: an AtoM job's
        # payload is JSON that names the object it works on.
        like = "%" + search.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        where.append(
            "(CAST(function AS TEXT) LIKE ? ESCAPE '\\' OR CAST(unique_key AS TEXT) LIKE ?"
            " ESCAPE '\\' OR reason LIKE ? ESCAPE '\\' OR worker LIKE ? ESCAPE '\\'"
            " OR CAST(data AS TEXT) LIKE ? ESCAPE '\\')"
        )
        params += [like] * 5
    return (" WHERE " + " AND ".join(where)) if where else "", params


def list_jobs(path: str, *, state: str | None = None, function: str | None = None,
              since: float | None = None, until: float | None = None,
              search: str | None = None, limit: int = 50, offset: int = 0,
              preview: int = 0) -> tuple[list[StoredJob], int, list[bytes]]:
    """Jobs matching the filters, newest first, without payloads (``data`` holds its size
    as an int); how many match in all; and the first ``preview`` bytes of each payload."""
    where, params = _filters(state, function, since, until, search)
    con = connect_ro(path)
    try:
        total = con.execute(f"SELECT count(*) FROM jobs{where}", params).fetchone()[0]
        rows = con.execute(
            f"SELECT {_LIST_COLUMNS}, substr(data, 1, ?) FROM jobs{where}"
            " ORDER BY coalesce(finished_at, submitted_at) DESC, id DESC LIMIT ? OFFSET ?",
            [preview] + params + [limit, offset],
        ).fetchall()
    except sqlite3.Error as e:
        raise ReadError(f"cannot read the queue database {path}: {e}") from None
    finally:
        con.close()
    return [StoredJob(*r[:-1]) for r in rows], total, [bytes(r[-1]) for r in rows]


def show_job(path: str, job_id: int) -> StoredJob | None:
    """One job's whole record, payload included."""
    con = connect_ro(path)
    try:
        row = con.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    except sqlite3.Error as e:
        raise ReadError(f"cannot read the queue database {path}: {e}") from None
    finally:
        con.close()
    return StoredJob(*row) if row else None


def failed_ids(path: str, function: str) -> list[int]:
    """Ids of the failed jobs of ``function`` (for "retry all" / "cancel all")."""
    con = connect_ro(path)
    try:
        return [r[0] for r in con.execute(
            "SELECT id FROM jobs WHERE state = 'failed' AND function = ? ORDER BY id",
            (function.encode(),))]
    except sqlite3.Error as e:
        raise ReadError(f"cannot read the queue database {path}: {e}") from None
    finally:
        con.close()


def counts_by_function(
    path: str, states: tuple[str, ...] = ("failed",)
) -> dict[str, dict[str, int]]:
    """``{function: {state: count}}`` for the given states (the read API's counts)."""
    with reads.StoreReader(path, timeout=2.0) as reader:
        return reader.counts(states)


def samples(path: str, since: float, step: float) -> list[dict[str, Any]]:
    """Chart samples since ``since``, summed (counts) or averaged (depth, waits) into
    ``step``-second buckets, per function, oldest first."""
    con = connect_ro(path)
    try:
        rows = con.execute(
            "SELECT CAST(at / ? AS INTEGER) * ? AS t, function, sum(completed), sum(failed),"
            " avg(queued), max(queued), avg(wait_p50), max(wait_p95)"
            " FROM samples WHERE at >= ? GROUP BY t, function ORDER BY t",
            (step, step, since)).fetchall()
    except sqlite3.Error as e:
        raise ReadError(f"cannot read the queue database {path}: {e}") from None
    finally:
        con.close()
    return [
        {"at": t, "function": bytes(fn).decode("utf-8", "replace"), "completed": c,
         "failed": f, "queued": q, "queued_max": qm, "wait_p50": w50, "wait_p95": w95}
        for t, fn, c, f, q, qm, w50, w95 in rows
    ]
