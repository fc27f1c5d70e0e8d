"""Composition root (placeholder until the server lands)."""


def register(sub):
    p = sub.add_parser("run", help="run the daemon")
    p.set_defaults(func=lambda args: 1)
