"""Just enough PHP to read what AtoM writes: ``var_export`` arrays and ``serialize`` strings.

AtoM's installer writes the database settings to ``config/config.php`` as
``<?php ... return array ( 'all' => array ( 'propel' => ... ) );`` (``var_export``), and keeps
its enabled plugins in MySQL as a ``serialize``d array. These readers accept exactly those
shapes (plus the short ``[...]`` array syntax a person may write) and raise
:class:`PhpSyntaxError` with the position of anything else. Pure functions.
"""

from __future__ import annotations

import re
from typing import Any


class PhpSyntaxError(ValueError):
    """The text is not a PHP literal this reader understands."""


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<comment>//[^\n]*|\#[^\n]*|/\*.*?\*/)
      | (?P<sq>'(?:[^'\\]|\\.)*')
      | (?P<dq>"(?:[^"\\]|\\.)*")
      | (?P<num>-?\d+(?:\.\d+)?)
      | (?P<word>[A-Za-z_][A-Za-z0-9_]*)
      | (?P<op>=>|[()\[\],;])
    )""",
    re.VERBOSE | re.DOTALL,
)

_DQ_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "$": "$", "0": "\0"}


def _tokens(text: str) -> list[tuple[str, str, int]]:
    out: list[tuple[str, str, int]] = []
    pos = 0
    end = len(text.rstrip())
    while pos < end:
        m = _TOKEN.match(text, pos)
        if not m or m.end() == pos:
            raise PhpSyntaxError(f"unexpected text at offset {pos}: {text[pos : pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup or ""
        if kind != "comment":
            out.append((kind, m.group(kind), m.start(kind)))
    return out


def _unquote(kind: str, raw: str) -> str:
    body = raw[1:-1]
    if kind == "sq":
        return re.sub(r"\\([\\'])", r"\1", body)
    return re.sub(r"\\(.)", lambda m: _DQ_ESCAPES.get(m.group(1), "\\" + m.group(1)), body)


class _Parser:
    def __init__(self, tokens: list[tuple[str, str, int]]):
        self.t = tokens
        self.i = 0

    def peek(self) -> tuple[str, str, int]:
        return self.t[self.i] if self.i < len(self.t) else ("eof", "", -1)

    def take(self, value: str | None = None) -> tuple[str, str, int]:
        tok = self.peek()
        if tok[0] == "eof" or (value is not None and tok[1].lower() != value):
            want = repr(value) if value else "a value"
            raise PhpSyntaxError(f"expected {want} at offset {tok[2]}, found {tok[1]!r}")
        self.i += 1
        return tok

    def value(self) -> Any:
        kind, raw, at = self.peek()
        if kind in ("sq", "dq"):
            self.i += 1
            return _unquote(kind, raw)
        if kind == "num":
            self.i += 1
            return float(raw) if "." in raw else int(raw)
        if kind == "word":
            low = raw.lower()
            self.i += 1
            if low in ("true", "false"):
                return low == "true"
            if low == "null":
                return None
            if low == "array":
                self.take("(")
                return self.items(")")
            raise PhpSyntaxError(f"unsupported PHP at offset {at}: {raw!r}")
        if raw == "[":
            self.i += 1
            return self.items("]")
        raise PhpSyntaxError(f"expected a value at offset {at}, found {raw!r}")

    def items(self, close: str) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        nxt = 0
        while self.peek()[1] != close:
            first = self.value()
            if self.peek()[1] == "=>":
                self.i += 1
                key, val = first, self.value()
                if isinstance(key, bool) or key is None:
                    key = int(bool(key))
                if isinstance(key, str) and re.fullmatch(r"-?[1-9]\d*|0", key):
                    key = int(key)  # PHP turns "3" into 3
            else:
                key, val = nxt, first
            out[key] = val
            if isinstance(key, int):
                nxt = max(nxt, key + 1)
            if self.peek()[1] == ",":
                self.i += 1
            elif self.peek()[1] != close:
                tok = self.peek()
                raise PhpSyntaxError(f"expected ',' or {close!r} at offset {tok[2]}")
        self.take(close)
        return out


def parse_php_return(text: str) -> Any:
    """The value of a PHP file of the form ``<?php [comments] return <literal>;``.

    Arrays come back as dicts (keys as PHP has them: ``int`` or ``str``)."""
    body = text.lstrip("\ufeff")
    if body.startswith("<?php"):
        body = body[5:]
    body = body.split("?>")[0]
    toks = _tokens(body)
    p = _Parser(toks)
    p.take("return")
    value = p.value()
    if p.peek()[1] == ";":
        p.i += 1
    if p.peek()[0] != "eof":
        tok = p.peek()
        raise PhpSyntaxError(f"unexpected {tok[1]!r} at offset {tok[2]} after the returned value")
    return value


def php_unserialize(data: str) -> Any:
    """PHP's ``unserialize`` for strings, numbers, booleans, null and arrays (what AtoM
    stores in its ``plugins`` setting). Lengths are in bytes, as PHP counts them."""
    raw = data.encode("utf-8")
    value, pos = _unser(raw, 0)
    if raw[pos:].strip():
        raise PhpSyntaxError(f"trailing data at byte {pos}")
    return value


def _unser(b: bytes, i: int) -> tuple[Any, int]:
    try:
        t = chr(b[i])
    except IndexError:
        raise PhpSyntaxError("serialized data ends too early") from None
    if t == "N" and b[i : i + 2] == b"N;":
        return None, i + 2
    if t in "bid" and b[i + 1 : i + 2] == b":":
        end = b.index(b";", i)
        text = b[i + 2 : end].decode()
        try:
            if t == "b":
                return text == "1", end + 1
            if t == "i":
                return int(text), end + 1
            return float(text), end + 1
        except ValueError:
            raise PhpSyntaxError(f"bad number {text!r} at byte {i}") from None
    if t == "s" and b[i + 1 : i + 2] == b":":
        colon = b.index(b":", i + 2)
        n = int(b[i + 2 : colon])
        start = colon + 2
        if b[colon + 1 : colon + 2] != b'"' or b[start + n : start + n + 2] != b'";':
            raise PhpSyntaxError(f"bad string at byte {i}")
        return b[start : start + n].decode("utf-8", "replace"), start + n + 2
    if t == "a" and b[i + 1 : i + 2] == b":":
        colon = b.index(b":", i + 2)
        n = int(b[i + 2 : colon])
        if b[colon + 1 : colon + 2] != b"{":
            raise PhpSyntaxError(f"bad array at byte {i}")
        pos = colon + 2
        out: dict[Any, Any] = {}
        for _ in range(n):
            key, pos = _unser(b, pos)
            val, pos = _unser(b, pos)
            out[key] = val
        if b[pos : pos + 1] != b"}":
            raise PhpSyntaxError(f"array not closed at byte {pos}")
        return out, pos + 1
    raise PhpSyntaxError(f"unsupported serialized type {t!r} at byte {i}")
