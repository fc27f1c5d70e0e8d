"""The package's preinst (debian/atomnode.preinst): installing a version over another one
refuses when the queue database's schema is newer than that version's code, and says so;
anything else goes on. Run with a stand-in `atomnode` on PATH (the installed version's
check-config names the database); the real upgrade and downgrade through apt are in
tests/packaging/run.sh (make test-deb)."""

from __future__ import annotations

import os
import sqlite3
import subprocess
from pathlib import Path

import pytest

from atomnode.queue.store import SCHEMA_VERSION

PREINST = Path(__file__).resolve().parent.parent / "debian" / "atomnode.preinst"


@pytest.fixture
def preinst(tmp_path: Path):
    script = tmp_path / "preinst"
    text = PREINST.read_text()
    assert "#SCHEMA_VERSION#" in text
    # What dh_installdeb does at build time (#DEBHELPER# is left as the comment it is).
    script.write_text(text.replace("#SCHEMA_VERSION#", str(SCHEMA_VERSION)))
    script.chmod(0o755)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    db = tmp_path / "atomnode.db"
    fake = bindir / "atomnode"
    fake.write_text(f"#!/bin/sh\necho '# effective configuration'\necho 'database: {db}'\n")
    fake.chmod(0o755)

    def run(*args: str, schema: int | None) -> subprocess.CompletedProcess:
        if db.exists():
            db.unlink()
        if schema is not None:
            con = sqlite3.connect(db)
            con.execute("CREATE TABLE jobs (id)")
            con.execute(f"PRAGMA user_version = {schema}")
            con.commit()
            con.close()
        env = {**os.environ, "PATH": f"{bindir}:{os.environ['PATH']}"}
        return subprocess.run([str(script), *args], capture_output=True, text=True, env=env)

    run.db = db  # type: ignore[attr-defined]
    return run


def test_a_newer_schema_refuses_with_both_versions_and_the_file(preinst) -> None:
    r = preinst("upgrade", "0.2.0", schema=SCHEMA_VERSION + 1)
    assert r.returncode == 1
    said = " ".join(r.stderr.split())
    assert f"the queue database {preinst.db} has schema version {SCHEMA_VERSION + 1}, " \
        "written by a newer atomnode" in said
    assert f"understands schema versions up to {SCHEMA_VERSION}" in said
    assert "atomnode 0.2.0 stays installed and running, the queue is intact" in said
    # Refused without touching it.
    con = sqlite3.connect(preinst.db)
    assert con.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
    con.close()


@pytest.mark.parametrize("schema", [SCHEMA_VERSION, SCHEMA_VERSION - 1, None])
def test_the_same_or_an_older_schema_or_no_database_goes_on(preinst, schema) -> None:
    r = preinst("upgrade", "0.1.0", schema=schema)
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""


def test_a_first_install_is_not_checked(preinst) -> None:
    r = preinst("install", schema=SCHEMA_VERSION + 5)
    assert r.returncode == 0, r.stderr
