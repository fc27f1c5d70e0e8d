#!/usr/bin/python3
"""Add the sha256 of every published file to pinned requirements (``name==version``).

Usage: packaging/pin-hashes.py PINS_FILE > HASHED_FILE
Reads the index pip uses (PIP_INDEX_URL, else PyPI) through its JSON simple API (PEP 691)
and writes each pin followed by one ``--hash=sha256:...`` per file of that release that
CPython 3 on Linux can install: the sdist, pure wheels, and CPython/abi3 wheels for Linux
(every architecture, so the same file serves amd64 and arm64 builds). pip, given these
lines, runs in hash-checking mode: it refuses a file whose hash is not listed. Comment
and option lines (``--require-hashes``) are kept; only the standard library is used.
"""

from __future__ import annotations

import json
import os
import re
import sys
import urllib.request

INDEX = os.environ.get("PIP_INDEX_URL", "https://pypi.org/simple").rstrip("/")
ACCEPT = "application/vnd.pypi.simple.v1+json"


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def usable(filename: str) -> bool:
    """An sdist, or a wheel CPython 3 on Linux (any architecture) can install."""
    if filename.endswith((".tar.gz", ".zip")):
        return True
    if not filename.endswith(".whl"):
        return False
    python, abi, platform = filename[:-4].split("-")[-3:]
    py_ok = any(t in ("py3", "py2.py3") or t.startswith("cp3") for t in python.split("."))
    return py_ok and (platform == "any" or "linux" in platform) and abi != "cp311t"


def release_of(filename: str) -> tuple[str, str]:
    """(canonical name, version) of a distribution file name."""
    if filename.endswith(".whl"):
        name, version = filename.split("-")[:2]
    else:
        stem = re.sub(r"\.(tar\.gz|zip)$", "", filename)
        name, version = stem.rsplit("-", 1)
    return canonical(name), version


def hashes(name: str, version: str) -> list[str]:
    req = urllib.request.Request(f"{INDEX}/{canonical(name)}/", headers={"Accept": ACCEPT})
    with urllib.request.urlopen(req, timeout=60) as resp:
        files = json.load(resp)["files"]
    found = sorted({
        f["hashes"]["sha256"]
        for f in files
        if release_of(f["filename"]) == (canonical(name), version)
        and usable(f["filename"]) and "sha256" in f.get("hashes", {})
    })
    if not found:
        raise SystemExit(f"pin-hashes: no files of {name}=={version} on {INDEX}")
    return found


def main(path: str) -> None:
    out = sys.stdout
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith(("#", "--")):
            out.write(line + "\n")
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"pin-hashes: not an exact pin (name==version): {line!r}")
        digests = hashes(*m.groups())
        out.write(line + " \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in digests) + "\n")


if __name__ == "__main__":
    main(sys.argv[1])
