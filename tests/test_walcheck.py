"""atomnode.queue.walcheck against logs written by the real SQLite: crash images (the files
copied while the writer still has them open) with a torn tail, damage in the middle, a
damaged header, leftovers of an earlier generation. Each verdict is checked against what
SQLite itself then recovers."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from atomnode.queue.walcheck import HEADER_SIZE, checksum, scan_wal

ROWS_PER_COMMIT = 40


def crash_image(tmp_path: Path, commits: int, *, reset_after: int | None = None) -> tuple[Path, bytes]:
    """A database in WAL mode after ``commits`` commits, copied with its -wal while the
    connection is open (what a kill -9 leaves). ``reset_after``: checkpoint and restart the
    log after that many commits (later frames overwrite the old generation's)."""
    src = tmp_path / "src.db"
    c = sqlite3.connect(src, isolation_level=None)
    c.execute("PRAGMA journal_mode = WAL")
    c.execute("PRAGMA wal_autocheckpoint = 0")
    c.execute("CREATE TABLE t (x)")
    for i in range(commits):
        c.execute("BEGIN")
        c.executemany("INSERT INTO t VALUES (?)", [(b"y" * 100,)] * ROWS_PER_COMMIT)
        c.execute("COMMIT")
        if reset_after is not None and i + 1 == reset_after:
            c.execute("PRAGMA wal_checkpoint(PASSIVE)")
    base = tmp_path / "base.db"
    shutil.copy(src, base)
    wal = (tmp_path / "src.db-wal").read_bytes()
    c.close()
    return base, wal


def sqlite_rows(tmp_path: Path, base: Path, wal: bytes) -> int:
    """Rows SQLite recovers from this image."""
    db = tmp_path / "trial.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    shutil.copy(base, db)
    Path(f"{db}-wal").write_bytes(wal)
    con = sqlite3.connect(db)
    try:
        return con.execute("SELECT count(*) FROM t").fetchone()[0]
    except sqlite3.OperationalError:
        return 0  # the table itself was only in the log
    finally:
        con.close()


def flip(wal: bytes, offset: int) -> bytes:
    b = bytearray(wal)
    b[offset] ^= 0x01
    return bytes(b)


def test_checksum_matches_the_header_of_a_real_log(tmp_path: Path) -> None:
    _, wal = crash_image(tmp_path, 1)
    big = wal[3] == 0x83
    assert checksum(wal[:24], 0, 0, big) == (
        int.from_bytes(wal[24:28], "big"), int.from_bytes(wal[28:32], "big"))


def test_intact_log_is_clean(tmp_path: Path) -> None:
    base, wal = crash_image(tmp_path, 30)
    scan = scan_wal(wal)
    assert scan is not None and not scan.damaged and scan.first_bad is None
    assert scan.replayed == scan.frames
    assert sqlite_rows(tmp_path, base, wal) == 30 * ROWS_PER_COMMIT


@pytest.mark.parametrize("cut", ["half-frame", "bad-last-frame"])
def test_torn_tail_is_normal(tmp_path: Path, cut: str) -> None:
    base, wal = crash_image(tmp_path, 30)
    scan = scan_wal(wal)
    assert scan is not None
    frame = scan.page_size + 24
    if cut == "half-frame":
        torn = wal[: len(wal) - frame // 2]
    else:
        torn = flip(wal, HEADER_SIZE + (scan.frames - 1) * frame + 24 + 7)
    verdict = scan_wal(torn)
    assert verdict is not None and not verdict.damaged
    assert sqlite_rows(tmp_path, base, torn) == 29 * ROWS_PER_COMMIT


@pytest.mark.parametrize("where", ["page", "frame-header-checksum", "salt"])
def test_damage_in_the_middle_is_detected(tmp_path: Path, where: str) -> None:
    """One flipped bit in frame 20's page (or checksum, or salt): SQLite replays up to
    it and drops the rest without a word; the scan names the frame and counts what
    SQLite would drop."""
    base, wal = crash_image(tmp_path, 50)
    scan = scan_wal(wal)
    assert scan is not None
    frame = scan.page_size + 24
    start = HEADER_SIZE + 20 * frame
    offset = {"page": start + 24 + 100, "frame-header-checksum": start + 17,
              "salt": start + 9}[where]
    bad = flip(wal, offset)
    verdict = scan_wal(bad)
    assert verdict is not None and verdict.damaged
    assert verdict.first_bad == 20
    assert verdict.commits_after >= 40
    assert verdict.offset(20) == start
    assert sqlite_rows(tmp_path, base, bad) < 50 * ROWS_PER_COMMIT / 2  # the silent loss


def test_damaged_header_is_detected(tmp_path: Path) -> None:
    base, wal = crash_image(tmp_path, 10)
    bad = flip(wal, 5)  # the version field: the header checksum fails
    verdict = scan_wal(bad)
    assert verdict is not None and verdict.damaged and verdict.first_bad == 0
    assert sqlite_rows(tmp_path, base, bad) == 0


def test_frames_of_an_earlier_generation_are_not_damage(tmp_path: Path) -> None:
    """After a checkpoint the log restarts from its beginning with new salts; the old
    generation's frames further on are leftovers, not damage."""
    base, wal = crash_image(tmp_path, 40, reset_after=30)
    verdict = scan_wal(wal)
    assert verdict is not None and not verdict.damaged
    assert verdict.replayed < verdict.frames  # old frames follow the current ones
    assert sqlite_rows(tmp_path, base, wal) == 40 * ROWS_PER_COMMIT


def test_empty_and_headerless_logs_are_ignored() -> None:
    assert scan_wal(b"") is None
    assert scan_wal(b"\0" * 31) is None
    assert scan_wal(b"\0" * 4096) is None
