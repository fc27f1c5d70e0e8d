"""Small values operators write: addresses, durations, sizes. One grammar each.

Pure functions, used by the configuration, the listener, the worker handlers and the
command line alike, so ``5m`` or ``[::1]:4730`` mean the same everywhere.
"""

from __future__ import annotations

import ipaddress
import re
from typing import Any

# ------------------------------------------------------------------------------ addresses

#: Wildcard listen addresses and the loopback address a local client connects to instead.
_WILDCARD_TO_LOOPBACK = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "*": "127.0.0.1", "::": "::1"}


def parse_address(text: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``"host:port"`` or ``"[v6]:port"`` -> ``(host, port)``. Raises ValueError.

    With ``default_port``, a bare ``host`` (no colon) is accepted too.
    """
    if not isinstance(text, str):
        raise ValueError(f"expected a string host:port, got {type(text).__name__}")
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{text!r}: expected [IPv6]:port, e.g. [::1]:4730")
        host, port_s = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{text!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = text.rpartition(":")
        if not sep and default_port is not None and text:
            return text, default_port
        if not sep or not host:
            raise ValueError(f"{text!r}: expected host:port, e.g. 127.0.0.1:4730")
        if ":" in host:
            raise ValueError(f"{text!r}: write an IPv6 address in brackets, e.g. [::1]:4730")
    if not port_s.isdigit():
        raise ValueError(f"{text!r}: port {port_s!r} is not a number")
    port = int(port_s)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1-65535")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of :func:`parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def connectable(host: str) -> str:
    """The host a local client connects to for a listen host: a wildcard (``0.0.0.0``,
    ``::``, ``*``, empty) becomes the loopback address of its family."""
    return _WILDCARD_TO_LOOPBACK.get(host, host)


# ------------------------------------------------------------------------------ durations

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h|d|w)?\s*$")
_DURATION_UNITS = {None: 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
#: Units under a second divide (200us is 0.0002, not 0.00019999999999999998).
_DURATION_FRACTIONS = {"us": 1e6, "ms": 1e3}


def parse_duration(value: Any) -> float:
    """``30``, ``30s``, ``500ms``, ``200us``, ``5m``, ``2h``, ``7d``, ``2w`` -> seconds (a
    plain number is seconds). Raises ValueError."""
    if isinstance(value, bool):
        raise ValueError("expected a duration")
    if isinstance(value, (int, float)):
        if value < 0:
            raise ValueError("must not be negative")
        return float(value)
    if isinstance(value, str):
        m = _DURATION.match(value)
        if m:
            unit = m.group(2)
            if unit in _DURATION_FRACTIONS:
                return float(m.group(1)) / _DURATION_FRACTIONS[unit]
            return float(m.group(1)) * _DURATION_UNITS[unit]
    raise ValueError("expected a duration")


def format_duration(seconds: float | None) -> str:
    """``93784`` -> ``1d 2h``; ``125`` -> ``2m 5s``; None -> ``-``."""
    if seconds is None:
        return "-"
    s = max(int(seconds), 0)  # a clock step back shows as 0s, never as a negative
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


# ---------------------------------------------------------------------------------- sizes

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?b?)\s*$", re.IGNORECASE)


def parse_size(value: Any) -> int:
    """``67108864``, ``64MiB``, ``512M``, ``1G``, ``10MB`` -> bytes.

    K/M/G/T and KiB/MiB/GiB/TiB are powers of 1024; KB/MB/GB/TB are powers of 1000.
    """
    if isinstance(value, bool):
        raise ValueError("expected a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("must not be negative")
        return value
    if isinstance(value, str):
        m = _SIZE.match(value)
        if m:
            number, unit, suffix = float(m.group(1)), m.group(2).lower(), m.group(3).lower()
            power = "kmgt".find(unit) + 1 if unit else 0
            base = 1000 if suffix == "b" else 1024
            if not unit and suffix:
                return int(number)  # "100B"
            return int(number * base**power)
    raise ValueError("expected a size")
