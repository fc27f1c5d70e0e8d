"""Check SQLite's write-ahead log before opening: a torn tail is normal, damage is not.

When SQLite opens a database whose ``-wal`` survived a crash it replays the log's frames in
order and stops, silently, at the first frame whose checksum does not match. After a crash
the frames past the last commit may be torn (half written): stopping there is right. But a
frame damaged *inside* the log (a flipped bit, a lost write) also stops the replay, and every
transaction committed after it is dropped without a word: acknowledged jobs vanish. This
module reads the log itself (format: https://www.sqlite.org/fileformat.html#the_write_ahead_log)
and tells the two apart: damage is a frame that fails its checksum with *intact* frames of
this log generation after it, beyond a commit boundary.

Pure functions over bytes (:func:`scan_wal`); :func:`check_wal_file` reads the file.

Format, in short: a 32-byte header (magic 0x377f0682/0x377f0683, the last bit choosing the
checksum's byte order; version; page size; checkpoint sequence; salt-1, salt-2; a checksum of
the first 24 bytes), then frames of a 24-byte header (page number; for a commit frame the
database size in pages, else 0; salt-1, salt-2; a checksum) and one page. Each frame's
checksum covers its first 8 header bytes and its page, seeded with the previous frame's
checksum (the first frame's with the header's). A frame belongs to the log when its salts
equal the header's and its checksum matches. Frames left over from earlier generations
(the log is rewritten from the start after a checkpoint) carry other salts.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

WAL_MAGIC = (0x377F0682, 0x377F0683)
HEADER_SIZE = 32
FRAME_HEADER_SIZE = 24
_MASK = 0xFFFFFFFF


def checksum(data: bytes | memoryview, s0: int, s1: int, big_endian: bool) -> tuple[int, int]:
    """SQLite's WAL checksum of ``data`` (a multiple of 8 bytes), seeded with (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    it = iter(words)
    for a, b in zip(it, it):
        s0 = (s0 + a + s1) & _MASK
        s1 = (s1 + b + s0) & _MASK
    return s0, s1


@dataclass
class WalScan:
    """What the log holds, as SQLite would see it and as it is."""

    frames: int  # complete frames in the file
    replayed: int  # frames SQLite replays (up to the last valid commit before any damage)
    first_bad: int | None  # index of the first frame that fails (None: all valid)
    intact_after: int  # frames of this log generation, intact, after a commit past first_bad
    commits_after: int  # commit frames among those
    page_size: int = 0

    @property
    def damaged(self) -> bool:
        return self.intact_after > 0

    def offset(self, frame: int) -> int:
        """Byte offset of frame number ``frame`` (0-based)."""
        return HEADER_SIZE + frame * (FRAME_HEADER_SIZE + self.page_size)


def scan_wal(data: bytes | memoryview) -> WalScan | None:
    """Scan a whole log. None if it has no usable header (SQLite then ignores the file:
    an empty or never-written log, or a header torn by a crash)."""
    data = memoryview(data)
    if len(data) < HEADER_SIZE:
        return None
    magic, version, page_size, _ckpt, salt1, salt2, c1, c2 = struct.unpack(
        ">8I", data[:HEADER_SIZE]
    )
    if magic not in WAL_MAGIC or page_size < 512 or page_size > 65536 or (
        page_size & (page_size - 1)
    ):
        return None
    big = bool(magic & 1)
    header_ok = checksum(data[:24], 0, 0, big) == (c1, c2)
    frame_size = FRAME_HEADER_SIZE + page_size
    n = (len(data) - HEADER_SIZE) // frame_size
    prev = (c1, c2)  # stored checksum of the previous frame (or of the header)
    chain_ok = header_ok
    replayed = 0
    first_bad: int | None = None if header_ok else 0
    # A bad header makes SQLite ignore the whole log: every intact frame is then lost.
    commit_seen_since_bad = not header_ok
    intact_after = commits_after = 0
    off = HEADER_SIZE
    for i in range(n):
        fh = data[off:off + FRAME_HEADER_SIZE]
        pgno, commit, fs1, fs2, fc1, fc2 = struct.unpack(">6I", fh)
        intact = (
            pgno != 0
            and (fs1, fs2) == (salt1, salt2)
            and checksum(data[off + FRAME_HEADER_SIZE:off + frame_size],
                         *checksum(fh[:8], *prev, big), big) == (fc1, fc2)
        )
        if chain_ok:
            if intact:
                if commit:
                    replayed = i + 1
            else:
                chain_ok = False
                first_bad = i
                if commit:
                    commit_seen_since_bad = True
        elif first_bad is not None:
            if intact and commit_seen_since_bad:
                intact_after += 1
                if commit:
                    commits_after += 1
            if commit and (fs1, fs2) == (salt1, salt2):
                commit_seen_since_bad = True
        prev = (fc1, fc2)
        off += frame_size
    return WalScan(frames=n, replayed=replayed, first_bad=first_bad,
                   intact_after=intact_after, commits_after=commits_after,
                   page_size=page_size)


def check_wal_file(path: str) -> WalScan | None:
    """:func:`scan_wal` of the file at ``path`` (None if it is missing or has no header)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    return scan_wal(data)
