"""``atomnode doctor``: check a running setup (and an AtoM site) and say what is wrong."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
from dataclasses import dataclass
from typing import Any

from ..system.access import listen_problem
from ..system.config import Config, ConfigError, format_address, parse_address
from ..system.names import split_atom_prefix
from ..workers.supervisor import REGISTER_GRACE
from .atom_site import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    AtomError,
    AtomSite,
    MysqlUnavailable,
    _server_address,
    _values,
    add_site_options,
    check_mysql,
    read_atom_site,
)
from .client import AdminClient, ClientError, DaemonUnreachable
from .ops_cli import _add_address_args, _daemon_address, _split_status, fetch_status
from .php import PhpSyntaxError, parse_php_return


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
    site_options: dict[str, Any] | None = None,
) -> list[Check]:
    """Every check of ``atomnode doctor``, in order. ``site_options`` go to
    :func:`read_atom_site` (plugins, site_title, site_base_url, culture, mysql)."""
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
        opts = dict(site_options or {})
        try:
            site = read_atom_site(atom_root, mysql_timeout=timeout, **opts)
        except AtomError as e:
            checks.append(Check("FAIL", str(e)))
        else:
            for note in site.notes:
                checks.append(Check("WARN", note))
            for m in site.missing:
                checks.append(Check("WARN", m))
            prefix = site.prefix
            shown = (
                "no function prefix"
                if prefix == ""
                else "job prefix not known"
                if prefix is None
                else f"job prefix {prefix!r}"
            )
            checks.append(
                Check(
                    "OK",
                    f"{site.release} at {site.root} (release family {site.family}, "
                    f"worker task {site.worker_task}): {shown}",
                )
            )
            checks.extend(_atom_server_checks(site, host, port, cfg, timeout))
            checks.extend(_atom_dependency_checks(site, opts.get("mysql", True), timeout))
            checks.extend(_atom_cache_checks(site))

    if data is not None:
        functions = data.get("functions") or []
        if site is not None:
            checks.extend(_atom_job_checks(site, functions, timeout))
        for f in functions:
            if (f.get("queued") or 0) > 0 and not f.get("workers"):
                checks.append(
                    Check(
                        "WARN",
                        f"{f.get('queued')} job(s) wait for {f.get('name')} but no worker is "
                        "connected that can run it",
                    )
                )
        checks.extend(_pool_checks(data, site))
        checks.extend(_runner_checks(data))
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
                    f"{q['failed']} background job(s) failed for good (their worker reported a "
                    "failure, or atomnode gave them up after their worker died on every allowed "
                    "attempt); see `atomnode jobs list --state failed`, retry with "
                    "`atomnode jobs retry`",
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
            checks.append(
                Check(
                    "FAIL",
                    f"this worker host cannot reach the server {address}: "
                    f"{e.reason or e}; check the address, the network and the "
                    f"firewall (TCP port {port} on the server)",
                )
            )
            continue
        except ClientError as e:
            checks.append(
                Check(
                    "FAIL",
                    f"the server {address} closed the connection ({e}): "
                    "add this host's address to allow: in the server's "
                    "configuration",
                )
            )
            continue
        if lines and lines[0].startswith("ERR"):
            checks.append(
                Check(
                    "WARN",
                    f"the server {address} is not an atomnode ({lines[0]}): "
                    "workers run there without job awareness (no drain before "
                    "stop, no recycle limits); see docs/scaling.md",
                )
            )
            continue
        try:
            mine = len(json.loads(lines[0])) if lines else 0
        except ValueError:
            mine = 0
        checks.append(
            Check(
                "OK",
                f"the server {address} is reachable and allows this host "
                f"({mine} connection(s) of this host there)",
            )
        )
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
    seen: list[tuple[str, int]] = []
    for server in site.servers + site.worker_servers or [(DEFAULT_HOST, DEFAULT_PORT)]:
        if server in seen:
            continue
        seen.append(server)
        shost, sport = server
        saddr = format_address(shost, sport)
        who = (
            "AtoM's web app and workers"
            if server in site.servers and server in site.worker_servers
            else "AtoM's web app"
            if server in site.servers
            else "AtoM's workers"
        )
        answer = _answers(shost, sport, timeout)
        if answer is None:
            checks.append(
                Check(
                    "FAIL",
                    f"{who} use {saddr} ({site.server_source}) but nothing answers there: "
                    f"make atomnode listen on {saddr} (listen: in its configuration)",
                )
            )
        else:
            checks.append(Check("OK", f"{who} use {saddr}, which answers ({answer})"))
        local = {("127.0.0.1", sport)} if shost == "localhost" else set()
        if listen and (shost, sport) not in listen and not (local & listen):
            if (host, port) != (shost, sport):
                checks.append(
                    Check(
                        "WARN",
                        f"the atomnode configuration does not listen on {saddr}, "
                        f"the address {who} use",
                    )
                )
    if site.family == "2.0.0-2.0.1":
        checks.append(
            Check(
                "OK",
                "AtoM 2.0.0-2.0.1 always use localhost:4730 (hard-coded in the worker "
                "task and the SWORD plugin; 2.0.2 made it configurable)",
            )
        )
    return checks


def _tcp_answers(host: str, port: int, timeout: float) -> str | None:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        return e.strerror or str(e)


def _atom_dependency_checks(site: AtomSite, mysql: bool, timeout: float) -> list[Check]:
    """MySQL with the site's credentials, and Elasticsearch where the site names it."""
    checks: list[Check] = []
    db = site.database
    if db is not None and mysql:
        error = site.mysql_error
        if error is None:
            try:
                check_mysql(db, timeout)
            except MysqlUnavailable as e:
                error = str(e)
        if error:
            checks.append(
                Check(
                    "FAIL",
                    f"{error}: AtoM's web app and workers cannot work without it; "
                    "start MySQL or fix the DSN and credentials in "
                    f"{site.root}/{db.source}",
                )
            )
        else:
            checks.append(
                Check("OK", f"MySQL at {db.where} answers to {db.user!r} (from {db.source})")
            )
    for host, port in site.search:
        where = format_address(host, port)
        err = _tcp_answers(host, port, timeout)
        if err:
            checks.append(
                Check(
                    "FAIL",
                    f"Elasticsearch at {where} (config/search.yml) does not answer "
                    f"({err}): AtoM's search and most of its jobs fail without it; "
                    "start it or fix server: host/port in config/search.yml",
                )
            )
        else:
            checks.append(Check("OK", f"Elasticsearch at {where} answers"))
    return checks


def _atom_cache_checks(site: AtomSite) -> list[Check]:
    """symfony caches gearman.yml in cache/qubit/<env>/config/config_gearman.yml.php and, in
    the prod and cli environments, never looks at the YAML again: a worker or web app then
    keeps using an old server list until the cache is cleared."""
    checks: list[Check] = []
    if site.worker_task != "jobs:worker":
        return checks
    want = {"prod": site.servers, "cli": site.worker_servers}
    for env, servers in want.items():
        path = os.path.join(site.root, "cache", "qubit", env, "config", "config_gearman.yml.php")
        try:
            with open(path, encoding="utf-8") as f:
                cached = parse_php_return(f.read())
        except FileNotFoundError:
            continue
        except (OSError, UnicodeDecodeError, PhpSyntaxError) as e:
            checks.append(Check("WARN", f"{path}: cannot read symfony's cached gearman.yml: {e}"))
            continue
        got = [a for a in (_server_address(v) for v in _values((cached or {}).get("servers"))) if a]
        if got != servers:
            checks.append(
                Check(
                    "FAIL",
                    f"symfony's cache ({os.path.relpath(path, site.root)}) still says servers "
                    f"{', '.join(format_address(*a) for a in got) or 'none'} but "
                    f"{site.server_source} says "
                    f"{', '.join(format_address(*a) for a in servers) or 'none'}: clear the cache "
                    f"with `php symfony cc` in {site.root}, then `systemctl reload atomnode`",
                )
            )
    return checks


def _atom_job_checks(
    site: AtomSite, functions: list[dict[str, Any]], timeout: float
) -> list[Check]:
    # Read `status` where AtoM's web app reads it (its last server), as
    # QubitJob::checkWorkerAvailable does; fall back to the daemon's own view.
    shost, sport = site.check_server
    try:
        with AdminClient(shost, sport, timeout) as c:
            functions = _split_status(c.command("status"))
    except ClientError:
        pass  # already reported by the server checks
    checks: list[Check] = []
    for c, why in site.skipped_classes.items():
        checks.append(Check("OK", f"{c} not checked: {why}"))
    prefix = site.prefix
    if prefix is None:
        checks.append(
            Check(
                "WARN",
                "the job prefix is not known, so which job classes have a worker "
                "cannot be checked (see above for the values to give)",
            )
        )
        return checks
    workers = {f.get("name"): f.get("workers") or 0 for f in functions}
    expected = site.served_classes
    missing = [c for c in expected if not workers.get(prefix + c)]
    if not missing:
        checks.append(
            Check(
                "OK",
                f"all {len(expected)} enabled AtoM job classes have a worker"
                + (f" under {prefix!r}" if prefix else ""),
            )
        )
        return checks
    other_prefixes = sorted(
        {
            split_atom_prefix(f.get("name", ""))[0]
            for f in functions
            if f.get("workers")
            and split_atom_prefix(f.get("name", ""))[1] in expected
            and split_atom_prefix(f.get("name", ""))[0] != prefix
        }
    )
    hint = ""
    if other_prefixes:
        hint = (
            "; workers are registered under another prefix "
            f"({', '.join(map(repr, other_prefixes))}): "
            "the workers run from a different AtoM root path or workers_key than the web app"
        )
    for c in missing:
        checks.append(
            Check(
                "FAIL",
                f'no worker for {c}: AtoM will say "No Gearman worker available that can handle '
                f'the job {c}" (expected function {prefix + c!r}){hint}',
            )
        )
    return checks


def _pool_checks(data: dict[str, Any], site: AtomSite | None = None) -> list[Check]:
    checks: list[Check] = []
    for pool in data.get("pools") or []:
        name = pool.get("name")
        workers = pool.get("workers") or []
        bad = []
        unregistered = []
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
            elif state == "starting" and (w.get("uptime") or 0) >= REGISTER_GRACE:
                unregistered.append(w)
        if unregistered:
            pids = ", ".join(str(w.get("pid")) for w in unregistered)
            fix = (
                f"clear symfony's cache with `php symfony cc` in {site.root}, then "
                "`systemctl reload atomnode`"
                if site is not None and site.worker_task == "jobs:worker"
                else "check the server address the workers are given"
            )
            checks.append(
                Check(
                    "FAIL",
                    f"pool {name}: worker(s) {pids} have run for over {REGISTER_GRACE:.0f}s "
                    "without registering with atomnode: they are connected elsewhere or not at "
                    f"all (for AtoM, often a cached old gearman.yml); {fix}",
                )
            )
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
        elif not unregistered:
            if workers and all(w.get("state") == "running" for w in workers):
                # Supervisor-only: no job awareness, so registration is not known.
                checks.append(Check("OK", f"pool {name}: {len(workers)} worker(s) running"))
            else:
                up = [w for w in workers if w.get("state") in ("idle", "busy", "draining")]
                starting = len(workers) - len(up)
                checks.append(
                    Check(
                        "OK",
                        f"pool {name}: {len(up)} worker(s) registered"
                        + (f", {starting} starting" if starting else ""),
                    )
                )
    return checks


def _runner_checks(data: dict[str, Any]) -> list[Check]:
    """Per-job AtoM runners (atom_runners): can they run jobs, and if not why."""
    checks: list[Check] = []
    for r in data.get("runners") or []:
        name, n = r.get("name"), r.get("concurrency")
        if r.get("problem"):
            checks.append(Check(
                "FAIL",
                f"runner {name} ({r.get('root')}) cannot run jobs: {r['problem']}; until "
                "this is fixed `status` shows no worker for its functions and AtoM refuses "
                "new jobs (\"No Gearman worker available\")"))
        else:
            st = r.get("startup_ms") or {}
            cost = (f"; job start-up p50 {st['p50']:g} ms over the last {st['jobs']} jobs"
                    if st.get("p50") is not None else "")
            checks.append(Check(
                "OK", f"runner {name}: {n} slot(s) registered for "
                f"{len(r.get('functions') or [])} function(s), one process per job{cost}"))
    return checks


def cmd_doctor(args: argparse.Namespace) -> int:
    """``atomnode doctor [ATOM_ROOT]``."""
    try:
        host, port, cfg = _daemon_address(args, sys.stderr)
    except ConfigError as e:
        print(Check("FAIL", f"the configuration is invalid:\n{e}"))
        return 1
    plugins = None
    if args.plugins is not None:
        plugins = [p.strip() for p in args.plugins.split(",") if p.strip()]
    opts = {
        "mysql": not args.no_mysql,
        "plugins": plugins,
        "site_title": args.site_title,
        "site_base_url": args.site_base_url,
        "culture": args.culture,
    }
    checks = run_doctor(args.atom_root, host, port, cfg, timeout=args.timeout, site_options=opts)
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
    add_site_options(p)
    p.set_defaults(func=cmd_doctor)
