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
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import __version__
from . import hosts
from .broker import PENDING, RUNNING, SCHEDULED, Conn
from ..system.names import strip_atom_prefix

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
        verb = words[0].lower()
        argc = len(words)
        broker = server.broker
        if verb == b"workers":
            return self.workers(server)
        if verb == b"status":
            out = [
                b"%s\t%d\t%d\t%d\n" % (fn.name, fn.total, fn.running, len(fn.workers))
                for fn in broker.functions.values()
            ]
            out.append(b".\n")
            return b"".join(out)
        if verb == b"prioritystatus":
            out = []
            for fn in broker.functions.values():
                h, n, lo = fn.counts_by_priority()
                out.append(b"%s\t%d\t%d\t%d\t%d\n" % (fn.name, h, n, lo, len(fn.workers)))
            out.append(b".\n")
            return b"".join(out)
        if verb == b"cancel" and argc >= 3:
            if argc == 3 and words[1].lower() == b"job":
                return OK if broker.cancel(words[2]) else b"ERR UNKNOWN_JOB\r\n"
            return b"ERR UNKNOWN_ERROR\r\n"
        if verb == b"show" and argc >= 2:
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
        if verb == b"create":
            if argc == 3 and words[1].lower() == b"function":
                broker.function(words[2])
                return OK
            return _err_args(words[0])
        if verb == b"drop":
            if argc == 3 and words[1].lower() == b"function":
                err = broker.drop_function(words[2])
                return OK if err is None else b"ERR " + err.encode() + b"\r\n"
            return _err_args(words[0])
        if verb == b"maxqueue":
            if argc == 1:
                return _err_args(words[0])
            fn = broker.functions.get(words[1])
            if fn is not None:
                try:
                    n = int(words[2]) if argc > 2 else 0
                except ValueError:
                    n = 0
                fn.max_queue = max(n, 0)
            return OK
        if verb == b"getpid":
            return b"OK %d\n" % os.getpid()
        if verb == b"verbose":
            return b"OK " + self.verbose.encode() + b"\n"
        if verb == b"version":
            return f"OK {GEARMAND_VERSION}-atomnode-{__version__}\n".encode()
        if verb == b"shutdown":
            peer = server.peers.get(conn)
            if peer is None or not peer.is_loopback:
                return b"ERR PERMISSION_DENIED shutdown+is+accepted+only+from+loopback\r\n"
            if argc == 1 or (argc == 2 and words[1].lower() == b"graceful"):
                graceful = argc == 2
                log.warning("%s shutdown requested by admin connection from %s",
                            "graceful" if graceful else "immediate", conn.peer)
                if self.on_shutdown is not None:
                    self.on_shutdown(graceful)
                return OK
            return _err_args(words[0])
        if verb == b"atomnode-status":
            return json.dumps(self.status_document(server), separators=(",", ":")).encode() + (
                b"\n.\n"
            )
        if verb == b"atomnode-host":
            return hosts.command(server, conn, words[1:])
        if verb == b"atomnode-jobs":
            if argc >= 2 and words[1].lower() == b"list":
                return self.jobs_listing(server, words[2:])
            if self.jobs_command is None:
                return b"ERR UNAVAILABLE no+durable+queue\r\n"
            return self.jobs_command(conn, words[1:])
        return _unknown(words[0])

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
            job_class = strip_atom_prefix(name)
            functions.append({
                "name": name,
                "job_class": job_class,  # AtoM's class name, without the site prefix
                "site": name[: -len(job_class) - 1] if job_class != name else None,
                "queued": fn.queued,
                "running": fn.running,
                "workers": len(fn.workers),
                "max_queue": fn.max_queue,
            })
        doc: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "uptime": round(time.time() - server.started_at, 1),
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
            "concurrency": [
                {"name": g.name, "max": g.limit, "running": g.running,
                 "functions": list(g.patterns)}
                for g in broker.groups
            ],
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
    def jobs_listing(server: Server, args: list[bytes]) -> bytes:
        """``atomnode-jobs list [json]``: live jobs with function, state, age, attempts,
        worker. Text: tab-separated lines then ``.``; ``json``: one JSON line then ``.``."""
        broker = server.broker
        now = time.time()
        rows = []
        for j in broker.jobs.values():
            rows.append({
                "handle": j.handle.decode(),
                "function": j.function.name.decode("utf-8", "replace"),
                "unique": j.unique.decode("utf-8", "replace"),
                "state": j.state,
                "priority": ("high", "normal", "low")[j.priority],
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


__all__ = ["OK", "Admin"]
