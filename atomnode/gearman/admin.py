"""The text admin protocol: gearmand 1.1.20's commands, byte for byte, plus extras.

gearmand's commands keep gearmand's exact output (OK/ERR lines end with CRLF, listings
with LF and a final ``.``); AtoM parses ``status`` strictly and gearadmin stops reading
after 5 ms of silence, so every reply is returned as one bytes object and written in one
send -- except the listings of the whole queue (``show jobs``, ``show unique jobs``,
``atomnode-jobs list``), streamed in chunks (:meth:`Admin.stream`). atomnode's own
commands use names gearmand does not have (``atomnode-...``). Who may run what:
:meth:`Admin.permitted`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from .. import __version__
from . import hosts
from ..system import memory
from ..system.access import is_loopback, parse_networks, peer_allowed
from ..system.logs import Repeats
from ..system.names import split_atom_prefix
from .broker import PENDING, PRIORITY_NAMES, RUNNING, Conn

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


#: Commands that change state. ``atomnode-jobs`` changes state except ``list``.
STATE_CHANGING = frozenset({b"cancel", b"maxqueue", b"shutdown", b"create", b"drop"})


def changes_state(words: list[bytes]) -> bool:
    """True for an admin command that changes state (see :data:`STATE_CHANGING`); every
    other command (status, workers, show jobs, version, ...) is read-only."""
    verb = words[0].lower()
    if verb == b"atomnode-jobs":
        return not (len(words) >= 2 and words[1].lower() == b"list")
    return verb in STATE_CHANGING


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
        operator_networks: Iterable[str] = (),
    ):
        self.verbose = verbose
        self.extra_status = extra_status
        self.jobs_command = jobs_command
        self.on_shutdown = on_shutdown
        #: Networks besides loopback allowed to change state (config ``operator_networks``).
        self.operator_networks = parse_networks(operator_networks)
        self._denied_log = Repeats(60.0)

    # ------------------------------------------------------------ who may do what
    def permitted(self, server: Server, conn: Conn, words: list[bytes]) -> bool:
        """THE access rule of the admin protocol, in one place.

        Read-only commands are open to every peer allowed to connect (``allow:``).
        Commands that change state (:func:`changes_state`) are accepted from loopback
        (and the local control socket) and from the configured ``operator_networks``;
        anything else is refused. ``atomnode-host`` (a worker host draining or releasing
        its own connections) checks its own rule in :mod:`.hosts`. Extend the rule here.
        """
        if hosts.exempt_from_operator_rule(words) or not changes_state(words):
            return True
        return self.is_operator(conn)

    def is_operator(self, conn: Conn) -> bool:
        """The peer is loopback (or the local control socket) or in operator_networks."""
        return self.is_operator_address(conn.peer)

    def is_operator_address(self, ip: str) -> bool:
        """The operator rule for an address alone (the web console's peers use it too)."""
        return is_loopback(ip) or peer_allowed(ip, self.operator_networks)

    def _deny(self, conn: Conn, words: list[bytes]) -> bytes:
        verb = words[0].decode("utf-8", "replace")
        if self._denied_log.should_log(conn.peer):
            more = self._denied_log.suppressed
            log.warning("refused admin command %r from %s: state-changing commands are "
                        "accepted only from loopback or operator_networks%s",
                        b" ".join(words[:3]).decode("utf-8", "replace")[:100], conn.peer,
                        f" ({more} more refused since)" if more else "")
        return (b"ERR PERMISSION_DENIED " + verb.encode() +
                b"+is+accepted+only+from+loopback+or+operator_networks\r\n")

    def __call__(self, server: Server, conn: Conn, line: bytes) -> bytes:
        """The whole reply to one admin line, as one bytes object."""
        reply = self.stream(server, conn, line)
        return reply if isinstance(reply, bytes) else b"".join(reply)

    def stream(self, server: Server, conn: Conn, line: bytes) -> bytes | Iterator[bytes]:
        """The reply to one admin line: bytes, or for listings whose size grows with the
        queue (``show jobs``, ``show unique jobs``, ``atomnode-jobs list``) an iterator
        of chunks (each made in about LISTING_CHUNK_SECONDS), which the server pulls one
        per round while the peer reads (so one listing of a deep queue neither stalls
        the workers nor piles up in memory). The listing is of the jobs live when the
        first chunk is made."""
        words = line.split()
        if not words:
            return _unknown(b"")
        command = _COMMANDS.get(words[0].lower())
        if command is None:
            return _unknown(words[0])
        if not self.permitted(server, conn, words):
            return self._deny(conn, words)
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

    def _show(self, server: Server, conn: Conn, words: list[bytes]
              ) -> bytes | Iterator[bytes]:
        argc = len(words)
        if argc < 2:
            return _unknown(words[0])
        broker = server.broker
        if argc == 3 and words[1].lower() == b"unique" and words[2].lower() == b"jobs":
            # As gearmand: every job's unique, an empty line for an empty unique.
            return _listing(broker, _unique_row, b"", b".\n")
        if argc == 2 and words[1].lower() == b"jobs":
            durable = broker.durable
            return _listing(broker, lambda j: _job_row(j, durable), b"", b".\n")
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
        return hosts.command(server, conn, words[1:], operator=self.is_operator(conn))

    def _atomnode_jobs(self, server: Server, conn: Conn, words: list[bytes]
                       ) -> bytes | Iterator[bytes]:
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
                "scheduled": broker.scheduled_count,
                "running": running,
                "durable": broker.durable,
                "store_healthy": True,
                "store_error": None,
                "store_pending": 0,
            },
            "stats": dict(broker.stats),
            "connections": len(broker.conns),
            "buffers": {
                # Bytes held for peers: replies not read yet, unfinished input packets.
                "output": getattr(server, "out_total", 0),
                "input": getattr(server, "in_total", 0),
                "output_limit": getattr(server, "max_output_total", None),
                "input_limit": getattr(server, "max_input_total", None),
                "rss": memory.rss_bytes(),
            },
            "loop": {
                # CPU of the longest I/O round, and rounds over 20 ms: what one peer's
                # requests may delay everybody else's.
                "longest_round_ms": round(getattr(server, "longest_round", 0.0) * 1000, 2),
                "slow_rounds": getattr(server, "slow_rounds", 0),
                # The busy poll (config busy_poll): waits it caught the next input in,
                # and those it ran out of (each spent busy_poll of CPU in vain).
                "busy_poll_ms": round(getattr(server, "busy_poll", 0.0) * 1000, 3),
                "busy_poll_hits": getattr(server, "busy_hits", 0),
                "busy_poll_misses": getattr(server, "busy_misses", 0),
            },
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
    def jobs_listing(server: Server, args: list[bytes]) -> Iterator[bytes]:
        """``atomnode-jobs list [json]``: live jobs with function, state, age, attempts,
        worker. Text: tab-separated lines then ``.``; ``json``: one JSON line (an array)
        then ``.``."""
        broker = server.broker
        now = broker.clock()
        if args and args[0].lower() == b"json":
            return _listing(broker, lambda j: _json_row(j, now), b"[", b"]\n.\n",
                            all_states=True, separator=b",")
        return _listing(broker, lambda j: _text_row(j, now), b"", b".\n", all_states=True)


#: A chunk of a streamed listing holds at most this many jobs, and is cut earlier once
#: it took LISTING_CHUNK_SECONDS to make (JSON rows cost ten times text rows).
LISTING_CHUNK = 4096
LISTING_CHUNK_SECONDS = 0.002


def _listing(broker: Any, row: Callable[[Any], bytes], head: bytes, tail: bytes, *,
             all_states: bool = False, separator: bytes = b"") -> Iterator[bytes]:
    """Chunks of ``head``, one ``row(job)`` per live job, ``tail`` (see Admin.stream).

    The jobs are taken when the first chunk is made (a list of references: 8 bytes a
    job); a job that ended since is still listed, as it was."""
    clock = time.perf_counter
    started = clock()
    jobs = [j for j in broker.jobs.values() if all_states or j.state is not PENDING]
    out = [head]
    n = 0
    for j in jobs:
        if separator and n:
            out.append(separator)
        out.append(row(j))
        n += 1
        if not n & 31 and (len(out) >= LISTING_CHUNK
                           or clock() - started > LISTING_CHUNK_SECONDS):
            yield b"".join(out)
            out = []
            started = clock()
    out.append(tail)
    yield b"".join(out)


def _unique_row(j: Any) -> bytes:
    return j.unique + b"\n"


def _job_row(j: Any, durable: bool) -> bytes:
    retries = j.attempts - (1 if j.state is RUNNING else 0)
    return b"%s\t%d\t0\t%d\n" % (j.handle, retries, 1 if j.background and durable else 0)


def _row_dict(j: Any, now: float) -> dict[str, Any]:
    return {
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
    }


def _json_row(j: Any, now: float) -> bytes:
    return json.dumps(_row_dict(j, now), separators=(",", ":")).encode()


def _text_row(j: Any, now: float) -> bytes:
    r = _row_dict(j, now)
    return "\t".join(str(r[k]) for k in ("handle", "function", "state", "priority", "age",
                                          "attempts", "worker")).encode() + b"\n"


#: Admin verb (lower case) -> handler.
_COMMANDS: dict[bytes, Callable[[Admin, Server, Conn, list[bytes]], Any]] = {
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
