"""``atomnode-host``: the admin-protocol extension worker hosts use (issue 14).

A worker host runs atomnode with pools and no listener, its workers connected to this
server. To drain before stop and recycle only when idle, as on one box, it must know which
of its workers' connections hold which job, and ask that one of them get no more jobs.
Every command here acts on the *caller's own* connections: those whose peer address is
the caller's address. See docs/protocol.md ("Worker hosts") for the wire format.

    atomnode-host conns            -> one JSON line (this host's connections), then "."
    atomnode-host drain ID...      -> OK | ERR ...   (no more jobs for these connections)
    atomnode-host release ID...    -> OK | ERR ...   (undo drain)
    atomnode-host report JSON      -> OK | ERR ...   (the host's pools, for status/console)

gearmand answers ``ERR UNKNOWN_COMMAND`` to all of them, which is how a worker host knows
it talks to a server without job awareness. Plain Gearman clients never send them.

Permission: ``drain``/``release`` change state, so they follow the operator rule (loopback;
see :func:`is_operator`), with one exception: any peer the ``allow:`` list admitted may
drain and release the connections that come from its own address, and nothing else.
"""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING, Any

from ..system.access import is_loopback
from .broker import Conn

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("atomnode.admin")

#: Largest report accepted (an admin line is at most 64 KiB anyway).
MAX_REPORT = 60000
#: A host that has neither reported nor kept a connection for this long is forgotten.
FORGET_AFTER = 300.0


def _err(code: str, text: str) -> bytes:
    return f"ERR {code} {text.replace(' ', '+')}\r\n".encode()


def is_operator(server: Server, conn: Conn) -> bool:
    """May this connection run state-changing admin commands on any connection?
    (Loopback; the admin's operator rule passes its own answer to :func:`command`.)"""
    return is_loopback(conn.peer)


#: ``atomnode-host`` subcommands that change state (on the caller's own connections).
STATE_CHANGING = frozenset({b"drain", b"release"})


def exempt_from_operator_rule(words: list[bytes]) -> bool:
    """The one exception to the admin protocol's operator rule (issue 14): a peer the
    ``allow:`` list admitted may run ``atomnode-host`` (drain and release act on its own
    connections only: :func:`command` refuses any other id), and nothing else."""
    return bool(words) and words[0].lower() == b"atomnode-host"


def own_connections(server: Server, conn: Conn) -> list[Conn]:
    """The connections from the caller's address, the caller itself excepted."""
    return [c for c in server.broker.conns.values() if c.peer == conn.peer and c is not conn]


def conn_info(c: Conn) -> dict[str, Any]:
    return {
        "id": c.id,
        "peer": [c.peer, c.peer_port],
        "local": list(c.local),
        "client_id": c.client_id.decode("utf-8", "replace"),
        "abilities": [f.name.decode("utf-8", "replace") for f in c.functions],
        "jobs": [h.decode("utf-8", "replace") for h in c.held],
        "jobs_done": c.jobs_done,
        "draining": c.draining,
    }


def command(server: Server, conn: Conn, args: list[bytes], *,
            operator: bool | None = None) -> bytes:
    """Answer one ``atomnode-host`` line (``args`` are the words after the verb).
    ``operator``: whether the caller may act on any connection (default: loopback)."""
    if operator is None:
        operator = is_operator(server, conn)
    if not args:
        return _err("INVALID_ARGUMENTS", "usage: atomnode-host conns|drain|release|report")
    sub = args[0].lower()
    if sub == b"conns":
        rows = [conn_info(c) for c in own_connections(server, conn)]
        return json.dumps(rows, separators=(",", ":")).encode() + b"\n.\n"
    if sub in (b"drain", b"release"):
        if len(args) < 2:
            return _err("INVALID_ARGUMENTS", f"usage: atomnode-host {sub.decode()} ID...")
        targets = []
        for a in args[1:]:
            try:
                cid = int(a)
            except ValueError:
                return _err("INVALID_ARGUMENTS", f"{a.decode('utf-8', 'replace')} is not a "
                            "connection id")
            c = server.broker.conns.get(cid)
            if c is None:
                continue  # gone already: nothing to drain, nothing running
            if c.peer != conn.peer and not operator:
                return _err("PERMISSION_DENIED", f"connection {cid} is not from {conn.peer}; "
                            "a host may only drain its own connections")
            targets.append(c)
        for c in targets:
            c.draining = sub == b"drain"
            if not c.draining and c.sleeping and not c.noop_sent:
                # Released: wake it if work waits, as a new CAN_DO would.
                server.broker.wake_worker(c)
        return b"OK\r\n"
    if sub == b"report":
        raw = b" ".join(args[1:])
        if len(raw) > MAX_REPORT:
            return _err("INVALID_ARGUMENTS", "report too large")
        try:
            doc = json.loads(raw)
        except ValueError:
            return _err("INVALID_ARGUMENTS", "report is not JSON")
        pools = _clean_pools(doc.get("pools", []) if isinstance(doc, dict) else None)
        if pools is None:
            return _err("INVALID_ARGUMENTS", "report must be an object with a pools list")
        server.broker.report_host(conn.peer, {
            "host": str(doc.get("host") or conn.peer)[:200],
            "pools": pools,
            "aware": bool(doc.get("aware", True)),
        })
        return b"OK\r\n"
    return _err("UNKNOWN_COMMAND", "unknown atomnode-host command")


_POOL_FIELDS = {"name": str, "count": int}
_WORKER_FIELDS = {"pid": int, "state": str, "job": str, "jobs_done": int, "rss_mb": float,
                  "uptime": float, "detail": str}


def _clean_pools(raw: Any) -> list[dict[str, Any]] | None:
    """A report's pools reduced to the known fields with the expected types (a peer's
    JSON is shown by status, the CLI and the console: no surprises in it). None if the
    shape is wrong."""
    if not isinstance(raw, list):
        return None

    def pick(d: Any, fields: dict[str, type]) -> dict[str, Any] | None:
        if not isinstance(d, dict):
            return None
        out: dict[str, Any] = {}
        for k, t in fields.items():
            v = d.get(k)
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                v = float(v)
            out[k] = v if isinstance(v, t) and not isinstance(v, bool) else None
            if isinstance(out[k], str):
                out[k] = out[k][:300]
        return out

    pools = []
    for p in raw[:100]:
        pool = pick(p, _POOL_FIELDS)
        if pool is None:
            return None
        workers = p.get("workers", [])
        if not isinstance(workers, list):
            return None
        pool["workers"] = [w for w in (pick(x, _WORKER_FIELDS) for x in workers[:1000]) if w]
        pools.append(pool)
    return pools


def remote_hosts(server: Server) -> list[dict[str, Any]]:
    """Other hosts' workers, for ``atomnode status``: every non-loopback address with
    worker connections, plus what each worker host reported about its pools."""
    broker = server.broker
    now = broker.clock()
    by_ip: dict[str, list[Conn]] = {}
    for c in broker.conns.values():
        if c.functions and not _local(server, c):
            by_ip.setdefault(c.peer, []).append(c)
    out = []
    for ip in sorted(set(by_ip) | set(broker.remote_hosts)):
        rep = broker.remote_hosts.get(ip)
        conns = by_ip.get(ip, [])
        if rep is not None and not conns and now - rep["reported_at"] > FORGET_AFTER:
            del broker.remote_hosts[ip]
            continue
        out.append({
            "address": ip,
            "host": rep["host"] if rep else None,
            "reported": round(now - rep["reported_at"], 1) if rep else None,
            "aware": rep["aware"] if rep else False,
            "workers": len(conns),
            "busy": sum(1 for c in conns if c.held),
            "draining": sum(1 for c in conns if c.draining),
            "pools": rep["pools"] if rep else [],
        })
    return out


def _local(server: Server, c: Conn) -> bool:
    """A connection from this host: loopback, or an in-process worker (its address is
    ``local``: Server.attach_local)."""
    return c.peer == "local" or is_loopback(c.peer)


__all__ = ["STATE_CHANGING", "command", "conn_info", "exempt_from_operator_rule",
           "is_operator", "own_connections", "remote_hosts"]
