"""atom-config and the site reader on a tree of every AtoM 2.x release family (fixtures
written from the release trees' facts: tests/atom_trees.py), without MySQL."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import yaml
from atom_trees import RELEASES, make_atom_release

from atomnode.cli import main
from atomnode.ops.atom_site import (
    AtomError,
    atom_config_yaml,
    atom_function_prefix,
    php_array_merge,
    read_atom_site,
)
from atomnode.ops.php import PhpSyntaxError, parse_php_return, php_unserialize
from atomnode.system import config as config_mod
from atomnode.system.config import parse_config
from atomnode.system.names import function_matches, split_atom_prefix


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ATOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yml"))


def md5(text: str) -> str:
    return hashlib.md5(text.encode()).hexdigest()


# ------------------------------------------------------------------ each release family

EXPECTED = {
    # family: (worker task, server source, prefix scheme)
    "2.0.0-2.0.1": ("tools:gearman-worker", "hard-coded", "none"),
    "2.0.2-2.1": ("tools:gearman-worker", "gearman_job_server in config/app.yml", "none"),
    "2.2": ("jobs:worker", "config/gearman.yml", "root"),
    "2.3-2.5.1": ("jobs:worker", "config/gearman.yml", "title"),
    "2.5.2+": ("jobs:worker", "config/gearman.yml", "key"),
}


@pytest.mark.parametrize("family,version", RELEASES)
def test_each_release_is_recognised(tmp_path: Path, family: str, version: str) -> None:
    root = make_atom_release(tmp_path / "atom", family, version=version, server="127.0.0.1:4731")
    site = read_atom_site(
        str(root), mysql=False, plugins=[], site_title="Archive", site_base_url="http://a"
    )
    task, source, scheme = EXPECTED[family]
    assert (site.family, site.version, site.worker_task) == (family, version, task)
    assert site.server_source.startswith(source)
    assert site.prefix_scheme == scheme
    assert site.max_job_count == (version >= "2.7")
    real = os.path.realpath(root)
    if family == "2.0.0-2.0.1":
        assert site.servers == [("localhost", 4730)]  # whatever the tree's YAML says
    else:
        assert site.servers == site.worker_servers == [("127.0.0.1", 4731)]
    expected_prefix = {
        "none": "",
        "root": real + " - ",
        "title": md5("Archive" + "http://a" + real) + "-",
        "key": md5(real) + "-",
    }[scheme]
    assert site.prefix == expected_prefix
    if task == "tools:gearman-worker":
        # 2.0-2.1 register qtSwordPluginWorker unconditionally, unprefixed.
        assert site.functions == ["qtSwordPluginWorker"]
    else:
        assert "qtSwordPluginWorker" not in site.served_classes  # plugin disabled
        assert site.skipped_classes == {"qtSwordPluginWorker": "qtSwordPlugin is disabled"}
        assert all(f.startswith(expected_prefix) for f in site.functions)
    # The database settings come from config/config.php (databases.yml is empty).
    assert site.database is not None
    assert (site.database.dbname, site.database.user, site.database.password) == (
        "atom", "atom", "secret")
    assert site.database.host is None and site.database.socket == "/var/run/mysqld/mysqld.sock"
    assert site.search == [("127.0.0.1", 9200)]
    assert site.notes == [] and site.missing == []


@pytest.mark.parametrize("family,version", RELEASES)
def test_atom_config_for_each_release(tmp_path: Path, family: str, version: str) -> None:
    root = make_atom_release(tmp_path / "atom", family, version=version, server="127.0.0.1:4731")
    site = read_atom_site(
        str(root), mysql=False, plugins=["qtSwordPlugin"], site_title="T", site_base_url="U"
    )
    text = atom_config_yaml(site)
    cfg = parse_config(text, "generated")
    (pool,) = cfg.pools
    assert pool.count <= 2
    assert pool.command[-1] == site.worker_task
    assert pool.directory == site.root
    assert set(pool.functions) == set(site.functions)
    assert "qtSwordPluginWorker" in {split_atom_prefix(f)[1] for f in pool.functions}
    assert [(w.name, w.path) for w in pool.wait_for][0] == (
        "mysql", "/var/run/mysqld/mysqld.sock")
    assert [(w.name, w.host, w.port) for w in pool.wait_for][1] == (
        "elasticsearch", "127.0.0.1", 9200)
    if family == "2.0.0-2.0.1":
        assert cfg.listen == ("127.0.0.1:4730",)
        assert "[::1]:4730" in text  # localhost may be IPv6 for PHP
    else:
        assert cfg.listen == ("127.0.0.1:4731",)
    assert "also checks port" not in text
    if site.worker_task == "jobs:worker":
        assert ("has --max-job-count" in text) == (version >= "2.7")
    assert cfg.atom_sites[0].root == site.root
    assert cfg.atom_sites[0].mark_failed_jobs is False
    assert cfg.atom_sites[0].prefix == (site.prefix or None)


def test_newest_default_install(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A default install of the newest AtoM: installer-written config/config.php, empty
    databases.yml: at most 2 long-running workers covering every enabled class, waiting for
    MySQL; the per-type layout on request."""
    root = make_atom_release(tmp_path / "atom", "2.5.2+", version="2.9.0")
    assert main(["atom-config", str(root), "--plugins", "", "--user", "www-data"]) == 0
    out = capsys.readouterr()
    data = yaml.safe_load(out.out)
    (pool,) = data["pools"]
    prefix = atom_function_prefix(os.path.realpath(root))
    assert pool["command"] == ["php", "-d", "memory_limit=-1", "symfony", "jobs:worker"]
    assert pool["count"] == 2
    classes = ["arFindingAidJob", "arInheritRightsJob", "arObjectMoveJob",
               "arUpdatePublicationStatusJob", "arFileImportJob"]
    assert pool["functions"] == [prefix + c for c in classes]
    assert pool["wait_for"][0] == {"name": "mysql", "path": "/var/run/mysqld/mysqld.sock"}
    assert "qtSwordPluginWorker is not served: qtSwordPlugin is disabled" in out.out
    assert data["concurrency"] == [
        {"name": "serial-moves", "functions": ["arObjectMoveJob", "arFileImportJob"], "max": 1}]
    path = tmp_path / "atomnode.yml"
    path.write_text(out.out)
    assert main(["check-config", str(path)]) == 0
    capsys.readouterr()

    assert main(["atom-config", str(root), "--plugins", "qtSwordPlugin", "--workers", "1"]) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    assert data["pools"][0]["count"] == 1
    assert prefix + "qtSwordPluginWorker" in data["pools"][0]["functions"]

    assert main(["atom-config", str(root), "--plugins", "", "--layout", "per-type"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert [p["name"] for p in data["pools"]] == [
        "general", "acl", "move", "publication_status", "file_import"]
    assert all(p["count"] == 1 for p in data["pools"])
    assert data["pools"][2]["command"][-1] == "--types=move"
    assert data["pools"][2]["functions"] == [prefix + "arObjectMoveJob"]
    assert "about 37 MB" not in out  # the shared layout's comment only


def test_app_level_gearman_yml_overrides_the_project_one(tmp_path: Path) -> None:
    # AtoM's own Docker setup writes apps/qubit/config/gearman.yml; symfony merges it over
    # config/gearman.yml, the application winning (lists too are merged by index).
    override = (
        "all:\n  servers:\n    default: gearmand.example:4740\n"
        "  worker_types:\n    general:\n      - arFindingAidJob\n      - arExtraJob\n"
    )
    root = make_atom_release(tmp_path / "atom", "2.5.2+", version="2.9.0", app_gearman=override)
    (root / "lib" / "job" / "arExtraJob.class.php").write_text("<?php\n")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.servers == [("gearmand.example", 4740)]
    assert site.server_source == "config/gearman.yml + apps/qubit/config/gearman.yml"
    assert site.worker_types["general"] == ["arFindingAidJob", "arExtraJob"]
    assert site.worker_types["acl"] == ["arInheritRightsJob"]  # kept from the project file
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert cfg.listen == ("gearmand.example:4740",)


def test_php_array_merge_is_symfonys() -> None:
    a = {"servers": {"default": "a:1"}, "list": ["x", "y", "z"], "keep": 1}
    b = {"servers": {"default": "b:2", "two": "c:3"}, "list": ["q"]}
    merged = php_array_merge(a, b)
    assert merged["servers"] == {"default": "b:2", "two": "c:3"}
    assert list(merged["list"].values()) == ["q", "y", "z"]
    assert merged["keep"] == 1


def test_environment_sections(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "atom", "2.5.2+")
    with open(root / "config" / "gearman.yml", "a") as f:
        f.write("prod:\n  servers:\n    default: 127.0.0.1:4799\n")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.servers == [("127.0.0.1", 4799)]  # the web app (prod)
    assert site.worker_servers == [("127.0.0.1", 4730)]  # the workers (cli)
    assert any("the workers (environment cli) use 127.0.0.1:4730" in n for n in site.notes)
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert cfg.listen == ("127.0.0.1:4799", "127.0.0.1:4730")


def test_workers_key_application_wins_and_symlinked_root(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "releases" / "2.9", "2.5.2+", workers_key="project")
    (root / "apps" / "qubit" / "config" / "app.yml").write_text("all:\n  workers_key: app\n")
    link = tmp_path / "current"
    link.symlink_to(root)
    site = read_atom_site(str(link), mysql=False, plugins=[])
    assert site.root == os.path.realpath(root)
    assert site.prefix == md5(os.path.realpath(root) + "app") + "-"


def test_2_2_names_have_spaces(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "my atom", "2.2")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    real = os.path.realpath(root)
    assert site.functions == [f"{real} - arGenerateFindingAidJob", f"{real} - arInheritRightsJob"]
    name = site.functions[0]
    assert split_atom_prefix(name) == (real + " - ", "arGenerateFindingAidJob")
    assert function_matches("arGenerateFindingAidJob", name)
    assert not function_matches("arInheritRightsJob", name)
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert cfg.pools[0].functions == tuple(site.functions)


def test_tcp_mysql_and_explicit_socket(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "a", dsn="mysql:dbname=atom;host=db.example;port=3307")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.database is not None and site.database.where == "db.example:3307"
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert (cfg.pools[0].wait_for[0].host, cfg.pools[0].wait_for[0].port) == ("db.example", 3307)
    root = make_atom_release(tmp_path / "b", dsn="mysql:unix_socket=/run/m.sock;dbname=atom")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.database is not None and site.database.where == "/run/m.sock"


def test_no_search_yml_no_elasticsearch_wait(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "a", search=None)
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.search == []
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert [w.name for w in cfg.pools[0].wait_for] == ["mysql"]


def test_values_kept_in_mysql_say_which_option_supplies_them(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "a", "2.3-2.5.1")
    site = read_atom_site(str(root), mysql=False)
    assert site.prefix is None
    text = "\n".join(site.missing)
    assert "--plugins" in text and "qtSwordPluginWorker left out" in text
    assert "md5(siteTitle . siteBaseUrl . root)" in text
    assert "--site-title and --site-base-url" in text
    assert "--no-mysql was given" in text
    cfg = parse_config(atom_config_yaml(site), "generated")
    # Without the prefix, the pool names the classes, which match any site prefix.
    assert cfg.pools[0].functions[0] == "arFindingAidJob"


def test_not_an_atom_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(AtomError, match="no such directory"):
        read_atom_site(str(tmp_path / "nothing"))
    (tmp_path / "empty" / "config").mkdir(parents=True)
    with pytest.raises(AtomError, match="jobWorkerTask.*gearmanWorkerTask"):
        read_atom_site(str(tmp_path / "empty"))
    assert main(["atom-config", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_unreadable_config_php_is_a_note(tmp_path: Path) -> None:
    root = make_atom_release(tmp_path / "a")
    (root / "config" / "config.php").write_text("<?php\nreturn array ( 'all' => exec('x') );\n")
    site = read_atom_site(str(root), mysql=False, plugins=[])
    assert site.database is None
    assert any("cannot read the database settings" in n for n in site.notes)
    text = atom_config_yaml(site)
    assert "no wait_for" in text


# ------------------------------------------------------------------ PHP readers


def test_parse_php_return_reads_var_export_and_short_arrays() -> None:
    text = (
        "<?php\n// c\n/* block */ return array (\n  'a' => 1, 'b' => true, 'c' => NULL,\n"
        "  'd' => [ 'x', 'y' ], 'e' => 'it\\'s', '7' => -2.5, \"q\" => \"t\\n\",\n);\n"
    )
    assert parse_php_return(text) == {
        "a": 1, "b": True, "c": None, "d": {0: "x", 1: "y"}, "e": "it's", 7: -2.5, "q": "t\n"}
    for bad in ("<?php return system('id');", "<?php echo 1;", "<?php return array(1 2);"):
        with pytest.raises(PhpSyntaxError):
            parse_php_return(bad)


def test_php_unserialize() -> None:
    data = 'a:3:{i:0;s:10:"sfDcPlugin";i:1;s:13:"qtSwordPlugin";i:2;s:5:"\u00e9t\u00e9";}'
    assert php_unserialize(data) == {0: "sfDcPlugin", 1: "qtSwordPlugin", 2: "\u00e9t\u00e9"}
    assert php_unserialize("b:1;") is True and php_unserialize("N;") is None
    for bad in ("a:1:{i:0;s:3:\"ab\";}", "x:1;", "a:2:{i:0;N;}"):
        with pytest.raises(PhpSyntaxError):
            php_unserialize(bad)


def test_prefix_is_md5_of_root_and_workers_key() -> None:
    # AtoM 2.5.2+: md5(sf_root_dir . app_workers_key) . '-'
    assert atom_function_prefix("/usr/share/nginx/atom") == md5("/usr/share/nginx/atom") + "-"
    assert atom_function_prefix("/usr/share/nginx/atom", "site2") == (
        md5("/usr/share/nginx/atomsite2") + "-")
