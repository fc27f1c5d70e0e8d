"""Validating a YAML document with its line numbers: the configuration's checker.

:class:`Doc` turns a composed YAML document into plain values while remembering the line of
every key and value; :class:`Validator` checks values (types, ranges, durations, sizes,
addresses, commands) and records each problem with ``file:line: key.path: what was
expected``. Problems are collected, never raised one by one, so an operator sees them all.
"""

from __future__ import annotations

import difflib
import shlex
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import yaml

from .access import parse_network
from .values import parse_address, parse_duration, parse_size

#: libyaml's parser where PyYAML was built with it (Debian's python3-yaml and the PyPI wheels
#: are), else the pure-Python one: same documents, same nodes and marks, a fraction of the time.
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def empty_map() -> Mapping[str, Any]:
    """A read-only empty mapping (a frozen dataclass's default)."""
    return MappingProxyType({})


# --------------------------------------------------------------------------- YAML with lines

Path = tuple[str | int, ...]


def path_str(path: Path) -> str:
    """``("pools", 0, "count")`` -> ``pools[0].count``."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out or "(top level)"


class Doc:
    """A YAML document turned into plain Python values, remembering each value's line.

    Drop-in files laid over it (:meth:`lay_over`) keep their own file name and lines: a
    problem in a value that came from a drop-in names that file."""

    def __init__(self, filename: str):
        self.filename = filename
        self.value_lines: dict[Path, int] = {}
        self.key_lines: dict[Path, int] = {}
        #: The file a path's value came from, where it is not ``filename`` (a drop-in);
        #: a path without an entry inherits its nearest ancestor's.
        self.files: dict[Path, str] = {}
        self._ranks: dict[str, int] = {filename: 0}
        self._errors: list[tuple[int, int, str]] = []
        self._constructor = YAML_LOADER("")

    def file_of(self, path: Path) -> str:
        """The file the value at ``path`` came from."""
        p = path
        while True:
            if p in self.files:
                return self.files[p]
            if not p:
                return self.filename
            p = p[:-1]

    def lay_over(self, base: Any, other: Doc, data: Any, path: Path = ()) -> Any:
        """``data`` (converted by ``other``, a drop-in file) laid over ``base`` (this
        document's value at ``path``): mappings merge key by key, recursively; any other
        value (a scalar, a list such as ``pools``) replaces the earlier one whole.
        Returns the merged value; lines and file names follow the values."""
        self._ranks.setdefault(other.filename, len(self._ranks))
        if isinstance(base, dict) and isinstance(data, dict):
            for key, value in data.items():
                kp = path + (key,)
                if isinstance(base.get(key), dict) and isinstance(value, dict):
                    base[key] = self.lay_over(base[key], other, value, kp)
                else:
                    self._take(other, kp)
                    base[key] = value
            return base
        self._take(other, path)
        return data

    def _take(self, other: Doc, path: Path) -> None:
        """Forget what this document knew under ``path``; take ``other``'s lines for it."""
        n = len(path)
        for table, theirs in ((self.value_lines, other.value_lines),
                              (self.key_lines, other.key_lines)):
            for p in [p for p in table if p[:n] == path]:
                del table[p]
            table.update((p, line) for p, line in theirs.items() if p[:n] == path)
        for p in [p for p in self.files if p[:n] == path]:
            del self.files[p]
        self.files[path] = other.filename

    def error(self, path: Path, message: str, *, at_key: bool = False) -> None:
        line = None
        if at_key:
            line = self.key_lines.get(path)
        if line is None:
            p = path
            while line is None:
                line = self.value_lines.get(p) or self.key_lines.get(p)
                if not p:
                    break
                p = p[:-1]
        filename = self.file_of(path)
        where = f"{filename}:{line}" if line else filename
        self._errors.append(
            (self._ranks.get(filename, 0), line or 0, f"{where}: {path_str(path)}: {message}")
        )

    def add_error(self, line: int, message: str, filename: str | None = None) -> None:
        """A problem found outside the document's values (``message`` names the file)."""
        self._errors.append((self._ranks.get(filename or self.filename, 0), line, message))

    @property
    def errors(self) -> list[str]:
        """Every problem found, file by file (the main file, then the drop-ins in name
        order), each in line order."""
        return [msg for *_, msg in sorted(self._errors, key=lambda e: (e[0], e[1]))]

    def convert(self, node: yaml.Node, path: Path) -> Any:
        self.value_lines[path] = node.start_mark.line + 1
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            for knode, vnode in node.value:
                key = self._constructor.construct_object(knode, deep=True)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    self.key_lines[path + ("?",)] = knode.start_mark.line + 1
                    self.error(path + ("?",), "a key must be a plain name", at_key=True)
                    continue
                key = str(key)
                kpath = path + (key,)
                if key in out:
                    self.key_lines[kpath] = knode.start_mark.line + 1
                    self.error(kpath, "key given twice (the later one would win)", at_key=True)
                self.key_lines.setdefault(kpath, knode.start_mark.line + 1)
                out[key] = self.convert(vnode, kpath)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.convert(n, path + (i,)) for i, n in enumerate(node.value)]
        return self._constructor.construct_object(node, deep=True)


# --------------------------------------------------------------------------- validation


class Validator:
    def __init__(self, doc: Doc):
        self.doc = doc

    def err(self, path: Path, message: str) -> None:
        self.doc.error(path, message)

    def keys(self, data: dict, path: Path, allowed: list[str], required: tuple[str, ...] = ()):
        for key in data:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                self.doc.error(
                    path + (key,),
                    f"unknown key {key!r}{hint} (expected one of: {', '.join(allowed)})",
                    at_key=True,
                )
        for key in required:
            if key not in data:
                self.err(path, f"missing required key {key!r}")

    def mapping(self, value: Any, path: Path) -> dict | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.err(path, f"expected a mapping (key: value), got {kind(value)}")
            return None
        return value

    def seq(self, value: Any, path: Path, what: str) -> list | None:
        if value is None:
            return []
        if not isinstance(value, list):
            self.err(path, f"expected a list of {what}, got {kind(value)}")
            return None
        return value

    def string(self, value: Any, path: Path, *, optional: bool = False) -> str | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or value is None or isinstance(value, (list, dict)):
            self.err(path, f"expected a string, got {kind(value)}")
            return None
        if not isinstance(value, str):
            value = str(value)
        if not value.strip():
            self.err(path, "expected a non-empty string")
            return None
        return value

    def choice(self, value: Any, path: Path, choices: tuple[str, ...]) -> str | None:
        if isinstance(value, str) and value.lower() in choices:
            return value.lower()
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        self.err(path, f"expected one of {', '.join(choices)}, got {value!r}{hint}")
        return None

    def integer(
        self, value: Any, path: Path, *, minimum: int | None = None, optional: bool = False
    ) -> int | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, int):
            self.err(path, f"expected an integer, got {kind(value)} {value!r}")
            return None
        if minimum is not None and value < minimum:
            self.err(path, f"expected an integer >= {minimum}, got {value}")
            return None
        return value

    def number(
        self,
        value: Any,
        path: Path,
        *,
        minimum: float | None = None,
        maximum: float | None = None,
    ) -> float | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            self.err(path, f"expected a number, got {kind(value)} {value!r}")
            return None
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            rng = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            self.err(path, f"expected a number {rng}, got {value}")
            return None
        return float(value)

    def duration(
        self, value: Any, path: Path, *, optional: bool = False, positive: bool = False
    ) -> float | None:
        if value is None and optional:
            return None
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.err(
                path,
                f"expected a duration in seconds (30, 30s, 5m, 2h, 7d), got {value!r}",
            )
            return None
        if positive and seconds <= 0:
            self.err(path, f"expected a duration greater than 0, got {value!r}")
            return None
        return seconds

    def size(self, value: Any, path: Path) -> int | None:
        try:
            return parse_size(value)
        except ValueError:
            self.err(path, f"expected a size in bytes (67108864, 64MiB, 512M), got {value!r}")
            return None

    def address(self, value: Any, path: Path) -> str | None:
        if not isinstance(value, str):
            self.err(path, f"expected an address host:port, got {kind(value)} {value!r}")
            return None
        try:
            parse_address(value)
        except ValueError as e:
            self.err(path, f"expected an address host:port ([v6]:port for IPv6): {e}")
            return None
        return value.strip()

    def addresses(self, value: Any, path: Path) -> tuple[str, ...] | None:
        if isinstance(value, str):  # a single address is fine too
            a = self.address(value, path)
            return (a,) if a else None
        items = self.seq(value, path, "addresses host:port")
        if items is None:
            return None
        out = [self.address(v, path + (i,)) for i, v in enumerate(items)]
        return tuple(a for a in out if a) if all(out) else None

    def each(self, value: Any, path: Path, what: str,
             one: Callable[[Any, Path], Any]) -> tuple[Any, ...] | None:
        """A list whose every item ``one(item, path)`` accepts (it returns None after
        recording why not): the accepted values, or None if any item was refused. Every
        item is checked, so every problem is reported."""
        items = self.seq(value, path, what)
        if items is None:
            return None
        out = [one(item, path + (i,)) for i, item in enumerate(items)]
        return tuple(out) if all(x is not None for x in out) else None

    def networks(self, value: Any, path: Path) -> tuple[str, ...] | None:
        if isinstance(value, str):  # a single network is fine too
            value = [value]
        return self.each(value, path, "networks (10.0.0.0/24, fd00::/64)", self.network)

    def network(self, value: Any, path: Path) -> str | None:
        try:
            return str(parse_network(value))
        except ValueError as e:
            self.err(path, str(e))
            return None

    def environment(self, value: Any, path: Path) -> Mapping[str, str]:
        data = self.mapping(value, path)
        if data is None:
            return empty_map()
        env: dict[str, str] = {}
        for k, v in data.items():
            if isinstance(v, (dict, list)) or v is None:
                self.err(path + (k,), f"expected a string value, got {kind(v)}")
                continue
            if isinstance(v, bool):
                v = "true" if v else "false"
            env[k] = str(v)
        return MappingProxyType(env)

    def command(self, value: Any, path: Path, *, shell: bool = False) -> tuple[str, ...] | None:
        if isinstance(value, str):
            if shell:
                if value.strip():
                    return (value,)
                self.err(path, "expected a non-empty command")
                return None
            try:
                parts = shlex.split(value)
            except ValueError:
                parts = value.split()
            suggestion = "[" + ", ".join(parts) + "]"
            self.err(
                path,
                "expected a list of arguments (no shell is used), got a string; "
                f"write it as a list: command: {suggestion}",
            )
            return None
        items = self.seq(value, path, "arguments")
        if items is None:
            return None
        if not items:
            self.err(
                path, "expected a non-empty list of arguments, e.g. [php, symfony, jobs:worker]"
            )
            return None
        out: list[str] = []
        ok = True
        for i, v in enumerate(items):
            if isinstance(v, (dict, list)) or v is None or isinstance(v, bool):
                self.err(path + (i,), f"expected a string argument, got {kind(v)}")
                ok = False
            else:
                out.append(str(v))
        return tuple(out) if ok else None


def kind(value: Any) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (int, float)):
        return "a number"
    return type(value).__name__
