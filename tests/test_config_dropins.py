"""Drop-in configuration files (``conf.d/*.yml``): merged over the main file in name order,
validated as one configuration, each problem naming the file and key it came from."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from atomnode.system import config as config_mod
from atomnode.system.config import ConfigError, format_config, load_config

MAIN = """\
listen: [127.0.0.1:4730]
database: /var/lib/atomnode/atomnode.db
queue:
  synchronous: full
  max_attempts: 5
shutdown_timeout: 30
"""


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read this machine's /etc/atomnode or the caller's $ATOMNODE_CONFIG."""
    monkeypatch.delenv("ATOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "etc" / "atomnode.yml"))
    monkeypatch.setattr(config_mod, "DEFAULT_DROPIN_DIR", str(tmp_path / "etc" / "conf.d"))


def site(tmp_path: Path, main: str | None, dropins: dict[str, str]) -> Path:
    """/etc/atomnode as a site has it: the main file (unless None) and conf.d/."""
    etc = tmp_path / "etc"
    (etc / "conf.d").mkdir(parents=True)
    if main is not None:
        (etc / "atomnode.yml").write_text(textwrap.dedent(main))
    for name, text in dropins.items():
        (etc / "conf.d" / name).write_text(textwrap.dedent(text))
    return etc


def errors(**kw: object) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        load_config(**kw)  # type: ignore[arg-type]
    return exc.value.errors


def test_dropins_merge_in_name_order_mappings_key_by_key(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN, {
        "20-later.yml": "shutdown_timeout: 90\nqueue: {max_attempts: 2}\n",
        "10-first.yml": "shutdown_timeout: 60\nlog_level: debug\nqueue: {max_attempts: 9}\n",
    })
    cfg = load_config()
    assert cfg.shutdown_timeout == 90  # 20-later.yml comes after 10-first.yml
    assert cfg.max_attempts == 2
    assert cfg.log_level == "debug"  # only 10-first.yml sets it
    assert cfg.synchronous == "full"  # the main file's, beside the drop-ins' queue keys
    assert cfg.source == str(etc / "atomnode.yml")
    assert cfg.dropins == (str(etc / "conf.d/10-first.yml"), str(etc / "conf.d/20-later.yml"))
    head = format_config(cfg).splitlines()[:3]
    assert head[1:] == [f"# with the drop-in {etc}/conf.d/10-first.yml",
                        f"# with the drop-in {etc}/conf.d/20-later.yml"]


def test_a_list_in_a_dropin_replaces_the_earlier_one(tmp_path: Path) -> None:
    site(tmp_path, MAIN + "pools:\n  - {name: old, command: [a]}\n", {
        "50-atom.yml": "pools:\n  - {name: atom, command: [php, symfony, jobs:worker]}\n",
        "60-listen.yml": "listen: [127.0.0.1:4730, 127.0.0.1:4740]\n",
    })
    cfg = load_config()
    assert [p.name for p in cfg.pools] == ["atom"]
    assert cfg.listen == ("127.0.0.1:4730", "127.0.0.1:4740")


def test_only_yml_files_and_no_hidden_ones(tmp_path: Path) -> None:
    site(tmp_path, MAIN, {
        "10-a.yml": "log_level: debug\n",
        "20-b.yml.dpkg-old": "log_level: nonsense\n",
        "30-c.yml~": "log_level: nonsense\n",
        ".40-d.yml": "log_level: nonsense\n",
        "README": "not yaml: [\n",
    })
    assert load_config().log_level == "debug"


def test_dropins_without_a_main_file(tmp_path: Path) -> None:
    etc = site(tmp_path, None, {"10-a.yml": "shutdown_timeout: 5\n"})
    cfg = load_config()
    assert cfg.shutdown_timeout == 5
    assert cfg.source is None and cfg.dropins == (str(etc / "conf.d/10-a.yml"),)
    assert not cfg.empty_file


def test_an_explicit_file_takes_the_dropins_beside_it(tmp_path: Path) -> None:
    other = tmp_path / "srv"
    (other / "conf.d").mkdir(parents=True)
    (other / "main.yml").write_text("log_level: info\n")
    (other / "conf.d" / "x.yml").write_text("log_level: warning\n")
    assert load_config(other / "main.yml").log_level == "warning"


def test_empty_dropins_change_nothing_and_an_empty_whole_is_empty(tmp_path: Path) -> None:
    site(tmp_path, "# only comments\n", {"10-empty.yml": "", "20-comments.yml": "# x\n"})
    cfg = load_config()
    assert cfg.empty_file
    assert cfg.shutdown_timeout == 30


def test_errors_name_the_dropin_file_line_and_key(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN + "log_level: loud\n", {
        "10-a.yml": "queue:\n  max_attempts: -1\n",
        "20-b.yml": "\npools:\n  - name: atom\n    count: 2\n",
        "30-c.yml": "shutdown_timout: 5\n",
    })
    errs = errors()
    conf = f"{etc}/conf.d"
    assert errs[0].startswith(f"{etc}/atomnode.yml:7: log_level: ")
    assert errs[1].startswith(f"{conf}/10-a.yml:2: queue.max_attempts: ")
    assert errs[2] == f"{conf}/20-b.yml:3: pools[0]: missing required key 'command'"
    assert errs[3].startswith(f"{conf}/30-c.yml:1: shutdown_timout: ")
    assert "did you mean 'shutdown_timeout'?" in errs[3]
    assert len(errs) == 4


def test_a_dropin_value_that_replaces_a_bad_one_hides_it(tmp_path: Path) -> None:
    # Validated as one: the main file's bad value is replaced, so it is no problem.
    site(tmp_path, MAIN + "log_level: loud\n", {"10-fix.yml": "log_level: debug\n"})
    assert load_config().log_level == "debug"


def test_a_replacing_list_is_checked_and_blamed_on_its_dropin(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN + "concurrency:\n  - {name: g, functions: [f], max: 1}\n", {
        "10-a.yml": "concurrency:\n  - {name: g, functions: [f], max: 0}\n",
    })
    (err,) = errors()
    assert err.startswith(f"{etc}/conf.d/10-a.yml:2: concurrency[0].max: ")


def test_yaml_errors_in_several_files_are_all_reported(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN, {
        "10-a.yml": "listen: [127.0.0.1:4730\n",
        "20-b.yml": "log_level: debug\nlog_level: info\n",
    })
    errs = errors()
    assert errs[0].startswith(f"{etc}/conf.d/10-a.yml:") and "not valid YAML" in errs[0]
    assert errs[1].startswith(f"{etc}/conf.d/20-b.yml:2: log_level: key given twice")


def test_a_dropin_that_is_not_a_mapping(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN, {"10-list.yml": "- a\n- b\n"})
    (err,) = errors()
    assert err.startswith(f"{etc}/conf.d/10-list.yml:1: (top level): expected a mapping")


def test_an_unreadable_dropin_is_named(tmp_path: Path) -> None:
    etc = site(tmp_path, MAIN, {})
    (etc / "conf.d" / "10-dir.yml").mkdir()
    (err,) = errors()
    assert err.startswith(f"{etc}/conf.d/10-dir.yml: cannot read the drop-in file")


def test_atom_config_writes_a_dropin_the_daemon_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from atom_trees import make_atom_release

    from atomnode.cli import main

    etc = site(tmp_path, MAIN, {"90-local.yml": "shutdown_timeout: 120\n"})
    root = make_atom_release(tmp_path / "atom", "2.5.2+", version="2.9.0")
    target = etc / "conf.d" / "50-atom.yml"
    assert main(["atom-config", str(root), "--plugins", "", "--write", str(target)]) == 0
    out = capsys.readouterr()
    assert out.out == ""
    assert f"wrote {target}" in out.err
    assert (etc / "atomnode.yml").read_text() == MAIN  # the main file is not touched
    cfg = load_config()
    assert [p.name for p in cfg.pools] == ["atom"]
    assert cfg.shutdown_timeout == 120  # the site's own later drop-in still wins
    assert not list((etc / "conf.d").glob(".*"))  # no temporary file left

    # A configuration that does not hold together as a whole is said so.
    (etc / "conf.d" / "60-bad.yml").write_text("log_level: loud\n")
    assert main(["atom-config", str(root), "--plugins", "", "--write", str(target)]) == 1
    assert "60-bad.yml:1: log_level" in capsys.readouterr().err
