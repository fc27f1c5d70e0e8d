"""The console's credential: scrypt password hashes, and ``atomnode console-password``.

Standard library only, so the command works without the console's libraries loaded.
"""

from __future__ import annotations

import argparse
import base64
import getpass
import hashlib
import hmac
import secrets
import sys


def hash_password(password: str, *, n: int = 2**14, r: int = 8, p: int = 1) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) for ``http.password_hash``."""
    salt = secrets.token_bytes(16)
    digest = hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=32)
    b64 = base64.b64encode
    return f"scrypt${n}${r}${p}${b64(salt).decode()}${b64(digest).decode()}"


def check_password(password: str, stored: str) -> bool:
    """True if ``password`` matches the ``scrypt$...`` hash (constant-time compare)."""
    try:
        _scheme, n, r, p, salt, digest = stored.split("$")
        want = base64.b64decode(digest)
        got = hashlib.scrypt(password.encode(), salt=base64.b64decode(salt), n=int(n),
                             r=int(r), p=int(p), dklen=len(want), maxmem=64 * 1024 * 1024)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(got, want)


def cmd_console_password(args: argparse.Namespace) -> int:
    if args.stdin:
        password = sys.stdin.readline().rstrip("\n")
    else:
        password = getpass.getpass("console password: ")
        if getpass.getpass("again: ") != password:
            print("atomnode: the passwords differ", file=sys.stderr)
            return 1
    if len(password) < 8:
        print("atomnode: use at least 8 characters", file=sys.stderr)
        return 1
    print(hash_password(password))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "console-password", help="hash a password for the web console (http.password_hash)",
        description="Print a scrypt hash of a password for the configuration's "
        "http.password_hash (with http.user). The console then asks for that user and "
        "password from every request that is not made on this machine directly.",
    )
    p.add_argument("--stdin", action="store_true",
                   help="read the password from the first line of standard input")
    p.set_defaults(func=cmd_console_password)
