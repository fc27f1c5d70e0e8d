"""Command-line entry point: `atomnode SUBCOMMAND ...`.

Each subcommand lives in its own module that exposes ``register(subparsers)``; the
parser it adds sets ``func`` (called with the parsed args, returns an exit code).
Exit codes: 0 ok, 1 failure, 2 usage.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

# Modules that add subcommands. Each has register(subparsers).
SUBCOMMAND_MODULES = [
    "atomnode.daemon",
    "atomnode.ops.ops_cli",
    "atomnode.ops.atom_site",
    "atomnode.ops.doctor",
    "atomnode.ops.jobs_cli",
    "atomnode.console.passwords",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="atomnode",
        description="Gearman-compatible job server, durable queue and worker supervisor for AtoM.",
    )
    parser.add_argument("--version", action="version", version=f"atomnode {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
