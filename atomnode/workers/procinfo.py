"""Process helpers for the supervisor and the command handlers (Linux /proc, spawn options).

Everything here is synchronous and cheap (a few small /proc reads); the callers run it
from trio tasks at a low rate (about once a second per pool).
"""

from __future__ import annotations

import grp
import ipaddress
import logging
import os
import pwd
import signal
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

log = logging.getLogger("atomnode.procinfo")  # stable name: operators see it in the journal

#: PATH given to children: the daemon's own environment is not inherited.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

Address = tuple[str, int]


# --------------------------------------------------------------------------- processes


def each_process(file: str) -> Iterator[tuple[int, bytes]]:
    """``(pid, contents of /proc/<pid>/<file>)`` for every process whose file can be
    read now (processes that vanish or are not ours to read are passed over)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/{file}", "rb") as f:
                yield int(name), f.read()
        except OSError:
            continue


def children_map() -> dict[int, list[int]]:
    """parent pid -> child pids, for every process visible in /proc."""
    kids: dict[int, list[int]] = {}
    for pid, data in each_process("stat"):
        # The command name (field 2) is in parentheses and may contain spaces.
        rest = data[data.rfind(b")") + 2 :].split()
        if len(rest) < 2:
            continue
        kids.setdefault(int(rest[1]), []).append(pid)
    return kids


def process_tree(pid: int, kids: Mapping[int, list[int]] | None = None) -> list[int]:
    """``pid`` and all its descendants (pid first). Empty if ``pid`` is gone."""
    if not os.path.exists(f"/proc/{pid}"):
        return []
    if kids is None:
        kids = children_map()
    out = [pid]
    i = 0
    while i < len(out):
        out.extend(kids.get(out[i], ()))
        i += 1
    return out


def rss_kb(pids: Iterable[int]) -> int:
    """Sum of VmRSS (KiB) of the given processes; vanished processes count 0."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status", "rb") as f:
                for line in f:
                    if line.startswith(b"VmRSS:"):
                        total += int(line.split()[1])
                        break
        except (OSError, ValueError, IndexError):
            continue
    return total


def socket_inodes(pids: Iterable[int]) -> set[int]:
    """Inodes of the sockets the given processes hold open (``socket:[N]`` in fd/)."""
    inodes: set[int] = set()
    for pid in pids:
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inodes.add(int(target[8:-1]))
    return inodes


def signal_group(pgid: int, sig: int) -> bool:
    """Send ``sig`` to a process group; False if the group no longer exists."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:  # pragma: no cover - we spawn our own children
        log.warning("not allowed to signal process group %d", pgid)
        return False


def signal_name(returncode: int) -> str:
    """``'code 1'`` or ``'signal SIGKILL'`` for a Popen-style return code."""
    if returncode >= 0:
        return f"code {returncode}"
    try:
        return f"signal {signal.Signals(-returncode).name}"
    except ValueError:
        return f"signal {-returncode}"


# --------------------------------------------------------------------------- TCP sockets


def _normalize_ip(ip: str) -> str:
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return str(addr)


def _parse_proc_addr(text: str) -> Address:
    """Parse ``0100007F:1092`` (IPv4) or the 32-hex-digit IPv6 form of /proc/net/tcp*.

    The address is stored as 32-bit words in host byte order (little-endian here)."""
    hex_ip, hex_port = text.split(":")
    raw = bytes.fromhex(hex_ip)
    words = [raw[i : i + 4][::-1] for i in range(0, len(raw), 4)]
    packed = b"".join(words)
    if len(packed) == 4:
        ip = str(ipaddress.IPv4Address(packed))
    else:
        ip = str(ipaddress.IPv6Address(packed))
    return _normalize_ip(ip), int(hex_port, 16)


def tcp_connections() -> dict[tuple[Address, Address], int]:
    """(local, remote) -> socket inode for every TCP socket in /proc/net/tcp and tcp6.

    Addresses are normalized (IPv4-mapped IPv6 shown as plain IPv4)."""
    table: dict[tuple[Address, Address], int] = {}
    for path in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(path) as f:
                lines = f.readlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) < 10:
                continue
            try:
                local = _parse_proc_addr(fields[1])
                remote = _parse_proc_addr(fields[2])
                inode = int(fields[9])
            except ValueError:
                continue
            if inode:
                table[(local, remote)] = inode
    return table


def find_tcp_owner(
    peer: Address, local: Address, candidates: Mapping[int, set[int]],
    table: Mapping[tuple[Address, Address], int] | None = None,
) -> int | None:
    """Which candidate holds the client end of a TCP connection the server sees.

    ``peer``/``local`` are as the server sees them (peer = the client's address);
    ``candidates`` maps a key (e.g. a worker's pid) to the socket inodes its process tree
    holds. Returns the key or None."""
    if table is None:
        table = tcp_connections()
    key = ((_normalize_ip(peer[0]), int(peer[1])), (_normalize_ip(local[0]), int(local[1])))
    inode = table.get(key)
    if inode is None:
        return None
    for owner, inodes in candidates.items():
        if inode in inodes:
            return owner
    return None


# --------------------------------------------------------------------------- spawning

#: ATOMNODE_OWNER given to every process spawned (see atomnode.workers.keeper).
_owner: str | None = None


def set_owner(token: str | None) -> None:
    """From now on, every process started through :func:`spawn_options` carries
    ``ATOMNODE_OWNER=token`` (its children inherit it)."""
    global _owner
    _owner = token


def spawn_options(
    *,
    user: str | None = None,
    group: str | None = None,
    directory: str | None = None,
    environment: Mapping[str, str] | None = None,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Keyword arguments for ``subprocess.Popen`` / ``trio.lowlevel.open_process``.

    A minimal environment (PATH, LANG, HOME and USER/LOGNAME of the target user) plus
    ``environment``; when ``user`` is given, setuid/setgid to it with its supplementary
    groups (what initgroups would set). The child gets its own session and process group
    so signals reach the whole tree. Raises KeyError for an unknown user or group."""
    env: dict[str, str] = {
        "PATH": DEFAULT_PATH,
        "LANG": os.environ.get("LANG") or "C.UTF-8",
    }
    opts: dict[str, Any] = {"start_new_session": True, "close_fds": True}
    if user is not None:
        pw = pwd.getpwnam(user)
        gid = grp.getgrnam(group).gr_gid if group is not None else pw.pw_gid
        opts["user"] = pw.pw_uid
        opts["group"] = gid
        opts["extra_groups"] = sorted(set(os.getgrouplist(pw.pw_name, pw.pw_gid)))
        env["HOME"] = pw.pw_dir
        env["USER"] = env["LOGNAME"] = pw.pw_name
    else:
        if group is not None:
            opts["group"] = grp.getgrnam(group).gr_gid
        env["HOME"] = os.environ.get("HOME") or "/"
    if extra_env:
        env.update(extra_env)
    if environment:
        env.update(environment)
    if _owner:
        env["ATOMNODE_OWNER"] = _owner  # after the pool's environment: it cannot unset it
    opts["env"] = env
    if directory is not None:
        opts["cwd"] = directory
    return opts
