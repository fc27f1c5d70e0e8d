"""What atomnode knows about an AtoM site, read from its tree: ``atomnode atom-config``.

``read_atom_site(root)`` reads an AtoM installation the way that release of AtoM reads
itself, and ``atom_config_yaml(site)`` turns it into a ready atomnode configuration.

What differs between AtoM 2.x releases (checked against the release trees; see
docs/workers.md, "Which AtoM releases"):

============  ======================  ==========================================  ==============
release       worker task             Gearman server read from                    function name
============  ======================  ==========================================  ==============
2.0.0-2.0.1   tools:gearman-worker    hard-coded ``localhost:4730``               ``Class``
2.0.2-2.1     tools:gearman-worker    ``gearman_job_server`` in config/app.yml    ``Class``
2.2           jobs:worker             config/gearman.yml ``servers``              ``ROOT - Class``
2.3-2.5.1     jobs:worker             config/gearman.yml ``servers``              md5(siteTitle .
                                                                                   siteBaseUrl .
                                                                                   ROOT)-Class
2.5.2+        jobs:worker             config/gearman.yml ``servers``              md5(ROOT .
                                                                                   workers_key)-Class
============  ======================  ==========================================  ==============

The release is recognised from the code in the tree (the worker task that exists, how it
finds its server, how ``QubitJob::getJobPrefix()`` builds the prefix), not from a version
number. Every release reads its database settings from ``config/config.php`` (written by
the installer; ``config/databases.yml`` is left as a template). symfony merges a project
file with the application's (``apps/qubit/config/...``), the application winning; these
readers do the same merge (``sfToolkit::arrayDeepMerge``: lists too are merged by index).
Values AtoM keeps in MySQL (enabled plugins; the site title and base URL of 2.3-2.5.1)
are read with the site's own credentials (:func:`read_mysql_values`).
"""

from __future__ import annotations

import argparse
import glob
import hashlib
import os
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..system.config import (
    DEFAULT_DROPIN_DIR,
    ConfigError,
    dropin_dir,
    format_address,
    load_config,
    parse_address,
    parse_config,
    resolve_config_path,
)
from .php import PhpSyntaxError, parse_php_return, php_unserialize

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4730
#: Where PHP's PDO MySQL driver connects for host "localhost" (pdo_mysql.default_socket
#: of Debian's and Ubuntu's PHP).
DEFAULT_MYSQL_SOCKET = "/var/run/mysqld/mysqld.sock"
#: The job class AtoM 2.0-2.1 workers register (hard-coded in tools:gearman-worker).
SWORD_CLASS = "qtSwordPluginWorker"
#: Jobs that AtoM serialises itself by sleeping inside the worker; atomnode can do it.
ATOM_SERIAL_JOBS = ("arObjectMoveJob", "arFileImportJob")
#: Release families, oldest first (names used in messages, docs and tests).
FAMILIES = ("2.0.0-2.0.1", "2.0.2-2.1", "2.2", "2.3-2.5.1", "2.5.2+")
#: Resident memory of one idle ``php symfony jobs:worker``, as observed on AtoM 2.9 (issue #9).
WORKER_RSS_MB = 37


class AtomError(Exception):
    """The AtoM tree cannot be read."""


# =========================================================================== data


@dataclass
class Database:
    """AtoM's MySQL connection, from the DSN in config/config.php."""

    dbname: str = ""
    host: str | None = None  # None: a Unix socket (PDO's "localhost")
    port: int = 3306
    socket: str | None = None
    user: str = ""
    password: str = ""
    source: str = "config/config.php"

    @property
    def where(self) -> str:
        """``host:port`` or the socket path, for messages."""
        if self.host is None:
            return self.socket or DEFAULT_MYSQL_SOCKET
        return format_address(self.host, self.port)


@dataclass
class AtomSite:
    """What atomnode needs to know about one AtoM installation."""

    root: str  # realpath: symfony's sf_root_dir
    family: str = "2.5.2+"
    version: str | None = None  # AtoM's own VERSION constant, for messages only
    worker_task: str = "jobs:worker"
    server_source: str = "config/gearman.yml"
    servers: list[tuple[str, int]] = field(default_factory=list)  # web app (env prod)
    worker_servers: list[tuple[str, int]] = field(default_factory=list)  # workers (env cli)
    prefix_scheme: str = "key"  # none | root | title | key
    workers_key: str = ""
    site_title: str | None = None  # 2.3-2.5.1 only (MySQL)
    site_base_url: str | None = None
    worker_types: dict[str, list[str]] = field(default_factory=dict)
    class_plugin: dict[str, str | None] = field(default_factory=dict)  # None: core lib/
    missing_classes: list[str] = field(default_factory=list)
    static_plugins: list[str] = field(default_factory=list)
    db_plugins: list[str] | None = None  # None: not known
    max_job_count: bool = False
    database: Database | None = None
    search: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Values that could not be read, each with the option that supplies it.
    missing: list[str] = field(default_factory=list)
    mysql_error: str | None = None

    @property
    def prefix(self) -> str | None:
        """The function-name prefix of this site's jobs, or None if a value it needs is
        not known (2.3-2.5.1 without MySQL)."""
        if self.prefix_scheme == "none":
            return ""
        if self.prefix_scheme == "root":
            return self.root + " - "
        if self.prefix_scheme == "title":
            if self.site_title is None or self.site_base_url is None:
                return None
            return atom_function_prefix(self.site_title + self.site_base_url + self.root)
        return atom_function_prefix(self.root, self.workers_key)

    @property
    def job_classes(self) -> list[str]:
        """Every job class the tree declares (gearman.yml worker_types, or the list
        hard-coded in 2.0-2.1's worker task)."""
        seen: dict[str, None] = {}
        for classes in self.worker_types.values():
            for c in classes:
                seen.setdefault(c, None)
        return list(seen)

    @property
    def enabled_plugins(self) -> list[str] | None:
        if self.db_plugins is None:
            return None
        return list(dict.fromkeys(self.static_plugins + self.db_plugins))

    def plugin_enabled(self, plugin: str) -> bool | None:
        if plugin in self.static_plugins:
            return True
        if self.db_plugins is None:
            return None
        return plugin in self.db_plugins

    @property
    def served_classes(self) -> list[str]:
        """The job classes a worker of this site registers: 2.0-2.1 register their list
        unconditionally; from 2.2 ``jobs:worker`` skips a class that does not exist,
        which is the case for a class of a disabled plugin. A class whose plugin's state
        is unknown (MySQL unreachable, no --plugins) is left out."""
        if self.worker_task == "tools:gearman-worker":
            return self.job_classes
        out = []
        for c in self.job_classes:
            if c in self.missing_classes:
                continue
            plugin = self.class_plugin.get(c)
            if plugin is None or self.plugin_enabled(plugin):
                out.append(c)
        return out

    @property
    def skipped_classes(self) -> dict[str, str]:
        """Declared classes the workers will not register, with the reason."""
        out: dict[str, str] = {}
        served = set(self.served_classes)
        for c in self.job_classes:
            if c in served:
                continue
            if c in self.missing_classes:
                out[c] = "its class is not in the tree"
                continue
            plugin = self.class_plugin.get(c) or "?"
            state = self.plugin_enabled(plugin)
            out[c] = (
                f"{plugin} is disabled"
                if state is False
                else f"whether {plugin} is enabled is not known"
            )
        return out

    @property
    def functions(self) -> list[str]:
        """The Gearman function names the site's workers register (prefix + class), or
        the bare class names if the prefix is not known."""
        prefix = self.prefix or ""
        return [prefix + c for c in self.served_classes]

    @property
    def check_server(self) -> tuple[str, int]:
        """The server AtoM's web app asks for ``status`` (arGearman::getServer: the last)."""
        return self.servers[-1] if self.servers else (DEFAULT_HOST, DEFAULT_PORT)

    @property
    def release(self) -> str:
        return f"AtoM {self.version}" if self.version else f"AtoM {self.family}"


def atom_function_prefix(root: str, workers_key: str = "") -> str:
    """``md5(sf_root_dir . app_workers_key) . '-'``, as AtoM 2.5.2+ QubitJob::getJobPrefix()."""
    return hashlib.md5((root + (workers_key or "")).encode()).hexdigest() + "-"


# =========================================================================== symfony config


def php_array_merge(a: Any, b: Any) -> Any:
    """``sfToolkit::arrayDeepMerge(a, b)``: ``b`` wins; mappings *and lists* merge key by
    key (a list's keys are its indexes, as in PHP)."""
    if isinstance(a, list):
        a = dict(enumerate(a))
    if isinstance(b, list):
        b = dict(enumerate(b))
    if not (isinstance(a, dict) and isinstance(b, dict)):
        return b
    out: dict[Any, Any] = {}
    for key in list(a) + [k for k in b if k not in a]:
        if key in a and key in b:
            out[key] = php_array_merge(a[key], b[key])
        elif key in a:
            out[key] = a[key]
        else:
            out[key] = b[key]
    return out


def _values(v: Any) -> list[Any]:
    """A merged PHP array's values in order (lists come back from the merge as dicts)."""
    if isinstance(v, dict):
        return list(v.values())
    if isinstance(v, list):
        return v
    return [] if v is None else [v]


def _read_yaml(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return yaml.safe_load(f)
    except FileNotFoundError:
        return None
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise AtomError(f"{path}: cannot read: {e}") from None


def symfony_config(paths: Iterable[str], env: str) -> dict[Any, Any]:
    """Merge config files as symfony does (``parseYamls`` then
    ``flattenConfigurationWithEnvironment``): each file's environments, later files
    winning, then ``default`` < ``all`` < ``env``."""
    merged: Any = {}
    for path in paths:
        data = _read_yaml(path)
        if not isinstance(data, dict):
            continue
        values = {k: v for k, v in data.items() if v is not None}
        merged = php_array_merge(merged, values)
    out: Any = {}
    for section in ("default", "all", env):
        part = merged.get(section) if isinstance(merged, dict) else None
        if isinstance(part, dict):
            out = php_array_merge(out, part)
    return out if isinstance(out, dict) else {}


def _config_paths(root: str, name: str, plugins: Iterable[str] = ()) -> list[str]:
    """sfApplicationConfiguration::getConfigPaths: plugins, project, application."""
    out = [os.path.join(root, "plugins", p, "config", name) for p in plugins]
    out += [os.path.join(root, "config", name), os.path.join(root, "apps", "qubit", "config", name)]
    return [p for p in out if os.path.exists(p)]


def _server_address(value: Any) -> tuple[str, int] | None:
    """A Net_Gearman server string (``host:port``, ``host``) as (host, port)."""
    if isinstance(value, dict):  # 2.0's unused gearman.yml layout: {host, post}
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


def _servers(value: Any, where: str, notes: list[str]) -> list[tuple[str, int]]:
    out = []
    for v in _values(value):
        addr = _server_address(v)
        if addr:
            out.append(addr)
        else:
            notes.append(f"{where}: cannot read server {v!r}")
    return out


def _parse_dsn(dsn: str) -> dict[str, str]:
    _, _, rest = dsn.partition(":")
    out: dict[str, str] = {}
    for part in rest.split(";"):
        k, sep, v = part.partition("=")
        if sep:
            out[k.strip().lower()] = v.strip()
    return out


def database_from_param(param: dict[Any, Any], source: str) -> Database | None:
    """Database settings from a propel ``param`` mapping (dsn, username, password)."""
    dsn = param.get("dsn")
    if not (isinstance(dsn, str) and dsn.startswith("mysql:")):
        return None
    parts = _parse_dsn(dsn)
    db = Database(
        dbname=parts.get("dbname", ""),
        user=str(param.get("username") or ""),
        password=str(param.get("password") or ""),
        source=source,
    )
    try:
        db.port = int(parts.get("port", "3306"))
    except ValueError:
        pass
    host = parts.get("host", "localhost")
    if parts.get("unix_socket"):
        db.socket = parts["unix_socket"]
    elif host == "localhost":
        db.socket = DEFAULT_MYSQL_SOCKET  # PDO MySQL: "localhost" means the Unix socket
    else:
        db.host = host
    return db


def read_database(root: str, notes: list[str]) -> Database | None:
    """The database settings AtoM uses: ``config/config.php`` (every 2.x release's
    sfDatabaseManager includes it); ``config/databases.yml`` only if there is no
    config.php (a hand-made setup), since the installer leaves it a template."""
    php_path = os.path.join(root, "config", "config.php")
    if os.path.exists(php_path):
        try:
            with open(php_path, encoding="utf-8") as f:
                data = parse_php_return(f.read())
        except (OSError, UnicodeDecodeError, PhpSyntaxError) as e:
            notes.append(f"{php_path}: cannot read the database settings: {e}")
            return None
        conf = php_array_merge(
            data.get("all", {}) if isinstance(data, dict) else {},
            data.get("cli", {}) if isinstance(data, dict) else {},
        )
        param = (
            conf.get("propel", {}).get("param") if isinstance(conf.get("propel"), dict) else None
        )
        db = database_from_param(param, "config/config.php") if isinstance(param, dict) else None
        if db is None:
            notes.append(f"{php_path}: no MySQL DSN (all: propel: param: dsn)")
        return db
    yml = symfony_config(_config_paths(root, "databases.yml"), "cli")
    propel = yml.get("propel")
    param = propel.get("param") if isinstance(propel, dict) else None
    if isinstance(param, dict):
        db = database_from_param(param, "config/databases.yml")
        if db is not None:
            notes.append(
                f"{php_path} not found (the AtoM installer writes it): "
                "using the DSN in config/databases.yml"
            )
            return db
    notes.append(
        f"{php_path} not found and no MySQL DSN in config/databases.yml: "
        "is AtoM installed (php symfony tools:install)?"
    )
    return None


def _read_text(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def _class_files(root: str) -> dict[str, str | None]:
    """Job class name -> the plugin whose lib/ holds it (None: the core lib/)."""
    out: dict[str, str | None] = {}
    for plugin_lib in sorted(glob.glob(os.path.join(root, "plugins", "*", "lib"))):
        plugin = os.path.basename(os.path.dirname(plugin_lib))
        for _dir, _subdirs, files in os.walk(plugin_lib):
            for f in files:
                if f.endswith(".class.php"):
                    out.setdefault(f[: -len(".class.php")], plugin)
    for _dir, _subdirs, files in os.walk(os.path.join(root, "lib")):
        for f in files:
            if f.endswith(".class.php"):
                out[f[: -len(".class.php")]] = None
    return out


# =========================================================================== the reader


def read_atom_site(
    root: str,
    *,
    mysql: bool = True,
    plugins: list[str] | None = None,
    site_title: str | None = None,
    site_base_url: str | None = None,
    culture: str | None = None,
    mysql_timeout: float = 3.0,
) -> AtomSite:
    """Read the AtoM tree at ``root``. Raises AtomError if it is not an AtoM 2.x root.

    ``mysql``: read the values AtoM keeps in MySQL (enabled plugins; the site title and
    base URL on 2.3-2.5.1) with the site's credentials. ``plugins``, ``site_title`` and
    ``site_base_url`` supply them instead. ``culture``: whose site title (default: the
    site's default culture)."""
    if not os.path.isdir(root):
        raise AtomError(
            f"{root}: no such directory (expected the AtoM root, with config/ and symfony)"
        )
    real = os.path.realpath(root)
    site = AtomSite(root=real)
    jobs_task = os.path.join(real, "lib", "task", "jobs", "jobWorkerTask.class.php")
    tools_task = os.path.join(real, "lib", "task", "tools", "gearmanWorkerTask.class.php")
    if not os.path.isdir(os.path.join(real, "config")):
        raise AtomError(f"{real}/config not found: is {root} an AtoM root?")
    if not os.path.exists(os.path.join(real, "symfony")):
        site.notes.append(f"{real}/symfony not found: is this an AtoM root?")
    qc = _read_text(os.path.join(real, "apps", "qubit", "config", "qubitConfiguration.class.php"))
    m = re.search(r"VERSION\s*=\s*'([^']+)'", qc or "")
    site.version = m.group(1) if m else None

    if os.path.exists(jobs_task):
        _read_jobs_worker_site(site, jobs_task)
    elif os.path.exists(tools_task):
        _read_tools_worker_site(site, tools_task)
    else:
        raise AtomError(
            f"{real}: neither lib/task/jobs/jobWorkerTask.class.php (AtoM 2.2 and later) nor "
            "lib/task/tools/gearmanWorkerTask.class.php (AtoM 2.0-2.1): is this an AtoM 2.x root?"
        )

    site.database = read_database(real, site.notes)
    pc = _read_text(os.path.join(real, "config", "ProjectConfiguration.class.php")) or ""
    site.static_plugins = sorted(set(re.findall(r"'([A-Za-z0-9_]+Plugin)'", pc)))

    # Elasticsearch: only where the site's own search configuration names the host (the
    # installer writes config/search.yml); the plugin's defaults alone do not count.
    own = _config_paths(real, "search.yml")
    if own:
        es = symfony_config(_config_paths(real, "search.yml", ["arElasticSearchPlugin"]), "cli")
        server = es.get("server")
        if isinstance(server, dict):
            host = str(server.get("host") or "localhost")
            try:
                port = int(server.get("port") or 9200)
            except (TypeError, ValueError):
                port = 9200
            site.search.append((host, port))

    settings = symfony_config(_config_paths(real, "settings.yml"), "cli")
    dflt = settings.get(".settings", {}) if isinstance(settings.get(".settings"), dict) else {}
    culture = culture or str(dflt.get("default_culture") or "en")

    plugin_classes = [c for c in site.job_classes if site.class_plugin.get(c)]
    need_plugins = (
        plugins is None
        and site.worker_task == "jobs:worker"
        and any(site.plugin_enabled(site.class_plugin[c] or "") is None for c in plugin_classes)
    )
    need_title = site.prefix_scheme == "title" and (site_title is None or site_base_url is None)
    if plugins is not None:
        site.db_plugins = list(plugins)
    site.site_title, site.site_base_url = site_title, site_base_url
    if (need_plugins or need_title) and mysql and site.database is not None:
        try:
            values = read_mysql_values(
                site.database,
                plugins=need_plugins,
                title=need_title,
                culture=culture,
                timeout=mysql_timeout,
            )
        except MysqlUnavailable as e:
            site.mysql_error = str(e)
        else:
            if need_plugins:
                site.db_plugins = values.get("plugins") or []
            if need_title:
                if site.site_title is None:
                    site.site_title = values.get("siteTitle") or ""
                if site.site_base_url is None:
                    site.site_base_url = values.get("siteBaseUrl") or ""
    why = _why_no_mysql(site, mysql)
    if site.db_plugins is None and need_plugins:
        names = ", ".join(sorted({site.class_plugin[c] or "" for c in plugin_classes}))
        classes = ", ".join(c for c in plugin_classes)
        site.missing.append(
            f"which plugins are enabled ({names}) is kept in MySQL, and {why}: {classes} "
            "left out; give the enabled plugins with --plugins (e.g. --plugins qtSwordPlugin, "
            "or --plugins '' for none)"
        )
    if site.prefix_scheme == "title" and site.prefix is None:
        site.missing.append(
            f"the job prefix of {site.release} is md5(siteTitle . siteBaseUrl . root); "
            f"siteTitle and siteBaseUrl are kept in MySQL, and {why}: give them with "
            "--site-title and --site-base-url (as in Admin > Settings > Site information)"
        )
    return site


def _why_no_mysql(site: AtomSite, mysql: bool) -> str:
    if not mysql:
        return "--no-mysql was given"
    if site.database is None:
        return "the site's database settings could not be read"
    return f"MySQL could not be read: {site.mysql_error}"


def _read_jobs_worker_site(site: AtomSite, task_path: str) -> None:
    """AtoM 2.2 and later: ``php symfony jobs:worker``, config/gearman.yml."""
    real = site.root
    site.worker_task = "jobs:worker"
    task = _read_text(task_path) or ""
    site.max_job_count = "max-job-count" in task
    qubit_job = _read_text(os.path.join(real, "lib", "model", "QubitJob.php")) or ""
    m = re.search(r"function\s+getJobPrefix\s*\(\s*\)\s*\{(.*?)\n\s*\}", qubit_job, re.DOTALL)
    body = m.group(1) if m else ""
    if "app_workers_key" in body:
        site.prefix_scheme, site.family = "key", "2.5.2+"
    elif "app_siteTitle" in body:
        site.prefix_scheme, site.family = "title", "2.3-2.5.1"
    elif "' - '" in body or '" - "' in body:
        site.prefix_scheme, site.family = "root", "2.2"
    else:
        site.prefix_scheme, site.family = "key", "2.5.2+"
        site.notes.append(
            "lib/model/QubitJob.php: getJobPrefix() not recognised; assuming "
            "md5(root . workers_key) as in AtoM 2.5.2 and later"
        )
    paths = _config_paths(real, "gearman.yml")
    if not paths:
        raise AtomError(f"{real}/config/gearman.yml not found: is {real} an AtoM root?")
    site.server_source = " + ".join(os.path.relpath(p, real) for p in paths)
    web = symfony_config(paths, "prod")
    cli = symfony_config(paths, "cli")
    where = site.server_source
    site.servers = _servers(web.get("servers"), where, site.notes)
    site.worker_servers = _servers(cli.get("servers"), where, site.notes)
    if not site.servers:
        site.notes.append(f"{where}: no servers: AtoM stops with 'No servers specified'")
    if site.worker_servers != site.servers:
        site.notes.append(
            f"{where}: the workers (environment cli) use "
            f"{', '.join(format_address(*s) for s in site.worker_servers) or 'no server'} but the "
            f"web app (prod) {', '.join(format_address(*s) for s in site.servers) or 'no server'}"
        )
    wt = cli.get("worker_types")
    if isinstance(wt, dict):
        site.worker_types = {str(k): [str(c) for c in _values(v) if c] for k, v in wt.items()}
    else:
        site.notes.append(f"{where}: no worker_types: AtoM's jobs:worker stops with 'No abilities'")
    app = symfony_config(_config_paths(real, "app.yml"), "cli")
    if app.get("workers_key") is not None:
        site.workers_key = str(app["workers_key"])
    files = _class_files(real)
    for c in site.job_classes:
        if c in files:
            site.class_plugin[c] = files[c]
        else:
            site.missing_classes.append(c)
            site.notes.append(
                f"{c} is in worker_types but its class is not in lib/ or plugins/*/lib/: "
                "jobs:worker skips it ('Ability not defined')"
            )


def _read_tools_worker_site(site: AtomSite, task_path: str) -> None:
    """AtoM 2.0-2.1: ``php symfony tools:gearman-worker``, unprefixed names."""
    real = site.root
    site.worker_task = "tools:gearman-worker"
    site.prefix_scheme = "none"
    task = _read_text(task_path) or ""
    m = re.search(r"foreach\s*\(\s*array\s*\(([^)]*)\)\s*as", task)
    classes = re.findall(r"'([A-Za-z0-9_]+)'", m.group(1)) if m else []
    site.worker_types = {"sword": classes or [SWORD_CLASS]}
    for c in site.job_classes:
        site.class_plugin[c] = "qtSwordPlugin" if c == SWORD_CLASS else None
    if "app_gearman_job_server" in task:
        site.family = "2.0.2-2.1"
        app = symfony_config(_config_paths(real, "app.yml"), "cli")
        web = symfony_config(_config_paths(real, "app.yml"), "prod")
        site.server_source = "gearman_job_server in config/app.yml"
        site.worker_servers = _servers(
            app.get("gearman_job_server"), site.server_source, site.notes
        )
        site.servers = _servers(web.get("gearman_job_server"), site.server_source, site.notes)
        if not site.worker_servers:
            site.notes.append("config/app.yml has no gearman_job_server: the worker cannot start")
    else:
        site.family = "2.0.0-2.0.1"
        m = re.search(r"Net_Gearman_Worker\s*\(\s*array\s*\(\s*'([^']+)'", task)
        addr = _server_address(m.group(1)) if m else None
        site.server_source = (
            "hard-coded in lib/task/tools/gearmanWorkerTask.class.php and the SWORD plugin"
        )
        site.servers = site.worker_servers = [addr or ("localhost", DEFAULT_PORT)]


# =========================================================================== MySQL


class MysqlUnavailable(Exception):
    """MySQL cannot be reached or read; the message says where and why."""


def _connect(db: Database, timeout: float) -> Any:
    try:
        import pymysql
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise MysqlUnavailable(f"PyMySQL is not installed ({e})") from None
    kw: dict[str, Any] = {
        "user": db.user,
        "password": db.password,
        "database": db.dbname,
        "connect_timeout": timeout,
        "read_timeout": timeout,
        "write_timeout": timeout,
        "charset": "utf8mb4",
        "autocommit": True,
    }
    if db.host is None:
        kw["unix_socket"] = db.socket or DEFAULT_MYSQL_SOCKET
    else:
        kw["host"], kw["port"] = db.host, db.port
    try:
        return pymysql.connect(**kw)
    except pymysql.MySQLError as e:
        raise MysqlUnavailable(
            f"cannot connect to MySQL at {db.where} as {db.user!r} "
            f"(from {db.source}): {_mysql_message(e)}"
        ) from None


def _mysql_message(e: Exception) -> str:
    args = getattr(e, "args", ())
    if len(args) >= 2:
        return f"{args[1]} (error {args[0]})"
    return str(e) or type(e).__name__


def check_mysql(db: Database, timeout: float = 3.0) -> None:
    """Connect with the site's credentials and run ``SELECT 1``; raises MysqlUnavailable."""
    import pymysql

    con = _connect(db, timeout)
    try:
        with con.cursor() as cur:
            cur.execute("SELECT 1")
    except pymysql.MySQLError as e:
        raise MysqlUnavailable(
            f"MySQL at {db.where} does not answer: {_mysql_message(e)}"
        ) from None
    finally:
        con.close()


def read_mysql_values(
    db: Database,
    *,
    plugins: bool = True,
    title: bool = False,
    culture: str = "en",
    timeout: float = 3.0,
) -> dict[str, Any]:
    """Read AtoM settings from MySQL with the site's credentials.

    ``plugins``: the ``plugins`` setting (a PHP-serialized list, source culture), as
    sfPluginAdminPluginConfiguration reads it. ``title``: ``siteTitle`` and
    ``siteBaseUrl`` (scope NULL), in ``culture`` if set there, else in their source
    culture, as QubitSetting::getSettingsArray() does. Raises MysqlUnavailable."""
    import pymysql

    con = _connect(db, timeout)
    out: dict[str, Any] = {}
    try:
        with con.cursor() as cur:
            if plugins:
                cur.execute(
                    "SELECT i.value FROM setting s JOIN setting_i18n i "
                    "ON i.id = s.id AND i.culture = s.source_culture WHERE s.name = 'plugins'"
                )
                rows = cur.fetchall()
                names: list[str] = []
                if len(rows) == 1 and rows[0][0]:
                    try:
                        value = php_unserialize(rows[0][0])
                    except (PhpSyntaxError, ValueError) as e:
                        raise MysqlUnavailable(
                            f"the 'plugins' setting in MySQL is not a serialized list: {e}"
                        ) from None
                    names = [str(v) for v in _values(value) if isinstance(v, str)]
                out["plugins"] = names
            if title:
                cur.execute(
                    "SELECT s.name, cur.value, src.value FROM setting s "
                    "LEFT JOIN setting_i18n cur ON cur.id = s.id AND cur.culture = %s "
                    "LEFT JOIN setting_i18n src ON src.id = s.id "
                    "AND src.culture = s.source_culture "
                    "WHERE s.scope IS NULL AND s.name IN ('siteTitle', 'siteBaseUrl')",
                    (culture,),
                )
                for name, current, source in cur.fetchall():
                    out[name] = current if current not in (None, "") else (source or "")
    except pymysql.MySQLError as e:
        raise MysqlUnavailable(
            f"cannot read the settings from MySQL at {db.where}: {_mysql_message(e)}"
        ) from None
    finally:
        con.close()
    return out


# =========================================================================== atom-config


def _y(value: Any) -> str:
    """A value as inline YAML."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10_000).strip()
    return text[:-3].strip() if text.endswith("...") else text


def _listen_addresses(site: AtomSite) -> list[str]:
    listen: list[str] = []
    for host, port in site.servers + site.worker_servers or [(DEFAULT_HOST, DEFAULT_PORT)]:
        h = "127.0.0.1" if host == "localhost" else host
        addr = format_address(h, port)
        if addr not in listen:
            listen.append(addr)
    return listen


def atom_config_yaml(
    site: AtomSite,
    *,
    user: str = "www-data",
    database: str = "/var/lib/atomnode/atomnode.db",
    layout: str = "shared",
    workers: int = 2,
    php: str = "php",
    per_job: bool = False,
) -> str:
    """A ready atomnode configuration for ``site`` (YAML text with comments).

    ``layout``: ``shared`` (default) — one pool of ``workers`` processes (at most 2)
    serving every enabled job class; ``per-type`` — one pool per gearman.yml worker type
    (one process each), as AtoM's ``--types`` splits them.

    ``per_job``: no pool; an ``atom_runners`` entry instead: atomnode's own worker tasks
    (``workers`` of them) run each job in its own ``php symfony tools:run`` process
    (docs/workers.md, "Per-job mode"). Needs the job prefix."""
    prefix = site.prefix
    served = site.served_classes
    lines = [
        f"# atomnode configuration for the AtoM site at {site.root}",
        f"# generated by: atomnode atom-config {site.root}",
        f"# {site.release} (release family {site.family}): worker task {site.worker_task},",
        f"# Gearman server from {site.server_source}.",
    ]
    if site.prefix_scheme == "none":
        lines.append("# Function names have no prefix (e.g. qtSwordPluginWorker).")
    elif prefix is None:
        lines.append("# Function prefix: NOT KNOWN (see the notes atom-config printed)")
    else:
        how = {
            "root": 'the AtoM root followed by " - " (AtoM 2.2)',
            "title": 'md5(siteTitle . siteBaseUrl . root) . "-" (AtoM 2.3-2.5.1)',
            "key": (
                f'md5("{site.root}" + '
                + (
                    f'workers_key "{site.workers_key}"'
                    if site.workers_key
                    else "an empty workers_key"
                )
                + ') + "-"'
            ),
        }[site.prefix_scheme]
        lines += [f"# Function prefix: {prefix!r}", f"#   = {how}"]
    for c, why in site.skipped_classes.items():
        lines.append(f"# {c} is not served: {why}.")
    lines += [f"# Check the running setup with: atomnode doctor {site.root}", ""]

    listen = _listen_addresses(site)
    lines.append(f"# AtoM's web app and workers use {site.server_source}.")
    if any(h == "localhost" for h, _ in site.servers + site.worker_servers):
        lines.append(
            '# It says "localhost": add "[::1]:'
            + str(site.check_server[1])
            + '" if PHP resolves localhost to IPv6 there.'
        )
    lines += [
        f"listen: {_y(listen)}",
        f"database: {_y(database)}",
        "log_level: info",
        "queue: {synchronous: full, max_attempts: 5, retention_days: 7}",
        "",
    ]
    serial = [c for c in ATOM_SERIAL_JOBS if c in served]
    if len(serial) > 1:
        lines += [
            "# AtoM runs one move or file import at a time by sleeping inside the worker;",
            "# atomnode holds the next one in the queue instead (per site).",
            "concurrency:",
            f"  - {{name: serial-moves, functions: {_y(serial)}, max: 1}}",
            "",
        ]
    lines += [
        "# AtoM's Jobs page: mark a job that atomnode gives up (or whose worker died on its",
        "# last attempt) as failed in AtoM's job table, with atomnode's reason. Uses the",
        "# credentials in the site's config/config.php. Off until you turn it on.",
        "atom_sites:",
        f"  - root: {_y(site.root)}",
    ]
    if prefix:
        lines.append(f"    prefix: {_y(prefix)}")
    lines += ["    mark_failed_jobs: false", ""]

    task = [php, "-d", "memory_limit=-1", "symfony", site.worker_task]
    waits: list[str] = []
    if site.database is not None:
        if site.database.host is None:
            waits.append(
                f"{{name: mysql, path: {_y(site.database.socket or DEFAULT_MYSQL_SOCKET)}}}"
            )
        else:
            addr = format_address(site.database.host, site.database.port)
            waits.append(f"{{name: mysql, address: {_y(addr)}}}")
    for host, port in site.search:
        waits.append(f"{{name: elasticsearch, address: {_y(format_address(host, port))}}}")

    if per_job:
        n = max(1, workers)
        lines += [
            "# Per-job mode: atomnode itself is the Gearman worker for these functions (one",
            f"# registered worker per slot, {n} slot(s): at most {n} job(s) at once) and runs",
            "# each job in its own `php symfony tools:run` process with atomnode's runner",
            "# script: no long-lived PHP worker, nothing to recycle, and AtoM's \"is a worker",
            "# available?\" check passes while the runner can work. See docs/workers.md.",
            "atom_runners:",
            "  - name: atom",
            f"    root: {_y(site.root)}",
            f"    user: {_y(user)}",
            f"    concurrency: {n}",
            f"    functions: {_y([(prefix or '') + c for c in served])}",
            "    # Per-job limits (off by default: an AtoM import may rightly run for hours):",
            "    # timeout: 6h          # then the job's process group is killed and the job",
            "    # on_timeout: fail     # fails (or: requeue, counted against max_attempts)",
            "    # memory_limit: 2GiB   # resident memory of the job's processes",
        ]
        if php != "php":
            lines.append(f"    php: {_y(php)}")
        if site.database is None:
            lines.append("    # MySQL: the site's database settings could not be read; no wait_for")
        if waits:
            lines.append(f"    wait_for: [{', '.join(waits)}]")
        return "\n".join(lines) + "\n"

    pools: list[tuple[str, list[str], int, list[str], str]] = []
    if layout == "per-type" and site.worker_task == "jobs:worker":
        for wtype, wclasses in site.worker_types.items():
            classes = [c for c in wclasses if c in served]
            if not classes:
                continue
            pools.append((wtype, task + [f"--types={wtype}"], 1, classes, ", ".join(classes)))
    else:
        n = max(1, min(workers, 2))
        why = (
            f"{n} worker process(es) serve every enabled job class "
            f"(about {WORKER_RSS_MB * n} MB; --layout per-type runs one per worker type)"
        )
        pools.append(("atom", task, n, served, why))
    if site.worker_task == "jobs:worker":
        if site.max_job_count:
            lines += [
                "# This release's jobs:worker has --max-job-count / --max-mem-usage (exit 111, a",
                "# planned restart). atomnode's max_jobs / max_rss_mb do the same and start the",
                "# replacement before the old worker stops; either works with `functions:`.",
            ]
        else:
            lines.append(
                "# This release's jobs:worker has no --max-job-count: recycle with max_jobs "
                "/ max_rss_mb."
            )
    lines.append("pools:")
    for name, command, count, classes, comment in pools:
        functions = [(prefix or "") + c for c in classes]
        lines += [
            f"  # {comment}",
            f"  - name: {_y(name)}",
            f"    command: {_y(command)}",
            f"    directory: {_y(site.root)}",
            f"    user: {_y(user)}",
            f"    count: {count}",
            "    # The functions this pool serves: `status` keeps counting the pool while one",
            "    # of its workers is restarted, so AtoM does not refuse jobs meanwhile.",
            f"    functions: {_y(functions)}",
        ]
        if site.database is None:
            lines.append("    # MySQL: the site's database settings could not be read; no wait_for")
        if waits:
            lines.append(f"    wait_for: [{', '.join(waits)}]")
    return "\n".join(lines) + "\n"


def add_site_options(p: argparse.ArgumentParser) -> None:
    """Options that supply what is otherwise read from the site's MySQL."""
    p.add_argument(
        "--plugins",
        metavar="LIST",
        help="comma-separated enabled AtoM plugins (default: read from the site's MySQL)",
    )
    p.add_argument("--site-title", help="AtoM 2.3-2.5.1: the site title (default: from MySQL)")
    p.add_argument(
        "--site-base-url", help="AtoM 2.3-2.5.1: the site base URL (default: from MySQL)"
    )
    p.add_argument("--culture", help="culture of the site title (default: the site's default)")
    p.add_argument("--no-mysql", action="store_true", help="do not connect to the site's MySQL")


def read_site_from_args(args: argparse.Namespace) -> AtomSite:
    plugins = None
    if getattr(args, "plugins", None) is not None:
        plugins = [p.strip() for p in args.plugins.split(",") if p.strip()]
    return read_atom_site(
        args.atom_root,
        mysql=not getattr(args, "no_mysql", False),
        plugins=plugins,
        site_title=getattr(args, "site_title", None),
        site_base_url=getattr(args, "site_base_url", None),
        culture=getattr(args, "culture", None),
    )


def cmd_atom_config(args: argparse.Namespace) -> int:
    """``atomnode atom-config ATOM_ROOT``."""
    try:
        site = read_site_from_args(args)
    except AtomError as e:
        print(f"atomnode: {e}", file=sys.stderr)
        return 1
    for note in site.notes:
        print(f"atomnode: note: {note}", file=sys.stderr)
    for m in site.missing:
        print(f"atomnode: missing: {m}", file=sys.stderr)
    layout = "per-type" if args.layout == "per-type" else "shared"
    per_job = bool(getattr(args, "per_job", False))
    if per_job and site.prefix is None:
        print("atomnode: --per-job needs the site's job prefix, which is not known (see the "
              "notes above): atomnode registers the exact function names", file=sys.stderr)
        return 1
    text = atom_config_yaml(
        site, user=args.user, database=args.database, layout=layout, workers=args.workers,
        per_job=per_job,
    )
    if args.write is None:
        sys.stdout.write(text)
        return 0
    return write_dropin(args.write, text)


#: Where ``atom-config --write`` puts its configuration: a drop-in, never the main file.
ATOM_DROPIN = os.path.join(DEFAULT_DROPIN_DIR, "50-atom.yml")


def write_dropin(path: str, text: str) -> int:
    """Write the drop-in ``path`` (atomically) once ``text`` is valid on its own and with
    the configuration it joins; say what to do next."""
    try:
        parse_config(text, path)
    except ConfigError as e:
        print(f"atomnode: the generated configuration is invalid, not written:\n{e}",
              file=sys.stderr)
        return 1
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    print(f"atomnode: wrote {path}", file=sys.stderr)
    main = resolve_config_path(None)[0]
    try:
        if os.path.abspath(os.path.dirname(path)) == dropin_dir(main):
            load_config()  # the configuration the daemon will read, this drop-in included
    except ConfigError as e:
        print(f"atomnode: but the configuration as a whole is invalid:\n{e}", file=sys.stderr)
        return 1
    print("atomnode: review it, then: atomnode check-config && systemctl reload atomnode",
          file=sys.stderr)
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
        "--layout",
        choices=("shared", "per-type"),
        default="shared",
        help="shared: one pool of at most 2 workers for every job class (default); "
        f"per-type: one worker per gearman.yml worker type (~{WORKER_RSS_MB} MB each)",
    )
    p.add_argument(
        "--workers",
        type=int,
        choices=(1, 2),
        default=2,
        help="worker processes of the shared pool, or with --per-job jobs at once (default: 2)",
    )
    p.add_argument(
        "--per-job",
        action="store_true",
        help="no worker pool: atomnode runs each job in its own `php symfony tools:run` "
        "process (atom_runners; --workers = jobs at once; see docs/workers.md)",
    )
    p.add_argument(
        "--write",
        nargs="?",
        const=ATOM_DROPIN,
        metavar="FILE",
        help=f"write it to a drop-in file (default {ATOM_DROPIN}) instead of printing it",
    )
    p.add_argument("--single-pool", action="store_true", help=argparse.SUPPRESS)  # old default
    add_site_options(p)
    p.set_defaults(func=cmd_atom_config)
