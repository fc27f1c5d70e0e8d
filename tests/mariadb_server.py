"""A throwaway MariaDB server for tests: Debian's ``mariadbd`` in a temporary directory,
unprivileged (as ``nobody`` when the tests run as root), on a Unix socket only
(``--skip-networking``), with no configuration file read (``--no-defaults``). Never the
system service. Root has an empty password on this instance.

The schema the tests create is AtoM's, written from the facts of its config/schema.yml
(the columns atomnode reads or writes), not copied from it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pymysql

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "/usr/bin/mariadb-install-db"

#: AtoM's settings, job and note tables (the columns that matter, types as AtoM's SQL).
ATOM_SCHEMA = [
    """CREATE TABLE setting (
        name VARCHAR(255), scope VARCHAR(255), editable TINYINT DEFAULT 0,
        deleteable TINYINT DEFAULT 0, source_culture VARCHAR(16) NOT NULL,
        id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY, serial_number INTEGER DEFAULT 0 NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE setting_i18n (
        value TEXT, id INTEGER NOT NULL, culture VARCHAR(16) NOT NULL, PRIMARY KEY (id, culture)
    ) ENGINE=InnoDB""",
    """CREATE TABLE job (
        id INTEGER NOT NULL PRIMARY KEY, name VARCHAR(255), download_path TEXT,
        completed_at DATETIME, user_id INTEGER, object_id INTEGER, status_id INTEGER, output TEXT
    ) ENGINE=InnoDB""",
    """CREATE TABLE note (
        object_id INTEGER NOT NULL, type_id INTEGER, scope VARCHAR(1024), user_id INTEGER,
        source_culture VARCHAR(16) NOT NULL, id INTEGER NOT NULL AUTO_INCREMENT PRIMARY KEY,
        serial_number INTEGER DEFAULT 0 NOT NULL
    ) ENGINE=InnoDB""",
    """CREATE TABLE note_i18n (
        content TEXT, id INTEGER NOT NULL, culture VARCHAR(16) NOT NULL, PRIMARY KEY (id, culture)
    ) ENGINE=InnoDB""",
]


@contextmanager
def throwaway_mariadb() -> Iterator[str]:
    """Start a MariaDB server; yield its socket path; stop it and remove everything."""
    base = Path(tempfile.mkdtemp(prefix="atomnode-mariadb-"))
    os.chmod(base, 0o755)
    user_args: list[str] = []
    if os.geteuid() == 0:
        nobody = pwd.getpwnam("nobody")
        os.chown(base, nobody.pw_uid, nobody.pw_gid)
        user_args = ["--user=nobody"]
    datadir, sock = base / "data", base / "mysqld.sock"
    proc = None
    try:
        subprocess.run(
            [INSTALL_DB, "--no-defaults", *user_args, f"--datadir={datadir}",
             "--auth-root-authentication-method=normal", "--skip-test-db"],
            check=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=120,
        )
        log = base / "error.log"
        proc = subprocess.Popen(
            [MARIADBD, "--no-defaults", *user_args, f"--datadir={datadir}", f"--socket={sock}",
             "--skip-networking", f"--pid-file={base}/mysqld.pid", f"--log-error={log}",
             "--innodb-buffer-pool-size=16M", "--skip-log-bin"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mariadbd exited {proc.returncode}: {log.read_text()[-2000:]}")
            try:
                pymysql.connect(unix_socket=str(sock), user="root", password="").close()
                break
            except pymysql.MySQLError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)  # polling a socket another process creates
        yield str(sock)
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(base, ignore_errors=True)


def create_atom_database(sock: str, name: str, *, user: str = "atom", password: str = "secret",
                         schema: list[str] | None = None) -> None:
    """A database ``name`` with AtoM's tables and a user who may use it."""
    con = pymysql.connect(unix_socket=sock, user="root", password="", autocommit=True)
    try:
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
            cur.execute(f"CREATE USER IF NOT EXISTS '{user}'@'localhost' IDENTIFIED BY %s",
                        (password,))
            cur.execute(f"GRANT ALL ON `{name}`.* TO '{user}'@'localhost'")
            cur.execute(f"USE `{name}`")
            for stmt in ATOM_SCHEMA if schema is None else schema:
                cur.execute(stmt)
    finally:
        con.close()


def root_connection(sock: str, db: str) -> pymysql.connections.Connection:
    return pymysql.connect(unix_socket=sock, user="root", password="", database=db,
                           autocommit=True)


def add_setting(sock: str, db: str, name: str, values: dict[str, str], *,
                scope: str | None = None, source_culture: str = "en") -> None:
    con = root_connection(sock, db)
    try:
        with con.cursor() as cur:
            cur.execute("INSERT INTO setting (name, scope, source_culture) VALUES (%s, %s, %s)",
                        (name, scope, source_culture))
            sid = cur.lastrowid
            for culture, value in values.items():
                cur.execute("INSERT INTO setting_i18n (value, id, culture) VALUES (%s, %s, %s)",
                            (value, sid, culture))
    finally:
        con.close()

