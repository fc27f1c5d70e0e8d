"""Values AtoM keeps in MySQL, read with the site's credentials, and AtoM's job records
marked failed: against a real MariaDB server from Debian, started by the tests
(tests/mariadb_server.py), with AtoM's tables created from the facts of its schema."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from atom_trees import add_runtime, make_atom_release
from daemon_harness import Client, Daemon
from mariadb_server import (
    add_setting,
    create_atom_database,
    root_connection,
    throwaway_mariadb,
)

from atomnode.ops.atom_jobs import SiteMarker, atom_job_id
from atomnode.ops.atom_site import read_atom_site

PLUGINS = 'a:3:{i:0;s:10:"sfDcPlugin";i:1;s:13:"qtSwordPlugin";i:2;s:12:"sfEadPlugin_";}'
WORKER_PHP = Path(__file__).parent / "workers" / "atom_like_worker.php"


@pytest.fixture(scope="module")
def mariadb() -> Iterator[str]:
    with throwaway_mariadb() as sock:
        yield sock


_counter = iter(range(1000))


@pytest.fixture
def atom_db(mariadb: str) -> str:
    """A fresh database with AtoM's tables; returns its name."""
    name = f"atom{next(_counter)}"
    create_atom_database(mariadb, name)
    return name


def tree(tmp_path: Path, sock: str, db: str, family: str = "2.5.2+", password: str = "secret",
         **kw) -> Path:
    return make_atom_release(
        tmp_path / "atom", family, dsn=f"mysql:dbname={db};unix_socket={sock}",
        db_password=password, **kw,
    )


def test_enabled_plugins_are_read_from_mysql(tmp_path: Path, mariadb: str, atom_db: str) -> None:
    add_setting(mariadb, atom_db, "plugins", {"en": PLUGINS})
    site = read_atom_site(str(tree(tmp_path, mariadb, atom_db)))
    assert site.mysql_error is None and site.missing == []
    assert site.db_plugins == ["sfDcPlugin", "qtSwordPlugin", "sfEadPlugin_"]
    assert "qtSwordPluginWorker" in site.served_classes
    assert site.skipped_classes == {}


def test_sword_disabled_in_mysql(tmp_path: Path, mariadb: str, atom_db: str) -> None:
    add_setting(mariadb, atom_db, "plugins", {"en": 'a:1:{i:0;s:10:"sfDcPlugin";}'})
    site = read_atom_site(str(tree(tmp_path, mariadb, atom_db)))
    assert site.skipped_classes == {"qtSwordPluginWorker": "qtSwordPlugin is disabled"}


def test_2_3_prefix_from_site_title_and_base_url(
    tmp_path: Path, mariadb: str, atom_db: str
) -> None:
    add_setting(mariadb, atom_db, "plugins", {"en": PLUGINS})
    add_setting(mariadb, atom_db, "siteTitle", {"en": "City Archives", "fr": "Archives"})
    add_setting(mariadb, atom_db, "siteBaseUrl", {"en": "https://archives.example"})
    # A scoped setting of the same name is not app_siteTitle.
    add_setting(mariadb, atom_db, "siteTitle", {"en": "ignored"}, scope="site_information")
    root = tree(tmp_path, mariadb, atom_db, family="2.3-2.5.1")
    real = os.path.realpath(root)
    site = read_atom_site(str(root))
    key = "City Archives" + "https://archives.example" + real
    assert site.prefix == hashlib.md5(key.encode()).hexdigest() + "-"
    # In French the title differs; the base URL falls back to its source culture.
    site = read_atom_site(str(root), culture="fr")
    key = "Archives" + "https://archives.example" + real
    assert site.prefix == hashlib.md5(key.encode()).hexdigest() + "-"


def test_mysql_unreachable_says_which_value_and_which_option(
    tmp_path: Path, mariadb: str, atom_db: str
) -> None:
    root = tree(tmp_path, mariadb, atom_db, family="2.3-2.5.1", password="wrong")
    site = read_atom_site(str(root))
    assert site.mysql_error == (
        f"cannot connect to MySQL at {mariadb} as 'atom' (from config/config.php): "
        "Access denied for user 'atom'@'localhost' (using password: YES) (error 1045)"
    )
    assert site.prefix is None
    assert site.missing == [
        "which plugins are enabled (qtSwordPlugin) is kept in MySQL, and MySQL could not be "
        f"read: {site.mysql_error}: qtSwordPluginWorker left out; give the enabled plugins "
        "with --plugins (e.g. --plugins qtSwordPlugin, or --plugins '' for none)",
        "the job prefix of AtoM 2.4.1 is md5(siteTitle . siteBaseUrl . root); siteTitle and "
        f"siteBaseUrl are kept in MySQL, and MySQL could not be read: {site.mysql_error}: give "
        "them with --site-title and --site-base-url (as in Admin > Settings > Site information)",
    ]


def in_progress_job(sock: str, db: str, job_id: int, status: int = 183) -> None:
    con = root_connection(sock, db)
    with con.cursor() as cur:
        cur.execute("INSERT INTO job (id, name, status_id) VALUES (%s, 'arFindingAidJob', %s)",
                    (job_id, status))
    con.close()


def job_row(sock: str, db: str, job_id: int) -> tuple:
    con = root_connection(sock, db)
    with con.cursor() as cur:
        cur.execute("SELECT status_id, completed_at IS NOT NULL FROM job WHERE id = %s", (job_id,))
        row = cur.fetchone()
        cur.execute("SELECT n.type_id, i.content FROM note n JOIN note_i18n i ON i.id = n.id "
                    "WHERE n.object_id = %s", (job_id,))
        notes = cur.fetchall()
    con.close()
    return row + (notes,)


def test_marker_updates_only_a_job_in_progress(tmp_path: Path, mariadb: str, atom_db: str) -> None:
    root = tree(tmp_path, mariadb, atom_db)
    in_progress_job(mariadb, atom_db, 41)
    in_progress_job(mariadb, atom_db, 42, status=184)  # completed by AtoM's worker
    marker = SiteMarker(str(root), None)
    assert marker.mark_failed(41, "worker disconnected; gave up after 1 attempts")
    assert job_row(mariadb, atom_db, 41) == (
        185, 1, ((197, "atomnode: worker disconnected; gave up after 1 attempts"),))
    assert not marker.mark_failed(42, "x")
    assert job_row(mariadb, atom_db, 42) == (184, 0, ())
    assert marker.marked == [41]
    assert atom_job_id(json.dumps({"id": 41, "objectId": 7}).encode()) == 41
    assert atom_job_id(b"not json") is None and atom_job_id(b'{"id": true}') is None


def test_marker_leaves_an_unexpected_table_alone(
    tmp_path: Path, mariadb: str, caplog: pytest.LogCaptureFixture
) -> None:
    create_atom_database(mariadb, "notatom", schema=[
        "CREATE TABLE job (id INTEGER PRIMARY KEY, state VARCHAR(20))"])
    root = tree(tmp_path, mariadb, "notatom")
    marker = SiteMarker(str(root), None)
    assert not marker.mark_failed(1, "x")
    assert marker.disabled == "table 'job' has no column(s) completed_at, status_id"
    assert "not marking failed jobs in AtoM's database" in caplog.text
    con = root_connection(mariadb, "notatom")
    with con.cursor() as cur:
        cur.execute("SELECT count(*) FROM job")
        assert cur.fetchone() == (0,)
    con.close()


def test_daemon_marks_a_given_up_job_failed_in_atom(
    tmp_path: Path, mariadb: str, atom_db: str
) -> None:
    """A worker dies on a job's last attempt: atomnode gives the job up, AtoM's record says
    "error" with atomnode's reason (opt-in), and the pool restarts at once although its
    crash backoff is long (the cause is set aside)."""
    root = tree(tmp_path, mariadb, atom_db)
    real = os.path.realpath(root)
    prefix = hashlib.md5(real.encode()).hexdigest() + "-"
    fn = prefix + "arFindingAidJob"
    in_progress_job(mariadb, atom_db, 77)
    cmd = ["php", str(WORKER_PHP), "--server", "{server}", "--function", fn]
    config = (
        "queue: {max_attempts: 1}\n"
        f"atom_sites: [{{root: {json.dumps(real)}, prefix: {prefix}, mark_failed_jobs: true}}]\n"
        "pools:\n  - name: atom\n"
        f"    command: {json.dumps(cmd)}\n"
        f"    functions: [{fn}]\n"
        "    backoff_initial: 300\n    backoff_max: 300\n    stop_grace: 2\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        _wait(lambda: d.status().get(fn, (0, 0, 0))[2] == 1, "the worker registered", d)
        with Client(d.port) as c:
            c.submit_bg(fn.encode(), b"", json.dumps({"id": 77, "kill": True}).encode())
        _wait(lambda: job_row(mariadb, atom_db, 77)[0] == 185, "the AtoM job marked failed", d)
        (_type, content), = job_row(mariadb, atom_db, 77)[2]
        assert content.startswith("atomnode: worker disconnected; gave up after 1 attempts")
        # Restarted at once despite backoff_initial 300s: a new worker registers.
        _wait(lambda: "restarts now" in d.log() or "starting it now" in d.log(),
              "the quarantine noted", d)
        _wait(lambda: d.status().get(fn, (0, 0, 0))[2] == 1, "a new worker registered", d)
        assert "restarting in 5m" not in d.log()
    finally:
        d.stop()


def _wait(pred, what: str, d: Daemon, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{d.log()[-3000:]}"
        time.sleep(0.05)  # polling the daemon and MariaDB from outside



def test_per_job_runner_marks_a_job_it_failed_in_atom(
    tmp_path: Path, mariadb: str, atom_db: str
) -> None:
    """Per-job mode (issue 16): a job atomnode stops (here its timeout) fails in the queue
    and, opt-in, in AtoM's own job table, whose record would otherwise stay "Running"."""
    root = tree(tmp_path, mariadb, atom_db)
    add_runtime(root, "2.5.2+")
    real = os.path.realpath(root)
    prefix = hashlib.md5(real.encode()).hexdigest() + "-"
    fn = prefix + "arFixtureJob"
    in_progress_job(mariadb, atom_db, 78)
    config = (
        f"atom_sites: [{{root: {json.dumps(real)}, prefix: {prefix}, mark_failed_jobs: true}}]\n"
        f"atom_runners:\n  - {{name: atom, root: {json.dumps(real)}, functions: [{fn}],"
        " timeout: 1s}\n"
    )
    d = Daemon(tmp_path, config=config).start()
    try:
        with Client(d.port) as c:
            handle = c.submit_bg(fn.encode(), b"", json.dumps(
                {"id": 78, "do": "hang", "marker": str(tmp_path / "m")}).encode())
        _wait(lambda: job_row(mariadb, atom_db, 78)[0] == 185, "the AtoM job marked failed", d)
        (_type, content), = job_row(mariadb, atom_db, 78)[2]
        assert content == f"atomnode: timed out after 1s (job {handle.decode()})"
    finally:
        d.stop()
