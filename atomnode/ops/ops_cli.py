"""Operator subcommands: status, submit, check-config, atom-config, doctor.

Commands that need the daemon talk to it over its admin port (the first ``listen`` address
of the configuration unless ``--host``/``--port`` say otherwise). Exit codes: 0 ok,
1 failure, 2 usage (argparse).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any, TextIO


from .client import (
    AdminClient,
    ClientError,
    GearmanClient,
    GearmanError,
    JobException,
    JobFailed,
)
from ..system.access import listen_problem
from .common import DEFAULT_HOST, DEFAULT_PORT, CliError, daemon_address, format_table, guard
from ..system.values import format_duration
from ..system.config import (
    Config,
    ConfigError,
    control_socket_path,
    format_config,
    load_config,
)

# =========================================================================== daemon address


def _daemon_address(args: argparse.Namespace, err: TextIO) -> tuple[str, int, Config | None]:
    """Where the daemon's admin port is: --host/--port, else the config's first listen."""
    cfg: Config | None = None
    try:
        cfg = load_config(getattr(args, "config", None))
    except ConfigError as e:
        if getattr(args, "config", None):
            raise
        print(f"atomnode: warning: ignoring the invalid configuration:\n{e}", file=err)
    host, port = DEFAULT_HOST, DEFAULT_PORT
    if cfg is not None and not cfg.listen:
        # A worker host: no Gearman listener, admin commands on the control socket.
        host, port = control_socket_path(cfg), 0
    elif cfg is not None:
        host, port = daemon_address(cfg.listen)
    if getattr(args, "host", None):
        host = args.host
    if getattr(args, "port", None):
        port = args.port
    return host, port, cfg


def _add_address_args(p: argparse.ArgumentParser, config: bool = True) -> None:
    if config:
        p.add_argument(
            "--config",
            metavar="FILE",
            help="configuration file (default: $ATOMNODE_CONFIG or /etc/atomnode/atomnode.yml)",
        )
    p.add_argument(
        "--host", help="daemon address (default: the configuration's first listen address)"
    )
    p.add_argument(
        "--port", type=int, help="daemon port (default: from the configuration, else 4730)"
    )


# =========================================================================== status


def _split_status(lines: Sequence[str]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        parts = line.split("\t")
        if len(parts) < 4:
            continue
        try:
            total, running, workers = int(parts[1]), int(parts[2]), int(parts[3])
        except ValueError:
            continue
        out.append(
            {
                "name": parts[0],
                "queued": max(total - running, 0),
                "running": running,
                "workers": workers,
                "max_queue": None,
            }
        )
    return out


def fetch_status(client: AdminClient) -> dict[str, Any]:
    """The daemon's state as ``atomnode-status`` JSON; from ``status``/``workers`` if the
    daemon does not know that command (then ``"degraded": true``)."""
    lines = client.command("atomnode-status")
    if lines and not lines[0].startswith("ERR"):
        try:
            data = json.loads(lines[0])
            if isinstance(data, dict):
                data.setdefault("degraded", False)
                return data
        except ValueError:
            pass
    functions = _split_status(client.command("status"))
    connections = client.command("workers")
    return {
        "degraded": True,
        "version": None,
        "pid": None,
        "uptime": None,
        "queue": {
            "queued": sum(f["queued"] for f in functions),
            "running": sum(f["running"] for f in functions),
            "failed": None,
            "store_healthy": None,
            "store_error": None,
        },
        "functions": functions,
        "pools": [],
        "handlers": [],
        "connections": [c for c in connections if not c.startswith("ERR")],
    }


def render_status(data: dict[str, Any]) -> str:
    """The human-readable form of :func:`fetch_status`'s result."""
    out: list[str] = []
    q = data.get("queue") or {}
    if data.get("degraded"):
        out.append(
            "atomnode (this daemon does not answer atomnode-status: pool details unavailable)"
        )
    else:
        out.append(
            f"atomnode {data.get('version') or '?'}, pid {data.get('pid') or '?'}, "
            f"up {format_duration(data.get('uptime'))}"
        )
    store = ""
    if q.get("store_healthy") is False:
        store = f", STORE FAILING: {q.get('store_error') or 'unknown error'}"
    elif q.get("store_healthy"):
        store = ", store healthy"
    if q.get("store_damage"):
        store += f", FILE DAMAGED: {q['store_damage']}"
    if q.get("store_incident"):
        store += f" (INCIDENT: {q['store_incident']})"
    failed = "" if q.get("failed") is None else f", {q.get('failed')} failed"
    out.append(f"queue: {q.get('queued', 0)} queued, {q.get('running', 0)} running{failed}{store}")
    access = data.get("access") or {}
    if access.get("error"):
        out.append("ERROR: serving loopback only: " + str(access["error"]))
    if access.get("refused"):
        out.append(f"refused {access['refused']} connection(s) from hosts not in allow:")
    for link in (data.get("worker_host") or {}).get("servers") or []:
        if link.get("error"):
            out.append(f"server {link.get('server')}: {link.get('error')}")
        else:
            out.append(f"server {link.get('server')}: connected, job awareness "
                       f"{'on' if link.get('aware') else 'off'}, "
                       f"{link.get('connections')} connection(s) of this host")
    out.append("")
    funcs = data.get("functions") or []
    if funcs:
        out.append(
            format_table(
                ["FUNCTION", "QUEUED", "RUNNING", "WORKERS", "MAX QUEUE"],
                [
                    [
                        f.get("name"),
                        f.get("queued"),
                        f.get("running"),
                        f.get("workers"),
                        f.get("max_queue") or "-",
                    ]
                    for f in funcs
                ],
            )
        )
    else:
        out.append("no functions registered")
    pools = data.get("pools") or []
    if pools:
        out.append("")
        rows = []
        for p in pools:
            workers = p.get("workers") or []
            if not workers:
                rows.append(
                    [
                        p.get("name"),
                        "-",
                        "no workers",
                        "-",
                        "-",
                        "-",
                        "-",
                        f"count {p.get('count')}",
                    ]
                )
            for w in workers:
                rows.append(
                    [
                        p.get("name"),
                        w.get("pid"),
                        w.get("state"),
                        w.get("job") or "-",
                        w.get("jobs_done"),
                        "-" if w.get("rss_mb") is None else f"{w.get('rss_mb'):.0f}",
                        format_duration(w.get("uptime")),
                        w.get("detail") or "",
                    ]
                )
        out.append(
            format_table(
                ["POOL", "PID", "STATE", "JOB", "DONE", "RSS MB", "UPTIME", "DETAIL"], rows
            )
        )
    hosts = data.get("remote_hosts") or []
    if hosts:
        out.append("")
        rows = []
        for h in hosts:
            name = h.get("host") or h.get("address")
            where = f"{name} ({h.get('address')})" if h.get("host") else name
            pools_ = h.get("pools") or []
            if not pools_:
                rows.append([where, "-", "-", f"{h.get('workers')} worker connection(s)",
                             "-", "-", "not reported (not an atomnode worker host)"])
            for p in pools_:
                for w in p.get("workers") or []:
                    rows.append([where, p.get("name"), w.get("pid"), w.get("state"),
                                 w.get("job") or "-", w.get("jobs_done"),
                                 w.get("detail") or ""])
        out.append(format_table(["REMOTE HOST", "POOL", "PID", "STATE", "JOB", "DONE", "DETAIL"],
                          rows))
    handlers = data.get("handlers") or []
    if handlers:
        out.append("")
        out.append(
            format_table(
                ["HANDLER", "CONCURRENCY", "RUNNING"],
                [[h.get("function"), h.get("concurrency"), h.get("running")] for h in handlers],
            )
        )
    for r in data.get("runners") or []:
        out.append("")
        head = f"runner {r.get('name')} ({r.get('root')}): one process per job"
        if r.get("problem"):
            head += f"; CANNOT RUN JOBS: {r['problem']} (no worker registered)"
        st = r.get("startup_ms") or {}
        if st.get("p50") is not None:
            head += f"; start-up p50 {st['p50']:g} ms"
        out.append(head)
        out.append(format_table(
            ["SLOT", "STATE", "JOB", "ATOM JOB", "PID", "RSS MB", "RUNNING S"],
            [[i, s.get("state"), s.get("job") or "-", s.get("atom_job_id") or "-",
              s.get("pid") or "-", s.get("rss_mb") if s.get("rss_mb") is not None else "-",
              s.get("running") if s.get("running") is not None else "-"]
             for i, s in enumerate(r.get("slots") or [])]))
        out.append(f"done {r.get('done', 0)}, failed {r.get('failed', 0)} (timed out "
                   f"{r.get('timed_out', 0)}, over memory {r.get('memory', 0)}), requeued "
                   f"{r.get('requeued', 0)}")
    conns = data.get("connections")
    if isinstance(conns, list) and conns:  # from `workers` (older daemon)
        out.append("")
        out.append("connections (fd ip client-id : functions):")
        out.extend(f"  {c}" for c in conns)
    elif isinstance(conns, int):
        out.append("")
        out.append(f"{conns} client/worker connection(s)")
    return "\n".join(out) + "\n"


def _target(args: argparse.Namespace) -> tuple[str, int] | None:
    """The daemon's address, or None after saying why the configuration is unusable."""
    try:
        host, port, _ = _daemon_address(args, sys.stderr)
    except ConfigError as e:
        print(f"atomnode: invalid configuration:\n{e}", file=sys.stderr)
        return None
    return host, port


def cmd_status(args: argparse.Namespace) -> int:
    """``atomnode status``."""
    if (target := _target(args)) is None:
        return 1
    host, port = target
    try:
        with AdminClient(host, port, args.timeout) as client:
            data = fetch_status(client)
    except ClientError as e:
        print(f"atomnode: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        sys.stdout.write(render_status(data))
    return 0


# =========================================================================== submit


def cmd_submit(args: argparse.Namespace) -> int:
    """``atomnode submit FUNCTION [DATA | -]``."""
    if (target := _target(args)) is None:
        return 1
    host, port = target
    if args.data == "-":
        data = sys.stdin.buffer.read()
    else:
        data = (args.data or "").encode()
    out = sys.stdout.buffer

    def on_status(num: int, den: int) -> None:
        pct = f"{num * 100 // den}%" if den else "?%"
        print(f"{pct} ({num}/{den})", file=sys.stderr, flush=True)

    def on_data(chunk: bytes) -> None:
        out.write(chunk)
        out.flush()

    def on_warning(chunk: bytes) -> None:
        print(f"warning: {chunk.decode('utf-8', 'replace')}", file=sys.stderr, flush=True)

    try:
        with GearmanClient(host, port, timeout=args.timeout) as client:
            result = client.submit(
                args.function,
                data,
                unique=(args.unique or "").encode(),
                background=args.background,
                priority=args.priority,
                on_status=on_status,
                on_data=on_data,
                on_warning=on_warning,
            )
    except JobException as e:
        print(
            f"atomnode: job failed with an exception: {e.data.decode('utf-8', 'replace')}",
            file=sys.stderr,
        )
        return 1
    except JobFailed as e:
        print(f"atomnode: {e}", file=sys.stderr)
        return 1
    except GearmanError as e:
        print(f"atomnode: the server refused the job: {e.code}: {e.text}", file=sys.stderr)
        return 1
    except ClientError as e:
        print(f"atomnode: {e}", file=sys.stderr)
        return 1
    if isinstance(result, str):
        print(result)
    else:
        out.write(result)
        if result and not result.endswith(b"\n") and sys.stdout.isatty():
            out.write(b"\n")
        out.flush()
    return 0


# =========================================================================== check-config


def cmd_check_config(args: argparse.Namespace) -> int:
    """``atomnode check-config [FILE]``."""
    try:
        cfg = load_config(args.file)
    except ConfigError as e:
        raise CliError(f"the configuration is invalid:\n{e}") from None
    problem = listen_problem(cfg.listen, cfg.allow)
    if problem:
        raise CliError(f"the configuration is refused:\n{problem}")
    sys.stdout.write(format_config(cfg))
    if cfg.empty_file:
        print(f"atomnode: warning: {cfg.source} is empty (0 bytes, only comments or null): "
              "it means the embedded defaults, with no pools and no handlers; a running "
              "daemon refuses to reload from it while pools or handlers run",
              file=sys.stderr)
    print(f"configuration OK ({cfg.source or 'embedded defaults'})", file=sys.stderr)
    return 0


# =========================================================================== registration


def register(sub: argparse._SubParsersAction) -> None:
    """Add the operator subcommands to ``atomnode``'s parser."""
    p = sub.add_parser(
        "status", help="show functions, queues, pools and workers of the running daemon"
    )
    p.add_argument("--json", action="store_true", help="print the JSON the daemon returns")
    p.add_argument("--timeout", type=float, default=5.0, help=argparse.SUPPRESS)
    _add_address_args(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("submit", help="submit a job (foreground shows progress; or --background)")
    p.add_argument("function", help="function name")
    p.add_argument("data", nargs="?", help="payload; '-' reads it from stdin (default: empty)")
    p.add_argument("--background", "-b", action="store_true", help="queue it and print its handle")
    p.add_argument("--priority", choices=("high", "normal", "low"), default="normal")
    p.add_argument("--unique", "-u", help="unique id (jobs with the same one are coalesced)")
    p.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="give up after this many seconds without an answer",
    )
    _add_address_args(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser(
        "check-config", help="validate a configuration file and print the effective configuration"
    )
    p.add_argument(
        "file", nargs="?", help="default: $ATOMNODE_CONFIG or /etc/atomnode/atomnode.yml"
    )
    p.set_defaults(func=guard(cmd_check_config))
