"""AtoM trees for tests, one per release family, written from what the real release trees
show (see docs/workers.md, "Which AtoM releases"). Only the files and the few lines that
atomnode reads are written, in our own words; nothing is copied from AtoM.

Facts used, per family (verified on the artefactual/atom tags):

* every 2.x: the installer writes the database settings to config/config.php (a PHP
  ``return array(...)`` with ``all: propel: param: dsn/username/password``; the DSN leaves
  the host out when it is localhost) and leaves config/databases.yml a template;
  config/search.yml (``all: server: host/port``); the version in
  apps/qubit/config/qubitConfiguration.class.php (``VERSION = 'x.y.z'``); static plugins
  enabled in config/ProjectConfiguration.class.php; qtSwordPluginWorker lives in
  plugins/qtSwordPlugin/lib/, the other job classes in lib/job/.
* 2.0.0-2.0.1: lib/task/tools/gearmanWorkerTask.class.php (``tools:gearman-worker``)
  connects to the literal ``localhost:4730`` and registers ``qtSwordPluginWorker``.
* 2.0.2-2.1: the same task reads ``app_gearman_job_server`` (config/app.yml
  ``gearman_job_server: 127.0.0.1:4730``).
* 2.2: lib/task/jobs/jobWorkerTask.class.php (``jobs:worker``), config/gearman.yml
  (``servers``, ``worker_types``), QubitJob::getJobPrefix() = sf_root_dir . ' - '.
* 2.3-2.5.1: getJobPrefix() = md5(app_siteTitle . app_siteBaseUrl . sf_root_dir) . '-'.
* 2.5.2+: getJobPrefix() = md5(sf_root_dir . app_workers_key) . '-'; ``workers_key`` in
  config/app.yml.
* 2.7+: jobs:worker has ``--max-job-count`` (exit code 111).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

#: (family, a version in it) in release order.
RELEASES = [
    ("2.0.0-2.0.1", "2.0.1"),
    ("2.0.2-2.1", "2.1.2"),
    ("2.2", "2.2.1"),
    ("2.3-2.5.1", "2.4.1"),
    ("2.5.2+", "2.6.4"),
    ("2.5.2+", "2.9.0"),
]

#: worker_types of a recent gearman.yml (abridged to the classes the tests need).
WORKER_TYPES_29 = {
    "general": ["arFindingAidJob"],
    "acl": ["arInheritRightsJob"],
    "move": ["arObjectMoveJob"],
    "sword": ["qtSwordPluginWorker"],
    "publication_status": ["arUpdatePublicationStatusJob"],
    "file_import": ["arFileImportJob"],
}
WORKER_TYPES_22 = {
    "general": ["arGenerateFindingAidJob"],
    "acl": ["arInheritRightsJob"],
    "sword": ["qtSwordPluginWorker"],
}


def php_literal(value: Any, indent: str = "") -> str:
    """A value as PHP's var_export writes it (our writer, for config/config.php)."""
    if isinstance(value, dict):
        inner = indent + "  "
        items = "".join(
            f"{inner}{php_literal(k)} => {php_literal(v, inner)},\n" for k, v in value.items()
        )
        return f"\n{indent}array (\n{items}{indent})"
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "NULL"
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


def config_php(dsn: str, user: str = "atom", password: str = "secret") -> str:
    data = {
        "all": {
            "propel": {
                "class": "sfPropelDatabase",
                "param": {
                    "encoding": "utf8mb4",
                    "persistent": True,
                    "pooling": True,
                    "dsn": dsn,
                    "username": user,
                    "password": password,
                },
            }
        },
        "dev": {"propel": {"param": {"classname": "DebugPDO"}}},
    }
    return (
        "<?php\n// written by the AtoM installer (test fixture)\n// date: 2026/01/01 00:00:00\n\n"
        f"return {php_literal(data).lstrip()};\n"
    )


def _yaml_list_map(mapping: dict[str, list[str]], indent: str = "    ") -> str:
    out = ""
    for key, items in mapping.items():
        out += f"{indent}{key}:\n" + "".join(f"{indent}  - {c}\n" for c in items)
    return out


def make_atom_release(
    root: Path,
    family: str = "2.5.2+",
    *,
    version: str | None = None,
    server: str = "127.0.0.1:4730",
    app_gearman: str | None = None,
    worker_types: dict[str, list[str]] | None = None,
    workers_key: str | None = None,
    dsn: str | None = "mysql:dbname=atom;port=3306",
    db_user: str = "atom",
    db_password: str = "secret",
    search: tuple[str, int] | None = ("127.0.0.1", 9200),
    max_job_count: bool | None = None,
    cached_servers: dict[str, str] | None = None,
) -> Path:
    """Write an AtoM tree of ``family`` at ``root``. ``app_gearman``: the text of an
    apps/qubit/config/gearman.yml override; ``cached_servers``: {env: server} written to
    symfony's config cache as a stale copy."""
    version = version or dict(RELEASES)[family]  # the newest of the family
    (root / "config").mkdir(parents=True)
    (root / "apps" / "qubit" / "config").mkdir(parents=True)
    (root / "lib" / "model").mkdir(parents=True)
    (root / "lib" / "job").mkdir(parents=True)
    (root / "plugins" / "qtSwordPlugin" / "lib").mkdir(parents=True)
    (root / "plugins" / "arElasticSearchPlugin" / "config").mkdir(parents=True)
    (root / "symfony").write_text("#!/usr/bin/env php\n<?php // the symfony CLI\n")
    (root / "apps" / "qubit" / "config" / "qubitConfiguration.class.php").write_text(
        f"<?php\nclass qubitConfiguration extends sfApplicationConfiguration\n{{\n"
        f"  const VERSION = '{version}';\n}}\n"
    )
    (root / "config" / "ProjectConfiguration.class.php").write_text(
        "<?php\nclass ProjectConfiguration extends sfProjectConfiguration\n{\n"
        "  public function setup()\n  {\n    $this->enablePlugins(array(\n"
        "      'qbAclPlugin', 'sfPropelPlugin', 'arElasticSearchPlugin', 'sfPluginAdminPlugin'));\n"
        "  }\n}\n"
    )
    (root / "plugins" / "qtSwordPlugin" / "lib" / "qtSwordPluginWorker.class.php").write_text(
        "<?php\nclass qtSwordPluginWorker {}\n"
    )
    (root / "plugins" / "arElasticSearchPlugin" / "config" / "search.yml").write_text(
        "all:\n  batch_mode: true\n  server:\n    host: 127.0.0.1\n    port: 9200\n"
        "  index:\n    name: atom\n"
    )
    if dsn is not None:
        (root / "config" / "config.php").write_text(config_php(dsn, db_user, db_password))
    (root / "config" / "databases.yml").write_text("")  # the installer leaves it unused
    if search is not None:
        (root / "config" / "search.yml").write_text(
            f"all:\n  server:\n    host: {search[0]}\n    port: '{search[1]}'\n"
            "  index:\n    name: atom\n"
        )
    app = "all:\n  upload_limit: -1\n  read_only: false\n"

    if family in ("2.0.0-2.0.1", "2.0.2-2.1"):
        (root / "lib" / "task" / "tools").mkdir(parents=True)
        if family == "2.0.0-2.0.1":
            connect = "new Net_Gearman_Worker(array('localhost:4730'))"
        else:
            connect = "new Net_Gearman_Worker(array(sfConfig::get('app_gearman_job_server')))"
            app += f"  gearman_job_server: {server}\n"
        (root / "lib" / "task" / "tools" / "gearmanWorkerTask.class.php").write_text(
            "<?php\nclass gearmanWorkerTask extends sfBaseTask\n{\n"
            "  protected function configure()\n  {\n    $this->namespace = 'tools';\n"
            "    $this->name = 'gearman-worker';\n  }\n"
            "  protected function execute($arguments = array(), $options = array())\n  {\n"
            f"    $worker = {connect};\n"
            "    foreach (array('qtSwordPluginWorker') as $item)\n    {\n"
            "      $worker->addAbility($item);\n    }\n  }\n}\n"
        )
        (root / "config" / "app.yml").write_text(app)
        return root

    # 2.2 and later
    if max_job_count is None:
        max_job_count = version >= "2.7"
    (root / "lib" / "task" / "jobs").mkdir(parents=True)
    options = "    // options: --types --abilities"
    if max_job_count:
        options += " --max-job-count --max-mem-usage (exit 111)"
    (root / "lib" / "task" / "jobs" / "jobWorkerTask.class.php").write_text(
        "<?php\nclass jobWorkerTask extends arBaseTask\n{\n  protected function configure()\n"
        f"  {{\n{options}\n    $this->namespace = 'jobs';\n    $this->name = 'worker';\n  }}\n}}\n"
    )
    prefix_body = {
        "2.2": "    return sfConfig::get('sf_root_dir') . ' - ';",
        "2.3-2.5.1": (
            "    $key = sfConfig::get('app_siteTitle').sfConfig::get('app_siteBaseUrl')"
            ".sfConfig::get('sf_root_dir');\n    return md5($key).'-';"
        ),
        "2.5.2+": (
            "    $key = sfConfig::get('sf_root_dir').sfConfig::get('app_workers_key', '');\n"
            "    return md5($key).'-';"
        ),
    }[family]
    (root / "lib" / "model" / "QubitJob.php").write_text(
        "<?php\nclass QubitJob extends BaseJob\n{\n"
        f"  public static function getJobPrefix()\n  {{\n{prefix_body}\n  }}\n}}\n"
    )
    types = worker_types or (WORKER_TYPES_22 if family == "2.2" else WORKER_TYPES_29)
    for classes in types.values():
        for c in classes:
            if c != "qtSwordPluginWorker":
                (root / "lib" / "job" / f"{c}.class.php").write_text(f"<?php\nclass {c} {{}}\n")
    (root / "config" / "gearman.yml").write_text(
        f"all:\n  servers:\n    default: {server}\n\n  worker_types:\n"
        + _yaml_list_map(types)
    )
    if app_gearman is not None:
        (root / "apps" / "qubit" / "config" / "gearman.yml").write_text(app_gearman)
    if family == "2.5.2+":
        app += "  workers_key:" + (f" {workers_key}" if workers_key is not None else "") + "\n"
    (root / "config" / "app.yml").write_text(app)
    for env, srv in (cached_servers or {}).items():
        d = root / "cache" / "qubit" / env / "config"
        d.mkdir(parents=True)
        (d / "config_gearman.yml.php").write_text(
            "<?php\n// cached by symfony (test fixture)\nreturn "
            + php_literal({"servers": {"default": srv}, "worker_types": types}).lstrip()
            + ";\n"
        )
    return root


# ---------------------------------------------------------------- a runnable tree (issue 16)

RUNTIME = Path(__file__).parent / "atom_runtime"

#: How each family's ``tools:run`` (runCustomLogicTask) boots before it includes the file
#: (verified on the tags): 2.0-2.1 open the database only; 2.2-2.4 also create a symfony
#: context from the task's configuration (environment cli) but load no settings; 2.5 and
#: later extend arBaseTask, whose execute() creates the context and loads the settings.
_TOOLS_RUN = {
    "none": (
        "class runCustomLogicTask extends sfBaseTask\n{\n"
        "  public function execute($arguments = array(), $options = array())\n  {\n"
        "    $databaseManager = new sfDatabaseManager($this->configuration);\n"
        "    include($arguments['filename']);\n  }\n}\n"
    ),
    "context": (
        "class runCustomLogicTask extends sfBaseTask\n{\n"
        "  public function execute($arguments = array(), $options = array())\n  {\n"
        "    $sf_context = sfContext::createInstance($this->configuration);\n"
        "    $databaseManager = new sfDatabaseManager($this->configuration);\n"
        "    include($arguments['filename']);\n  }\n}\n"
    ),
    "full": (
        "class runCustomLogicTask extends arBaseTask\n{\n"
        "  public function execute($arguments = array(), $options = array())\n  {\n"
        "    parent::execute($arguments, $options);\n"
        "    include $arguments['filename'];\n  }\n}\n"
    ),
}


def tools_run_boot(family: str, version: str) -> str:
    """none | context | full: what the release's tools:run boots (see _TOOLS_RUN)."""
    if family in ("2.0.0-2.0.1", "2.0.2-2.1"):
        return "none"
    return "full" if version >= "2.5" else "context"


def add_runtime(root: Path, family: str = "2.5.2+", *, version: str | None = None,
                settings: dict[str, Any] | None = None) -> Path:
    """Make a tree written by :func:`make_atom_release` runnable by atomnode's per-job
    runner: a ``symfony`` entry implementing ``tools:run FILE`` as the family does, the
    few symfony/AtoM classes it needs, Net_Gearman's job classes and the test job class
    ``arFixtureJob`` (tests/atom_runtime/). ``settings``: the site's settings table."""
    version = version or dict(RELEASES)[family]
    lib = root / "vendor" / "symfony" / "lib"
    lib.mkdir(parents=True, exist_ok=True)
    (lib / "fixture.php").write_text((RUNTIME / "framework.php").read_text())
    (lib / "fixture_release.php").write_text(
        f"<?php\ndefine('FIXTURE_FAMILY', {php_literal(family)});\n"
        f"define('FIXTURE_VERSION', {php_literal(version)});\n"
    )
    (root / "symfony").write_text((RUNTIME / "symfony").read_text())
    gearman = root / "vendor" / "net_gearman" / "Net" / "Gearman"
    gearman.mkdir(parents=True, exist_ok=True)
    (gearman / "Job.php").write_text((RUNTIME / "Job.php").read_text())
    tools = root / "lib" / "task" / "tools"
    tools.mkdir(parents=True, exist_ok=True)
    (tools / "runCustomLogicTask.class.php").write_text(
        "<?php\n" + _TOOLS_RUN[tools_run_boot(family, version)])
    (root / "lib" / "job").mkdir(parents=True, exist_ok=True)
    (root / "lib" / "job" / "arFixtureJob.class.php").write_text(
        (RUNTIME / "arFixtureJob.class.php").read_text())
    om = root / "lib" / "model" / "om"
    om.mkdir(parents=True, exist_ok=True)
    (om / "BaseJob.php").write_text("<?php\nclass BaseJob\n{\n}\n")
    (root / "config" / "settings.json").write_text(
        json.dumps(settings if settings is not None else {"app_siteTitle": "Fixture archive"}))
    return root
