"""Reading gearmand's own queue (its libsqlite3 plugin's table) to bring it over.

Read-only; the jobs come back as plain tuples for ``atomnode import-gearmand-queue``.
"""

from __future__ import annotations

import os
import re
import sqlite3
import urllib.parse
from typing import Any

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class GearmandQueueError(Exception):
    """The file is not a readable gearmand queue; the message says why."""


def _blob(v: Any) -> bytes:
    if v is None:
        return b""
    return v.encode("utf-8") if isinstance(v, str) else bytes(v)


def read_queue(path: str, table: str = "gearman_queue") -> list[tuple]:
    """Rows of gearmand's libsqlite3 queue in insertion (rowid) order, as
    ``(function, unique, priority, data, when_to_run)`` with bytes for the blobs."""
    if not _TABLE_NAME.fullmatch(table):
        raise GearmandQueueError(f"{table!r} is not a table name")
    if not os.path.exists(path):
        raise GearmandQueueError(f"{path}: no such file")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        try:
            cols = {r[1] for r in con.execute(f'PRAGMA table_info("{table}")')}
            if not cols:
                raise GearmandQueueError(
                    f"{path} has no table {table} (is it gearmand's libsqlite3 queue?)"
                )
            missing = {"unique_key", "function_name", "priority", "data"} - cols
            if missing:
                raise GearmandQueueError(
                    f"{path}: table {table} lacks {', '.join(sorted(missing))}"
                )
            when = "when_to_run" if "when_to_run" in cols else "0"
            rows = con.execute(
                f'SELECT function_name, unique_key, priority, data, {when} FROM "{table}" '
                "ORDER BY rowid"
            ).fetchall()
        finally:
            con.close()
    except sqlite3.Error as e:
        raise GearmandQueueError(f"cannot read {path}: {e}") from None
    out = []
    for function, unique, priority, data, when_to_run in rows:
        prio = priority if priority in (0, 1, 2) else 1  # gearmand: 0 high, 1 normal, 2 low
        out.append((_blob(function), _blob(unique), prio, _blob(data), int(when_to_run or 0)))
    return out
