"""Function names as AtoM writes them.

AtoM prefixes every job class with a per-site key: ``md5(sf_root_dir . workers_key) . '-'``
(32 lowercase hex digits and a dash). Configuration names job classes without it, so
``arObjectMoveJob`` matches ``0123...ef-arObjectMoveJob`` on any site. Pure functions,
shared by the configuration and the broker.
"""

from __future__ import annotations

import re

_ATOM_PREFIX = re.compile(r"^[0-9a-f]{32}-(.+)$", re.DOTALL)


def strip_atom_prefix(name: str) -> str:
    """``0123...ef-arObjectMoveJob`` -> ``arObjectMoveJob``; other names unchanged."""
    m = _ATOM_PREFIX.match(name)
    return m.group(1) if m else name


def function_matches(pattern: str, function: str) -> bool:
    """True if ``pattern`` names ``function`` exactly, or names it without its
    ``<32 hex>-`` AtoM site prefix."""
    return pattern == function or pattern == strip_atom_prefix(function)
