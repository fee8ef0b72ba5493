"""Inline SVG charts for the posture page, drawn by our own code (no script, no library).

Owns one chart type: stacked bars, one bar per day. Every bar segment carries its day,
series and value as data attributes and a <title> (the browser's tooltip), so the page
reads without script and tests can find what was drawn. Pure: text in, text out.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from html import escape

_WIDTH = 760
_HEIGHT = 260
_LEFT, _RIGHT, _TOP, _BOTTOM = 48, 12, 12, 46
_LEGEND_ROW = 18


@dataclass(frozen=True, slots=True)
class Series:
    """One stacked layer: its name (legend), fill colour and one value per day."""

    name: str
    color: str
    values: tuple[int, ...]


def nice_ceiling(value: int) -> int:
    """A round axis maximum at or above `value` (1, 2, 5 times a power of ten)."""
    if value <= 0:
        return 1
    scale = 1
    while True:
        for step in (1, 2, 5):
            if step * scale >= value:
                return step * scale
        scale *= 10


def stacked_bars(chart_id: str, title: str, days: Sequence[str], series: Sequence[Series]) -> str:
    """An SVG stacked bar chart with one bar per day, bottom to top in `series` order."""
    legend_rows = (len(series) + 3) // 4
    height = _HEIGHT + legend_rows * _LEGEND_ROW
    plot_w = _WIDTH - _LEFT - _RIGHT
    plot_h = _HEIGHT - _TOP - _BOTTOM
    totals = [sum(s.values[i] for s in series) for i in range(len(days))]
    highest = max(totals, default=0)
    step = nice_ceiling(-(-highest // 4))  # whole-number ticks, at most about five
    top = step * max(1, -(-highest // step))
    slot = plot_w / max(len(days), 1)
    bar_w = max(min(slot * 0.7, 48.0), 1.0)
    out = [
        f'<svg class="chart" id="{escape(chart_id)}"'
        f' role="img" viewBox="0 0 {_WIDTH} {height}" width="100%"'
        f' data-days="{len(days)}" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title>",
    ]
    for tick in range(top // step + 1):  # horizontal grid and y labels: 0, step ... top
        y = _TOP + plot_h - plot_h * tick * step / top
        out.append(
            f'<line class="grid" x1="{_LEFT}" x2="{_WIDTH - _RIGHT}" y1="{y:.1f}" y2="{y:.1f}"/>'
        )
        out.append(
            f'<text class="axis" x="{_LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">'
            f"{tick * step}</text>"
        )
    label_every = max(1, round(len(days) / 14))  # at most ~14 day labels
    for i, day in enumerate(days):
        x = _LEFT + slot * i + (slot - bar_w) / 2
        out.append(f'<g class="day" data-day="{escape(day)}" data-total="{totals[i]}">')
        base = 0
        for s in series:
            value = s.values[i]
            if value <= 0:
                continue
            y0 = _TOP + plot_h - plot_h * base / top
            h = plot_h * value / top
            out.append(
                f'<rect class="bar" x="{x:.1f}" y="{y0 - h:.1f}" width="{bar_w:.1f}"'
                f' height="{h:.1f}" fill="{escape(s.color)}" data-series="{escape(s.name)}"'
                f' data-value="{value}"><title>{escape(day)} {escape(s.name)}: {value}'
                "</title></rect>"
            )
            base += value
        if i % label_every == 0 or i == len(days) - 1:
            out.append(
                f'<text class="axis" x="{x + bar_w / 2:.1f}" y="{_TOP + plot_h + 16}"'
                f' text-anchor="middle">{escape(day[5:])}</text>'
            )
        out.append("</g>")
    for n, s in enumerate(series):  # the legend, four entries a row
        lx = _LEFT + (n % 4) * (plot_w / 4)
        ly = _HEIGHT - 10 + (n // 4) * _LEGEND_ROW
        out.append(
            f'<rect class="key" x="{lx:.1f}" y="{ly - 9}" width="10" height="10"'
            f' fill="{escape(s.color)}"/>'
            f'<text class="legend" x="{lx + 14:.1f}" y="{ly}">{escape(s.name)}</text>'
        )
    out.append("</svg>")
    return "\n".join(out)
