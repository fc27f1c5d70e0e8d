"""AtoM helpers: reading a synthetic AtoM tree laid out like the real one, the function
prefix, and `atomnode atom-config`."""

from __future__ import annotations

import hashlib
import os
import textwrap
from pathlib import Path

import pytest
import yaml

from atomnode.system import config as config_mod
from atomnode.cli import main
from atomnode.system.config import parse_config
from atomnode.ops.atom_site import (
    ATOM_JOB_CLASSES,
    AtomError,
    atom_config_yaml,
    atom_function_prefix,
    read_atom_site,
)

# AtoM 2.x's config/gearman.yml, abridged (same layout: all/servers/default, worker_types).
GEARMAN_YML = """\
all:
  servers:
    default: {server}

  worker_types:
    general:
      - arFindingAidJob
    acl:
      - arInheritRightsJob
    move:
      - arObjectMoveJob
    file_import:
      - arFileImportJob
"""

DATABASES_YML = """\
all:
  propel:
    class: sfPropelDatabase
    param:
      encoding: utf8mb4
      persistent: true
      pooling: true
      dsn: '{dsn}'
      username: atom
      password: secret
"""


def make_atom_tree(
    root: Path,
    *,
    server: str = "127.0.0.1:4730",
    worker_types: bool = True,
    workers_key: str | None = None,
    dsn: str | None = "mysql:host=localhost;port=3306;dbname=atom;charset=utf8mb4",
    app_key: str | None = None,
) -> Path:
    """A directory laid out like an AtoM root: symfony, config/gearman.yml, config/app.yml,
    config/databases.yml, apps/qubit/config/app.yml."""
    (root / "config").mkdir(parents=True)
    (root / "apps" / "qubit" / "config").mkdir(parents=True)
    (root / "symfony").write_text("#!/usr/bin/env php\n<?php // symfony CLI\n")
    gearman = GEARMAN_YML.format(server=server)
    if not worker_types:
        gearman = gearman.split("  worker_types:")[0]
    (root / "config" / "gearman.yml").write_text(gearman)
    app = "all:\n  upload_limit: -1\n  read_only: false\n"
    if workers_key is not None:
        app += f"  workers_key: {workers_key}\n"
    (root / "config" / "app.yml").write_text(app)
    qubit_app = "all:\n  upload_limit: -1\n"
    if app_key is not None:
        qubit_app += f"  workers_key: {app_key}\n"
    (root / "apps" / "qubit" / "config" / "app.yml").write_text(qubit_app)
    if dsn is not None:
        (root / "config" / "databases.yml").write_text(DATABASES_YML.format(dsn=dsn))
    return root


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("ATOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent.yml"))


def test_prefix_is_md5_of_root_and_workers_key() -> None:
    # AtoM: md5(sf_root_dir . app_workers_key) . '-'
    assert atom_function_prefix("/usr/share/nginx/atom") == (
        hashlib.md5(b"/usr/share/nginx/atom").hexdigest() + "-"
    )
    assert atom_function_prefix("/usr/share/nginx/atom", "site2") == (
        hashlib.md5(b"/usr/share/nginx/atomsite2").hexdigest() + "-"
    )


def test_read_site(tmp_path: Path) -> None:
    root = make_atom_tree(tmp_path / "atom", workers_key="k1")
    site = read_atom_site(str(root))
    assert site.root == os.path.realpath(root)
    assert site.workers_key == "k1"
    assert site.prefix == hashlib.md5((site.root + "k1").encode()).hexdigest() + "-"
    assert site.servers == [("127.0.0.1", 4730)]
    assert site.worker_types == {
        "general": ["arFindingAidJob"],
        "acl": ["arInheritRightsJob"],
        "move": ["arObjectMoveJob"],
        "file_import": ["arFileImportJob"],
    }
    assert site.job_classes == [
        "arFindingAidJob",
        "arInheritRightsJob",
        "arObjectMoveJob",
        "arFileImportJob",
    ]
    assert site.mysql == ("127.0.0.1", 3306)
    assert site.notes == []


def test_prefix_uses_the_real_path(tmp_path: Path) -> None:
    # symfony's sf_root_dir is a realpath: a symlinked root has the target's prefix.
    root = make_atom_tree(tmp_path / "releases" / "2.8")
    link = tmp_path / "current"
    link.symlink_to(root)
    site = read_atom_site(str(link))
    assert site.root == os.path.realpath(root)
    assert site.prefix == atom_function_prefix(os.path.realpath(root))


def test_application_app_yml_wins_and_empty_key(tmp_path: Path) -> None:
    site = read_atom_site(str(make_atom_tree(tmp_path / "a", workers_key="project", app_key="app")))
    assert site.workers_key == "app"
    site = read_atom_site(str(make_atom_tree(tmp_path / "b", workers_key="''")))
    assert site.workers_key == ""
    assert site.prefix == atom_function_prefix(site.root, "")


def test_old_layout_and_missing_worker_types(tmp_path: Path) -> None:
    root = make_atom_tree(tmp_path / "atom", worker_types=False, dsn=None)
    (root / "config" / "gearman.yml").write_text(
        "all:\n  server:\n    default:\n      host: 10.0.0.5\n      port: 4731\n"
    )
    site = read_atom_site(str(root))
    assert site.servers == [("10.0.0.5", 4731)]
    assert site.worker_types is None
    assert site.job_classes == list(ATOM_JOB_CLASSES)
    assert site.mysql is None


def test_environment_section_overrides_all(tmp_path: Path) -> None:
    root = make_atom_tree(tmp_path / "atom")
    with open(root / "config" / "gearman.yml", "a") as f:
        f.write("prod:\n  servers:\n    default: 127.0.0.1:4799\n")
    assert read_atom_site(str(root)).servers == [("127.0.0.1", 4799)]


def test_unix_socket_mysql(tmp_path: Path) -> None:
    root = make_atom_tree(
        tmp_path / "atom", dsn="mysql:unix_socket=/run/mysqld/mysqld.sock;dbname=atom"
    )
    site = read_atom_site(str(root))
    assert site.mysql is None
    assert site.mysql_socket == "/run/mysqld/mysqld.sock"


def test_not_an_atom_root(tmp_path: Path) -> None:
    with pytest.raises(AtomError, match="no such directory"):
        read_atom_site(str(tmp_path / "nothing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AtomError, match=r"config/gearman\.yml not found: is .* an AtoM root\?"):
        read_atom_site(str(tmp_path / "empty"))


def test_generated_config_is_valid_and_complete(tmp_path: Path) -> None:
    root = make_atom_tree(tmp_path / "atom", workers_key="k1")
    site = read_atom_site(str(root))
    text = atom_config_yaml(site)
    cfg = parse_config(text, "generated")
    assert cfg.listen == ("127.0.0.1:4730",)
    assert cfg.database == "/var/lib/atomnode/atomnode.db"
    assert [p.name for p in cfg.pools] == ["general", "acl", "move", "file_import"]
    general = cfg.pools[0]
    assert general.command == (
        "php",
        "-d",
        "memory_limit=-1",
        "symfony",
        "jobs:worker",
        "--types=general",
    )
    assert general.directory == site.root
    assert general.user == "www-data"
    assert general.count == 2
    assert all(p.count == 1 for p in cfg.pools[1:])
    assert cfg.pools[2].command[-1] == "--types=move"
    assert [(w.name, w.host, w.port) for w in general.wait_for] == [("mysql", "127.0.0.1", 3306)]
    assert cfg.concurrency[0].functions == ("arObjectMoveJob", "arFileImportJob")
    assert cfg.concurrency[0].max == 1
    # The comment tells the prefix and how it was computed.
    assert f"# AtoM function prefix: {site.prefix}" in text
    assert f'md5("{site.root}" + workers_key "k1")' in text


def test_generated_config_without_worker_types_is_one_pool(tmp_path: Path) -> None:
    site = read_atom_site(str(make_atom_tree(tmp_path / "atom", worker_types=False)))
    cfg = parse_config(atom_config_yaml(site), "generated")
    assert [(p.name, p.command, p.count) for p in cfg.pools] == [
        ("atom", ("php", "-d", "memory_limit=-1", "symfony", "jobs:worker"), 2)
    ]


def test_atom_config_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_atom_tree(tmp_path / "atom", server="127.0.0.1:4730")
    assert main(["atom-config", str(root), "--user", "atom", "--single-pool"]) == 0
    out = capsys.readouterr().out
    data = yaml.safe_load(out)
    assert data["pools"] == [
        {
            "name": "atom",
            "command": ["php", "-d", "memory_limit=-1", "symfony", "jobs:worker"],
            "directory": os.path.realpath(root),
            "user": "atom",
            "count": 2,
            "wait_for": [{"name": "mysql", "address": "127.0.0.1:3306"}],
        }
    ]
    # And check-config accepts what atom-config printed.
    path = tmp_path / "atomnode.yml"
    path.write_text(out)
    assert main(["check-config", str(path)]) == 0


def test_atom_config_bad_root(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["atom-config", str(tmp_path / "nope")]) == 1
    assert "no such directory" in capsys.readouterr().err


def test_atom_config_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["atom-config"])
    assert exc.value.code == 2
    assert "ATOM_ROOT" in textwrap.dedent(capsys.readouterr().err)
