"""What every command-line command shares: errors, tables, durations, the daemon's address.

One of each, so ``atomnode status`` and ``atomnode jobs`` print tables alike, accept the
same durations (:func:`atomnode.system.values.parse_duration`) and find the daemon the same
way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from ..system.values import connectable, parse_address, parse_duration

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4730


class CliError(Exception):
    """A failure to report on stderr (``atomnode: ...``) with exit status 1."""


def guard(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run a command, turning :class:`CliError` into a message and status 1 (and a closed
    stdout, as in ``atomnode jobs list | head``, into status 1 without a traceback)."""

    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except CliError as e:
            print(f"atomnode: {e}", file=sys.stderr)
            return 1
        except BrokenPipeError:
            return 1

    return run


def format_table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """Left-aligned columns separated by two spaces, header first; None shows as ``-``."""
    cells = [list(headers)] + [["-" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells
    )


def duration_arg(text: str) -> float:
    """argparse ``type=`` for a duration (``7d``, ``12h``, ``30m``, ``45s``, ``2w``,
    ``500ms`` or seconds)."""
    try:
        return parse_duration(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration (examples: 7d, 12h, 30m, 3600)"
        ) from None


def daemon_address(listen: Sequence[str]) -> tuple[str, int]:
    """Where a local client reaches the daemon: its first ``listen`` address, a wildcard
    host replaced by loopback; the default address when it listens nowhere."""
    if not listen:
        return DEFAULT_HOST, DEFAULT_PORT
    host, port = parse_address(listen[0])
    return connectable(host), port
