"""Reading the queue database: the one read API (jobs CLI, ``atomnode status``, consoles).

:class:`StoreReader` opens the database read-only (``mode=ro``), through sqlite-utils. WAL
readers never block the writer, and a reader never writes: it works whether or not the
daemon runs. Every method is a short query that returns plain data (dicts, ints, lists),
JSON-ready; the connection may be used from any one thread at a time (open a reader in the
thread that uses it, e.g. inside ``trio.to_thread.run_sync``, or share one under a lock).

A job record (:func:`job_record`) is a dict with ``handle``, ``id``, ``function``,
``unique``, ``state``, ``priority`` (``high``/``normal``/``low``), ``attempts``,
``when_to_run``, ``submitted_at``, ``started_at``, ``finished_at`` (unix seconds or None),
``worker``, ``result_size``, ``reason``, ``size`` (payload bytes) and ``seq``; with
``with_data`` also ``data`` (text) or, for a payload that is not UTF-8, ``data`` None and
``data_base64``.
"""

from __future__ import annotations

import base64
import csv
import json
import os
import socket
import sqlite3
import threading
import urllib.parse
from collections.abc import Iterator
from typing import IO, Any

from .store import APPLICATION_ID, FINISHED_STATES, STATES, StoreError

PRIORITY_NAMES = ("high", "normal", "low")

#: Columns of a job record's row, in table order.
COLUMNS = (
    "id", "function", "unique_key", "data", "priority", "when_to_run", "seq", "attempts",
    "state", "submitted_at", "worker", "started_at", "finished_at", "result_size", "reason",
)
_SELECT = ", ".join(COLUMNS)
EXPORT_FORMATS = ("json", "csv")
#: Fields of an exported job, in column order (csv header).
EXPORT_FIELDS = (
    "handle", "id", "function", "unique", "state", "priority", "attempts", "when_to_run",
    "submitted_at", "started_at", "finished_at", "worker", "result_size", "reason", "size",
    "seq", "data", "data_base64",
)


class StoreReadError(StoreError):
    """The database cannot be read (missing, not an atomnode database, unreadable)."""


def _text(b: bytes | str) -> str:
    return b if isinstance(b, str) else bytes(b).decode("utf-8", "replace")


def job_record(row: dict[str, Any], hostname: str, *, with_data: bool = False
               ) -> dict[str, Any]:
    """A ``jobs`` row (column name -> value) as a job record (see the module docstring)."""
    priority = row["priority"]
    data = row["data"]
    d: dict[str, Any] = {
        "handle": f"H:{hostname}:{row['id']}",
        "id": row["id"],
        "function": _text(row["function"]),
        "unique": _text(row["unique_key"]),
        "state": row["state"],
        "priority": PRIORITY_NAMES[priority] if 0 <= priority < 3 else str(priority),
        "attempts": row["attempts"],
        "when_to_run": row["when_to_run"] or None,
        "submitted_at": row["submitted_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "worker": row["worker"],
        "result_size": row["result_size"],
        "reason": row["reason"],
        "size": len(data),
        "seq": row["seq"],
    }
    if with_data:
        try:
            d["data"] = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            d["data"] = None
            d["data_base64"] = base64.b64encode(data).decode("ascii")
    return d


def _filters(
    *, state: str | None = None, states: tuple[str, ...] | None = None,
    function: str | None = None, since: float | None = None, until: float | None = None,
    time_column: str = "submitted_at",
) -> tuple[str | None, list[Any]]:
    """A WHERE clause (or None) and its arguments for the common filters."""
    where: list[str] = []
    args: list[Any] = []
    if state is not None:
        if state not in STATES:
            raise ValueError(f"unknown state {state!r} (one of {', '.join(STATES)})")
        where.append("state = ?")
        args.append(state)
    if states is not None:
        where.append(f"state IN ({', '.join('?' * len(states))})")
        args.extend(states)
    if function:
        # AtoM functions carry a "<32 hex>-" site prefix: accept the bare class name too.
        suffix = b"-" + function.encode()
        where.append("(function = ? OR substr(function, ?) = ?)")
        args += [function.encode(), -len(suffix), suffix]
    if since is not None:
        where.append(f"{time_column} >= ?")
        args.append(since)
    if until is not None:
        where.append(f"{time_column} < ?")
        args.append(until)
    return (" AND ".join(where) or None), args


def connect_ro(path: str, timeout: float = 5.0) -> sqlite3.Connection:
    """A read-only connection to the queue database at ``path`` (``mode=ro``: it never
    writes; WAL: it never blocks the writer), usable from any one thread at a time. Raises
    :class:`StoreReadError` if there is no file, it cannot be read, or it is not an
    atomnode database."""
    if not os.path.exists(path):
        raise StoreReadError(f"no queue database at {path} (start atomnode once, or pass --db)")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=timeout, check_same_thread=False)
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.Error as e:
        raise StoreReadError(f"cannot read the queue database {path}: {e}") from None
    if app_id != APPLICATION_ID:
        conn.close()
        raise StoreReadError(f"{path} is not an atomnode queue database")
    return conn


class StoreReader:
    """Read-only access to the queue database at ``path`` (see the module docstring).

    ``hostname`` makes the handles (default: this machine's name, as the daemon's).
    ``timeout`` is how long a query may wait on a lock (seconds). Use as a context manager,
    or call :meth:`close`.
    """

    def __init__(self, path: str, *, hostname: str | None = None, timeout: float = 5.0):
        self.path = path
        self.hostname = hostname or socket.gethostname()
        self._conn = connect_ro(path, timeout)
        self._lock = threading.Lock()
        self._db: Any = None

    @property
    def db(self) -> Any:
        """The sqlite-utils ``Database`` on this reader's connection. Made on first use:
        importing sqlite-utils takes a noticeable fraction of a second, which the daemon's
        quick :meth:`failed_count` should not pay."""
        if self._db is None:
            import sqlite_utils

            self._db = sqlite_utils.Database(self._conn, execute_plugins=False)
        return self._db

    @property
    def _jobs(self) -> Any:
        return self.db.table("jobs")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> StoreReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, where: str | None, args: list[Any], *, order_by: str,
              limit: int | None = None, offset: int | None = None) -> list[dict[str, Any]]:
        try:
            with self._lock:
                return list(self._jobs.rows_where(
                    where, args, order_by=order_by, select=_SELECT, limit=limit or None,
                    offset=offset or None,
                ))
        except sqlite3.Error as e:
            raise StoreReadError(f"cannot read the queue database {self.path}: {e}") from None

    def _query(self, sql: str, args: list[Any] | tuple = ()) -> list[dict[str, Any]]:
        """Rows as dicts (what sqlite-utils' ``query`` gives), straight from sqlite3: the
        daemon counts failed jobs through here every few seconds, and importing
        sqlite-utils for that cost every daemon ~8 MiB of RSS."""
        try:
            with self._lock:
                cur = self._conn.execute(sql, args)
                names = [d[0] for d in cur.description]
                return [dict(zip(names, row)) for row in cur]
        except sqlite3.Error as e:
            raise StoreReadError(f"cannot read the queue database {self.path}: {e}") from None

    # -------------------------------------------------------------------- the API
    def list(self, *, state: str | None = None, function: str | None = None,
             limit: int | None = 50) -> list[dict[str, Any]]:
        """Jobs, oldest first: queued or running ones in queue order (the next to run
        first, at most ``limit``), otherwise the most recent ``limit`` (0/None = all)."""
        where, args = _filters(state=state, function=function)
        if state in ("queued", "running"):
            rows = self._rows(where, args, order_by="priority, seq", limit=limit)
        else:
            rows = self._rows(where, args, order_by="id DESC", limit=limit)[::-1]
        return [job_record(r, self.hostname) for r in rows]

    def show(self, job_id: int) -> dict[str, Any] | None:
        """Everything stored about one job, payload included; None if there is none."""
        rows = self._rows("id = ?", [job_id], order_by="id")
        return job_record(rows[0], self.hostname, with_data=True) if rows else None

    def state(self, job_id: int) -> str | None:
        """The stored state of one job, None if there is none."""
        rows = self._query("SELECT state FROM jobs WHERE id = ?", (job_id,))
        return rows[0]["state"] if rows else None

    def counts(self, states: tuple[str, ...] = STATES) -> dict[str, dict[str, int]]:
        """Jobs per function and state, ``{function: {state: n}}``, for the functions that
        have jobs in ``states`` (every one of ``states`` present, 0 where none)."""
        where, args = _filters(states=states)
        out: dict[str, dict[str, int]] = {}
        for r in self._query(
            f"SELECT function, state, count(*) AS n FROM jobs WHERE {where}"
            " GROUP BY function, state", args,
        ):
            per = out.setdefault(_text(r["function"]), dict.fromkeys(states, 0))
            per[r["state"]] = r["n"]
        return out

    def failed_count(self) -> int:
        """Jobs in state failed (quarantined until an operator retries them)."""
        try:
            with self._lock:
                row = self._conn.execute("SELECT count(*) FROM jobs WHERE state = 'failed'")
                return int(row.fetchone()[0])
        except sqlite3.Error as e:
            raise StoreReadError(f"cannot read the queue database {self.path}: {e}") from None

    def history(self, *, function: str | None = None, state: str | None = None,
                since: float | None = None, until: float | None = None, limit: int = 50,
                offset: int = 0) -> dict[str, Any]:
        """Finished jobs (done, failed, cancelled), newest first, one page at a time.

        ``since``/``until`` bound ``finished_at`` (unix seconds, until excluded). Returns
        ``{"total": matching jobs, "offset": offset, "limit": limit, "jobs": [records]}``.
        """
        if state is not None and state not in FINISHED_STATES:
            raise ValueError(f"history holds finished jobs only ({', '.join(FINISHED_STATES)})")
        where, args = _filters(
            state=state, states=None if state else FINISHED_STATES, function=function,
            since=since, until=until, time_column="finished_at",
        )
        try:
            with self._lock:
                total = self._jobs.count_where(where, args)
        except sqlite3.Error as e:
            raise StoreReadError(f"cannot read the queue database {self.path}: {e}") from None
        rows = self._rows(where, args, order_by="finished_at DESC, id DESC", limit=limit,
                          offset=offset)
        return {"total": total, "offset": offset, "limit": limit,
                "jobs": [job_record(r, self.hostname) for r in rows]}

    def iter_jobs(self, *, state: str | None = None, function: str | None = None,
                  since: float | None = None, until: float | None = None,
                  batch: int = 1000) -> Iterator[dict[str, Any]]:
        """Every matching job with its payload, in id order (``since``/``until`` bound
        ``submitted_at``), read ``batch`` rows at a time."""
        where, args = _filters(state=state, function=function, since=since, until=until)
        last = 0
        while True:
            page_where = "id > ?" + (f" AND ({where})" if where else "")
            rows = self._rows(page_where, [last, *args], order_by="id", limit=batch)
            for r in rows:
                yield job_record(r, self.hostname, with_data=True)
            if len(rows) < batch:
                return
            last = rows[-1]["id"]

    def export(self, out: IO[str], fmt: str = "json", **filters: Any) -> int:
        """Write the matching jobs (filters as :meth:`iter_jobs`) to ``out`` as a JSON array
        or CSV with a header line (:data:`EXPORT_FIELDS`). Returns the number written."""
        if fmt not in EXPORT_FORMATS:
            raise ValueError(f"unknown export format {fmt!r} (one of json, csv)")
        n = 0
        if fmt == "csv":
            writer = csv.DictWriter(out, fieldnames=EXPORT_FIELDS, extrasaction="ignore")
            writer.writeheader()
            for job in self.iter_jobs(**filters):
                writer.writerow(job)
                n += 1
            return n
        out.write("[")
        for job in self.iter_jobs(**filters):
            out.write(("\n" if n == 0 else ",\n") + json.dumps(job))
            n += 1
        out.write("\n]\n" if n else "]\n")
        return n

    # ------------------------------------------------------ for the web console
    def search(self, *, state: str | None = None, function: str | None = None,
               since: float | None = None, until: float | None = None,
               text: str | None = None, limit: int = 50, offset: int = 0,
               preview: int = 0) -> dict[str, Any]:
        """Jobs in any state, newest first (by finished, else submitted time), one page at a
        time: ``since``/``until`` bound that time; ``text`` is looked for in the function,
        unique key, reason, worker and payload. With ``preview``, each record carries the
        first ``preview`` bytes of its payload as ``preview`` (bytes).
        Returns ``{"total", "offset", "limit", "jobs"}``."""
        where, args = _filters(state=state, function=function)
        clauses = [where] if where else []
        if since is not None:
            clauses.append("coalesce(finished_at, submitted_at) >= ?")
            args.append(since)
        if until is not None:
            clauses.append("coalesce(finished_at, submitted_at) < ?")
            args.append(until)
        if text:
            like = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
            clauses.append(
                "(CAST(function AS TEXT) LIKE ? ESCAPE '\\' OR CAST(unique_key AS TEXT) LIKE ?"
                " ESCAPE '\\' OR reason LIKE ? ESCAPE '\\' OR worker LIKE ? ESCAPE '\\'"
                " OR CAST(data AS TEXT) LIKE ? ESCAPE '\\')")
            args += [like] * 5
        sql_where = (" WHERE " + " AND ".join(clauses)) if clauses else ""
        cols = _SELECT.replace("data,", "length(data) AS data_size, substr(data, 1, ?) AS data,")
        try:
            with self._lock:
                total = self._conn.execute(
                    f"SELECT count(*) FROM jobs{sql_where}", args).fetchone()[0]
                cur = self._conn.execute(
                    f"SELECT {cols} FROM jobs{sql_where}"
                    " ORDER BY coalesce(finished_at, submitted_at) DESC, id DESC"
                    " LIMIT ? OFFSET ?", [preview] + args + [limit, offset])
                names = [d[0] for d in cur.description]
                rows = [dict(zip(names, r)) for r in cur.fetchall()]
        except sqlite3.Error as e:
            raise StoreReadError(f"cannot read the queue database {self.path}: {e}") from None
        jobs = []
        for r in rows:
            rec = job_record(r, self.hostname)
            rec["size"] = r["data_size"]
            if preview:
                rec["preview"] = bytes(r["data"])
            jobs.append(rec)
        return {"total": total, "offset": offset, "limit": limit, "jobs": jobs}

    def failed_by_function(self) -> dict[str, int]:
        """Failed jobs per function (functions without any left out)."""
        return {_text(r["function"]): r["n"] for r in self._query(
            "SELECT function, count(*) AS n FROM jobs WHERE state = 'failed' GROUP BY function")}

    def failed_ids(self, function: str) -> list[int]:
        """Ids of the failed jobs of exactly ``function``, oldest first ("retry all")."""
        return [r["id"] for r in self._query(
            "SELECT id FROM jobs WHERE state = 'failed' AND function = ? ORDER BY id",
            (function.encode(),))]

    def samples(self, since: float, step: float) -> list[dict[str, Any]]:
        """The console's chart samples since ``since``, per function, in ``step``-second
        buckets (counts summed; queue depth averaged and its maximum; waits averaged
        (p50) and their maximum (p95)), oldest first."""
        rows = self._query(
            "SELECT CAST(at / ? AS INTEGER) * ? AS t, function, sum(completed) AS c,"
            " sum(failed) AS f, avg(queued) AS q, max(queued) AS qm, avg(wait_p50) AS w50,"
            " max(wait_p95) AS w95 FROM samples WHERE at >= ? GROUP BY t, function ORDER BY t",
            (step, step, since))
        return [{"at": r["t"], "function": _text(r["function"]), "completed": r["c"],
                 "failed": r["f"], "queued": r["q"], "queued_max": r["qm"],
                 "wait_p50": r["w50"], "wait_p95": r["w95"]} for r in rows]
