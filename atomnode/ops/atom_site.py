"""What atomnode knows about an AtoM site, read from its tree: ``atomnode atom-config``.

``read_atom_site(root)`` reads an AtoM installation's configuration files the way AtoM reads
them; ``atom_config_yaml(site)`` turns that into a ready atomnode configuration.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..system.config import format_address, parse_address

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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``atomnode atom-config`` to ``atomnode``'s parser."""
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
