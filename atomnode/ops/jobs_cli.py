"""`atomnode jobs ...` (inspect and repair the durable queue) and `atomnode import-gearmand-queue`.

Reads go straight to SQLite through a read-only connection, so they work whether or not the
daemon runs. Changes go through the daemon's admin protocol when a daemon holds the database
(``atomnode-jobs retry|cancel HANDLE``, ``atomnode-jobs purge SECONDS``); otherwise the CLI
opens the store itself and applies them.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import socket
import sqlite3
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable
from typing import Any

from ..gearman.protocol import Decoder, ProtocolError, T, encode
from ..queue.store import (
    APPLICATION_ID,
    STATES,
    Store,
    StoreError,
    parse_handle,
)

PRIORITY_NAMES = ("high", "normal", "low")
DEFAULT_LIMIT = 50
ADMIN_TIMEOUT = 10.0


class CliError(Exception):
    """A failure to report on stderr with exit status 1."""


# -- where things are ---------------------------------------------------------------------


def _load_config(args: argparse.Namespace) -> Any:
    from ..system.config import ConfigError, load_config

    try:
        return load_config(getattr(args, "config", None))
    except ConfigError as e:
        raise CliError(str(e)) from None


def _database_path(args: argparse.Namespace) -> str:
    """The queue database: ``--db``, else the configuration's ``database``."""
    if getattr(args, "db", None):
        return str(args.db)
    return str(_load_config(args).database)


def _daemon_address(args: argparse.Namespace) -> tuple[str, int]:
    """Where the daemon's admin protocol answers: its first ``listen`` address, with a
    wildcard address replaced by loopback."""
    from ..system.config import parse_address

    listen = tuple(_load_config(args).listen)
    if not listen:
        raise CliError(
            "the daemon holds the database but its configuration has no listen address; "
            "stop it to change jobs offline"
        )
    host, port = parse_address(listen[0])
    if host in ("", "0.0.0.0", "*"):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return host, port


# -- reading ------------------------------------------------------------------------------


def _connect_ro(path: str) -> sqlite3.Connection:
    if not os.path.exists(path):
        raise CliError(f"no queue database at {path} (start atomnode once, or pass --db)")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        app_id = con.execute("PRAGMA application_id").fetchone()[0]
    except sqlite3.Error as e:
        raise CliError(f"cannot read the queue database {path}: {e}") from None
    if app_id != APPLICATION_ID:
        con.close()
        raise CliError(f"{path} is not an atomnode queue database")
    con.execute("PRAGMA busy_timeout = 5000")
    return con


_LIST_COLUMNS = (
    "id, function, unique_key, data, priority, when_to_run, seq, attempts, state,"
    " submitted_at, worker, started_at, finished_at, result_size, reason"
)


def _row_dict(row: tuple, hostname: str, *, with_data: bool) -> dict[str, Any]:
    (job_id, function, unique, data, priority, when, seq, attempts, state, submitted,
     worker, started, finished, result_size, reason) = row  # fmt: skip
    d: dict[str, Any] = {
        "handle": f"H:{hostname}:{job_id}",
        "id": job_id,
        "function": _text(function),
        "unique": _text(unique),
        "state": state,
        "priority": PRIORITY_NAMES[priority] if 0 <= priority < 3 else str(priority),
        "attempts": attempts,
        "when_to_run": when or None,
        "submitted_at": submitted,
        "started_at": started,
        "finished_at": finished,
        "worker": worker,
        "result_size": result_size,
        "reason": reason,
        "size": len(data),
        "seq": seq,
    }
    if with_data:
        try:
            d["data"] = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            d["data"] = None
            d["data_base64"] = base64.b64encode(data).decode("ascii")
    return d


def _text(b: bytes | str) -> str:
    return b if isinstance(b, str) else bytes(b).decode("utf-8", "replace")


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def format_table(headers: list[str], rows: Iterable[list[str]]) -> str:
    """Left-aligned columns separated by two spaces, header first."""
    rows = [headers] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(headers))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows
    )


def cmd_list(args: argparse.Namespace) -> int:
    path = _database_path(args)
    con = _connect_ro(path)
    where, params = [], []
    if args.state:
        where.append("state = ?")
        params.append(args.state)
    if args.function:
        # AtoM functions carry a "<32 hex>-" site prefix: accept the bare class name too.
        suffix = b"-" + args.function.encode()
        where.append("(function = ? OR substr(function, ?) = ?)")
        params += [args.function.encode(), -len(suffix), suffix]
    sql = f"SELECT {_LIST_COLUMNS} FROM jobs"
    if where:
        sql += " WHERE " + " AND ".join(where)
    if args.state in ("queued", "running"):
        order = "priority, seq"  # queue order: the next to run first
        sql += f" ORDER BY {order}"
        if args.limit:
            sql += f" LIMIT {int(args.limit)}"
        rows = con.execute(sql, params).fetchall()
    else:
        sql += " ORDER BY id DESC"  # the most recent N, shown oldest first
        if args.limit:
            sql += f" LIMIT {int(args.limit)}"
        rows = con.execute(sql, params).fetchall()[::-1]
    con.close()
    hostname = args.hostname or socket.gethostname()
    jobs = [_row_dict(r, hostname, with_data=False) for r in rows]
    if args.json:
        print(json.dumps(jobs, indent=1))
        return 0
    if not jobs:
        print("no jobs" + (f" in state {args.state}" if args.state else ""))
        return 0
    print(format_table(
        ["HANDLE", "FUNCTION", "STATE", "PRIORITY", "ATTEMPTS", "SUBMITTED", "FINISHED",
         "WORKER", "REASON"],
        ([j["handle"], j["function"], j["state"], j["priority"], j["attempts"],
          _when(j["submitted_at"]), _when(j["finished_at"]), j["worker"] or "-",
          j["reason"] or ""] for j in jobs),
    ))  # fmt: skip
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    path = _database_path(args)
    job_id = _parse_handle(args.handle)
    con = _connect_ro(path)
    row = con.execute(f"SELECT {_LIST_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
    con.close()
    if row is None:
        raise CliError(f"no job {args.handle} in {path}")
    job = _row_dict(row, args.hostname or socket.gethostname(), with_data=True)
    if args.json:
        print(json.dumps(job, indent=1))
        return 0
    for key in ("handle", "function", "unique", "state", "priority", "attempts", "worker",
                "reason", "result_size", "size"):  # fmt: skip
        print(f"{key + ':':14}{'-' if job[key] is None else job[key]}")
    for key in ("when_to_run", "submitted_at", "started_at", "finished_at"):
        print(f"{key + ':':14}{_when(job[key])}")
    if job.get("data") is not None and job["data"].isprintable():
        print(f"{'data:':14}{job['data']}")
    elif job.get("data") is not None:
        print(f"{'data:':14}{job['data']!r}")  # escapes NULs and control characters
    else:
        print(f"{'data (b64):':14}{job['data_base64']}")
    return 0


# -- changing -----------------------------------------------------------------------------


def _parse_handle(text: str) -> int:
    try:
        return parse_handle(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def parse_duration(text: str) -> float:
    """Seconds in ``7d``, ``12h``, ``30m``, ``45s``, ``2w`` or a plain number of seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", text)
    if not m:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (examples: 7d, 12h, 30m, 3600)"
        )
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}[m.group(2)]
    return float(m.group(1)) * unit


def _admin_exchange(args: argparse.Namespace, lines: list[str]) -> list[str]:
    """Send admin lines to the daemon, one answer line each."""
    host, port = _daemon_address(args)
    path = _database_path(args)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        sock = socket.create_connection((host, port), timeout=ADMIN_TIMEOUT)
    except OSError as e:
        raise CliError(
            f"an atomnode daemon holds {path} but does not answer at {where} "
            f"({e.strerror or e}); check `atomnode status` or its logs, or pass --config"
        ) from None
    answers: list[str] = []
    buf = b""
    with sock:
        try:
            for line in lines:
                sock.sendall(line.encode() + b"\r\n")
                while b"\n" not in buf:
                    chunk = sock.recv(4096)
                    if not chunk:
                        raise CliError(f"the daemon at {where} closed the connection")
                    buf += chunk
                answer, _, buf = buf.partition(b"\n")
                answers.append(answer.decode("utf-8", "replace").rstrip("\r"))
        except OSError as e:
            raise CliError(f"talking to the daemon at {where} failed: {e}") from None
    return answers


def _show_err(answer: str) -> str:
    # gearmand-style ERR lines use '+' for spaces in the text.
    return answer.replace("+", " ")


class _Token:
    job: Any = None
    count: int = 0


def _offline_store(path: str) -> Store:
    # retention 0: the CLI leaves history pruning to the daemon.
    store = Store(path, retention_days=0)
    return store


def _run_offline(path: str, build_ops) -> tuple[Store, list, list[tuple[object, str]]]:
    """Open the store (no daemon), submit ``build_ops(recovery)``, wait for every token."""
    store = _offline_store(path)
    try:
        recovery = store.open()
    except StoreError as e:
        raise CliError(str(e)) from None
    committed: list = []
    failed: list[tuple[object, str]] = []
    cond = threading.Condition()

    def on_result(c: list, f: list) -> None:
        with cond:
            committed.extend(c)
            failed.extend(f)
            cond.notify_all()

    ops, tokens = build_ops(recovery)
    store.start(on_result)
    store.submit_many(ops)
    with cond:
        cond.wait_for(lambda: len(committed) + len(failed) >= len(tokens))
    store.close()
    return store, committed, failed


def _change_online(args: argparse.Namespace, verb: str, targets: list[str]) -> int:
    answers = _admin_exchange(args, [f"atomnode-jobs {verb} {t}" for t in targets])
    status = 0
    for target, answer in zip(targets, answers):
        if answer.startswith("OK"):
            rest = answer[2:].strip()
            if verb == "purge":
                print(f"purged {rest or 0} finished jobs")
            else:
                print(f"{target}: {'retried' if verb == 'retry' else 'cancelled'}"
                      + (f" ({rest})" if rest else ""))  # fmt: skip
        else:
            print(f"{target}: {_show_err(answer)}", file=sys.stderr)
            status = 1
    return status


def cmd_retry(args: argparse.Namespace) -> int:
    path = _database_path(args)
    ids = [_parse_handle(h) for h in args.handles]
    if Store.is_locked(path):
        return _change_online(args, "retry", args.handles)

    def build(recovery):
        tokens = [_Token() for _ in ids]
        ops = [("retry", i, recovery.next_seq + n, t) for n, (i, t) in enumerate(zip(ids, tokens))]
        return ops, tokens

    store, committed, failed = _run_offline(path, build)
    for t in committed:
        print(f"{store.handle(t.job.id)}: retried (queued again)")
    for _, message in failed:
        print(message, file=sys.stderr)
    return 1 if failed else 0


def cmd_cancel(args: argparse.Namespace) -> int:
    path = _database_path(args)
    ids = [_parse_handle(h) for h in args.handles]
    if Store.is_locked(path):
        return _change_online(args, "cancel", args.handles)
    store = _offline_store(path)
    try:
        recovery = store.open()
    except StoreError as e:
        raise CliError(str(e)) from None
    # With no daemon, a 'running' row is a job that will be queued again at the next start:
    # cancelling it is as safe as cancelling a queued one.
    live = {j.id for j in recovery.jobs}
    now = time.time()
    status = 0
    todo = []
    for i in ids:
        if i in live:
            todo.append(("cancel", i, now))
        else:
            print(f"{store.handle(i)}: not queued (unknown or already finished)", file=sys.stderr)
            status = 1
    store.submit_many(todo)
    store.close()  # writes the ops; below we read back what is on disk
    con = _connect_ro(path)
    for _, i, _ in todo:
        row = con.execute("SELECT state FROM jobs WHERE id = ?", (i,)).fetchone()
        if row and row[0] == "cancelled":
            print(f"{store.handle(i)}: cancelled")
        else:
            print(f"{store.handle(i)}: could not be cancelled (see the log)", file=sys.stderr)
            status = 1
    con.close()
    return status


def cmd_purge(args: argparse.Namespace) -> int:
    path = _database_path(args)
    seconds = args.older_than
    if Store.is_locked(path):
        return _change_online(args, "purge", [f"{seconds:g}"])

    def build(recovery):
        token = _Token()
        return [("purge", seconds, token)], [token]

    _, committed, failed = _run_offline(path, build)
    for _, message in failed:
        print(message, file=sys.stderr)
        return 1
    print(f"purged {committed[0].count} finished jobs")
    return 0


# -- gearmand import ----------------------------------------------------------------------

_TABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def read_gearmand_queue(path: str, table: str = "gearman_queue") -> list[tuple]:
    """Rows of gearmand's libsqlite3 queue in insertion (rowid) order, as
    ``(function, unique, priority, data, when_to_run)`` with bytes for the blobs."""
    if not _TABLE_NAME.fullmatch(table):
        raise CliError(f"{table!r} is not a table name")
    if not os.path.exists(path):
        raise CliError(f"{path}: no such file")
    uri = "file:" + urllib.parse.quote(os.path.abspath(path)) + "?mode=ro"
    try:
        con = sqlite3.connect(uri, uri=True)
        cols = {r[1] for r in con.execute(f'PRAGMA table_info("{table}")')}
        if not cols:
            raise CliError(f"{path} has no table {table} (is it gearmand's libsqlite3 queue?)")
        missing = {"unique_key", "function_name", "priority", "data"} - cols
        if missing:
            raise CliError(f"{path}: table {table} lacks {', '.join(sorted(missing))}")
        when = "when_to_run" if "when_to_run" in cols else "0"
        rows = con.execute(
            f'SELECT function_name, unique_key, priority, data, {when} FROM "{table}" '
            "ORDER BY rowid"
        ).fetchall()
        con.close()
    except sqlite3.Error as e:
        raise CliError(f"cannot read {path}: {e}") from None

    def blob(v: Any) -> bytes:
        if v is None:
            return b""
        return v.encode("utf-8") if isinstance(v, str) else bytes(v)

    out = []
    for function, unique, priority, data, when_to_run in rows:
        prio = priority if priority in (0, 1, 2) else 1  # gearmand: 0 high, 1 normal, 2 low
        out.append((blob(function), blob(unique), prio, blob(data), int(when_to_run or 0)))
    return out


_BG_SUBMIT = {0: T.SUBMIT_JOB_HIGH_BG, 1: T.SUBMIT_JOB_BG, 2: T.SUBMIT_JOB_LOW_BG}


def submit_over_gearman(
    host: str, port: int, jobs: list[tuple], *, window: int = 256
) -> tuple[int, list[str]]:
    """Submit background jobs to a Gearman server, pipelined (up to ``window`` awaiting
    JOB_CREATED). Future ``when_to_run`` uses SUBMIT_JOB_EPOCH. Returns (created, errors)."""
    now = time.time()
    sock = socket.create_connection((host, port), timeout=30)
    decoder = Decoder(expect_requests=False)
    created, errors = 0, []
    with sock:
        sent = answered = 0
        while answered < len(jobs):
            while sent < len(jobs) and sent - answered < window:
                function, unique, prio, data, when = jobs[sent]
                if when > now:
                    pkt = encode(T.SUBMIT_JOB_EPOCH, function, unique, str(when).encode(), data,
                                 request=True)  # fmt: skip
                else:
                    pkt = encode(_BG_SUBMIT[prio], function, unique, data, request=True)
                sock.sendall(pkt)
                sent += 1
            chunk = sock.recv(65536)
            if not chunk:
                raise CliError(f"the daemon at {host}:{port} closed the connection after "
                               f"{answered} of {len(jobs)} jobs")  # fmt: skip
            try:
                for ev in decoder.events(chunk):
                    if ev.type == T.JOB_CREATED:
                        created += 1
                    elif ev.type == T.ERROR:
                        errors.append(b": ".join(ev.args).decode("utf-8", "replace"))
                    else:
                        continue
                    answered += 1
            except ProtocolError as e:
                raise CliError(f"bad answer from {host}:{port}: {e}") from None
    return created, errors


def import_into_store(path: str, jobs: list[tuple]) -> tuple[int, list[str]]:
    """Write jobs straight into the queue database (no daemon running)."""
    now = time.time()

    def build(recovery):
        tokens = [_Token() for _ in jobs]
        ops: list[tuple] = []
        for n, ((function, unique, prio, data, when), tok) in enumerate(zip(jobs, tokens)):
            ops.append(("insert", recovery.next_id + n, function, unique, data, prio, when,
                        recovery.next_seq + n, now, tok))  # fmt: skip
        ops.append(("reserve_ids", recovery.next_id + len(jobs)))
        return ops, tokens

    _, committed, failed = _run_offline(path, build)
    return len(committed), sorted({m for _, m in failed})


def cmd_import(args: argparse.Namespace) -> int:
    jobs = read_gearmand_queue(args.file, args.table)
    path = _database_path(args)
    if not jobs:
        print(f"{args.file}: no queued jobs to import")
        return 0
    if Store.is_locked(path):
        host, port = _daemon_address(args)
        try:
            created, errors = submit_over_gearman(host, port, jobs)
        except OSError as e:
            raise CliError(
                f"an atomnode daemon holds {path} but does not answer at {host}:{port} ({e})"
            ) from None
        how = f"through the daemon at {host}:{port}"
    else:
        created, errors = import_into_store(path, jobs)
        how = f"into {path}"
    print(f"imported {created} of {len(jobs)} jobs from {args.file} {how}")
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    return 0 if created == len(jobs) else 1


# -- wiring -------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--db", metavar="FILE", help="queue database (default: the config's)")
    p.add_argument("--config", metavar="FILE", help="configuration file")


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as e:
            print(f"atomnode: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 1

    return run


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``jobs`` and ``import-gearmand-queue`` to the CLI."""
    jobs = sub.add_parser("jobs", help="list, show, retry, cancel and purge stored jobs")
    jsub = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    jobs.set_defaults(func=lambda args: (jobs.print_help(sys.stderr), 2)[1])

    p = jsub.add_parser("list", help="list jobs (newest last)")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--function", metavar="F", help="function name, or an AtoM job class")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, metavar="N",
                   help=f"at most N jobs (default {DEFAULT_LIMIT}; 0 = all)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--hostname", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=_guard(cmd_list))

    p = jsub.add_parser("show", help="everything stored about one job")
    p.add_argument("handle", metavar="HANDLE", help="H:host:123 or 123")
    p.add_argument("--json", action="store_true")
    p.add_argument("--hostname", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=_guard(cmd_show))

    p = jsub.add_parser("retry", help="queue failed or cancelled jobs again")
    p.add_argument("handles", nargs="+", metavar="HANDLE")
    _common(p)
    p.set_defaults(func=_guard(cmd_retry))

    p = jsub.add_parser("cancel", help="cancel queued jobs")
    p.add_argument("handles", nargs="+", metavar="HANDLE")
    _common(p)
    p.set_defaults(func=_guard(cmd_cancel))

    p = jsub.add_parser("purge", help="delete finished jobs from the history")
    p.add_argument("--older-than", type=parse_duration, required=True, metavar="AGE",
                   help="e.g. 7d, 12h, 30m, or seconds")  # fmt: skip
    _common(p)
    p.set_defaults(func=_guard(cmd_purge))

    p = sub.add_parser("import-gearmand-queue",
                       help="import the queue of gearmand's libsqlite3 plugin")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="gearmand's --libsqlite3-db file")
    p.add_argument("--table", default="gearman_queue", help="gearmand's --libsqlite3-table")
    _common(p)
    p.set_defaults(func=_guard(cmd_import))

