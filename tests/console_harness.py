"""An in-process atomnode daemon with its web console on a free port, and a small HTTP
client for it. Shared by the console's API, metrics and browser tests."""

from __future__ import annotations

import http.client
import json
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import trio
from daemon_harness import free_port

from atomnode.daemon import Daemon
from atomnode.system.config import Config

#: An AtoM site prefix (md5 of the site's root dir and workers key).
SITE = "0123456789abcdef0123456789abcdef"
SITE2 = "fedcba9876543210fedcba9876543210"


@asynccontextmanager
async def console_daemon(tmp_path: Path, **cfg: Any):
    """A running Daemon (Gearman and console on free loopback ports)."""
    config = replace(Config(), listen=(f"127.0.0.1:{free_port()}",),
                     database=str(tmp_path / "q.db"),
                     http_listen=f"127.0.0.1:{free_port()}", **cfg)
    daemon = Daemon(config)
    async with trio.open_nursery() as nursery:
        await nursery.start(daemon.run)
        try:
            yield daemon
        finally:
            daemon.request_shutdown(graceful=False)


def gearman_port(daemon: Daemon) -> int:
    return daemon.server.bound[0][1]


def http_port(daemon: Daemon) -> int:
    return daemon.http_bound[0][1]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status = status
        self.headers = headers
        self.body = body

    @property
    def text(self) -> str:
        return self.body.decode("utf-8")

    def json(self) -> Any:
        return json.loads(self.body)


def request(port: int, method: str, path: str, *, body: bytes | dict | None = None,
            headers: dict[str, str] | None = None) -> Response:
    """One blocking HTTP request (run it in a thread from trio)."""
    hdrs = dict(headers or {})
    if isinstance(body, dict):
        body = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, body=body, headers=hdrs)
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


async def arequest(daemon: Daemon, method: str, path: str, **kw: Any) -> Response:
    port = http_port(daemon)
    return await trio.to_thread.run_sync(lambda: request(port, method, path, **kw))
