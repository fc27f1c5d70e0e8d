"""``atomnode doctor``: check a running setup (and an AtoM site) and say what is wrong."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Any

from ..system.access import listen_problem
from ..system.config import Config, ConfigError, format_address, parse_address, strip_atom_prefix
from .atom_site import (
    ATOM_CHECK_PORT,
    DEFAULT_HOST,
    DEFAULT_PORT,
    AtomError,
    AtomSite,
    read_atom_site,
)
from .client import AdminClient, ClientError, DaemonUnreachable
from .ops_cli import _add_address_args, _daemon_address, _split_status, fetch_status


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
    addr = f"the control socket {host}" if host.startswith("/") else format_address(host, port)
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
                    f"AtoM at {site.root}: job prefix {site.prefix} "
                    f"(workers_key {site.workers_key!r})",
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
                        f"{f.get('queued')} job(s) wait for {f.get('name')} "
                        "but no worker can run it",
                    )
                )
        checks.extend(_pool_checks(data))
        access_error = (data.get("access") or {}).get("error")
        if access_error:
            checks.append(Check("FAIL", "the daemon serves loopback only: " + access_error))
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
        if q.get("store_damage"):
            checks.append(
                Check(
                    "FAIL",
                    f"the queue database file is damaged ({q['store_damage']}): the jobs in "
                    "memory are served, but a restart may not find them all; see "
                    "'Faults' in docs/durability.md",
                )
            )
        if q.get("store_incident"):
            checks.append(
                Check("WARN", f"the queue database had an incident: {q['store_incident']}")
            )
        if q.get("failed"):
            checks.append(
                Check(
                    "WARN",
                    f"{q['failed']} job(s) failed for good (poison jobs); "
                    "see `atomnode jobs list --state failed`, retry with `atomnode jobs retry`",
                )
            )

    if cfg is not None and not cfg.listen:
        checks.extend(worker_host_checks(cfg, timeout))
    elif cfg is not None:
        problem = listen_problem(cfg.listen, cfg.allow)
        if problem and not any("loopback only" in c.message for c in checks):
            checks.append(Check("FAIL", "the configuration is refused: " + problem))

    # Prefer the database the daemon says it uses (when it is an absolute path).
    database = ((data or {}).get("queue") or {}).get("database")
    if not (isinstance(database, str) and os.path.isabs(database)):
        database = cfg.database if cfg is not None else None
    if database:
        checks.append(_disk_check(database))
    return checks


def worker_host_checks(cfg: Config, timeout: float) -> list[Check]:
    """On a worker host (no listener): can this host reach each server its pools use,
    and does the server let it in and give it job awareness?"""
    checks: list[Check] = []
    servers = list(dict.fromkeys(a for p in cfg.pools for a in p.servers))
    for address in servers:
        try:
            host, port = parse_address(address)
        except ValueError:
            continue
        try:
            with AdminClient(host, port, timeout) as c:
                lines = c.command("atomnode-host conns")
        except DaemonUnreachable as e:
            checks.append(Check("FAIL", f"this worker host cannot reach the server {address}: "
                                f"{e.reason or e}; check the address, the network and the "
                                f"firewall (TCP port {port} on the server)"))
            continue
        except ClientError as e:
            checks.append(Check("FAIL", f"the server {address} closed the connection ({e}): "
                                "add this host's address to allow: in the server's "
                                "configuration"))
            continue
        if lines and lines[0].startswith("ERR"):
            checks.append(Check("WARN", f"the server {address} is not an atomnode ({lines[0]}): "
                                "workers run there without job awareness (no drain before "
                                "stop, no recycle limits); see docs/scaling.md"))
            continue
        try:
            mine = len(json.loads(lines[0])) if lines else 0
        except ValueError:
            mine = 0
        checks.append(Check("OK", f"the server {address} is reachable and allows this host "
                            f"({mine} connection(s) of this host there)"))
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


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``atomnode doctor`` to ``atomnode``'s parser."""
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
