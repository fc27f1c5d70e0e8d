"""Handing freed memory back to the system.

CPython frees large buffers with ``free()``, but glibc keeps freed heap memory in its
arenas for reuse, so the daemon's RSS stays at its peak after greedy clients leave or a
deep queue drains. :func:`trim` asks glibc to return what it can (``malloc_trim(0)``);
elsewhere (musl, no libc found) it does nothing. Never raises.
"""

from __future__ import annotations

import ctypes
import logging
import time

log = logging.getLogger("atomnode.memory")

_malloc_trim = None
try:
    # The symbols this process already has (its C library among them): no search for the
    # library (ctypes.util.find_library runs `ldconfig -p`, ~0.1 s of every start).
    _libc = ctypes.CDLL(None, use_errno=True)
    _malloc_trim = _libc.malloc_trim
    _malloc_trim.argtypes = [ctypes.c_size_t]
    _malloc_trim.restype = ctypes.c_int
except (OSError, AttributeError):  # not glibc: nothing to call
    _malloc_trim = None


def available() -> bool:
    """True where ``malloc_trim`` exists (glibc)."""
    return _malloc_trim is not None


def trim() -> float:
    """Return freed heap memory to the system; the seconds it took (0 if unavailable)."""
    if _malloc_trim is None:
        return 0.0
    t0 = time.monotonic()
    try:
        _malloc_trim(0)
    except Exception:  # noqa: BLE001 - an optimisation must never hurt the daemon
        log.debug("malloc_trim failed", exc_info=True)
    return time.monotonic() - t0


def rss_bytes(pid: int | str = "self") -> int:
    """Resident set size of a process (0 if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0
