"""Logging setup: stderr, journal-aware.

When stderr is connected to the journal (``$JOURNAL_STREAM`` names stderr's device and
inode), each line starts with the ``<N>`` syslog priority so ``journalctl -p warning`` works,
and carries no timestamp (the journal adds one). Otherwise lines are meant for a terminal::

    2026-11-27 12:00:00 INFO atomnode.gearman.server: message
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

#: syslog priorities (sd-daemon.h SD_*) for Python levels.
_PRIORITIES = (
    (logging.CRITICAL, 2),
    (logging.ERROR, 3),
    (logging.WARNING, 4),
    (logging.INFO, 6),
)
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "critical": logging.CRITICAL,
}
TERMINAL_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
TERMINAL_DATEFMT = "%Y-%m-%d %H:%M:%S"


def syslog_priority(levelno: int) -> int:
    """Python log level -> syslog priority (debug 7, info 6, warning 4, error 3, critical 2)."""
    for level, prio in _PRIORITIES:
        if levelno >= level:
            return prio
    return 7


class JournalFormatter(logging.Formatter):
    """``<N>logger: message``, every line of a multi-line message prefixed."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        prefix = f"<{syslog_priority(record.levelno)}>"
        text = super().format(record)
        return "\n".join(prefix + line for line in text.split("\n"))


def stderr_is_journal(stream: TextIO | None = None) -> bool:
    """True if ``$JOURNAL_STREAM`` (``dev:inode``) matches ``stream`` (default stderr)."""
    value = os.environ.get("JOURNAL_STREAM")
    if not value:
        return False
    stream = stream or sys.stderr
    try:
        dev_s, ino_s = value.split(":", 1)
        st = os.fstat(stream.fileno())
        return st.st_dev == int(dev_s) and st.st_ino == int(ino_s)
    except (ValueError, OSError, AttributeError):
        return False


_HANDLER_ATTR = "_atomnode_handler"


def setup_logging(level: str = "info", stream: TextIO | None = None) -> logging.Handler:
    """Send every log record at ``level`` or above to ``stream`` (stderr by default), in the
    journal format or the terminal format (see the module docstring). Calling it again
    (e.g. after a reload changed the level) replaces the previous setup."""
    try:
        levelno = LEVELS[level.lower()]
    except KeyError:
        raise ValueError(
            f"unknown log level {level!r}; expected one of {', '.join(LEVELS)}"
        ) from None
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)
    if stderr_is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter(TERMINAL_FORMAT, TERMINAL_DATEFMT))
    setattr(handler, _HANDLER_ATTR, True)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, _HANDLER_ATTR, False):
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(levelno)
    return handler


class Repeats:
    """Rate limit for a message that may repeat many times a second (accept failing with
    EMFILE, refused admin commands from one peer, ...).

    ``should_log(key)`` is true for the first occurrence of ``key`` and then at most once
    every ``interval`` seconds; the occurrences in between are counted and
    ``should_log`` returns how many were suppressed through :attr:`suppressed`, so the
    next line can say "(N more since)". At most ``max_keys`` keys are remembered (the
    oldest are forgotten), so a flood of distinct keys cannot grow it.
    """

    def __init__(self, interval: float = 10.0, *, max_keys: int = 1024,
                 clock: Callable[[], float] = time.monotonic):
        self.interval = interval
        self.max_keys = max_keys
        self.clock = clock
        self._last: dict[object, tuple[float, int]] = {}
        self.suppressed = 0

    def should_log(self, key: object = None) -> bool:
        now = self.clock()
        entry = self._last.get(key)
        if entry is not None and now - entry[0] < self.interval:
            self._last[key] = (entry[0], entry[1] + 1)
            return False
        self.suppressed = entry[1] if entry is not None else 0
        self._last.pop(key, None)
        self._last[key] = (now, 0)
        while len(self._last) > self.max_keys:
            del self._last[next(iter(self._last))]
        return True
