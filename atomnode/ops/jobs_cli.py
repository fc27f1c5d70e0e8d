"""`atomnode jobs ...` (inspect and repair the durable queue) and `atomnode import-gearmand-queue`.

Reads go through the store's read API (:class:`atomnode.queue.reads.StoreReader`, read-only,
so they work whether or not the daemon runs). Changes go through the daemon's admin
protocol when a daemon holds the database (``atomnode-jobs retry|cancel HANDLE``,
``atomnode-jobs purge SECONDS``, via :mod:`atomnode.ops.client`); otherwise the CLI opens
the store itself and applies them.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from ..queue import commands, gearmand
from ..queue.reads import EXPORT_FORMATS, StoreReader, StoreReadError
from ..queue.store import STATES, Store, StoreError, parse_handle
from .client import AdminClient, ClientError, DaemonUnreachable, GearmanClient
from .common import CliError, daemon_address, duration_arg, format_table, guard

DEFAULT_LIMIT = 50
ADMIN_TIMEOUT = 10.0

#: Kept importable under its old name (tests, scripts).
parse_duration = duration_arg


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
    """Where the daemon's admin protocol answers (see :func:`common.daemon_address`)."""
    listen = tuple(_load_config(args).listen)
    if not listen:
        raise CliError(
            "the daemon holds the database but its configuration has no listen address; "
            "stop it to change jobs offline"
        )
    return daemon_address(listen)


def _reader(args: argparse.Namespace) -> StoreReader:
    path = _database_path(args)
    try:
        return StoreReader(path, hostname=getattr(args, "hostname", None))
    except StoreReadError as e:
        raise CliError(str(e)) from None


# -- reading ------------------------------------------------------------------------------


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def cmd_list(args: argparse.Namespace) -> int:
    try:
        with _reader(args) as reader:
            jobs = reader.list(state=args.state, function=args.function, limit=args.limit)
    except StoreReadError as e:
        raise CliError(str(e)) from None
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
    job_id = _parse_handle(args.handle)
    try:
        with _reader(args) as reader:
            job = reader.show(job_id)
    except StoreReadError as e:
        raise CliError(str(e)) from None
    if job is None:
        raise CliError(f"no job {args.handle} in {_database_path(args)}")
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


def cmd_export(args: argparse.Namespace) -> int:
    try:
        with _reader(args) as reader:
            if args.output and args.output != "-":
                with open(args.output, "w", encoding="utf-8", newline="") as out:
                    n = reader.export(out, args.format, state=args.state,
                                      function=args.function)
                print(f"exported {n} jobs to {args.output}", file=sys.stderr)
            else:
                reader.export(sys.stdout, args.format, state=args.state,
                              function=args.function)
    except StoreReadError as e:
        raise CliError(str(e)) from None
    except OSError as e:
        raise CliError(f"cannot write {args.output}: {e.strerror or e}") from None
    return 0


# -- changing -----------------------------------------------------------------------------


def _parse_handle(text: str) -> int:
    try:
        return parse_handle(text)
    except ValueError as e:
        raise CliError(str(e)) from None


def _admin_exchange(args: argparse.Namespace, lines: list[str]) -> list[str]:
    """Send admin lines to the daemon, one answer line each."""
    host, port = _daemon_address(args)
    path = _database_path(args)
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    answers: list[str] = []
    with AdminClient(host, port, timeout=ADMIN_TIMEOUT) as admin:
        try:
            for line in lines:
                answers.append(admin.command(line)[0])
        except DaemonUnreachable as e:
            raise CliError(
                f"an atomnode daemon holds {path} but does not answer at {where} "
                f"({e.reason}); check `atomnode status` or its logs, or pass --config"
            ) from None
        except ClientError as e:
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


def _change_jobs(verb: str, offline: Callable[[str, list[int]], int]
                 ) -> Callable[[argparse.Namespace], int]:
    """A command changing the jobs named by handle: through the daemon when one holds the
    database, else ``offline(path, job ids)``."""

    def command(args: argparse.Namespace) -> int:
        path = _database_path(args)
        ids = [_parse_handle(h) for h in args.handles]
        if Store.is_locked(path):
            return _change_online(args, verb, args.handles)
        return offline(path, ids)

    return command


def _retry_offline(path: str, ids: list[int]) -> int:
    def build(recovery):
        tokens = [_Token() for _ in ids]
        ops = [commands.retry(i, recovery.next_seq + n, t)
               for n, (i, t) in enumerate(zip(ids, tokens))]
        return ops, tokens

    store, committed, failed = _run_offline(path, build)
    for t in committed:
        print(f"{store.handle(t.job.id)}: retried (queued again)")
    for _, message in failed:
        print(message, file=sys.stderr)
    return 1 if failed else 0


def _cancel_offline(path: str, ids: list[int]) -> int:
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
            todo.append(i)
        else:
            print(f"{store.handle(i)}: not queued (unknown or already finished)", file=sys.stderr)
            status = 1
    store.submit_many([commands.cancel(i, now) for i in todo])
    store.close()  # writes the commands; below we read back what is on disk
    try:
        with StoreReader(path) as reader:
            cancelled = [reader.state(i) == "cancelled" for i in todo]
    except StoreReadError as e:
        raise CliError(str(e)) from None
    for i, ok in zip(todo, cancelled):
        if ok:
            print(f"{store.handle(i)}: cancelled")
        else:
            print(f"{store.handle(i)}: could not be cancelled (see the log)", file=sys.stderr)
            status = 1
    return status


cmd_retry = _change_jobs("retry", _retry_offline)
cmd_cancel = _change_jobs("cancel", _cancel_offline)


def cmd_purge(args: argparse.Namespace) -> int:
    path = _database_path(args)
    seconds = args.older_than
    if Store.is_locked(path):
        return _change_online(args, "purge", [f"{seconds:g}"])

    def build(recovery):
        token = _Token()
        return [commands.purge(seconds, token)], [token]

    _, committed, failed = _run_offline(path, build)
    for _, message in failed:
        print(message, file=sys.stderr)
        return 1
    print(f"purged {committed[0].count} finished jobs")
    return 0


# -- gearmand import ----------------------------------------------------------------------

def read_gearmand_queue(path: str, table: str = "gearman_queue") -> list[tuple]:
    """gearmand's queued jobs (see :func:`atomnode.queue.gearmand.read_queue`)."""
    try:
        return gearmand.read_queue(path, table)
    except gearmand.GearmandQueueError as e:
        raise CliError(str(e)) from None


def import_into_store(path: str, jobs: list[tuple]) -> tuple[int, list[str]]:
    """Write jobs straight into the queue database (no daemon running)."""
    now = time.time()

    def build(recovery):
        tokens = [_Token() for _ in jobs]
        ops: list[tuple] = []
        for n, ((function, unique, prio, data, when), tok) in enumerate(zip(jobs, tokens)):
            ops.append(commands.insert(recovery.next_id + n, function, unique, data, prio, when,
                                       recovery.next_seq + n, now, tok))  # fmt: skip
        ops.append(commands.reserve_ids(recovery.next_id + len(jobs)))
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
            with GearmanClient(host, port, timeout=30) as client:
                created, errors = client.submit_background_many(jobs)
        except DaemonUnreachable as e:
            raise CliError(
                f"an atomnode daemon holds {path} but does not answer at {host}:{port} "
                f"({e.reason})"
            ) from None
        except ClientError as e:
            raise CliError(f"importing through the daemon at {host}:{port} failed: {e}") from None
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
    p.set_defaults(func=guard(cmd_list))

    p = jsub.add_parser("show", help="everything stored about one job")
    p.add_argument("handle", metavar="HANDLE", help="H:host:123 or 123")
    p.add_argument("--json", action="store_true")
    p.add_argument("--hostname", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=guard(cmd_show))

    p = jsub.add_parser("export", help="every stored job with its payload, as JSON or CSV")
    p.add_argument("--format", choices=EXPORT_FORMATS, default="json")
    p.add_argument("--state", choices=STATES)
    p.add_argument("--function", metavar="F", help="function name, or an AtoM job class")
    p.add_argument("--output", "-o", metavar="FILE", help="write to FILE (default: stdout)")
    p.add_argument("--hostname", help=argparse.SUPPRESS)
    _common(p)
    p.set_defaults(func=guard(cmd_export))

    p = jsub.add_parser("retry", help="queue failed or cancelled jobs again")
    p.add_argument("handles", nargs="+", metavar="HANDLE")
    _common(p)
    p.set_defaults(func=guard(cmd_retry))

    p = jsub.add_parser("cancel", help="cancel queued jobs")
    p.add_argument("handles", nargs="+", metavar="HANDLE")
    _common(p)
    p.set_defaults(func=guard(cmd_cancel))

    p = jsub.add_parser("purge", help="delete finished jobs from the history")
    p.add_argument("--older-than", type=duration_arg, required=True, metavar="AGE",
                   help="e.g. 7d, 12h, 30m, or seconds")  # fmt: skip
    _common(p)
    p.set_defaults(func=guard(cmd_purge))

    p = sub.add_parser("import-gearmand-queue",
                       help="import the queue of gearmand's libsqlite3 plugin")  # fmt: skip
    p.add_argument("file", metavar="FILE", help="gearmand's --libsqlite3-db file")
    p.add_argument("--table", default="gearman_queue", help="gearmand's --libsqlite3-table")
    _common(p)
    p.set_defaults(func=guard(cmd_import))

