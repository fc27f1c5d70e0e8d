"""Function names as AtoM writes them.

AtoM prefixes every job class with a per-site key: from 2.3 ``md5(...) . '-'`` (32
lowercase hex digits and a dash), in 2.2 the site's root directory and ``" - "``
(``/usr/share/nginx/atom - arFindingAidJob``: a name with spaces). 2.0-2.1 use bare class
names. Configuration names job classes without the prefix, so ``arObjectMoveJob`` matches
``0123...ef-arObjectMoveJob`` (or ``/srv/atom - arObjectMoveJob``) on any site. Pure
functions, shared by the configuration and the broker.
"""

from __future__ import annotations

import json
import re

_ATOM_PREFIX = re.compile(r"^([0-9a-f]{32}-)(.+)$", re.DOTALL)


def split_atom_prefix(name: str) -> tuple[str, str]:
    """``0123...ef-arObjectMoveJob`` -> (``0123...ef-``, ``arObjectMoveJob``);
    ``/srv/atom - arObjectMoveJob`` -> (``/srv/atom - ``, ``arObjectMoveJob``);
    any other name -> ("", name)."""
    m = _ATOM_PREFIX.match(name)
    if m:
        return m.group(1), m.group(2)
    if " - " in name:
        head, _, tail = name.rpartition(" - ")
        if head.startswith("/") and tail and not any(c.isspace() for c in tail):
            return head + " - ", tail
    return "", name


def strip_atom_prefix(name: str) -> str:
    """``0123...ef-arObjectMoveJob`` -> ``arObjectMoveJob``; other names unchanged."""
    return split_atom_prefix(name)[1]


def function_matches(pattern: str, function: str) -> bool:
    """True if ``pattern`` names ``function`` exactly, or names it without its AtoM site
    prefix."""
    return pattern == function or pattern == strip_atom_prefix(function)


def atom_job_id(payload: bytes) -> int | None:
    """The AtoM job id in a job's payload (JSON with ``"id"``), or None."""
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(data, dict):
        value = data.get("id")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        if isinstance(value, str) and value.isdigit():
            return int(value)
    return None
