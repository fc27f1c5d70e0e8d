"""The web console and /metrics: a small ASGI application served by Hypercorn's trio
worker inside the daemon's nursery (see docs/dev/console.md for the choice).

Imported only when ``http.listen`` is not ``none``: Hypercorn, Jinja2 and
prometheus_client are loaded here and nowhere else.
"""

from __future__ import annotations

import logging
import socket
from typing import Any

import trio

log = logging.getLogger("atomnode.console")


def open_socket(host: str, port: int) -> socket.socket:
    """Bind and listen (raises OSError); the daemon does this before READY=1."""
    # Import the stack now: a missing library is reported at start, not at first request.
    import hypercorn  # noqa: F401
    import jinja2  # noqa: F401
    import prometheus_client  # noqa: F401

    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _type, _proto, _name, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(addr)
        sock.listen(128)
        sock.setblocking(False)
    except OSError:
        sock.close()
        raise
    return sock


async def serve(daemon: Any, sock: socket.socket, *,
                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve the console on ``sock`` until cancelled."""
    from hypercorn.config import Config as HyperConfig
    from hypercorn.config import Sockets
    from hypercorn.trio.run import worker_serve
    from hypercorn.utils import wrap_app

    from .app import ConsoleApp

    app = ConsoleApp(daemon)
    hc = HyperConfig()
    hc.accesslog = None
    hc.errorlog = logging.getLogger("atomnode.console.http")
    hc.keep_alive_timeout = 30
    hc.graceful_timeout = 1.0
    hc.h11_max_incomplete_size = 64 * 1024
    hc.include_server_header = False
    await worker_serve(
        wrap_app(app, hc.wsgi_max_body_size, "asgi"), hc,
        sockets=Sockets([], [sock], []), task_status=task_status,
    )
