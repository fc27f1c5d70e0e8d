"""The Debian package's pins (packaging/*requirements.txt): every requirement is an exact
version with at least one sha256, in hash-checking mode, and the runtime pins cover what
pyproject.toml declares; debian/rules installs them that way."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import pytest

TOP = Path(__file__).resolve().parent.parent
PACKAGING = TOP / "packaging"
HASH = re.compile(r"--hash=sha256:[0-9a-f]{64}")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirements(path: Path) -> dict[str, tuple[str, list[str]]]:
    """{canonical name: (version, [hashes])} of a pip requirements file; the options."""
    text = path.read_text().replace("\\\n", " ")
    out: dict[str, tuple[str, list[str]]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line == "--require-hashes":
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)((?:\s+--hash=\S+)+)", line)
        assert m, f"{path.name}: not 'name==version --hash=sha256:...': {line[:80]!r}"
        hashes = m.group(3).split()
        assert all(HASH.fullmatch(h) for h in hashes), f"{path.name}: bad hash in {line[:80]!r}"
        name = canonical(m.group(1))
        assert name not in out, f"{path.name}: {name} pinned twice"
        out[name] = (m.group(2), hashes)
    return out


@pytest.mark.parametrize("name", ["requirements.txt", "build-requirements.txt"])
def test_every_pin_is_exact_and_hashed_in_hash_checking_mode(name: str) -> None:
    path = PACKAGING / name
    lines = [x.strip() for x in path.read_text().splitlines()]
    assert "--require-hashes" in lines
    pins = requirements(path)
    assert pins
    for pkg, (version, hashes) in pins.items():
        assert hashes, f"{pkg}=={version} has no hash"


def test_runtime_pins_cover_the_declared_dependencies() -> None:
    project = tomllib.loads((TOP / "pyproject.toml").read_text())["project"]
    pins = requirements(PACKAGING / "requirements.txt")
    for dep in project["dependencies"]:
        name = canonical(re.split(r"[\s<>=!~;\[]", dep, maxsplit=1)[0])
        assert name in pins, f"{dep!r} is declared in pyproject.toml but not pinned"


def test_build_tools_are_pinned_by_version_and_match_their_source() -> None:
    pins = requirements(PACKAGING / "build-requirements.txt")
    assert {"pip", "setuptools", "cython"} <= set(pins)
    wanted = {}
    for line in (PACKAGING / "build-requirements.in").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            n, v = line.strip().split("==")
            wanted[canonical(n)] = v
    assert {n: v for n, (v, _) in pins.items()} == wanted


def test_debian_rules_installs_with_the_pins_and_no_unpinned_tools() -> None:
    rules = (TOP / "debian" / "rules").read_text()
    assert "--requirements packaging/requirements.txt" in rules
    assert "--preinstall=--requirement=packaging/build-requirements.txt" in rules
    assert "--preinstall=--require-hashes" in rules
    # Builds use the pinned, hash-checked tools, never an isolated environment that pip
    # would fill with whatever versions the index has that day.
    assert "--no-build-isolation" in rules
    assert not re.search(r"--upgrade-pip\b(?!-to)", rules), "an unpinned pip upgrade"


def test_the_dev_venv_takes_the_pinned_pip_too() -> None:
    makefile = (TOP / "Makefile").read_text()
    assert "--upgrade pip" not in makefile
    assert "pip==" in makefile and "packaging/build-requirements.txt" in makefile
