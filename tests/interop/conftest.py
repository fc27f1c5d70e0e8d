"""Fixtures for the interop tests: unique function names and peer processes cleaned up."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from peerproc import Peer


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "interop" in item.nodeid.split("::")[0]:
            item.add_marker(pytest.mark.interop)


@pytest.fixture
def func(request: pytest.FixtureRequest) -> str:
    """A function name no other test uses (servers are shared within a module)."""
    return f"t{uuid.uuid4().hex[:12]}-{request.node.originalname}"


@pytest.fixture
def peers() -> Iterator[Callable[..., Peer]]:
    """Start peer processes with ``peers(argv, stdin=None)``; all are killed at teardown."""
    started: list[Peer] = []

    def start(argv: list[str | Path], stdin: bytes | None = None) -> Peer:
        p = Peer([str(a) for a in argv], stdin)
        started.append(p)
        return p

    yield start
    for p in started:
        p.cleanup()
