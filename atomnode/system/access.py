"""Who may connect: the ``allow:`` list (issue 14), one check for every listener.

Gearman has no authentication: whoever reaches the port can submit jobs, register as a
worker and receive AtoM's payloads, or run admin commands. atomnode therefore serves
loopback (and its unix control socket) always, and other peers only when their address is
in ``allow:``. The same function decides for the Gearman port, socket-activated
listeners and the web console's HTTP port: :func:`peer_allowed`.

Nothing here does I/O; :class:`RefusalLog` only decides *what* to log, so a scan of the
port cannot flood the journal.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Shown when there is no better guess at the network to allow.
EXAMPLE_NETWORK = "192.0.2.0/24"


def parse_network(text: str) -> Network:
    """``10.0.0.0/24``, ``10.0.0.7`` (one host), ``fd00::/64``. Host bits are ignored
    (``10.0.0.7/24`` means ``10.0.0.0/24``). Raises ValueError with a readable message."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("expected a network such as 10.0.0.0/24 or fd00::/64")
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(
            f"{text!r} is not an IP network: expected e.g. 10.0.0.0/24, 10.0.0.7 or fd00::/64"
        ) from None


def parse_networks(items: Iterable[str]) -> tuple[Network, ...]:
    return tuple(parse_network(i) for i in items)


def _ip(ip: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        addr = ipaddress.ip_address(ip.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def is_loopback(ip: str) -> bool:
    """127.0.0.0/8, ::1 (also IPv4-mapped), and ``unix`` (the local control socket)."""
    if ip == "unix":
        return True
    addr = _ip(ip)
    return addr is not None and addr.is_loopback


def peer_allowed(ip: str, allow: Sequence[Network]) -> bool:
    """May a peer at ``ip`` connect? Loopback always; others only inside ``allow``.

    This is the one check every listener uses (Gearman port, socket activation, the
    web console)."""
    if ip == "unix":
        return True
    addr = _ip(ip)
    if addr is None:
        return False
    if addr.is_loopback:
        return True
    return any(addr.version == net.version and addr in net for net in allow)


def host_is_loopback(host: str) -> bool:
    """A listen host that only loopback peers can reach."""
    if host in ("localhost", "ip6-localhost"):
        return True
    addr = _ip(host)
    return addr is not None and addr.is_loopback


def suggested_network(host: str) -> str:
    """A network to suggest for ``allow:`` given a listen host: the /24 (IPv4) or /64
    (IPv6) around a concrete address, else a documentation example."""
    addr = _ip(host)
    if addr is None or addr.is_unspecified:
        return EXAMPLE_NETWORK
    prefix = 24 if addr.version == 4 else 64
    return str(ipaddress.ip_network(f"{addr}/{prefix}", strict=False))


def listen_problem(listen: Sequence[str], allow: Sequence[object]) -> str | None:
    """Why this listen/allow pair is unsafe, with the line to add; None when it is fine.

    A non-loopback listen address without an ``allow:`` list would let every host that
    reaches the port submit jobs, take AtoM's jobs (and their payloads) and run admin
    commands."""
    if allow:
        return None
    from .config import parse_address  # config imports this module at load time

    open_hosts = []
    for a in listen:
        try:
            host, _port = parse_address(a)
        except ValueError:
            continue
        if not host_is_loopback(host):
            open_hosts.append((a, host))
    if not open_hosts:
        return None
    addrs = ", ".join(a for a, _ in open_hosts)
    net = suggested_network(open_hosts[0][1])
    return (
        f"listen: {addrs} accepts connections from other hosts, but there is no allow: "
        f"list saying which (Gearman has no authentication). Add the networks of your "
        f"AtoM web servers and worker hosts to the configuration, e.g.:\n"
        f"  allow: [{net}]"
    )


def loopback_only(listen: Sequence[str]) -> tuple[str, ...]:
    """The listen addresses reduced to loopback (same ports, no duplicates): what the
    daemon serves when :func:`listen_problem` finds a problem at start."""
    from .config import format_address, parse_address

    out: list[str] = []
    for a in listen:
        try:
            host, port = parse_address(a)
        except ValueError:
            continue
        if host_is_loopback(host):
            new = a
        else:
            addr = _ip(host)
            new = format_address("::1" if addr is not None and addr.version == 6 else
                                 "127.0.0.1", port)
        if new not in out:
            out.append(new)
    return tuple(out)


class RefusalLog:
    """Counts refused connections and says when to log, at most one line per
    ``interval`` seconds (a port scan must not flood the journal).

    ``note(ip, now)`` returns the text to log now, or None (counted, told later)."""

    def __init__(self, interval: float = 10.0):
        self.interval = interval
        self.total = 0
        self.by_address: dict[str, int] = {}
        self._last_log = -1e18
        self._unlogged = 0
        self._unlogged_addrs: set[str] = set()

    #: Distinct refused addresses remembered for status (the rest are only counted).
    MAX_ADDRESSES = 100

    def note(self, ip: str, now: float) -> str | None:
        self.total += 1
        if ip in self.by_address or len(self.by_address) < self.MAX_ADDRESSES:
            self.by_address[ip] = self.by_address.get(ip, 0) + 1
        self._unlogged += 1
        self._unlogged_addrs.add(ip)
        if now - self._last_log < self.interval:
            return None
        n, addrs = self._unlogged, sorted(self._unlogged_addrs)
        self._last_log = now
        self._unlogged = 0
        self._unlogged_addrs = set()
        shown = ", ".join(addrs[:5]) + (f" and {len(addrs) - 5} more" if len(addrs) > 5 else "")
        return (
            f"refused {n} connection(s) from {shown}: not in allow: "
            f"({self.total} refused since start; at most one such line per "
            f"{self.interval:g}s)"
        )

    def snapshot(self) -> dict[str, object]:
        top = sorted(self.by_address.items(), key=lambda kv: -kv[1])[:10]
        return {"refused": self.total, "refused_from": dict(top)}


__all__ = [
    "Network", "RefusalLog", "host_is_loopback", "is_loopback", "listen_problem",
    "loopback_only", "parse_network", "parse_networks", "peer_allowed", "suggested_network",
]
