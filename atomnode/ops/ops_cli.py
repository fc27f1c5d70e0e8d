"""Operator subcommands: status, submit, check-config, atom-config, doctor.

Commands that need the daemon talk to it over its admin port (the first ``listen`` address
of the configuration unless ``--host``/``--port`` say otherwise). Exit codes: 0 ok,
1 failure, 2 usage (argparse).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import yaml

from .client import (
    AdminClient,
    ClientError,
    DaemonUnreachable,
    GearmanClient,
    GearmanError,
    JobException,
    JobFailed,
)
from ..system.config import (
    Config,
    ConfigError,
    format_address,
    format_config,
    load_config,
    parse_address,
    strip_atom_prefix,
)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4730
#: AtoM's Net_Gearman client checks this port whatever gearman.yml says.
ATOM_CHECK_PORT = 4730

#: AtoM's job classes (config/gearman.yml worker_types in AtoM 2.x), used when the site's
#: gearman.yml has no worker_types.
ATOM_JOB_CLASSES = (
    "arFindingAidJob",
    "arInheritRightsJob",
    "arCalculateDescendantDatesJob",
    "arObjectMoveJob",
    "arInformationObjectCsvExportJob",
    "qtSwordPluginWorker",
    "arUpdatePublicationStatusJob",
    "arFileImportJob",
    "arInformationObjectXmlExportJob",
    "arXmlExportSingleFileJob",
    "arGenerateReportJob",
    "arActorCsvExportJob",
    "arActorXmlExportJob",
    "arRepositoryCsvExportJob",
    "arUpdateEsIoDocumentsJob",
    "arPhysicalObjectCsvHoldingsReportJob",
)
#: Jobs that AtoM serialises itself by sleeping inside the worker; atomnode can do it.
ATOM_SERIAL_JOBS = ("arObjectMoveJob", "arFileImportJob")


# =========================================================================== AtoM site


class AtomError(Exception):
    """The AtoM tree cannot be read."""


@dataclass
class AtomSite:
    """What atomnode needs to know about one AtoM installation."""

    root: str  # realpath: symfony's sf_root_dir
    workers_key: str = ""
    servers: list[tuple[str, int]] = field(default_factory=list)
    worker_types: dict[str, list[str]] | None = None
    mysql: tuple[str, int] | None = None
    mysql_socket: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The function prefix AtoM's web app and workers use: ``md5(root + key) + '-'``."""
        return atom_function_prefix(self.root, self.workers_key)

    @property
    def job_classes(self) -> list[str]:
        """Every job class the site's workers are expected to serve."""
        if self.worker_types is None:
            return list(ATOM_JOB_CLASSES)
        seen: dict[str, None] = {}
        for classes in self.worker_types.values():
            for c in classes:
                seen.setdefault(c, None)
        return list(seen)

    @property
    def check_server(self) -> tuple[str, int]:
        """The server AtoM's web app asks for ``status`` (arGearman::getServer: the last)."""
        return self.servers[-1] if self.servers else (DEFAULT_HOST, DEFAULT_PORT)


def atom_function_prefix(root: str, workers_key: str = "") -> str:
    """``md5(sf_root_dir . app_workers_key) . '-'``, as AtoM's QubitJob::getJobPrefix()."""
    return hashlib.md5((root + (workers_key or "")).encode()).hexdigest() + "-"


def _symfony_env(data: Any, env: str = "prod") -> dict[str, Any]:
    """Symfony config files have ``all:`` plus per-environment sections; merge them."""
    if not isinstance(data, dict):
        return {}
    out: dict[str, Any] = {}
    for section in ("all", env):
        part = data.get(section)
        if isinstance(part, dict):
            for k, v in part.items():
                if isinstance(v, dict) and isinstance(out.get(k), dict):
                    out[k] = {**out[k], **v}
                else:
                    out[k] = v
    return out


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError) as e:
        raise AtomError(f"{path}: cannot read: {e}") from None


def _server_address(value: Any) -> tuple[str, int] | None:
    if isinstance(value, dict):  # old layout: {host: ..., port: ...}
        host = str(value.get("host") or DEFAULT_HOST)
        port = value.get("port") or value.get("post") or DEFAULT_PORT
        try:
            return host, int(port)
        except (TypeError, ValueError):
            return None
    if isinstance(value, str) and value.strip():
        text = value.strip()
        try:
            return parse_address(text)
        except ValueError:
            if ":" not in text:
                return text, DEFAULT_PORT  # Net_Gearman's default port
    return None


def _parse_dsn(dsn: str) -> dict[str, str]:
    _, _, rest = dsn.partition(":")
    out: dict[str, str] = {}
    for part in rest.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def read_atom_site(root: str) -> AtomSite:
    """Read ``config/gearman.yml``, ``config/app.yml`` (and ``apps/qubit/config/app.yml``)
    and ``config/databases.yml`` of the AtoM tree at ``root``. Raises AtomError."""
    if not os.path.isdir(root):
        raise AtomError(
            f"{root}: no such directory (expected the AtoM root, with config/ and symfony)"
        )
    real = os.path.realpath(root)
    gearman_path = os.path.join(real, "config", "gearman.yml")
    if not os.path.exists(gearman_path):
        raise AtomError(f"{gearman_path} not found: is {root} an AtoM root?")
    site = AtomSite(root=real)
    if not os.path.exists(os.path.join(real, "symfony")):
        site.notes.append(f"{real}/symfony not found: is this an AtoM root?")

    gconf = _symfony_env(_read_yaml(gearman_path))
    servers = gconf.get("servers", gconf.get("server"))
    if isinstance(servers, dict):
        values: Iterable[Any] = servers.values()
    elif isinstance(servers, list):
        values = servers
    elif servers is None:
        values = []
    else:
        values = [servers]
    for value in values:
        addr = _server_address(value)
        if addr:
            site.servers.append(addr)
        else:
            site.notes.append(f"{gearman_path}: cannot read server {value!r}")
    wt = gconf.get("worker_types")
    if isinstance(wt, dict):
        site.worker_types = {
            str(k): [str(c) for c in (v if isinstance(v, list) else [v]) if c]
            for k, v in wt.items()
        }

    # sfConfig merges the project's config/app.yml with the application's (app wins).
    for rel in ("config/app.yml", "apps/qubit/config/app.yml"):
        app = _symfony_env(_read_yaml(os.path.join(real, rel)))
        if "workers_key" in app:
            site.workers_key = "" if app["workers_key"] is None else str(app["workers_key"])

    db = _symfony_env(_read_yaml(os.path.join(real, "config", "databases.yml")))
    propel = db.get("propel") if isinstance(db.get("propel"), dict) else None
    param = propel.get("param") if propel and isinstance(propel.get("param"), dict) else None
    dsn = param.get("dsn") if param else None
    if isinstance(dsn, str) and dsn.startswith("mysql:"):
        parts = _parse_dsn(dsn)
        if parts.get("unix_socket"):
            site.mysql_socket = parts["unix_socket"]
        else:
            host = parts.get("host", "localhost")
            try:
                port = int(parts.get("port", "3306"))
            except ValueError:
                port = 3306
            # PHP reaches "localhost" through MySQL's Unix socket; atomnode probes TCP.
            site.mysql = ("127.0.0.1" if host == "localhost" else host, port)
    return site


def _y(value: Any) -> str:
    """A value as inline YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def atom_config_yaml(
    site: AtomSite,
    *,
    user: str = "www-data",
    database: str = "/var/lib/atomnode/atomnode.db",
    single_pool: bool = False,
    php: str = "php",
) -> str:
    """A ready atomnode configuration for ``site`` (YAML text with comments)."""
    prefix = site.prefix
    key_note = f'workers_key "{site.workers_key}"' if site.workers_key else "an empty workers_key"
    lines = [
        f"# atomnode configuration for the AtoM site at {site.root}",
        f"# generated by: atomnode atom-config {site.root}",
        "#",
        f"# AtoM function prefix: {prefix}",
        f'#   = md5("{site.root}" + {key_note}) + "-"',
        f"#   e.g. the web app submits {prefix}arFindingAidJob.",
        f"# Check the running setup with: atomnode doctor {site.root}",
        "",
    ]
    listen: list[str] = []
    for host, port in site.servers or [(DEFAULT_HOST, DEFAULT_PORT)]:
        h = "127.0.0.1" if host == "localhost" else host
        addr = format_address(h, port)
        if addr not in listen:
            listen.append(addr)
    lines.append(
        "# From config/gearman.yml servers. AtoM's client also checks port 4730 on that host."
    )
    if any(h == "localhost" for h, _ in site.servers):
        lines.append('# gearman.yml says localhost: add "[::1]:4730" if PHP resolves it to IPv6.')
    lines += [
        f"listen: {_y(listen)}",
        f"database: {_y(database)}",
        "log_level: info",
        "queue: {synchronous: full, max_attempts: 5, retention_days: 7}",
        "",
    ]
    classes = site.job_classes
    serial = [c for c in ATOM_SERIAL_JOBS if c in classes]
    if len(serial) > 1:
        lines += [
            "# AtoM runs one move or file import at a time by sleeping inside the worker;",
            "# atomnode holds the next one in the queue instead.",
            "concurrency:",
            f"  - {{name: serial-moves, functions: {_y(serial)}, max: 1}}",
            "",
        ]
    base = [php, "-d", "memory_limit=-1", "symfony", "jobs:worker"]
    pools: list[tuple[str, list[str], int, str | None]] = []
    if site.worker_types is None or single_pool:
        why = (
            "config/gearman.yml has no worker_types: one pool serves every job class"
            if site.worker_types is None
            else "one pool serves every job class"
        )
        pools.append(("atom", base, 2, why))
    else:
        for wtype, wclasses in site.worker_types.items():
            count = 2 if wtype == "general" else 1
            pools.append((wtype, base + [f"--types={wtype}"], count, ", ".join(wclasses)))
    lines.append("pools:")
    for name, command, count, comment in pools:
        if comment:
            lines.append(f"  # {comment}")
        lines += [
            f"  - name: {_y(name)}",
            f"    command: {_y(command)}",
            f"    directory: {_y(site.root)}",
            f"    user: {_y(user)}",
            f"    count: {count}",
        ]
        if site.mysql:
            addr = format_address(*site.mysql)
            lines.append(f"    wait_for: [{{name: mysql, address: {_y(addr)}}}]")
        elif site.mysql_socket:
            lines.append(f"    # MySQL is reached through {site.mysql_socket}: no TCP wait_for")
    return "\n".join(lines) + "\n"


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
    if cfg is not None and cfg.listen:
        host, port = parse_address(cfg.listen[0])
        if host in ("0.0.0.0", ""):
            host = "127.0.0.1"
        elif host == "::":
            host = "::1"
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


def format_duration(seconds: float | None) -> str:
    """``93784`` -> ``1d 2h``; ``125`` -> ``2m 5s``."""
    if seconds is None:
        return "-"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[("-" if c is None else str(c)) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def fmt(row: Sequence[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([fmt(headers)] + [fmt(r) for r in cells])


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
    failed = "" if q.get("failed") is None else f", {q.get('failed')} failed"
    out.append(f"queue: {q.get('queued', 0)} queued, {q.get('running', 0)} running{failed}{store}")
    out.append("")
    funcs = data.get("functions") or []
    if funcs:
        out.append(
            _table(
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
            _table(["POOL", "PID", "STATE", "JOB", "DONE", "RSS MB", "UPTIME", "DETAIL"], rows)
        )
    handlers = data.get("handlers") or []
    if handlers:
        out.append("")
        out.append(
            _table(
                ["HANDLER", "CONCURRENCY", "RUNNING"],
                [[h.get("function"), h.get("concurrency"), h.get("running")] for h in handlers],
            )
        )
    conns = data.get("connections")
    if isinstance(conns, list) and conns:  # from `workers` (older daemon)
        out.append("")
        out.append("connections (fd ip client-id : functions):")
        out.extend(f"  {c}" for c in conns)
    elif isinstance(conns, int):
        out.append("")
        out.append(f"{conns} client/worker connection(s)")
    return "\n".join(out) + "\n"


def cmd_status(args: argparse.Namespace) -> int:
    """``atomnode status``."""
    try:
        host, port, _ = _daemon_address(args, sys.stderr)
    except ConfigError as e:
        print(f"atomnode: invalid configuration:\n{e}", file=sys.stderr)
        return 1
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
    try:
        host, port, _ = _daemon_address(args, sys.stderr)
    except ConfigError as e:
        print(f"atomnode: invalid configuration:\n{e}", file=sys.stderr)
        return 1
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
        print(f"atomnode: the configuration is invalid:\n{e}", file=sys.stderr)
        return 1
    sys.stdout.write(format_config(cfg))
    print(f"configuration OK ({cfg.source or 'embedded defaults'})", file=sys.stderr)
    return 0


# =========================================================================== atom-config


def cmd_atom_config(args: argparse.Namespace) -> int:
    """``atomnode atom-config ATOM_ROOT``."""
    try:
        site = read_atom_site(args.atom_root)
    except AtomError as e:
        print(f"atomnode: {e}", file=sys.stderr)
        return 1
    for note in site.notes:
        print(f"atomnode: note: {note}", file=sys.stderr)
    sys.stdout.write(
        atom_config_yaml(site, user=args.user, database=args.database, single_pool=args.single_pool)
    )
    return 0


# =========================================================================== doctor


@dataclass
class Check:
    """One line of ``atomnode doctor``."""

    level: str  # OK | WARN | FAIL
    message: str

    def __str__(self) -> str:
        return f"{self.level:<4}  {self.message}"


def _disk_check(path: str) -> Check:
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError as e:
        return Check("WARN", f"cannot measure free disk space near {path}: {e}")
    mib = free / (1024 * 1024)
    shown = f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"
    if free < 100 * 1024 * 1024:
        return Check(
            "FAIL",
            f"only {shown} free on the disk holding the queue ({path}): new jobs will be "
            "refused when it is full; free some space",
        )
    if free < 1024 * 1024 * 1024:
        return Check("WARN", f"only {shown} free on the disk holding the queue ({path})")
    return Check("OK", f"{shown} free on the disk holding the queue ({path})")


def _answers(host: str, port: int, timeout: float) -> str | None:
    """The ``version`` answer at host:port, or None if nothing answers."""
    try:
        with AdminClient(host, port, timeout) as c:
            return c.command("version")[0]
    except ClientError:
        return None


def run_doctor(
    atom_root: str | None,
    host: str,
    port: int,
    cfg: Config | None,
    *,
    timeout: float = 3.0,
) -> list[Check]:
    """Every check of ``atomnode doctor``, in order."""
    checks: list[Check] = []
    addr = format_address(host, port)
    data: dict[str, Any] | None = None
    try:
        with AdminClient(host, port, timeout) as client:
            data = fetch_status(client)
        who = (
            ""
            if data.get("degraded")
            else f" (atomnode {data.get('version')}, pid {data.get('pid')})"
        )
        checks.append(Check("OK", f"the daemon answers at {addr}{who}"))
    except DaemonUnreachable as e:
        checks.append(Check("FAIL", str(e)))
    except ClientError as e:
        checks.append(Check("FAIL", f"the daemon at {addr} does not answer properly: {e}"))

    site: AtomSite | None = None
    if atom_root:
        try:
            site = read_atom_site(atom_root)
        except AtomError as e:
            checks.append(Check("FAIL", str(e)))
        else:
            for note in site.notes:
                checks.append(Check("WARN", note))
            checks.append(
                Check(
                    "OK",
                    f"AtoM at {site.root}: job prefix {site.prefix} (workers_key {site.workers_key!r})",
                )
            )
            checks.extend(_atom_server_checks(site, host, port, cfg, timeout))

    if data is not None:
        functions = data.get("functions") or []
        if site is not None:
            checks.extend(_atom_job_checks(site, host, port, functions, timeout))
        for f in functions:
            if (f.get("queued") or 0) > 0 and not f.get("workers"):
                checks.append(
                    Check(
                        "WARN",
                        f"{f.get('queued')} job(s) wait for {f.get('name')} but no worker can run it",
                    )
                )
        checks.extend(_pool_checks(data))
        q = data.get("queue") or {}
        if q.get("store_healthy") is False:
            checks.append(
                Check(
                    "FAIL",
                    f"the queue database is failing: {q.get('store_error') or 'unknown error'}; "
                    "new background jobs are refused until it recovers",
                )
            )
        elif q.get("store_healthy"):
            checks.append(Check("OK", "the queue database is healthy"))
        if q.get("failed"):
            checks.append(
                Check(
                    "WARN",
                    f"{q['failed']} job(s) failed for good (poison jobs); "
                    "see `atomnode jobs list --state failed`, retry with `atomnode jobs retry`",
                )
            )

    # Prefer the database the daemon says it uses (when it is an absolute path).
    database = ((data or {}).get("queue") or {}).get("database")
    if not (isinstance(database, str) and os.path.isabs(database)):
        database = cfg.database if cfg is not None else None
    if database:
        checks.append(_disk_check(database))
    return checks


def _atom_server_checks(
    site: AtomSite, host: str, port: int, cfg: Config | None, timeout: float
) -> list[Check]:
    checks: list[Check] = []
    listen = set()
    if cfg is not None:
        for a in cfg.listen:
            try:
                listen.add(parse_address(a))
            except ValueError:
                pass
    for shost, sport in site.servers or [(DEFAULT_HOST, DEFAULT_PORT)]:
        saddr = format_address(shost, sport)
        answer = _answers(shost, sport, timeout)
        if answer is None:
            checks.append(
                Check(
                    "FAIL",
                    f"AtoM's config/gearman.yml points at {saddr} but nothing answers there: "
                    f"make atomnode listen on {saddr} (listen: in the configuration)",
                )
            )
        else:
            checks.append(Check("OK", f"AtoM's server {saddr} answers ({answer})"))
        if sport != ATOM_CHECK_PORT:
            a4730 = _answers(shost, ATOM_CHECK_PORT, timeout)
            level = "WARN" if a4730 is not None else "FAIL"
            checks.append(
                Check(
                    level,
                    f"AtoM's config/gearman.yml uses port {sport}, but AtoM's Gearman client also "
                    f"checks port {ATOM_CHECK_PORT} on {shost}"
                    + ("" if a4730 is not None else " and nothing answers there")
                    + f": use {format_address(shost, ATOM_CHECK_PORT)}",
                )
            )
        if (
            listen
            and (shost, sport) not in listen
            and not (shost in ("localhost",) and ("127.0.0.1", sport) in listen)
        ):
            if (host, port) != (shost, sport):
                checks.append(
                    Check(
                        "WARN",
                        f"the atomnode configuration does not listen on {saddr}, "
                        "the address AtoM uses",
                    )
                )
    return checks


def _atom_job_checks(
    site: AtomSite, host: str, port: int, functions: list[dict[str, Any]], timeout: float
) -> list[Check]:
    # Read `status` where AtoM's web app reads it (its last gearman.yml server), as
    # QubitJob::checkWorkerAvailable does; fall back to the daemon's own view.
    shost, sport = site.check_server
    try:
        with AdminClient(shost, sport, timeout) as c:
            functions = _split_status(c.command("status"))
    except ClientError:
        pass  # already reported by the server checks
    workers = {f.get("name"): f.get("workers") or 0 for f in functions}
    missing = [c for c in site.job_classes if not workers.get(site.prefix + c)]
    checks: list[Check] = []
    if not missing:
        checks.append(
            Check(
                "OK",
                f"all {len(site.job_classes)} AtoM job classes have a worker under {site.prefix}",
            )
        )
        return checks
    other_prefixes = sorted(
        {
            f.get("name", "")[:33]
            for f in functions
            if strip_atom_prefix(f.get("name", "")) != f.get("name")
            and f.get("workers")
            and not f.get("name", "").startswith(site.prefix)
        }
    )
    hint = ""
    if other_prefixes:
        hint = (
            f"; workers are registered under another prefix ({', '.join(other_prefixes)}): "
            "the workers run from a different AtoM root path or workers_key than the web app"
        )
    for c in missing:
        checks.append(
            Check(
                "FAIL",
                f'no worker for {c}: AtoM will say "No Gearman worker available that can handle '
                f'the job {c}" (expected function {site.prefix}{c}){hint}',
            )
        )
    return checks


def _pool_checks(data: dict[str, Any]) -> list[Check]:
    checks: list[Check] = []
    for pool in data.get("pools") or []:
        name = pool.get("name")
        workers = pool.get("workers") or []
        bad = []
        for w in workers:
            state = str(w.get("state") or "")
            if state.startswith("backing") or state.startswith("waiting"):
                detail = str(w.get("detail") or "")
                desc = (
                    detail
                    if detail.startswith(state)
                    else f"{state}, {detail}"
                    if detail
                    else state
                )
                bad.append(f"pid {w.get('pid') or '-'}: {desc}")
        if bad:
            checks.append(
                Check(
                    "WARN",
                    f"pool {name}: workers are not running: "
                    + "; ".join(bad)
                    + " (see `journalctl -u atomnode` for their output)",
                )
            )
        elif (pool.get("count") or 0) > 0 and not workers:
            checks.append(
                Check(
                    "WARN", f"pool {name}: {pool.get('count')} worker(s) configured, none running"
                )
            )
        else:
            checks.append(Check("OK", f"pool {name}: {len(workers)} worker(s) running"))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    """``atomnode doctor [ATOM_ROOT]``."""
    try:
        host, port, cfg = _daemon_address(args, sys.stderr)
    except ConfigError as e:
        print(Check("FAIL", f"the configuration is invalid:\n{e}"))
        return 1
    checks = run_doctor(args.atom_root, host, port, cfg, timeout=args.timeout)
    for c in checks:
        print(c)
    return 1 if any(c.level == "FAIL" for c in checks) else 0


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
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("atom-config", help="print an atomnode configuration for an AtoM site")
    p.add_argument(
        "atom_root", metavar="ATOM_ROOT", help="AtoM's root directory (holds symfony and config/)"
    )
    p.add_argument("--user", default="www-data", help="user the workers run as (default: www-data)")
    p.add_argument(
        "--database", default="/var/lib/atomnode/atomnode.db", help="queue database path"
    )
    p.add_argument(
        "--single-pool",
        action="store_true",
        help="one pool for every job class instead of one per worker type",
    )
    p.set_defaults(func=cmd_atom_config)

    p = sub.add_parser("doctor", help="check a running setup and explain what is wrong")
    p.add_argument(
        "atom_root",
        metavar="ATOM_ROOT",
        nargs="?",
        help="AtoM's root directory, to check AtoM's side too",
    )
    p.add_argument("--timeout", type=float, default=3.0, help=argparse.SUPPRESS)
    _add_address_args(p)
    p.set_defaults(func=cmd_doctor)
