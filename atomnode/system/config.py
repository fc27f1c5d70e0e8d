"""Configuration: one YAML file -> validated, frozen :class:`Config`.

The file is checked completely before anything starts. Every problem is reported with the
file, the line, the key path (``pools[0].count``) and what was expected; unknown keys get a
"did you mean ...?" suggestion. All problems are collected and raised together as one
:class:`ConfigError` (one per line).

Where the file comes from (:func:`load_config`): an explicit path, else ``$ATOMNODE_CONFIG``,
else ``/etc/atomnode/atomnode.yml`` if it exists, else the embedded defaults. The drop-ins
``conf.d/*.yml`` beside that file (``/etc/atomnode/conf.d``) are laid over it in name order
and the result is validated as one configuration: sites keep their settings there, so a
package upgrade never has to touch a file they edited.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import yaml

# Re-exported: defined in atomnode.system.names, which the broker uses too.
from .names import function_matches, strip_atom_prefix  # noqa: F401

from .validation import YAML_LOADER, Doc, Path, Validator, empty_map, kind

# Re-exported: the value grammars live in atomnode.system.values (the listener uses them).
from .values import format_address, parse_address, parse_duration, parse_size  # noqa: F401

log = logging.getLogger("atomnode.config")  # stable name: operators see it in the journal

DEFAULT_CONFIG_PATH = "/etc/atomnode/atomnode.yml"
#: Sites' settings: ``*.yml`` here are laid over the main file in name order.
DEFAULT_DROPIN_DIR = "/etc/atomnode/conf.d"
ENV_CONFIG = "ATOMNODE_CONFIG"

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
SYNCHRONOUS_MODES = ("full", "normal", "off")
#: The web console's address when neither the file nor ``--http`` names one.
DEFAULT_HTTP_LISTEN = "127.0.0.1:4731"


@dataclass(frozen=True)
class FunctionConfig:
    """Per-function overrides (the key may be an AtoM job class without its site prefix)."""

    max_attempts: int | None = None
    max_queue: int | None = None


@dataclass(frozen=True)
class ConcurrencyGroup:
    """At most ``max`` jobs of any of ``functions`` run at once: per AtoM site (function
    prefix) unless ``span_sites``."""

    name: str
    functions: tuple[str, ...]
    max: int
    span_sites: bool = False


@dataclass(frozen=True)
class WaitFor:
    """An endpoint a pool waits for before starting workers (e.g. MySQL): a TCP
    ``host:port``, or a Unix socket ``path`` (then host is "" and port 0)."""

    name: str
    host: str
    port: int
    path: str | None = None

    @property
    def where(self) -> str:
        return self.path if self.path else format_address(self.host, self.port)


@dataclass(frozen=True)
class PoolConfig:
    """A pool of identical worker processes."""

    name: str
    command: tuple[str, ...]
    directory: str | None = None
    user: str | None = None
    group: str | None = None
    environment: Mapping[str, str] = field(default_factory=empty_map)
    count: int = 1
    servers: tuple[str, ...] = ()  # () = the embedded listener
    planned_exit_codes: tuple[int, ...] = (111,)
    max_jobs: int | None = None
    max_rss_mb: int | None = None
    max_age: float | None = None  # seconds
    age_jitter: float = 0.1
    wait_for: tuple[WaitFor, ...] = ()
    #: The functions this pool's workers register (names or patterns without the AtoM
    #: site prefix): `status` counts the pool for them while a worker is being replaced.
    functions: tuple[str, ...] = ()
    drain_timeout: float = 300.0
    stop_grace: float = 10.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0


@dataclass(frozen=True)
class HandlerConfig:
    """A function served in-process by running a command per job."""

    function: str
    command: tuple[str, ...]
    shell: bool = False
    concurrency: int = 1
    timeout: float | None = None
    user: str | None = None
    group: str | None = None
    directory: str | None = None
    environment: Mapping[str, str] = field(default_factory=empty_map)
    servers: tuple[str, ...] = ()


#: Where the package installs the per-job runner script (atom_runners' ``script``).
RUNNER_SCRIPT = "/usr/share/atomnode/atom-job-runner.php"
ON_TIMEOUT = ("fail", "requeue")


@dataclass(frozen=True)
class RunnerConfig:
    """An AtoM site whose jobs atomnode runs itself, one ``php symfony tools:run`` process
    per job (workers/atom_runner.py; docs/workers.md, "Per-job mode")."""

    name: str
    root: str
    #: The Gearman function names served (the site's prefix + job class), exactly.
    functions: tuple[str, ...]
    user: str | None = None
    group: str | None = None
    concurrency: int = 1
    timeout: float | None = None  # seconds per job; None: no limit
    on_timeout: str = "fail"  # fail | requeue
    memory_limit: int | None = None  # bytes of RSS per job (its process group)
    php: str = "php"
    #: None: the script shipped with atomnode (RUNNER_SCRIPT, else the package's copy).
    script: str | None = None
    environment: Mapping[str, str] = field(default_factory=empty_map)
    wait_for: tuple[WaitFor, ...] = ()


@dataclass(frozen=True)
class AtomSiteConfig:
    """An AtoM site whose job records atomnode may update (see docs/workers.md)."""

    root: str
    prefix: str | None = None  # None: any prefix (or an unprefixed AtoM 2.0-2.1)
    mark_failed_jobs: bool = False


@dataclass(frozen=True)
class Config:
    """The daemon's whole configuration. Field names are the internal interface."""

    listen: tuple[str, ...] = ("127.0.0.1:4730",)
    #: Networks (CIDR strings, normalised) allowed to connect besides loopback.
    allow: tuple[str, ...] = ()
    #: Unix socket answering admin commands on a worker host (listen: []); "" = next to
    #: the database (see :func:`control_socket_path`).
    control_socket: str = ""
    database: str = "var/atomnode.db"
    log_level: str = "info"
    synchronous: str = "full"
    max_attempts: int = 5
    retention_days: float = 7.0
    max_packet_size: int = 64 * 1024 * 1024
    #: Replies a connection has not read yet (``limits.output_per_connection``); past
    #: it the connection is closed. At least ``max_packet_size``.
    max_output_per_connection: int = 96 * 1024 * 1024
    #: Unread replies of all connections together (``limits.output_total``); past it the
    #: connection holding the most is closed, until the total is under the limit again.
    max_output_total: int = 256 * 1024 * 1024
    #: Unfinished input packets of all connections together (``limits.input_total``).
    max_input_total: int = 256 * 1024 * 1024
    #: Networks (CIDR) besides loopback whose peers may run state-changing admin
    #: commands (cancel, maxqueue, shutdown, create/drop function, atomnode-jobs ...).
    operator_networks: tuple[str, ...] = ()
    shutdown_timeout: float = 30.0
    status_interval: float = 5.0
    #: ``busy_poll``: seconds the hub polls its connections before it sleeps, after a
    #: short quiet spell (gearman/server.py, BUSY_POLL); 0 = never.
    busy_poll: float = 0.0002
    functions: Mapping[str, FunctionConfig] = field(default_factory=empty_map)
    concurrency: tuple[ConcurrencyGroup, ...] = ()
    pools: tuple[PoolConfig, ...] = ()
    handlers: tuple[HandlerConfig, ...] = ()
    atom_runners: tuple[RunnerConfig, ...] = ()
    #: The web console and /metrics (``http.listen``); None = off.
    http_listen: str | None = DEFAULT_HTTP_LISTEN
    #: ``http.user`` and ``http.password_hash`` (``atomnode console-password``): the
    #: credential remote and proxied requests must present (HTTP basic auth).
    http_user: str | None = None
    http_password_hash: str | None = None
    #: ``http.read_only``: the console shows no retry/cancel and refuses them.
    http_read_only: bool = False
    atom_sites: tuple[AtomSiteConfig, ...] = ()
    source: str | None = None
    #: The drop-in files laid over ``source``, in the order they were merged.
    dropins: tuple[str, ...] = ()
    #: The file was read but said nothing (0 bytes, only comments, ``null``, ``{}``):
    #: a reload from it is refused while pools or handlers run (docs/configuration.md).
    empty_file: bool = False


#: The longest ``busy_poll``: the hub's hold (gearman/server.py, HUB_HOLD).
MAX_BUSY_POLL = 0.010


class ConfigError(Exception):
    """The configuration is invalid. ``errors`` holds one message per problem; ``str()``
    is all of them, one per line."""

    def __init__(self, errors: list[str] | str):
        self.errors = [errors] if isinstance(errors, str) else list(errors)
        super().__init__("\n".join(self.errors))


_TOP_KEYS = [
    "listen", "database", "log_level", "queue", "max_packet_size", "limits",
    "operator_networks", "shutdown_timeout", "status_interval", "busy_poll", "functions",
    "concurrency",
    "pools", "handlers", "http", "allow", "control_socket", "atom_sites", "atom_runners",
]  # fmt: skip
_HTTP_KEYS = ["listen", "user", "password_hash", "read_only"]
_LIMIT_KEYS = ["output_per_connection", "output_total", "input_total"]
_QUEUE_KEYS = ["synchronous", "max_attempts", "retention_days"]
_FUNCTION_KEYS = ["max_attempts", "max_queue"]
_GROUP_KEYS = ["name", "functions", "max", "span_sites"]
_SITE_KEYS = ["root", "prefix", "mark_failed_jobs"]
_POOL_KEYS = [f.name for f in dataclasses.fields(PoolConfig)]
_HANDLER_KEYS = [f.name for f in dataclasses.fields(HandlerConfig)]
_RUNNER_KEYS = [f.name for f in dataclasses.fields(RunnerConfig)]
_WAIT_KEYS = ["name", "address", "path"]


_LIMIT_FIELDS = {
    "output_per_connection": "max_output_per_connection",
    "output_total": "max_output_total",
    "input_total": "max_input_total",
}


def _build(data: Any, doc: Doc) -> Config:
    v = Validator(doc)
    top = v.mapping(data, ())
    if top is None:
        return Config()
    v.keys(top, (), _TOP_KEYS)
    kw: dict[str, Any] = {}

    def put(name: str, value: Any) -> None:
        if value is not None:
            kw[name] = value

    if "listen" in top:
        listen = top["listen"]
        put("listen", () if listen == [] else v.addresses(listen, ("listen",)))
    if "allow" in top:
        put("allow", v.networks(top["allow"], ("allow",)))
    if "control_socket" in top:
        cs = top["control_socket"]
        put("control_socket", "" if cs in ("", None) else v.string(cs, ("control_socket",)))
    if "database" in top:
        put("database", v.string(top["database"], ("database",)))
    if "log_level" in top:
        put("log_level", v.choice(top["log_level"], ("log_level",), LOG_LEVELS))
    if "queue" in top:
        q = v.mapping(top["queue"], ("queue",))
        if q is not None:
            v.keys(q, ("queue",), _QUEUE_KEYS)
            if "synchronous" in q:
                mode = q["synchronous"]
                if mode is False:
                    mode = "off"  # YAML 1.1 reads a bare `off` as false
                put(
                    "synchronous",
                    v.choice(mode, ("queue", "synchronous"), SYNCHRONOUS_MODES),
                )
            if "max_attempts" in q:
                put(
                    "max_attempts",
                    v.integer(q["max_attempts"], ("queue", "max_attempts"), minimum=1),
                )
            if "retention_days" in q:
                r = q["retention_days"]
                p = ("queue", "retention_days")
                if isinstance(r, str):  # "12h" -> days
                    secs = v.duration(r, p)
                    put("retention_days", None if secs is None else secs / 86400.0)
                else:
                    put("retention_days", v.number(r, p, minimum=0))
    if "max_packet_size" in top:
        size = v.size(top["max_packet_size"], ("max_packet_size",))
        if size is not None and size < 1024:
            v.err(("max_packet_size",), f"expected at least 1024 bytes, got {size}")
            size = None
        put("max_packet_size", size)
    if "limits" in top:
        lim = v.mapping(top["limits"], ("limits",))
        if lim is not None:
            v.keys(lim, ("limits",), _LIMIT_KEYS)
            for key in _LIMIT_KEYS:
                if key in lim:
                    n = v.size(lim[key], ("limits", key))
                    if n is not None and n < 65536:
                        v.err(("limits", key), f"expected at least 64KiB, got {n}")
                        n = None
                    put(_LIMIT_FIELDS[key], n)
    per_conn = kw.get("max_output_per_connection", Config.max_output_per_connection)
    packet = kw.get("max_packet_size", Config.max_packet_size)
    if per_conn < packet:
        v.err(("limits", "output_per_connection") if "limits" in top else ("max_packet_size",),
              f"limits.output_per_connection ({per_conn} bytes) must be at least "
              f"max_packet_size ({packet} bytes): a reply of the largest allowed size must fit")
    if "operator_networks" in top:
        put("operator_networks", v.networks(top["operator_networks"], ("operator_networks",)))
    for name in ("shutdown_timeout", "status_interval"):
        if name in top:
            put(name, v.duration(top[name], (name,), positive=name == "status_interval"))
    if "busy_poll" in top:
        bp = top["busy_poll"]
        spin = v.duration(0 if bp is False else bp, ("busy_poll",))
        if spin is not None and spin > MAX_BUSY_POLL:
            v.err(("busy_poll",), f"expected at most {MAX_BUSY_POLL * 1000:g}ms (the hub goes "
                  f"back to its other work at least that often), got {bp!r}")
            spin = None
        put("busy_poll", spin)

    if "functions" in top:
        fmap = v.mapping(top["functions"], ("functions",))
        if fmap is not None:
            funcs: dict[str, FunctionConfig] = {}
            for fname, fval in fmap.items():
                p: Path = ("functions", fname)
                fdata = v.mapping(fval, p)
                if fdata is None:
                    continue
                v.keys(fdata, p, _FUNCTION_KEYS)
                ma = v.integer(
                    fdata.get("max_attempts"), p + ("max_attempts",), minimum=1, optional=True
                )
                mq = v.integer(fdata.get("max_queue"), p + ("max_queue",), minimum=0, optional=True)
                funcs[fname] = FunctionConfig(max_attempts=ma, max_queue=mq)
            kw["functions"] = MappingProxyType(funcs)

    if "concurrency" in top:
        groups = v.seq(top["concurrency"], ("concurrency",), "groups {name, functions, max}")
        out_g: list[ConcurrencyGroup] = []
        seen: dict[str, int] = {}
        for i, g in enumerate(groups or []):
            p = ("concurrency", i)
            gd = v.mapping(g, p)
            if gd is None:
                continue
            v.keys(gd, p, _GROUP_KEYS, required=("functions", "max"))
            name = v.string(gd.get("name", f"group{i}"), p + ("name",))
            if name is not None:
                if name in seen:
                    v.err(
                        p + ("name",),
                        f"group name {name!r} already used by concurrency[{seen[name]}]",
                    )
                seen[name] = i
            fl: tuple[str, ...] | None = None
            if "functions" in gd:
                raw = gd["functions"]
                if isinstance(raw, str):
                    raw = [raw]
                items = v.seq(raw, p + ("functions",), "function names")
                if items is not None:
                    if not items:
                        v.err(p + ("functions",), "expected at least one function name")
                    names = [v.string(x, p + ("functions", j)) for j, x in enumerate(items)]
                    if items and all(names):
                        fl = tuple(n for n in names if n)
            mx = v.integer(gd.get("max"), p + ("max",), minimum=1) if "max" in gd else None
            span = gd.get("span_sites", False)
            if not isinstance(span, bool):
                v.err(p + ("span_sites",), f"expected true or false, got {kind(span)}")
                span = False
            if name and fl and mx:
                out_g.append(ConcurrencyGroup(name=name, functions=fl, max=mx, span_sites=span))
        kw["concurrency"] = tuple(out_g)

    if "http" in top:
        _build_http(v, top["http"], kw)

    if "atom_sites" in top:
        sites = v.seq(top["atom_sites"], ("atom_sites",), "sites {root, prefix, mark_failed_jobs}")
        out_s: list[AtomSiteConfig] = []
        for i, sd in enumerate(sites or []):
            p = ("atom_sites", i)
            sm = v.mapping(sd, p)
            if sm is None:
                continue
            v.keys(sm, p, _SITE_KEYS, required=("root",))
            root = v.string(sm["root"], p + ("root",)) if "root" in sm else None
            prefix = v.string(sm.get("prefix"), p + ("prefix",), optional=True)
            mark = sm.get("mark_failed_jobs", False)
            if not isinstance(mark, bool):
                v.err(p + ("mark_failed_jobs",), f"expected true or false, got {kind(mark)}")
                mark = False
            if root is not None and not os.path.isabs(root):
                v.err(p + ("root",), f"expected an absolute path, got {root!r}")
                root = None
            if root:
                out_s.append(AtomSiteConfig(root=root, prefix=prefix, mark_failed_jobs=mark))
        kw["atom_sites"] = tuple(out_s)

    for key, build in (("pools", _build_pool), ("handlers", _build_handler),
                       ("atom_runners", _build_runner)):
        if key in top:
            items = v.seq(top[key], (key,), key)
            seen: dict[str, int] = {}
            built = (build(v, raw, (key, i), seen) for i, raw in enumerate(items or []))
            kw[key] = tuple(b for b in built if b is not None)

    if kw.get("listen") == ():
        # A worker host: nothing local to connect to, so every pool and handler must
        # name its server (and that is where job awareness comes from).
        for key in ("pools", "handlers"):
            for i, item in enumerate(kw.get(key, ())):
                if not item.servers:
                    v.err((key, i, "servers"), "required with listen: [] (a worker host has "
                          "no listener of its own): name the job server, e.g. "
                          "servers: [jobs1:4730]")
        if kw.get("atom_runners"):
            v.err(("atom_runners",), "not available with listen: [] (a worker host): the "
                  "per-job runner takes its jobs from this daemon's own queue; run it on the "
                  "job server, or use pools: on the worker host")

    return Config(**kw)


def is_off(value: Any) -> bool:
    """``none``/``off`` (or YAML's null/false) turn the web console off."""
    return value is None or value is False or (
        isinstance(value, str) and value.strip().lower() in ("none", "off", ""))


def _build_http(v: Validator, raw: Any, kw: dict[str, Any]) -> None:
    h = v.mapping(raw, ("http",))
    if h is None:
        return
    v.keys(h, ("http",), _HTTP_KEYS)
    if "listen" in h:
        if is_off(h["listen"]):
            kw["http_listen"] = None
        else:
            a = v.address(h["listen"], ("http", "listen"))
            if a is not None:
                kw["http_listen"] = a
    user = v.string(h.get("user"), ("http", "user"), optional=True)
    pw = v.string(h.get("password_hash"), ("http", "password_hash"), optional=True)
    if pw is not None and not pw.startswith("scrypt$"):
        v.err(("http", "password_hash"), "expected a hash made by `atomnode console-password` "
              "(scrypt$...), not a plain password")
        pw = None
    if ("user" in h) != ("password_hash" in h):
        v.err(("http",), "set both user and password_hash, or neither")
    kw["http_user"], kw["http_password_hash"] = user, pw
    if "read_only" in h:
        if isinstance(h["read_only"], bool):
            kw["http_read_only"] = h["read_only"]
        else:
            v.err(("http", "read_only"), f"expected true or false, got {h['read_only']!r}")
    listen = kw.get("http_listen", DEFAULT_HTTP_LISTEN)
    if listen is not None and pw is None and not is_loopback_address(listen):
        v.err(("http", "listen"), f"{listen} is not a loopback address: set http.user and "
              "http.password_hash first (`atomnode console-password`), or listen on "
              "127.0.0.1 and reach the console through a proxy or an SSH tunnel")


def is_loopback_address(address: str) -> bool:
    """``127.0.0.1:4731``, ``[::1]:4731``, ``localhost:4731`` -> True."""
    host, _port = parse_address(address)
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _optional_fields(
    v: Validator, data: dict, p: Path, kw: dict[str, Any], spec: dict[str, Callable[..., Any]]
) -> bool:
    ok = True
    for key, check in spec.items():
        if key in data:
            value = check(data[key], p + (key,))
            if value is None and data[key] is not None:
                ok = False
            elif value is not None:
                kw[key] = value
    return ok


def _entry(
    v: Validator, raw: Any, p: Path, keys: list[str], ident: str, seen: dict[str, int],
    clash: str,
) -> tuple[dict, str | None, bool, dict[str, Any]] | None:
    """The start of a pool or handler entry: a mapping of known keys with ``ident`` and a
    command, ``ident`` a string no earlier entry used (``clash.format(value, index)`` words
    the error). Returns (mapping, ident's value, ok so far, an empty dict for the entry's
    other fields), None if it is not a mapping."""
    data = v.mapping(raw, p)
    if data is None:
        return None
    v.keys(data, p, keys, required=(ident, "command"))
    ok = True
    value = v.string(data[ident], p + (ident,)) if ident in data else None
    if value is not None:
        if value in seen:
            v.err(p + (ident,), clash.format(value, seen[value]))
            ok = False
        seen.setdefault(value, int(p[-1]))
    return data, value, ok, {}


def _one_wait(v: Validator, w: Any, wq: Path) -> WaitFor | None:
    if isinstance(w, str):  # shorthand: "127.0.0.1:3306"
        w = {"address": w}
    wd = v.mapping(w, wq)
    if wd is None:
        return None
    v.keys(wd, wq, _WAIT_KEYS)
    if "address" not in wd and "path" not in wd:
        v.err(wq, "missing required key 'address' (host:port; or path: a Unix socket)")
        return None
    if "address" in wd and "path" in wd:
        v.err(wq, "expected address (host:port) or path (a Unix socket), not both")
        return None
    if "path" in wd:
        path = v.string(wd["path"], wq + ("path",))
        if path is not None and not os.path.isabs(path):
            v.err(wq + ("path",), f"expected an absolute path, got {path!r}")
            path = None
        if path is None:
            return None
        return WaitFor(name=v.string(wd.get("name", path), wq + ("name",)) or path,
                       host="", port=0, path=path)
    addr = v.address(wd["address"], wq + ("address",))
    if addr is None:
        return None
    host, port = parse_address(addr)
    wname = v.string(wd.get("name", addr), wq + ("name",)) or addr
    return WaitFor(name=wname, host=host, port=port)


def _wait_for(v: Validator, x: Any, q: Path) -> tuple[WaitFor, ...] | None:
    """``wait_for``: endpoints (MySQL, Elasticsearch) to wait for before starting work."""
    return v.each(x, q, "{name, address: host:port}", lambda w, wq: _one_wait(v, w, wq))


def _build_pool(v: Validator, raw: Any, p: Path, seen: dict[str, int]) -> PoolConfig | None:
    if (entry := _entry(v, raw, p, _POOL_KEYS, "name", seen, "pool name {!r} already used by "
                        "pools[{}]")) is None:
        return None
    data, name, ok, kw = entry
    command = v.command(data["command"], p + ("command",)) if "command" in data else None

    def opt_str(x: Any, q: Path) -> str | None:
        return v.string(x, q, optional=True)

    def codes(x: Any, q: Path) -> tuple[int, ...] | None:
        if isinstance(x, int) and not isinstance(x, bool):
            x = [x]
        items = v.seq(x, q, "exit codes")
        if items is None:
            return None
        vals = []
        for j, c in enumerate(items):
            n = v.integer(c, q + (j,), minimum=0)
            if n is not None and n > 255:
                v.err(q + (j,), f"expected an exit code 0-255, got {n}")
                n = None
            vals.append(n)
        return tuple(c for c in vals if c is not None) if all(c is not None for c in vals) else None

    def pool_functions(x: Any, q: Path) -> tuple[str, ...] | None:
        if isinstance(x, str):
            x = [x]
        items = v.seq(x, q, "function names")
        if items is None:
            return None
        names = [v.string(f, q + (j,)) for j, f in enumerate(items)]
        return tuple(n for n in names if n) if all(names) else None

    spec: dict[str, Callable[[Any, Path], Any]] = {
        "directory": opt_str,
        "user": opt_str,
        "group": opt_str,
        "environment": v.environment,
        "count": lambda x, q: v.integer(x, q, minimum=0),
        "servers": v.addresses,
        "planned_exit_codes": codes,
        "max_jobs": lambda x, q: v.integer(x, q, minimum=1, optional=True),
        "max_rss_mb": lambda x, q: v.integer(x, q, minimum=1, optional=True),
        "max_age": lambda x, q: v.duration(x, q, optional=True, positive=True),
        "age_jitter": lambda x, q: v.number(x, q, minimum=0, maximum=1),
        "wait_for": lambda x, q: _wait_for(v, x, q),
        "functions": pool_functions,
        "drain_timeout": lambda x, q: v.duration(x, q),
        "stop_grace": lambda x, q: v.duration(x, q),
        "backoff_initial": lambda x, q: v.duration(x, q, positive=True),
        "backoff_max": lambda x, q: v.duration(x, q, positive=True),
    }
    ok = _optional_fields(v, data, p, kw, spec) and ok
    bi, bm = kw.get("backoff_initial", 1.0), kw.get("backoff_max", 300.0)
    if bm < bi:
        v.err(
            p + ("backoff_max",), f"expected backoff_max >= backoff_initial ({bi:g}s), got {bm:g}s"
        )
        ok = False
    if not ok or name is None or command is None:
        return None
    return PoolConfig(name=name, command=command, **kw)


def _build_handler(v: Validator, raw: Any, p: Path, seen: dict[str, int]) -> HandlerConfig | None:
    if (entry := _entry(v, raw, p, _HANDLER_KEYS, "function", seen, "function {!r} already "
                        "handled by handlers[{}]")) is None:
        return None
    data, function, ok, kw = entry
    shell = data.get("shell", False)
    if not isinstance(shell, bool):
        v.err(p + ("shell",), f"expected true or false, got {shell!r}")
        ok, shell = False, False
    kw["shell"] = shell
    command = (
        v.command(data["command"], p + ("command",), shell=shell) if "command" in data else None
    )

    def opt_str(x: Any, q: Path) -> str | None:
        return v.string(x, q, optional=True)

    spec: dict[str, Callable[[Any, Path], Any]] = {
        "concurrency": lambda x, q: v.integer(x, q, minimum=1),
        "timeout": lambda x, q: v.duration(x, q, optional=True, positive=True),
        "user": opt_str,
        "group": opt_str,
        "directory": opt_str,
        "environment": v.environment,
        "servers": v.addresses,
    }
    ok = _optional_fields(v, data, p, kw, spec) and ok
    if not ok or function is None or command is None:
        return None
    return HandlerConfig(function=function, command=command, **kw)


def _build_runner(v: Validator, raw: Any, p: Path, seen: dict[str, int]) -> RunnerConfig | None:
    data = v.mapping(raw, p)
    if data is None:
        return None
    v.keys(data, p, _RUNNER_KEYS, required=("name", "root", "functions"))
    ok = True
    name = v.string(data["name"], p + ("name",)) if "name" in data else None
    if name is not None:
        if name in seen:
            v.err(p + ("name",), f"runner name {name!r} already used by atom_runners[{seen[name]}]")
            ok = False
        seen.setdefault(name, int(p[-1]))
    root = v.string(data["root"], p + ("root",)) if "root" in data else None
    if root is not None and not os.path.isabs(root):
        v.err(p + ("root",), f"expected an absolute path (the AtoM site's root), got {root!r}")
        root = None
    functions: tuple[str, ...] | None = None
    if "functions" in data:
        x = data["functions"]
        items = v.seq([x] if isinstance(x, str) else x, p + ("functions",), "function names")
        if items is not None:
            names = [v.string(f, p + ("functions", j)) for j, f in enumerate(items)]
            if all(names) and names:
                functions = tuple(n for n in names if n)
            elif not names:
                v.err(p + ("functions",), "expected at least one function name (the site's "
                      "job prefix + job class, as `atomnode atom-config --per-job` writes)")

    def opt_str(x: Any, q: Path) -> str | None:
        return v.string(x, q, optional=True)

    def abs_path(x: Any, q: Path) -> str | None:
        s_ = v.string(x, q, optional=True)
        if s_ is not None and not os.path.isabs(s_):
            v.err(q, f"expected an absolute path, got {s_!r}")
            return None
        return s_

    kw: dict[str, Any] = {}
    spec: dict[str, Callable[[Any, Path], Any]] = {
        "user": opt_str,
        "group": opt_str,
        "concurrency": lambda x, q: v.integer(x, q, minimum=1),
        "timeout": lambda x, q: v.duration(x, q, optional=True, positive=True),
        "on_timeout": lambda x, q: v.choice(x, q, ON_TIMEOUT),
        "memory_limit": lambda x, q: v.size(x, q),
        "php": lambda x, q: v.string(x, q),
        "script": abs_path,
        "environment": v.environment,
        "wait_for": lambda x, q: _wait_for(v, x, q),
    }
    ok = _optional_fields(v, data, p, kw, spec) and ok
    if not ok or name is None or root is None or functions is None:
        return None
    return RunnerConfig(name=name, root=root, functions=functions, **kw)


# --------------------------------------------------------------------------- loading


def _compose(doc: Doc, text: str) -> tuple[Any, str | None]:
    """YAML ``text`` converted by ``doc``: (value, None), or (None, the syntax error)."""
    filename = doc.filename
    try:
        node = yaml.compose(text, Loader=YAML_LOADER)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark else ""
        problem = e.problem or e.context or "invalid YAML"
        return None, f"{filename}{line}: not valid YAML: {problem}"
    except yaml.YAMLError as e:
        return None, f"{filename}: not valid YAML: {e}"
    try:
        return (None if node is None else doc.convert(node, ())), None
    except yaml.YAMLError as e:  # e.g. an unknown tag (!!python/object)
        return None, f"{filename}: {e}"


def parse_config(
    text: str, filename: str = "<config>", dropins: Sequence[tuple[str, str]] = ()
) -> Config:
    """Validate YAML ``text`` (named ``filename`` in messages), with the drop-in files
    ``dropins`` ((name, text) pairs, in the order given) laid over it: mappings merge key
    by key, any other value replaces the earlier one (see :meth:`Doc.lay_over`). The result
    is validated as one configuration; each problem names the file its value came from.
    Raises ConfigError."""
    doc = Doc(filename)
    data, syntax = _compose(doc, text)
    syntax_errors = [syntax] if syntax else []
    said_something = data not in (None, {})
    for name, dropin_text in dropins:
        sub = Doc(name)
        value, syntax = _compose(sub, dropin_text)
        if syntax:
            syntax_errors.append(syntax)
        errors = sub.errors  # e.g. a key given twice within the drop-in
        if errors:
            syntax_errors.extend(errors)
        if value is None:
            continue  # an empty drop-in (or only comments) changes nothing
        said_something = said_something or value != {}
        data = doc.lay_over(data, sub, value)
    if syntax_errors:
        raise ConfigError(syntax_errors + doc.errors)
    try:
        cfg = _build(data, doc)
    except yaml.YAMLError as e:  # e.g. an unknown tag (!!python/object)
        doc.add_error(0, f"{filename}: {e}")
        cfg = Config()
    if doc.errors:
        raise ConfigError(doc.errors)
    if not said_something:
        cfg = dataclasses.replace(cfg, empty_file=True)
    return cfg


def _apply_overrides(cfg: Config, overrides: Mapping[str, Any]) -> Config:
    names = {f.name for f in dataclasses.fields(Config)}
    errors: list[str] = []
    changes: dict[str, Any] = {}
    for key, value in overrides.items():
        if value is None:
            continue  # an option that was not given
        if key not in names:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            errors.append(f"command line: unknown setting {key!r}{hint}")
            continue
        if key == "listen":
            value = (value,) if isinstance(value, str) else tuple(value)
            for a in value:
                try:
                    parse_address(a)
                except ValueError as e:
                    errors.append(f"command line: listen: expected host:port: {e}")
        elif key == "http_listen":
            if is_off(value):
                value = None
            else:
                try:
                    parse_address(value)
                except ValueError as e:
                    errors.append(f"command line: --http: expected host:port or none: {e}")
                else:
                    if cfg.http_password_hash is None and not is_loopback_address(value):
                        errors.append(
                            f"command line: --http {value}: not a loopback address, and the "
                            "configuration sets no http.user/http.password_hash")
        elif key == "log_level" and str(value).lower() not in LOG_LEVELS:
            errors.append(
                f"command line: log_level: expected one of {', '.join(LOG_LEVELS)}, got {value!r}"
            )
        elif key == "log_level":
            value = str(value).lower()
        changes[key] = value
    if errors:
        raise ConfigError(errors)
    return dataclasses.replace(cfg, **changes)


def resolve_config_path(path: str | os.PathLike[str] | None) -> tuple[str | None, bool]:
    """Which file :func:`load_config` reads: ``(path or None, explicit)``."""
    if path is not None:
        return os.fspath(path), True
    env = os.environ.get(ENV_CONFIG)
    if env:
        return env, True
    if os.path.exists(DEFAULT_CONFIG_PATH):
        return DEFAULT_CONFIG_PATH, False
    return None, False


def dropin_dir(main: str | None) -> str:
    """Where the drop-ins of configuration file ``main`` are: ``conf.d/`` beside it
    (``/etc/atomnode/conf.d`` for the default file, and when there is no file)."""
    if main is None:
        return DEFAULT_DROPIN_DIR
    return os.path.join(os.path.dirname(os.path.abspath(main)), "conf.d")


def list_dropins(directory: str) -> list[str]:
    """The drop-in files in ``directory``: ``*.yml``, in name order (byte order of the
    names, as ``ls`` sorts them in the C locale), hidden files skipped; none when the
    directory does not exist."""
    try:
        names = os.listdir(directory)
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as e:
        raise ConfigError(f"{directory}: cannot list the drop-in directory: "
                          f"{e.strerror or e}") from None
    return [
        os.path.join(directory, n)
        for n in sorted(names, key=os.fsencode)
        if n.endswith(".yml") and not n.startswith(".")
    ]


def _read(filename: str, what: str) -> str:
    try:
        with open(filename, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"{filename}: cannot read the {what}: {why}") from None


def load_config(
    path: str | os.PathLike[str] | None = None, *, overrides: Mapping[str, Any] | None = None
) -> Config:
    """Read and validate the configuration: the main file and its drop-ins
    (:func:`dropin_dir`), merged in name order and validated as one; ``overrides``
    (Config field names, e.g. from command-line flags; None values ignored) win over the
    files. Raises ConfigError."""
    filename, explicit = resolve_config_path(path)
    dropins = [(name, _read(name, "drop-in file")) for name in list_dropins(dropin_dir(filename))]
    if filename is None:
        cfg = parse_config("", "<embedded defaults>", dropins) if dropins else Config()
    else:
        try:
            with open(filename, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            how = f" (from ${ENV_CONFIG})" if path is None and explicit else ""
            raise ConfigError(f"{filename}: configuration file not found{how}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{filename}: cannot read the configuration file: {e}") from None
        cfg = dataclasses.replace(parse_config(text, filename, dropins), source=filename)
    if dropins:
        cfg = dataclasses.replace(cfg, dropins=tuple(name for name, _ in dropins))
    if overrides:
        cfg = _apply_overrides(cfg, overrides)
    return cfg


# --------------------------------------------------------------------------- formatting


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """The effective configuration in the YAML file's shape (every key, defaults included)."""

    def plain(obj: Any) -> Any:
        if isinstance(obj, Mapping):
            return {k: plain(v) for k, v in obj.items()}
        if isinstance(obj, tuple):
            return [plain(x) for x in obj]
        return obj

    def pool(pc: PoolConfig | RunnerConfig) -> dict[str, Any]:
        d = {f.name: plain(getattr(pc, f.name)) for f in dataclasses.fields(pc)}
        d["wait_for"] = [
            {"name": w.name, "path": w.path}
            if w.path
            else {"name": w.name, "address": format_address(w.host, w.port)}
            for w in pc.wait_for
        ]
        return d

    def handler(h: HandlerConfig) -> dict[str, Any]:
        d = {f.name: plain(getattr(h, f.name)) for f in dataclasses.fields(h)}
        if h.shell and len(h.command) == 1:
            d["command"] = h.command[0]
        return d

    return {
        "listen": list(cfg.listen),
        "allow": list(cfg.allow),
        "control_socket": cfg.control_socket,
        "database": cfg.database,
        "log_level": cfg.log_level,
        "queue": {
            "synchronous": cfg.synchronous,
            "max_attempts": cfg.max_attempts,
            "retention_days": cfg.retention_days,
        },
        "max_packet_size": cfg.max_packet_size,
        "limits": {
            key: getattr(cfg, field_name) for key, field_name in _LIMIT_FIELDS.items()
        },
        "operator_networks": list(cfg.operator_networks),
        "shutdown_timeout": cfg.shutdown_timeout,
        "status_interval": cfg.status_interval,
        "busy_poll": cfg.busy_poll,
        "functions": {
            name: {k: v for k, v in dataclasses.asdict(fc).items() if v is not None}
            for name, fc in cfg.functions.items()
        },
        "concurrency": [
            {"name": g.name, "functions": list(g.functions), "max": g.max,
             "span_sites": g.span_sites}
            for g in cfg.concurrency
        ],
        "pools": [pool(p) for p in cfg.pools],
        "handlers": [handler(h) for h in cfg.handlers],
        "atom_runners": [pool(r) for r in cfg.atom_runners],
        "http": {
            "listen": cfg.http_listen or "none",
            "user": cfg.http_user,
            "password_hash": cfg.http_password_hash and "(set)",
            "read_only": cfg.http_read_only,
        },
        "atom_sites": [dataclasses.asdict(s) for s in cfg.atom_sites],
    }


def control_socket_path(cfg: Config) -> str:
    """Where a worker host's daemon answers admin commands (``atomnode status``): the
    ``control_socket`` setting, else ``atomnode.sock`` beside the queue database."""
    if cfg.control_socket:
        return cfg.control_socket
    return os.path.join(os.path.dirname(cfg.database) or ".", "atomnode.sock")


def format_config(cfg: Config) -> str:
    """YAML of the effective configuration (what ``atomnode check-config`` prints)."""
    head = f"# effective configuration (from {cfg.source or 'embedded defaults'})\n"
    head += "".join(f"# with the drop-in {name}\n" for name in cfg.dropins)
    return head + yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False)
