"""Configuration loading and validation: every message names file, line, key, expectation."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import pytest

from atomnode.system import config as config_mod
from atomnode.system.config import (
    Config,
    ConfigError,
    FunctionConfig,
    WaitFor,
    format_config,
    function_matches,
    load_config,
    parse_address,
    parse_config,
    parse_duration,
    parse_size,
    strip_atom_prefix,
)

EXAMPLE = """\
listen: [127.0.0.1:4730]
database: /var/lib/atomnode/atomnode.db
log_level: info
queue: {synchronous: full, max_attempts: 5, retention_days: 7}
max_packet_size: 67108864
shutdown_timeout: 30
functions:
  arFindingAidJob: {max_attempts: 3}
concurrency:
  - {name: serial-moves, functions: [arObjectMoveJob, arFileImportJob], max: 1}
pools:
  - name: atom
    command: [php, -d, memory_limit=-1, symfony, jobs:worker]
    directory: /usr/share/nginx/atom
    user: www-data
    count: 2
    wait_for: [{name: mysql, address: 127.0.0.1:3306}]
handlers:
  - {function: echo-upper, command: [tr, a-z, A-Z], concurrency: 2, timeout: 60}
"""


def write(tmp_path: Path, text: str, name: str = "atomnode.yml") -> str:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return str(p)


def errors_of(tmp_path: Path, text: str) -> list[str]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert str(exc.value) == "\n".join(exc.value.errors)
    return exc.value.errors


@pytest.fixture(autouse=True)
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never read this machine's /etc/atomnode or the caller's $ATOMNODE_CONFIG."""
    monkeypatch.delenv("ATOMNODE_CONFIG", raising=False)
    monkeypatch.setattr(
        config_mod, "DEFAULT_CONFIG_PATH", str(tmp_path / "absent" / "atomnode.yml")
    )
    monkeypatch.setattr(config_mod, "DEFAULT_DROPIN_DIR", str(tmp_path / "absent" / "conf.d"))


# ----------------------------------------------------------------------------- happy paths


def test_documented_example_loads(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    cfg = load_config(path)
    assert cfg.source == path
    assert cfg.listen == ("127.0.0.1:4730",)
    assert cfg.database == "/var/lib/atomnode/atomnode.db"
    assert (cfg.synchronous, cfg.max_attempts, cfg.retention_days) == ("full", 5, 7.0)
    assert cfg.functions["arFindingAidJob"] == FunctionConfig(max_attempts=3)
    assert cfg.concurrency[0].functions == ("arObjectMoveJob", "arFileImportJob")
    assert cfg.concurrency[0].max == 1
    pool = cfg.pools[0]
    assert pool.command == ("php", "-d", "memory_limit=-1", "symfony", "jobs:worker")
    assert (pool.user, pool.count, pool.planned_exit_codes) == ("www-data", 2, (111,))
    assert pool.wait_for == (WaitFor("mysql", "127.0.0.1", 3306),)
    h = cfg.handlers[0]
    assert (h.function, h.command, h.concurrency, h.timeout) == (
        "echo-upper",
        ("tr", "a-z", "A-Z"),
        2,
        60.0,
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.database = "x"  # type: ignore[misc]


def test_defaults_when_no_file_anywhere() -> None:
    cfg = load_config()
    assert cfg == Config()
    assert cfg.listen == ("127.0.0.1:4730",)
    assert cfg.database == "var/atomnode.db"
    assert cfg.source is None


def test_default_path_is_read_when_it_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(tmp_path, "log_level: debug\n", "etc.yml")
    monkeypatch.setattr(config_mod, "DEFAULT_CONFIG_PATH", path)
    assert load_config().log_level == "debug"


def test_env_variable_names_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "database: from-env.db\n")
    monkeypatch.setenv("ATOMNODE_CONFIG", path)
    cfg = load_config()
    assert (cfg.database, cfg.source) == ("from-env.db", path)
    # An explicit path wins over the environment.
    other = write(tmp_path, "database: explicit.db\n", "other.yml")
    assert load_config(other).database == "explicit.db"


def test_missing_explicit_file_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yml: configuration file not found"):
        load_config(str(tmp_path / "nope.yml"))
    monkeypatch.setenv("ATOMNODE_CONFIG", str(tmp_path / "gone.yml"))
    with pytest.raises(
        ConfigError, match=r"gone\.yml: configuration file not found \(from \$ATOMNODE_CONFIG\)"
    ):
        load_config()


def test_overrides_win_over_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "listen: [127.0.0.1:4730]\ndatabase: file.db\nlog_level: warning\n")
    cfg = load_config(
        path, overrides={"listen": ("127.0.0.1:5000",), "database": "x.db", "log_level": None}
    )
    assert cfg.listen == ("127.0.0.1:5000",)
    assert cfg.database == "x.db"
    assert cfg.log_level == "warning"  # None = option not given


def test_bad_overrides_are_reported() -> None:
    with pytest.raises(ConfigError) as exc:
        load_config(overrides={"listen": ["nohost"], "databse": "x"})
    text = str(exc.value)
    assert "listen: expected host:port" in text
    assert "unknown setting 'databse'; did you mean 'database'?" in text


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, ""))
    assert cfg.empty_file  # a reload refuses it while pools or handlers run
    assert dataclasses.replace(cfg, source=None, empty_file=False) == Config()
    for said_nothing in ("# only a comment\n", "null\n", "{}\n", "---\n...\n"):
        assert load_config(write(tmp_path, said_nothing)).empty_file, said_nothing
    assert not load_config(write(tmp_path, "pools: []\n")).empty_file


def test_limits_in_the_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, "limits:\n  output_per_connection: 80MiB\n"
                                      "  output_total: 128MiB\n  input_total: 1G\n"))
    assert cfg.max_output_per_connection == 80 * 1024 * 1024
    assert cfg.max_output_total == 128 * 1024 * 1024
    assert cfg.max_input_total == 1024 ** 3
    with pytest.raises(ConfigError, match="must be at least max_packet_size"):
        load_config(write(tmp_path, "limits: {output_per_connection: 1MiB}\n"))
    with pytest.raises(ConfigError, match="must be at least max_packet_size"):
        load_config(write(tmp_path, "max_packet_size: 200MiB\n"))
    with pytest.raises(ConfigError, match="unknown key 'output'"):
        load_config(write(tmp_path, "limits: {output: 1MiB}\n"))
    with pytest.raises(ConfigError, match="expected at least 64KiB"):
        load_config(write(tmp_path, "max_packet_size: 1024\nlimits: {input_total: 1000}\n"))


def test_durations_and_sizes_in_the_file(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            """\
            max_packet_size: 16MiB
            shutdown_timeout: 2m
            status_interval: 500ms
            busy_poll: 150us
            queue: {retention_days: 12h}
            pools:
              - {name: p, command: [x], max_age: 7d, drain_timeout: 1h, backoff_max: 5m}
            """,
        )
    )
    assert cfg.max_packet_size == 16 * 1024 * 1024
    assert cfg.shutdown_timeout == 120.0
    assert cfg.status_interval == 0.5
    assert cfg.busy_poll == pytest.approx(0.00015)
    assert cfg.retention_days == 0.5
    assert (cfg.pools[0].max_age, cfg.pools[0].drain_timeout, cfg.pools[0].backoff_max) == (
        7 * 86400.0,
        3600.0,
        300.0,
    )


def test_ipv6_listen_and_listen_none(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, 'listen: ["[::1]:4730", 0.0.0.0:4731]\n')).listen == (
        "[::1]:4730",
        "0.0.0.0:4731",
    )
    assert load_config(write(tmp_path, "listen: []\n")).listen == ()


def test_format_config_round_trips(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, EXAMPLE))
    text = format_config(cfg)
    assert "serial-moves" in text and "memory_limit=-1" in text
    again = parse_config(text, "formatted")
    assert again == dataclasses.replace(cfg, source=None)


# ----------------------------------------------------------------------------- errors


def test_unknown_key_suggests_the_close_one(tmp_path: Path) -> None:
    errs = errors_of(tmp_path, "listen: [127.0.0.1:4730]\ndatabse: x.db\n")
    assert len(errs) == 1
    assert errs[0].startswith(
        f"{tmp_path}/atomnode.yml:2: databse: unknown key 'databse'; did you mean 'database'?"
    )


def test_unknown_nested_keys_name_the_path_and_line(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        """\
        queue:
          max_attemps: 3
        pools:
          - name: atom
            command: [php]
            wait_for: [{name: mysql, adress: 127.0.0.1:3306}]
            cuont: 2
        """,
    )
    f = f"{tmp_path}/atomnode.yml"
    assert (
        f"{f}:2: queue.max_attemps: unknown key 'max_attemps'; did you mean 'max_attempts'?"
        in errs[0]
    )
    assert any(
        e.startswith(
            f"{f}:6: pools[0].wait_for[0].adress: unknown key 'adress'; did you mean 'address'?"
        )
        for e in errs
    )
    assert any(
        e.startswith(f"{f}:6: pools[0].wait_for[0]: missing required key 'address'") for e in errs
    )
    assert any(
        e.startswith(f"{f}:7: pools[0].cuont: unknown key 'cuont'; did you mean 'count'?")
        for e in errs
    )


def test_unknown_key_without_a_close_match_lists_the_keys(tmp_path: Path) -> None:
    (err,) = errors_of(tmp_path, "zzz: 1\n")
    assert "unknown key 'zzz' (expected one of: listen, database" in err
    assert "did you mean" not in err


@pytest.mark.parametrize(
    ("text", "line", "key", "expected"),
    [
        ("listen: [127.0.0.1:99999]\n", 1, "listen[0]", "port 99999 is out of range 1-65535"),
        ("listen: [127.0.0.1:0]\n", 1, "listen[0]", "port 0 is out of range 1-65535"),
        ("listen: [localhost]\n", 1, "listen[0]", "expected host:port"),
        ("listen: ['::1:4730']\n", 1, "listen[0]", "write an IPv6 address in brackets"),
        ("listen: ['[::1]4730']\n", 1, "listen[0]", "expected [IPv6]:port"),
        ("listen: [host:http]\n", 1, "listen[0]", "port 'http' is not a number"),
        (
            "log_level: verbose\n",
            1,
            "log_level",
            "expected one of debug, info, warning, error, critical, got 'verbose'",
        ),
        ("queue:\n  synchronous: fulll\n", 2, "queue.synchronous", "did you mean 'full'?"),
        ("queue:\n  max_attempts: 0\n", 2, "queue.max_attempts", "expected an integer >= 1, got 0"),
        (
            "max_packet_size: lots\n",
            1,
            "max_packet_size",
            "expected a size in bytes (67108864, 64MiB, 512M), got 'lots'",
        ),
        ("max_packet_size: 10\n", 1, "max_packet_size", "expected at least 1024 bytes, got 10"),
        (
            "shutdown_timeout: soon\n",
            1,
            "shutdown_timeout",
            "expected a duration in seconds (30, 30s, 5m, 2h, 7d), got 'soon'",
        ),
        ("status_interval: 0\n", 1, "status_interval", "expected a duration greater than 0"),
        (
            "busy_poll: 20ms\n",
            1,
            "busy_poll",
            "expected at most 10ms (the hub goes back to its other work at least that "
            "often), got '20ms'",
        ),
        ("database: ''\n", 1, "database", "expected a non-empty string"),
        (
            "functions:\n  f: {max_queue: -1}\n",
            2,
            "functions.f.max_queue",
            "expected an integer >= 0, got -1",
        ),
        ("functions: [a, b]\n", 1, "functions", "expected a mapping (key: value), got a list"),
        ("pools: {name: a}\n", 1, "pools", "expected a list of pools, got a mapping"),
        (
            "pools:\n  - name: a\n    command: php symfony jobs:worker\n",
            3,
            "pools[0].command",
            "expected a list of arguments (no shell is used), got a string; write it as a list: command: [php, symfony, jobs:worker]",
        ),
        (
            "pools:\n  - name: a\n    command: []\n",
            3,
            "pools[0].command",
            "expected a non-empty list of arguments",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    count: -1\n",
            4,
            "pools[0].count",
            "expected an integer >= 0, got -1",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    count: two\n",
            4,
            "pools[0].count",
            "expected an integer, got a string 'two'",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    wait_for: [{name: db, address: db}]\n",
            4,
            "pools[0].wait_for[0].address",
            "expected an address host:port",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    planned_exit_codes: [300]\n",
            4,
            "pools[0].planned_exit_codes[0]",
            "expected an exit code 0-255, got 300",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    age_jitter: 2\n",
            4,
            "pools[0].age_jitter",
            "expected a number between 0 and 1, got 2",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    backoff_initial: 10\n    backoff_max: 5\n",
            5,
            "pools[0].backoff_max",
            "expected backoff_max >= backoff_initial (10s), got 5s",
        ),
        (
            "pools:\n  - name: a\n    command: [x]\n    environment: {A: [1]}\n",
            4,
            "pools[0].environment.A",
            "expected a string value, got a list",
        ),
        ("pools:\n  - command: [x]\n", 2, "pools[0]", "missing required key 'name'"),
        ("pools:\n  - name: a\n", 2, "pools[0]", "missing required key 'command'"),
        (
            "pools:\n  - {name: a, command: [x]}\n  - {name: a, command: [y]}\n",
            3,
            "pools[1].name",
            "pool name 'a' already used by pools[0]",
        ),
        (
            "handlers:\n  - {function: f, command: [x], concurrency: 0}\n",
            2,
            "handlers[0].concurrency",
            "expected an integer >= 1, got 0",
        ),
        (
            "handlers:\n  - {function: f, command: [x]}\n  - {function: f, command: [y]}\n",
            3,
            "handlers[1].function",
            "function 'f' already handled by handlers[0]",
        ),
        (
            "handlers:\n  - {function: f, command: [x], shell: maybe}\n",
            2,
            "handlers[0].shell",
            "expected true or false, got 'maybe'",
        ),
        (
            "concurrency:\n  - {name: g, functions: [a], max: 0}\n",
            2,
            "concurrency[0].max",
            "expected an integer >= 1, got 0",
        ),
        (
            "concurrency:\n  - {name: g, functions: [], max: 1}\n",
            2,
            "concurrency[0].functions",
            "expected at least one function name",
        ),
        (
            "concurrency:\n  - {name: g, functions: [a], max: 1}\n  - {name: g, functions: [b], max: 1}\n",
            3,
            "concurrency[1].name",
            "group name 'g' already used by concurrency[0]",
        ),
        ("database: a\ndatabase: b\n", 2, "database", "key given twice"),
    ],
)
def test_each_validation_message(
    tmp_path: Path, text: str, line: int, key: str, expected: str
) -> None:
    errs = errors_of(tmp_path, text)
    want = f"{tmp_path}/atomnode.yml:{line}: {key}: "
    matching = [e for e in errs if e.startswith(want)]
    assert matching, f"no error starting {want!r} in {errs}"
    assert expected in matching[0], matching[0]


def test_all_errors_are_collected_in_file_order(tmp_path: Path) -> None:
    errs = errors_of(
        tmp_path,
        """\
        log_level: loud
        pools:
          - name: a
            command: [x]
            count: -3
        databse: y
        """,
    )
    assert [e.split(":")[1] for e in errs] == ["1", "5", "6"]


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (err,) = errors_of(tmp_path, "listen: [127.0.0.1:4730\ndatabase: x\n")
    assert err.startswith(f"{tmp_path}/atomnode.yml:")
    assert "not valid YAML" in err


def test_top_level_must_be_a_mapping(tmp_path: Path) -> None:
    (err,) = errors_of(tmp_path, "- a\n- b\n")
    assert (
        err
        == f"{tmp_path}/atomnode.yml:1: (top level): expected a mapping (key: value), got a list"
    )


def test_shell_handler_accepts_a_string(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "handlers:\n  - {function: f, command: 'tr a-z A-Z | sort', shell: true}\n")
    )
    assert cfg.handlers[0].command == ("tr a-z A-Z | sort",)
    assert cfg.handlers[0].shell is True


# ----------------------------------------------------------------------------- helpers


def test_parse_address() -> None:
    assert parse_address("127.0.0.1:4730") == ("127.0.0.1", 4730)
    assert parse_address("[::1]:4730") == ("::1", 4730)
    assert parse_address("gearman.example:1") == ("gearman.example", 1)
    for bad in ("4730", ":4730", "h:", "h:65536", "[zz]:1", "::1:4730"):
        with pytest.raises(ValueError):
            parse_address(bad)


def test_parse_duration_and_size() -> None:
    assert [parse_duration(x) for x in (30, "30", "30s", "5m", "2h", "7d", "250ms", 1.5,
                                        "200us")] == [
        30.0, 30.0, 30.0, 300.0, 7200.0, 604800.0, 0.25, 1.5, 0.0002,
    ]  # fmt: skip
    for bad in ("5 weeks", "-1", True, None, -1):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert parse_size(1000) == 1000
    assert parse_size("64MiB") == parse_size("64M") == 64 * 1024 * 1024
    assert parse_size("1GiB") == 1024**3
    assert parse_size("10MB") == 10_000_000
    assert parse_size("2k") == 2048
    for bad in ("lots", "-5", True, 1.5):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_atom_prefix_matching() -> None:
    full = "0123456789abcdef0123456789abcdef-arObjectMoveJob"
    assert strip_atom_prefix(full) == "arObjectMoveJob"
    assert strip_atom_prefix("arObjectMoveJob") == "arObjectMoveJob"
    assert strip_atom_prefix("0123-arObjectMoveJob") == "0123-arObjectMoveJob"  # not 32 hex
    assert function_matches("arObjectMoveJob", full)
    assert function_matches(full, full)
    assert not function_matches("arFileImportJob", full)
    assert not function_matches("MoveJob", full)
    assert not function_matches("arObjectMoveJob", "x" * 32 + "-arObjectMoveJob")


def test_yaml_is_parsed_by_libyaml_where_pyyaml_has_it() -> None:
    import yaml

    from atomnode.system import config

    expected = yaml.CSafeLoader if yaml.__with_libyaml__ else yaml.SafeLoader
    assert config.YAML_LOADER is expected
    # Lines in messages come from libyaml's marks as they did from the Python parser's.
    with pytest.raises(ConfigError, match=r"x\.yml:3: pools\[0\]\.count"):
        parse_config("listen: [127.0.0.1:4730]\npools:\n  - {name: a, command: [x], count: -1}\n",
                     "x.yml")


def test_atom_runners_are_validated() -> None:
    from atomnode.system.config import parse_config as parse

    cfg = parse(
        "atom_runners:\n  - name: atom\n    root: /srv/atom\n    functions: [p-arFindingAidJob]\n"
        "    timeout: 2h\n    on_timeout: requeue\n    memory_limit: 1GiB\n    concurrency: 3\n"
        "    wait_for: [127.0.0.1:3306]\n"
    )
    (r,) = cfg.atom_runners
    assert (r.timeout, r.on_timeout, r.memory_limit, r.concurrency) == (
        7200.0, "requeue", 1024**3, 3)
    assert r.wait_for[0].port == 3306 and r.script is None and r.php == "php"
    with pytest.raises(ConfigError) as e:
        parse("atom_runners:\n  - {name: a, root: srv, functions: [], on_timeout: later,"
              " concurrency: 0, script: x.php}\n  - {name: a, root: /x, functions: f}\n")
    text = str(e.value)
    assert "atom_runners[0].root: expected an absolute path" in text
    assert "atom_runners[0].functions: expected at least one function name" in text
    assert "atom_runners[0].on_timeout: expected one of fail, requeue" in text
    assert "atom_runners[0].concurrency" in text
    assert "atom_runners[0].script: expected an absolute path" in text
    assert "atom_runners[1].name: runner name 'a' already used by atom_runners[0]" in text
    with pytest.raises(ConfigError, match="not available with listen: \\[\\]"):
        parse("listen: []\natom_runners:\n  - {name: a, root: /x, functions: [f]}\n")
