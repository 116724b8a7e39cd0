"""Charts as inline SVG, built by hand: horizontal bars, histograms with marked thresholds, heat maps.

Every label goes through ``markupsafe.escape``; the result is ``Markup`` the templates insert as is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from markupsafe import Markup, escape

COLORS = ("#3b6ea8", "#d9822b", "#4a9a5b", "#a8443b", "#7a5aa8", "#8a8a8a")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'


def _num(value: float) -> str:
    if isinstance(value, int) or float(value).is_integer():
        return f"{int(value):,}"
    return f"{value:.3g}"


def hbars(items: Sequence[tuple[str, float]], *, width: int = 640, label_width: int = 220, title: str = "",
          color: str = COLORS[0]) -> Markup:
    """One horizontal bar per (label, value), the value written beside it."""
    if not items:
        return Markup("<p class='empty'>nothing to chart</p>")
    row, top = 18, 20 if title else 4
    height = top + row * len(items) + 6
    peak = max(float(v) for _, v in items) or 1.0
    room = width - label_width - 70
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>']
    if title:
        parts.append(f'<text x="0" y="13" font-weight="bold">{escape(title)}</text>')
    for i, (label, value) in enumerate(items):
        y = top + i * row
        w = max(1.0, room * float(value) / peak) if value else 0
        parts.append(f'<text x="{label_width - 6}" y="{y + 12}" text-anchor="end">{escape(str(label)[:40])}</text>'
                     f'<rect x="{label_width}" y="{y + 2}" width="{w:.1f}" height="{row - 5}" fill="{color}"/>'
                     f'<text x="{label_width + w + 4:.1f}" y="{y + 12}">{escape(_num(value))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def histogram(series: Sequence[tuple[str, Sequence[float]]], edges: Sequence[float], *,
              thresholds: Sequence[tuple[float, str]] = (), xlabel: str = "", density: bool = False,
              width: int = 640, height: int = 200) -> Markup:
    """Histogram(s) of counts per bin (``edges`` has one more entry than each series), thresholds as red lines.
    Several series are drawn as outlines over each other; ``density`` scales each to its own total."""
    left, right, top, bottom = 48, 12, 10, 34
    plot_w, plot_h = width - left - right, height - top - bottom
    lo, hi = float(edges[0]), float(edges[-1])
    span = (hi - lo) or 1.0
    scaled = []
    for name, counts in series:
        counts = np.asarray(counts, dtype=float)
        total = counts.sum()
        scaled.append((name, counts / total if density and total else counts))
    peak = max((float(c.max()) for _, c in scaled if len(c)), default=0.0) or 1.0

    def x_of(v: float) -> float:
        return left + plot_w * (float(v) - lo) / span

    legend = 16 * len(series) + 6 if len(series) > 1 else 0
    parts = [f'<svg class="chart" role="img" width="{width}" height="{height + legend}" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>',
             f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" stroke="#444"/>',
             f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_h}" stroke="#444"/>',
             f'<text x="{left - 4}" y="{top + 8}" text-anchor="end">'
             f'{escape(_num(peak if not density else round(peak, 3)))}</text>',
             f'<text x="{left - 4}" y="{top + plot_h}" text-anchor="end">0</text>']
    for k, (name, counts) in enumerate(scaled):
        color = COLORS[k % len(COLORS)]
        for i, c in enumerate(counts):
            if c <= 0:
                continue
            x0, x1 = x_of(edges[i]), x_of(edges[i + 1])
            h = plot_h * c / peak
            fill = f'fill="{color}" fill-opacity="{0.85 if len(series) == 1 else 0.35}"'
            parts.append(f'<rect x="{x0:.1f}" y="{top + plot_h - h:.1f}" width="{max(0.5, x1 - x0 - 0.5):.1f}" '
                         f'height="{h:.1f}" {fill} stroke="{color}" stroke-width="0.5"/>')
        if len(series) > 1:
            y = height + 16 * k + 12
            parts.append(f'<rect x="{left}" y="{y - 9}" width="10" height="10" fill="{color}"/>'
                         f'<text x="{left + 14}" y="{y}">{escape(name)}</text>')
    for tick in np.linspace(lo, hi, 6):
        parts.append(f'<text x="{x_of(tick):.1f}" y="{top + plot_h + 13}" text-anchor="middle">'
                     f'{escape(_num(round(float(tick), 3)))}</text>')
    for k, (value, label) in enumerate(thresholds):
        if lo <= float(value) <= hi:
            x = x_of(value)
            # the label goes on the side of the line with more room
            anchor, dx = ("end", -3) if x > left + plot_w / 2 else ("start", 3)
            parts.append(f'<line class="threshold" x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" '
                         f'stroke="#c0392b" stroke-width="2" stroke-dasharray="4 2"/>'
                         f'<text x="{x + dx:.1f}" y="{top + 10 + 12 * k}" text-anchor="{anchor}" fill="#c0392b">'
                         f'{escape(label)}</text>')
    if xlabel:
        parts.append(f'<text x="{left + plot_w / 2:.1f}" y="{top + plot_h + 28}" text-anchor="middle">'
                     f'{escape(xlabel)}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def heatmap(rows: Sequence[str], columns: Sequence[str], values: Sequence[Sequence[float | None]], *,
            cell: int = 54, label_width: int = 200) -> Markup:
    """A grid of cells shaded by value (None: no cell planned), the value written in each."""
    longest = max((min(len(str(c)), 28) for c in columns), default=0)
    top = 20 + 4 * longest
    width, height = label_width + cell * len(columns) + 10 + 5 * longest, top + 24 * len(rows) + 6
    peak = max((v for row in values for v in row if v is not None), default=0) or 1
    parts = [f'<svg class="chart heatmap" role="img" width="{width}" height="{height}" '
             f'xmlns="http://www.w3.org/2000/svg" {FONT}>']
    for j, name in enumerate(columns):
        x = label_width + j * cell + cell / 2
        parts.append(f'<text transform="translate({x:.1f},{top - 6}) rotate(-35)">{escape(str(name)[:28])}</text>')
    for i, name in enumerate(rows):
        y = top + i * 24
        parts.append(f'<text x="{label_width - 6}" y="{y + 15}" text-anchor="end">{escape(str(name)[:36])}</text>')
        for j, value in enumerate(values[i]):
            x = label_width + j * cell
            if value is None:
                parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="22" fill="#f2f2f2"/>')
                continue
            shade = 0.12 + 0.88 * float(value) / peak
            parts.append(f'<rect x="{x}" y="{y}" width="{cell - 2}" height="22" fill="{COLORS[0]}" '
                         f'fill-opacity="{shade:.2f}"/><text x="{x + cell / 2 - 1}" y="{y + 15}" '
                         f'text-anchor="middle" fill="{"#fff" if shade > 0.55 else "#000"}">'
                         f'{escape(_num(value))}</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def bins(values: Sequence[float], n: int = 30, lo: float | None = None, hi: float | None = None,
         log: bool = False) -> tuple[list[int], list[float]]:
    """Counts and edges of ``n`` equal bins (log-spaced with ``log``) over [lo, hi] (the data's range by default)."""
    data = np.asarray([v for v in values if v is not None], dtype=float)
    if log:
        data = data[data > 0]
    if not len(data):
        return [], [0.0, 1.0]
    lo = float(data.min()) if lo is None else lo
    hi = float(data.max()) if hi is None else hi
    if hi <= lo:
        hi = lo + 1.0
    edges = np.geomspace(max(lo, 1e-9), hi, n + 1) if log else np.linspace(lo, hi, n + 1)
    counts, _ = np.histogram(np.clip(data, lo, hi), bins=edges)
    return [int(c) for c in counts], [float(e) for e in edges]
