"""Several hosts on one machine: network namespaces joined by veth pairs (issue 14).

:class:`Hosts` creates a *server* namespace and, for each other host, a namespace with a
veth pair to the server (a /24 of private addresses per pair, existing only inside these
namespaces), and removes them all at the end. Processes run in a namespace through
``ip netns exec``; :meth:`Hosts.connect` opens a TCP connection *from* a namespace (a
socket stays in the namespace it was created in, so the test process can use it
directly).

Needs root (CAP_NET_ADMIN) and iproute2. :func:`require_netns` fails the test loudly when
they are missing: a multi-host test that silently skips proves nothing. Set
ATOMNODE_SKIP_NETNS=1 to skip them on purpose (the skip is reported with the reason).
"""

from __future__ import annotations

import ctypes
import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

CLONE_NEWNET = 0x40000000
T = TypeVar("T")


def require_netns() -> None:
    why = None
    if os.geteuid() != 0:
        why = "not root"
    elif shutil.which("ip") is None:
        why = "iproute2 (ip) is not installed"
    elif shutil.which("unshare") is None:
        why = "unshare (util-linux) is not installed"
    if why is None:
        return
    msg = (f"multi-host tests need network namespaces, unavailable here: {why}. "
           "`make test` runs as root with iproute2 (scripts/sysdeps.sh); set "
           "ATOMNODE_SKIP_NETNS=1 to skip these tests on purpose")
    if os.environ.get("ATOMNODE_SKIP_NETNS") == "1":
        pytest.skip(msg)
    pytest.fail(msg)


def _run(*argv: str) -> None:
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({r.returncode}): {r.stderr.strip()}")


class Hosts:
    """A server namespace plus one namespace per other host, each on its own veth link.

    ``net`` picks the 10.<net>.<i>.0/24 and fd00:<net>:<i>::/64 subnets; the server is
    .1 (::1) and host i is .2 (::2) on link i (1-based)."""

    def __init__(self, names: list[str], *, net: int = 231):
        require_netns()
        tag = f"{os.getpid() % 100000}"
        self.prefix = f"an{tag}"
        self.server_ns = f"{self.prefix}-server"
        self.ns: dict[str, str] = {}
        self.addr: dict[str, str] = {}
        self.server_addr: dict[str, str] = {}
        self.addr6: dict[str, str] = {}  # the same links also carry IPv6 (fd00:NET:i::/64)
        self.server_addr6: dict[str, str] = {}
        self._created: list[str] = []
        try:
            self._add_ns(self.server_ns)
            for i, name in enumerate(names, 1):
                ns = f"{self.prefix}-{name}"
                self._add_ns(ns)
                a, b = f"{self.prefix}s{i}", f"{self.prefix}h{i}"
                _run("ip", "link", "add", a, "netns", self.server_ns, "type", "veth",
                     "peer", "name", b, "netns", ns)
                srv, host = f"10.{net}.{i}.1", f"10.{net}.{i}.2"
                _run("ip", "-n", self.server_ns, "addr", "add", f"{srv}/24", "dev", a)
                _run("ip", "-n", ns, "addr", "add", f"{host}/24", "dev", b)
                srv6, host6 = f"fd00:{net}:{i}::1", f"fd00:{net}:{i}::2"
                _run("ip", "-n", self.server_ns, "addr", "add", f"{srv6}/64", "dev", a,
                     "nodad")
                _run("ip", "-n", ns, "addr", "add", f"{host6}/64", "dev", b, "nodad")
                _run("ip", "-n", self.server_ns, "link", "set", a, "up")
                _run("ip", "-n", ns, "link", "set", b, "up")
                self.ns[name] = ns
                self.addr[name] = host
                self.server_addr[name] = srv
                self.addr6[name] = host6
                self.server_addr6[name] = srv6
        except BaseException:
            self.close()
            raise

    def _add_ns(self, ns: str) -> None:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # a leftover
        _run("ip", "netns", "add", ns)
        self._created.append(ns)
        _run("ip", "-n", ns, "link", "set", "lo", "up")

    def close(self) -> None:
        """Remove every namespace (their veth ends go with them)."""
        for ns in reversed(self._created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self._created = []

    def __enter__(self) -> Hosts:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def exec_argv(self, name: str, argv: list[str], *, own_pids: bool = False) -> list[str]:
        """``argv`` run in host ``name``'s namespace ("server" for the server); with
        ``own_pids`` also in a PID namespace of its own with its own /proc."""
        ns = self.server_ns if name == "server" else self.ns[name]
        pre = ["ip", "netns", "exec", ns]
        if own_pids:
            pre += ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"]
        return pre + argv

    def in_ns(self, name: str, fn: Callable[[], T]) -> T:
        """``fn()`` called inside host ``name``'s network namespace (sockets it creates
        stay there)."""
        ns = self.server_ns if name == "server" else self.ns[name]
        out: dict[str, Any] = {}

        def inside() -> None:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, CLONE_NEWNET) != 0:
                    out["error"] = OSError(ctypes.get_errno(), f"setns({ns}) failed")
                    return
            finally:
                os.close(fd)
            try:
                out["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - re-raised in the caller
                out["error"] = e

        # setns() changes the calling thread only: a throwaway thread, so the test's
        # own thread stays in the root namespace.
        t = threading.Thread(target=inside)
        t.start()
        t.join()
        if "error" in out:
            raise out["error"]
        return out["value"]

    def connect(self, name: str, host: str, port: int, timeout: float = 10.0
                ) -> socket.socket:
        """A TCP connection made from inside host ``name``'s network namespace."""
        return self.in_ns(name, lambda: socket.create_connection((host, port),
                                                                 timeout=timeout))


def child_pid(pid: int) -> int | None:
    """The (single) child of ``pid``: the real daemon under ``unshare --fork``."""
    try:
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(kids[0]) if kids else None
