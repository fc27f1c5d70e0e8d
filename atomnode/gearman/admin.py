"""The text admin protocol: gearmand 1.1.20's commands, byte for byte, plus extras.

gearmand's commands keep gearmand's exact output (OK/ERR lines end with CRLF, listings
with LF and a final ``.``); AtoM parses ``status`` strictly and gearadmin stops reading
after 5 ms of silence, so every reply is returned as one bytes object and written in one
send. atomnode's own commands use names gearmand does not have (``atomnode-...``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from . import hosts
from ..system.names import split_atom_prefix
from ..system.access import is_loopback
from .broker import PENDING, PRIORITY_NAMES, RUNNING, SCHEDULED, Conn

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("atomnode.admin")

OK = b"OK\r\n"
GEARMAND_VERSION = "1.1.20"


def _err_args(verb: bytes) -> bytes:
    return b"ERR INVALID_ARGUMENTS An+incomplete+set+of+arguments+was+sent+to+this+command+" + (
        verb + b"\r\n"
    )


def _unknown(verb: bytes) -> bytes:
    return b"ERR UNKNOWN_COMMAND Unknown+server+command" + verb + b"\r\n"


class Admin:
    """Answers admin lines for one daemon. Hooks let the daemon add what only it knows
    (pools, handlers, store health, job retry/purge, shutdown)."""

    def __init__(
        self,
        *,
        verbose: str = "ERROR",
        extra_status: Callable[[], dict[str, Any]] | None = None,
        jobs_command: Callable[[Conn, list[bytes]], bytes] | None = None,
        on_shutdown: Callable[[bool], None] | None = None,
    ):
        self.verbose = verbose
        self.extra_status = extra_status
        self.jobs_command = jobs_command
        self.on_shutdown = on_shutdown

    def __call__(self, server: Server, conn: Conn, line: bytes) -> bytes:
        words = line.split()
        if not words:
            return _unknown(b"")
        command = _COMMANDS.get(words[0].lower())
        if command is None:
            return _unknown(words[0])
        return command(self, server, conn, words)

    # One method per verb, all (self, server, conn, words) with words[0] the verb as sent;
    # the table at the end of the module maps each verb to one of them.
    def _workers(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return self.workers(server)

    @staticmethod
    def _capable(broker: Any, fn: Any) -> int:
        """Capable workers: those connected now, or more while a healthy pool that serves
        the function replaces one (docs/workers.md, "What status reports")."""
        if broker.standby is None:
            return len(fn.workers)
        return max(len(fn.workers), broker.standby(fn.name))

    def _status(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        broker = server.broker
        out = [
            b"%s\t%d\t%d\t%d\n" % (fn.name, fn.total, fn.running, self._capable(broker, fn))
            for fn in broker.functions.values()
        ]
        out.append(b".\n")
        return b"".join(out)

    def _priority_status(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        out = []
        for fn in server.broker.functions.values():
            h, n, lo = fn.counts_by_priority()
            capable = self._capable(server.broker, fn)
            out.append(b"%s\t%d\t%d\t%d\t%d\n" % (fn.name, h, n, lo, capable))
        out.append(b".\n")
        return b"".join(out)

    def _cancel(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        argc = len(words)
        if argc < 3:
            return _unknown(words[0])
        if argc == 3 and words[1].lower() == b"job":
            return OK if server.broker.cancel(words[2]) else b"ERR UNKNOWN_JOB\r\n"
        return b"ERR UNKNOWN_ERROR\r\n"

    def _show(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        argc = len(words)
        if argc < 2:
            return _unknown(words[0])
        broker = server.broker
        if argc == 3 and words[1].lower() == b"unique" and words[2].lower() == b"jobs":
            # As gearmand: every job's unique, an empty line for an empty unique.
            out = [j.unique + b"\n" for j in broker.jobs.values() if j.state is not PENDING]
            out.append(b".\n")
            return b"".join(out)
        if argc == 2 and words[1].lower() == b"jobs":
            out = []
            for j in broker.jobs.values():
                if j.state is PENDING:
                    continue
                retries = j.attempts - (1 if j.state is RUNNING else 0)
                out.append(b"%s\t%d\t0\t%d\n" % (j.handle, retries, 1 if (
                    j.background and broker.durable) else 0))
            out.append(b".\n")
            return b"".join(out)
        return b"ERR UNKNOWN_SHOW_ARGUMENTS\r\n"

    def _create(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        if len(words) == 3 and words[1].lower() == b"function":
            server.broker.function(words[2])
            return OK
        return _err_args(words[0])

    def _drop(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        if len(words) == 3 and words[1].lower() == b"function":
            err = server.broker.drop_function(words[2])
            return OK if err is None else b"ERR " + err.encode() + b"\r\n"
        return _err_args(words[0])

    def _maxqueue(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        argc = len(words)
        if argc == 1:
            return _err_args(words[0])
        fn = server.broker.functions.get(words[1])
        if fn is not None:
            try:
                n = int(words[2]) if argc > 2 else 0
            except ValueError:
                n = 0
            fn.max_queue = max(n, 0)
        return OK

    def _getpid(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return b"OK %d\n" % os.getpid()

    def _verbose(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return b"OK " + self.verbose.encode() + b"\n"

    def _version(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return f"OK {GEARMAND_VERSION}-atomnode-{__version__}\n".encode()

    def _shutdown(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        if not is_loopback(conn.peer):
            return b"ERR PERMISSION_DENIED shutdown+is+accepted+only+from+loopback\r\n"
        argc = len(words)
        if argc == 1 or (argc == 2 and words[1].lower() == b"graceful"):
            graceful = argc == 2
            log.warning("%s shutdown requested by admin connection from %s",
                        "graceful" if graceful else "immediate", conn.peer)
            if self.on_shutdown is not None:
                self.on_shutdown(graceful)
            return OK
        return _err_args(words[0])

    def _atomnode_status(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return json.dumps(self.status_document(server), separators=(",", ":")).encode() + (
            b"\n.\n"
        )

    def _atomnode_host(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        return hosts.command(server, conn, words[1:])

    def _atomnode_jobs(self, server: Server, conn: Conn, words: list[bytes]) -> bytes:
        if len(words) >= 2 and words[1].lower() == b"list":
            return self.jobs_listing(server, words[2:])
        if self.jobs_command is None:
            return b"ERR UNAVAILABLE no+durable+queue\r\n"
        return self.jobs_command(conn, words[1:])

    # ------------------------------------------------------------ listings
    @staticmethod
    def workers(server: Server) -> bytes:
        out = []
        for conn in server.broker.conns.values():
            line = b"%d %s %s :" % (conn.fd, conn.peer.encode(), conn.client_id)
            if conn.functions:
                line += b"".join(b" " + fn.name for fn in conn.functions)
            out.append(line + b"\n")
        out.append(b".\n")
        return b"".join(out)

    def status_document(self, server: Server) -> dict[str, Any]:
        """The JSON behind ``atomnode status`` (one line, then ``.``)."""
        broker = server.broker
        functions = []
        queued = running = 0
        for fn in broker.functions.values():
            queued += fn.queued
            running += fn.running
            name = fn.name.decode("utf-8", "replace")
            prefix, job_class = split_atom_prefix(name)
            functions.append({
                "name": name,
                "job_class": job_class,  # AtoM's class name, without the site prefix
                # the site key: md5 without its "-", or a 2.2 root without " - "
                "site": prefix.rstrip(" -") if prefix else None,
                "queued": fn.queued,
                "running": fn.running,
                "workers": len(fn.workers),
                "max_queue": fn.max_queue,
            })
        doc: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(broker.clock() - server.started_at, 1),
            "listen": [f"{h}:{p}" for h, p in server.bound],
            "queue": {
                "queued": queued,
                "scheduled": len([1 for j in broker.jobs.values() if j.state is SCHEDULED]),
                "running": running,
                "durable": broker.durable,
                "store_healthy": True,
                "store_error": None,
                "store_pending": 0,
            },
            "stats": dict(broker.stats),
            "connections": len(broker.conns),
            "functions": functions,
            "concurrency": self.concurrency_listing(broker),
            "pools": [],
            "handlers": [],
            "access": {
                "allow": [str(n) for n in getattr(server, "allow", ())],
                **(server.refusals.snapshot() if hasattr(server, "refusals") else {}),
            },
            "remote_hosts": hosts.remote_hosts(server),
        }
        if self.extra_status is not None:
            extra = self.extra_status()
            for k, v in extra.items():
                if isinstance(v, dict) and isinstance(doc.get(k), dict):
                    doc[k].update(v)
                else:
                    doc[k] = v
        return doc

    @staticmethod
    def concurrency_listing(broker: Any) -> list[dict[str, Any]]:
        """Each concurrency group in use (one per AtoM site unless it spans sites), and each
        configured group no function has joined yet."""
        out = []
        used = set()
        for g in broker.groups:
            used.add(g.name)
            item = {"name": g.name, "max": g.limit, "running": g.running,
                    "functions": list(g.patterns)}
            if g.site:
                item["site"] = g.site
            out.append(item)
        for name, patterns, limit, _span in broker.group_specs:
            if name not in used:
                out.append({"name": name, "max": limit, "running": 0, "functions": list(patterns)})
        return out

    @staticmethod
    def jobs_listing(server: Server, args: list[bytes]) -> bytes:
        """``atomnode-jobs list [json]``: live jobs with function, state, age, attempts,
        worker. Text: tab-separated lines then ``.``; ``json``: one JSON line then ``.``."""
        broker = server.broker
        now = broker.clock()
        rows = []
        for j in broker.jobs.values():
            rows.append({
                "handle": j.handle.decode(),
                "function": j.function.name.decode("utf-8", "replace"),
                "unique": j.unique.decode("utf-8", "replace"),
                "state": j.state,
                "priority": PRIORITY_NAMES[j.priority],
                "background": j.background,
                "age": round(now - j.submitted_at, 3),
                "attempts": j.attempts,
                "worker": j.worker.client_id.decode("utf-8", "replace") if j.worker else None,
                "when": j.when or None,
            })
        if args and args[0].lower() == b"json":
            return json.dumps(rows, separators=(",", ":")).encode() + b"\n.\n"
        out = [
            "\t".join(str(r[k]) for k in ("handle", "function", "state", "priority", "age",
                                            "attempts", "worker")).encode() + b"\n"
            for r in rows
        ]
        out.append(b".\n")
        return b"".join(out)


#: Admin verb (lower case) -> handler.
_COMMANDS: dict[bytes, Callable[[Admin, Server, Conn, list[bytes]], bytes]] = {
    b"workers": Admin._workers,
    b"status": Admin._status,
    b"prioritystatus": Admin._priority_status,
    b"cancel": Admin._cancel,
    b"show": Admin._show,
    b"create": Admin._create,
    b"drop": Admin._drop,
    b"maxqueue": Admin._maxqueue,
    b"getpid": Admin._getpid,
    b"verbose": Admin._verbose,
    b"version": Admin._version,
    b"shutdown": Admin._shutdown,
    b"atomnode-status": Admin._atomnode_status,
    b"atomnode-host": Admin._atomnode_host,
    b"atomnode-jobs": Admin._atomnode_jobs,
}

__all__ = ["OK", "Admin"]
