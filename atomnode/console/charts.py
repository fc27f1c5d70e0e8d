"""Server-rendered SVG line charts: no JavaScript library, nothing fetched at run time.

Each chart is an ``<svg>`` with a title, axes, one polyline per series and a legend; the
numbers are also given as a table for screen readers (the template puts it in a
``<details>``).
"""

from __future__ import annotations

import time
from typing import Any

from markupsafe import Markup, escape

from ..system.names import strip_atom_prefix

WIDTH, HEIGHT = 720, 220
LEFT, RIGHT, TOP, BOTTOM = 52, 12, 12, 28
#: Colour-blind-safe palette (Okabe-Ito).
COLOURS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000",
           "#F0E442")


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    mag = 10 ** len(str(int(v))) / 10
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * mag:
            return m * mag
    return v


def _fmt(v: float) -> str:
    if v >= 100 or v == int(v):
        return f"{v:.0f}"
    return f"{v:.2g}" if v < 1 else f"{v:.1f}"


def line_chart(title: str, unit: str, t0: float, t1: float,
               series: dict[str, list[tuple[float, float]]]) -> Markup:
    """An SVG chart of ``series`` (name -> [(unix time, value)]) between t0 and t1."""
    pw, ph = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    vmax = _nice_max(max((v for pts in series.values() for _, v in pts), default=0.0))
    span = max(t1 - t0, 1.0)

    def x(t: float) -> float:
        return LEFT + (t - t0) / span * pw

    def y(v: float) -> float:
        return TOP + ph - v / vmax * ph

    total = sum(len(p) for p in series.values())
    label = f"{title} ({unit}), {len(series)} series"
    parts = [
        (f'<svg viewBox="0 0 {WIDTH} {HEIGHT}" role="img" aria-label="{escape(label)}" '
         f'class="chart" preserveAspectRatio="xMidYMid meet">'),
        f"<title>{escape(label)}</title>",
    ]
    for i in range(5):  # horizontal grid and value labels
        v = vmax * i / 4
        yy = y(v)
        parts.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{yy:.1f}" y2="{yy:.1f}" '
                     f'class="grid"/>')
        parts.append(f'<text x="{LEFT - 6}" y="{yy + 4:.1f}" text-anchor="end">{_fmt(v)}</text>')
    long_span = span > 2 * 86400
    for i in range(7):  # time labels
        t = t0 + span * i / 6
        fmt = "%a %d" if long_span else "%H:%M"
        anchor = "start" if i == 0 else "end" if i == 6 else "middle"
        parts.append(f'<text x="{x(t):.1f}" y="{HEIGHT - 8}" text-anchor="{anchor}">'
                     f"{time.strftime(fmt, time.localtime(t))}</text>")
    for i, (name, pts) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        if len(pts) == 1:
            (t, v), = pts
            parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}">'
                         f"<title>{escape(name)}</title></circle>")
            continue
        points = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in pts)
        parts.append(f'<polyline points="{points}" fill="none" stroke="{colour}" '
                     f'stroke-width="2"><title>{escape(name)}</title></polyline>')
    if not total:
        parts.append(f'<text x="{LEFT + pw / 2}" y="{TOP + ph / 2}" text-anchor="middle" '
                     f'class="empty">no samples yet (one is taken every minute)</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def build(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The console's four charts from ``/api/charts`` data."""
    t0, t1, step = data["from"], data["to"], data["step"]
    per_minute = 60.0 / step
    completed: dict[str, list] = {}
    failed: dict[str, list] = {}
    depth: dict[str, list] = {}
    waits: dict[str, dict[float, float]] = {"p50": {}, "p95": {}}
    for s in data["samples"]:
        name = strip_atom_prefix(s["function"])
        t = s["at"] + step / 2
        completed.setdefault(name, []).append((t, s["completed"] * per_minute))
        failed.setdefault(name, []).append((t, s["failed"] * per_minute))
        depth.setdefault(name, []).append((t, s["queued_max"] or 0))
        for key in ("p50", "p95"):
            v = s[f"wait_{key}"]
            if v is not None:
                waits[key][t] = max(waits[key].get(t, 0.0), v)
    wait_series = {f"wait {k}": sorted(v.items()) for k, v in waits.items() if v}

    def chart(key: str, title: str, unit: str, series: dict[str, list]) -> dict[str, Any]:
        legend = [(name, COLOURS[i % len(COLOURS)]) for i, name in enumerate(series)]
        rows = sorted({t for pts in series.values() for t, _ in pts})
        table = [(t, [dict(pts).get(t) for pts in series.values()]) for t in rows]
        return {"key": key, "title": title, "unit": unit, "legend": legend,
                "svg": line_chart(title, unit, t0, t1, series),
                "names": list(series), "table": table}

    return [
        chart("completed", "Jobs completed", "per minute", completed),
        chart("failed", "Jobs failed", "per minute", failed),
        chart("depth", "Queue depth", "jobs", depth),
        chart("wait", "Time waiting in the queue", "seconds", wait_series),
    ]
