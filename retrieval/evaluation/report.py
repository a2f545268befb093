"""A self-contained HTML report of an evaluation or tuning run: one file, nothing fetched.

The page must open anywhere an eval ran (a CI artifact, a laptop without network, an air-gapped
box), so charts are inline SVG built here by string formatting, styles are inline CSS, and there
is no JavaScript at all; hover tooltips are SVG ``<title>`` elements. Source names, params and
notes come from user YAML and logs, so every string is HTML-escaped. Values may be missing or NaN
(a source skipped for every user, a metric a stage did not compute): they are drawn as gaps and
shown as a dash, never a crash.

    from retrieval.evaluation.report import write_report
    write_report(Path("report.html"), {"title": "eval", "curves": {...}, "table": {...}})
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NotRequired, Required, TypedDict

__all__ = [
    "Curve",
    "Latency",
    "Overlap",
    "ReportData",
    "Table",
    "Trial",
    "render_report",
    "write_report",
]


class Curve(TypedDict):
    """Recall at each k (ascending, from 1 up to the config's k); NaN or None is a gap."""

    k: list[int]
    recall: list[float]


class Table(TypedDict):
    """Summary table: for each row, metrics keyed ``"<metric>@<k>"`` for every k in ``ks``.

    Known metrics (``recall``, ``recall_new``, ``hitrate``, ``unique_hits``, ``candidates``) come
    first in that order, any other ``name@k`` after them; keys without ``@`` (``coverage``) get
    one trailing column each, except latency keys (``p50_ms``, ``over_timeout``...) when the
    report has a latency section that already shows them.
    """

    ks: list[int]
    rows: dict[str, dict[str, float]]


class Overlap(TypedDict):
    """At the largest k: targets found (``hits``) and those no other source found."""

    hits: int
    unique_hits: int


class Latency(TypedDict):
    """Per-request latency percentiles in milliseconds; ``timeouts`` counts deadline misses."""

    p50_ms: float
    p99_ms: float
    timeouts: NotRequired[int]


class Trial(TypedDict):
    """One configuration a tuning run tried, scored on the validation slice."""

    stage: str
    source: str | None
    params: dict[str, Any]
    recall: float
    seconds: float
    chosen: bool
    note: NotRequired[str]  # why it was tried or kept; a column appears when any trial has one


class ReportData(TypedDict, total=False):
    """Everything the report can show; only ``title`` is required, absent sections are skipped.

    ``curves``: series name -> recall@k curve; names starting with ``blend`` are drawn thicker.
    ``table``: the per-k summary. ``overlap``: name -> hits / unique hits at the largest k.
    ``latency``: name -> p50 / p99 (ms). ``trials``: a tuning run's tries in order.
    ``notes``: free text lines shown at the end.
    """

    title: Required[str]
    subtitle: str
    curves: dict[str, Curve]
    table: Table
    overlap: dict[str, Overlap]
    latency: dict[str, Latency]
    trials: list[Trial]
    notes: list[str]


CHART_WIDTH = 900
_FONT = 12  # px, SVG labels
_CHAR_W = 0.6  # average glyph width / font size, to lay out labels without a text engine
_PALETTE = (
    "#2563eb",
    "#ea580c",
    "#16a34a",
    "#dc2626",
    "#9333ea",
    "#0891b2",
    "#ca8a04",
    "#db2777",
    "#4b5563",
    "#65a30d",
    "#7c3aed",
    "#0d9488",
)
_BLEND_COLOUR = "#111827"
_DASHES = ("", "7 4", "2 3", "9 3 2 3")
_METRIC_ORDER = ("recall", "recall_new", "hitrate", "unique_hits", "candidates")
_METRIC_LABEL = {
    "recall": "recall",
    "recall_new": "recall new",
    "hitrate": "hit rate",
    "unique_hits": "unique",
    "candidates": "cands",
}
_COUNTS = {"unique_hits", "candidates", "hits", "timeouts", "users"}
_LATENCY_KEYS = {"over_timeout", "timeouts"}
_BEST = {"recall", "recall_new", "hitrate"}  # higher is better: the column's best is bold
_MISSING = "\u2013"
_CHECK = "\u2713"

_CSS = """
:root { --fg:#1f2430; --muted:#6b7280; --line:#e5e7eb; --soft:#f3f4f6; --accent:#2563eb; }
* { box-sizing: border-box; }
body { margin:0; background:#f5f6f8; color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",Arial,sans-serif; }
main { max-width:980px; margin:0 auto; padding:28px 20px 40px; }
header { margin:0 0 8px; }
h1 { font-size:24px; margin:0 0 4px; letter-spacing:-0.01em; }
.subtitle { color:var(--muted); margin:0; font-size:12.5px; overflow-wrap:anywhere;
  font-family:ui-monospace,"SFMono-Regular",Menlo,"DejaVu Sans Mono",monospace; }
section { background:#fff; border:1px solid var(--line); border-radius:10px;
  padding:16px 20px 18px; margin:16px 0; box-shadow:0 1px 2px rgba(16,24,40,.04); }
h2 { font-size:16px; margin:0 0 2px; }
.caption { color:var(--muted); margin:0 0 10px; font-size:12.5px; }
svg.chart { display:block; width:100%; max-width:900px; height:auto; margin:4px 0 0; }
svg.chart text { font-size:12px; fill:var(--fg); }
svg.chart .axis text, svg.chart text.muted { fill:var(--muted); }
svg.chart .axis-title { font-size:12px; fill:var(--muted); }
.table-wrap { overflow-x:auto; margin-top:6px; }
table { border-collapse:collapse; width:100%; font-size:12.5px; font-variant-numeric:tabular-nums; }
th, td { padding:5px 7px; border-bottom:1px solid var(--line); text-align:right;
  white-space:nowrap; }
th:first-child, td:first-child { text-align:left; }
thead th { color:var(--muted); font-weight:600; background:#fafafb; }
thead tr.group th { color:var(--fg); border-bottom:none; }
th.gs, td.gs { border-left:1px solid var(--line); }
table.summary { margin-bottom:14px; }
table.summary th, table.summary td { padding:5px 8px; }
table.summary thead th { white-space:normal; vertical-align:bottom; line-height:1.2; }
table.summary thead tr.group th { text-align:center; }
table.latency { width:auto; min-width:60%; }
table.latency th, table.latency td { padding-left:28px; }
table.latency th:first-child, table.latency td:first-child { padding-left:7px; }
tbody tr:hover td { background:#f9fafb; }
tr.blend td.name { font-weight:600; }
td.best { font-weight:700; color:#047857; }
td.params { white-space:normal; text-align:left; font-size:12px; max-width:420px;
  font-family:ui-monospace,"SFMono-Regular",Menlo,"DejaVu Sans Mono",monospace; }
th.text, td.text { text-align:left; }
tr.chosen td { background:#fef3c7; }
tr.chosen:hover td { background:#fde68a; }
.sw { display:inline-block; width:10px; height:10px; border-radius:2px; margin-right:6px;
  vertical-align:baseline; }
ul.notes { margin:6px 0 0; padding-left:20px; }
ul.notes li { margin:3px 0; overflow-wrap:anywhere; }
footer { color:var(--muted); font-size:12px; text-align:center; margin-top:18px; }
"""


def render_report(data: ReportData) -> str:
    """The whole page as one HTML string: sections for whatever ``data`` holds, in fixed order."""
    title = data.get("title")
    if not isinstance(title, str):
        raise ValueError("ReportData needs a 'title' string")
    colours = _series_colours(list(data.get("curves") or {}))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(title)}</title>",
        f"<style>{_CSS}</style>",
        "</head>",
        "<body>",
        "<main>",
        "<header>",
        f"<h1>{_e(title)}</h1>",
    ]
    subtitle = data.get("subtitle")
    if subtitle:
        parts.append(f'<p class="subtitle">{_e(subtitle)}</p>')
    parts.append("</header>")
    curves = data.get("curves")
    if curves:
        parts.append(_curves_section(curves, colours, _table_ks(data.get("table"))))
    table = data.get("table")
    if table and table.get("rows"):
        parts.append(_summary_section(table, colours, bool(data.get("latency"))))
    overlap = data.get("overlap")
    if overlap:
        parts.append(_overlap_section(overlap))
    latency = data.get("latency")
    if latency:
        parts.append(_latency_section(latency))
    trials = data.get("trials")
    if trials:
        parts.append(_trials_section(trials))
    notes = data.get("notes")
    if notes:
        items = "".join(f"<li>{_e(n)}</li>" for n in notes)
        parts.append(f'<section id="notes"><h2>Notes</h2><ul class="notes">{items}</ul></section>')
    parts += [
        "<footer>candidate-retrieval report &middot; self-contained: no scripts, "
        "nothing fetched</footer>",
        "</main>",
        "</body>",
        "</html>",
    ]
    return "\n".join(parts) + "\n"


def write_report(path: Path, data: ReportData) -> None:
    """Render and write atomically (temp file in the same directory, then ``os.replace``).

    A reader (a CI artifact upload, a browser refresh) never sees a half-written page, and a
    failed render leaves any previous report in place.
    """
    text = render_report(data)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --- values -------------------------------------------------------------------------------


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _num(value: object) -> float | None:
    """A finite float, or None for None, NaN, +-inf, booleans and anything non-numeric."""
    if value is None or isinstance(value, bool):
        return None
    try:
        x = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value: object, metric: str = "") -> str:
    """4 decimals for rates, thousands separators for counts, 2 decimals for milliseconds."""
    x = _num(value)
    if x is None:
        return _MISSING
    if metric in _COUNTS:
        return f"{int(x):,}" if x == int(x) else f"{x:,.1f}"
    if metric.endswith("_ms") or metric == "seconds":
        return f"{x:,.2f}" if abs(x) < 1000 else f"{x:,.0f}"
    if abs(x) >= 1000:
        return f"{x:,.0f}"
    if abs(x) >= 100:
        return f"{x:.1f}"
    return f"{x:.4f}"


def _is_blend(name: str) -> bool:
    return name.startswith("blend")


def _series_colours(names: Sequence[str]) -> dict[str, tuple[str, str]]:
    """Name -> (colour, dash): sources take palette colours in order, the blend is near-black.

    Blend variants get a palette colour and a dash, so they stay apart from the sources even
    in print; past the palette, colours repeat with the next dash pattern.
    """
    out: dict[str, tuple[str, str]] = {}
    i = 0
    for name in names:
        if name == "blend":
            out[name] = (_BLEND_COLOUR, "")
            continue
        colour = _PALETTE[i % len(_PALETTE)]
        dash = _DASHES[(i // len(_PALETTE)) % len(_DASHES)]
        if _is_blend(name) and not dash:
            dash = "7 4"
        out[name] = (colour, dash)
        i += 1
    return out


def _text_w(text: str, size: float = _FONT) -> float:
    return len(text) * size * _CHAR_W


def _clip(text: str, chars: int) -> str:
    return text if len(text) <= chars else text[: max(1, chars - 1)] + "\u2026"


def _nice_step(span: float, ticks: int = 5) -> float:
    """A 1/2/2.5/5 x 10^n step giving about ``ticks`` intervals over ``span``."""
    raw = span / ticks if span > 0 else 1.0
    mag = 10 ** math.floor(math.log10(raw))
    for m in (1.0, 2.0, 2.5, 5.0, 10.0):
        if m * mag >= raw * (1 - 1e-9):
            return m * mag
    return 10 * mag


def _decimals(step: float) -> int:
    for d in range(0, 8):
        if abs(round(step * 10**d) - step * 10**d) < 1e-6:
            return d
    return 8


def _linear_range(lo: float, hi: float, *, zero: bool) -> tuple[float, float, float]:
    """Axis (min, max, step) covering [lo, hi] on round numbers; from 0 when ``zero``."""
    if zero:
        lo = min(0.0, lo)
    if hi <= lo:
        hi = lo + (abs(lo) * 0.1 or 1.0)
        if not zero:
            lo -= abs(lo) * 0.1 or 1.0
    step = _nice_step(hi - lo)
    return math.floor(lo / step + 1e-9) * step, math.ceil(hi / step - 1e-9) * step, step


def _k_label(k: float) -> str:
    if k >= 1_000_000 and k % 1_000_000 == 0:
        return f"{int(k // 1_000_000)}M"
    if k >= 10_000 and k % 1000 == 0:
        return f"{int(k // 1000)}k"
    return f"{int(k)}" if k == int(k) else f"{k:g}"


def _table_ks(table: Table | None) -> list[int]:
    if not table:
        return []
    return sorted({int(k) for k in table.get("ks") or [] if _num(k) is not None and k > 0})


# --- SVG pieces ---------------------------------------------------------------------------


def _svg_open(kind: str, height: float, label: str) -> str:
    return (
        f'<svg class="chart" data-chart="{kind}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{CHART_WIDTH}" height="{height:.0f}" viewBox="0 0 {CHART_WIDTH} {height:.0f}" '
        f'role="img" aria-label="{_e(label)}">'
    )


def _line(x1: float, y1: float, x2: float, y2: float, style: str) -> str:
    return f'<line x1="{x1:.2f}" y1="{y1:.2f}" x2="{x2:.2f}" y2="{y2:.2f}" {style}/>'


def _text(x: float, y: float, text: str, attrs: str = "") -> str:
    return f'<text x="{x:.2f}" y="{y:.2f}"{" " + attrs if attrs else ""}>{_e(text)}</text>'


@dataclass(frozen=True)
class _Key:
    """One legend entry: a line swatch (``dot`` draws a point, ``ring`` a chosen marker)."""

    name: str
    colour: str
    value: str = ""
    dash: str = ""
    stroke: float = 2.0
    marker: str = "line"


def _legend(entries: Sequence[_Key], x0: float, y0: float, width: float) -> tuple[str, float]:
    """Flowing legend rows; returns the markup and its height.

    Names are drawn in full (up to 60 characters) so every series can be found by name; the
    value follows in the same ``<text>`` so the browser, not an estimate, spaces the two.
    """
    parts = ['<g class="legend">']
    x, y, row_h = x0, y0, 20.0
    for key in entries:
        shown = _clip(key.name, 60)
        w = 28 + _text_w(shown) + (_text_w(key.value) + 6 if key.value else 0) + 20
        if x > x0 and x + w > x0 + width:
            x, y = x0, y + row_h
        parts.append(f'<g class="legend-item" data-name="{_e(key.name)}">')
        if key.marker == "dot":
            parts.append(f'<circle cx="{x + 11:.2f}" cy="{y:.2f}" r="4.5" fill="{key.colour}"/>')
        elif key.marker == "ring":
            parts.append(
                f'<circle cx="{x + 11:.2f}" cy="{y:.2f}" r="6" fill="#fff" '
                f'stroke="{key.colour}" stroke-width="{key.stroke}"/>'
            )
        else:
            dash_attr = f' stroke-dasharray="{key.dash}"' if key.dash else ""
            parts.append(
                _line(
                    x,
                    y,
                    x + 22,
                    y,
                    f'stroke="{key.colour}" stroke-width="{key.stroke}" '
                    f'stroke-linecap="butt"{dash_attr}',
                )
            )
        value = f'<tspan class="muted" dx="6">{_e(key.value)}</tspan>' if key.value else ""
        parts.append(
            f'<text x="{x + 28:.2f}" y="{y + 4:.2f}"><tspan class="legend-name">{_e(shown)}'
            f"</tspan>{value}</text></g>"
        )
        x += w
    parts.append("</g>")
    return "".join(parts), y - y0 + row_h


def _polyline_runs(points: Iterable[tuple[float, float] | None]) -> list[list[tuple[float, float]]]:
    """Split a point sequence at the gaps (None), so a missing value is drawn as missing."""
    runs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        if p is None:
            if runs[-1]:
                runs.append([])
        else:
            runs[-1].append(p)
    return [r for r in runs if r]


def _pts(run: Sequence[tuple[float, float]]) -> str:
    return " ".join(f"{x:.2f},{y:.2f}" for x, y in run)


# --- sections -----------------------------------------------------------------------------


def _clean_curve(curve: Mapping[str, Any]) -> list[tuple[float, float | None]]:
    """(k, recall or None) pairs with a usable k (> 0, finite), in ascending k."""
    ks = list(curve.get("k") or [])
    rs = list(curve.get("recall") or [])
    pairs: list[tuple[float, float | None]] = []
    for i, k in enumerate(ks):
        kk = _num(k)
        if kk is None or kk <= 0:
            continue
        pairs.append((kk, _num(rs[i]) if i < len(rs) else None))
    pairs.sort(key=lambda p: p[0])
    return pairs


def _curves_section(
    curves: Mapping[str, Curve], colours: Mapping[str, tuple[str, str]], marks: Sequence[int]
) -> str:
    series = {name: _clean_curve(c) for name, c in curves.items()}
    all_k = [k for pairs in series.values() for k, _ in pairs]
    all_r = [r for pairs in series.values() for _, r in pairs if r is not None]
    k_lo, k_hi = (min(all_k), max(all_k)) if all_k else (1.0, 1000.0)
    if k_hi <= k_lo:
        k_hi = k_lo * 10
    r_hi = max(all_r) if all_r else 1.0
    y_lo, y_hi, y_step = _linear_range(min(all_r, default=0.0), r_hi, zero=True)
    if r_hi <= 1.0:
        y_hi = min(y_hi, 1.0)

    left, right, top, plot_h = 58.0, 22.0, 14.0, 320.0
    plot_w = CHART_WIDTH - left - right
    bottom = top + plot_h
    lg_lo, lg_span = math.log10(k_lo), math.log10(k_hi) - math.log10(k_lo)

    def sx(k: float) -> float:
        return left + (math.log10(k) - lg_lo) / lg_span * plot_w

    def sy(r: float) -> float:
        return bottom - (r - y_lo) / (y_hi - y_lo) * plot_h

    body = [
        f'<rect class="plot-area" x="{left:.2f}" y="{top:.2f}" width="{plot_w:.2f}" '
        f'height="{plot_h:.2f}" fill="#fff" stroke="#d1d5db"/>'
    ]
    grid, axis = ['<g class="grid">'], ['<g class="axis">']
    # y: linear ticks
    n_y = round((y_hi - y_lo) / y_step)
    dec = _decimals(y_step)
    for i in range(n_y + 1):
        v = y_lo + i * y_step
        y = sy(v)
        if 0 < i < n_y:
            grid.append(_line(left, y, left + plot_w, y, 'stroke="#eef0f3"'))
        axis.append(_line(left - 4, y, left, y, 'stroke="#9ca3af"'))
        axis.append(_text(left - 7, y + 4, f"{v:.{dec}f}", 'text-anchor="end"'))
    # x: decades labelled, 2..9 x 10^n as faint minor lines
    labelled: list[float] = []
    for e in range(math.floor(math.log10(k_lo)), math.ceil(math.log10(k_hi)) + 1):
        for m in range(1, 10):
            k = m * 10.0**e
            if k < k_lo * (1 - 1e-9) or k > k_hi * (1 + 1e-9):
                continue
            x = sx(k)
            if m == 1:
                if left + 1 < x < left + plot_w - 1:
                    grid.append(_line(x, top, x, bottom, 'stroke="#e5e7eb"'))
                axis.append(_line(x, bottom, x, bottom + 5, 'stroke="#9ca3af"'))
                axis.append(_text(x, bottom + 18, _k_label(k), 'text-anchor="middle"'))
                labelled.append(x)
            else:
                grid.append(_line(x, top, x, bottom, 'stroke="#f4f5f7"'))
                axis.append(_line(x, bottom, x, bottom + 3, 'stroke="#d1d5db"'))
    for k in (k_lo, k_hi):  # label the ends when they are not decades
        x = sx(k)
        if all(abs(x - lx) > 34 for lx in labelled):
            axis.append(_line(x, bottom, x, bottom + 5, 'stroke="#9ca3af"'))
            axis.append(_text(x, bottom + 18, _k_label(k), 'text-anchor="middle"'))
    # the table's ks: dashed guides
    for k in marks:
        if k_lo <= k <= k_hi:
            x = sx(k)
            grid.append(_line(x, top, x, bottom, 'stroke="#cbd5e1" stroke-dasharray="3 4"'))
            at_right = x > left + plot_w - 60
            grid.append(
                _text(
                    x - 4 if at_right else x + 4,
                    top + 13,
                    f"@{_k_label(k)}",
                    'class="muted"' + (' text-anchor="end"' if at_right else ""),
                )
            )
    grid.append("</g>")
    axis.append(
        _text(
            left + plot_w / 2,
            bottom + 38,
            "k (log scale)",
            'class="axis-title" text-anchor="middle"',
        )
    )
    axis.append(
        f'<text class="axis-title" transform="translate(15 {top + plot_h / 2:.2f}) rotate(-90)" '
        f'text-anchor="middle">recall@k</text>'
    )
    axis.append("</g>")

    lines: list[str] = []
    entries: list[tuple[float, _Key]] = []
    # sources first, blends last: the thick blend lines stay on top
    for name in sorted(series, key=_is_blend):
        pairs = series[name]
        colour, dash = colours.get(name, (_PALETTE[0], ""))
        stroke = 3.5 if _is_blend(name) else 2.0
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        runs = _polyline_runs((sx(k), sy(r)) if r is not None else None for k, r in pairs)
        lines.append(f'<g class="series" data-name="{_e(name)}"><title>{_e(name)}</title>')
        for run in runs:
            if len(run) == 1:
                lines.append(
                    f'<circle cx="{run[0][0]:.2f}" cy="{run[0][1]:.2f}" r="{stroke}" '
                    f'fill="{colour}"/>'
                )
            else:
                lines.append(
                    f'<polyline fill="none" stroke="{colour}" stroke-width="{stroke}" '
                    f'stroke-linejoin="round" stroke-linecap="round"{dash_attr} '
                    f'points="{_pts(run)}"/>'
                )
        by_k = {k: r for k, r in pairs}
        for k in marks:
            r = by_k.get(float(k))
            if r is not None:
                lines.append(
                    f'<circle class="mark" cx="{sx(k):.2f}" cy="{sy(r):.2f}" r="3.5" '
                    f'fill="#fff" stroke="{colour}" stroke-width="2">'
                    f"<title>{_e(name)} recall@{k} = {_fmt(r)}</title></circle>"
                )
        lines.append("</g>")
        last = next((r for _, r in reversed(pairs) if r is not None), None)
        value = f"{_fmt(last)} @{_k_label(pairs[-1][0])}" if last is not None else _MISSING
        entries.append((-1.0 if last is None else last, _Key(name, colour, value, dash, stroke)))
    entries.sort(key=lambda e: -e[0])  # legend in the order the curves end, top to bottom
    legend, legend_h = _legend([e for _, e in entries], left, bottom + 62, plot_w)
    height = bottom + 62 + legend_h + 4
    svg = (
        _svg_open("curves", height, "recall@k by source, log-scale k")
        + "".join(body + grid + axis + lines)
        + legend
        + "</svg>"
    )
    return (
        '<section id="curves"><h2>Recall@k</h2>'
        '<p class="caption">Share of each test user\'s later items found in the top k, '
        "averaged over users. The blend is the thick line; the legend is ordered by recall at "
        "the largest k.</p>" + svg + "</section>"
    )


def _metric_columns(table: Table, hide_latency: bool) -> tuple[list[int], list[str], list[str]]:
    """(ks, per-k metrics in display order, plain keys) present in the rows."""
    ks = _table_ks(table)
    per_k: set[str] = set()
    plain: list[str] = []
    for stats in (table.get("rows") or {}).values():
        for key in stats or {}:
            metric, at, k = key.rpartition("@")
            if at and k.isdigit() and int(k) in ks:
                per_k.add(metric)
            elif not at and key not in plain:
                if hide_latency and (key.endswith("_ms") or key in _LATENCY_KEYS):
                    continue
                plain.append(key)
    order = [m for m in _METRIC_ORDER if m in per_k] + sorted(per_k - set(_METRIC_ORDER))
    return ks, order, plain


def _summary_section(
    table: Table, colours: Mapping[str, tuple[str, str]], hide_latency: bool
) -> str:
    """Rates in one table, counts (and keys without ``@k``) in a second one below it.

    Five metrics at three ks do not fit 900 px in one table; split, each stays readable.
    """
    ks, metrics, plain = _metric_columns(table, hide_latency)
    rows = table.get("rows") or {}
    rates = [m for m in metrics if m not in _COUNTS]
    counts = [m for m in metrics if m in _COUNTS]
    parts = [
        '<section id="summary"><h2>Summary</h2>'
        '<p class="caption">recall new: recall over items the user had not touched before the '
        "cutoff; unique: hits no other source had in its top k; cands: candidates returned "
        "(mean). Bold: the best in its column.</p>"
    ]
    if rates:
        parts.append(_summary_table(rows, ks, rates, [], colours))
    if counts or plain:
        parts.append(_summary_table(rows, ks, counts, plain, colours))
    parts.append("</section>")
    return "".join(parts)


def _summary_table(
    rows: Mapping[str, Mapping[str, float]],
    ks: Sequence[int],
    metrics: Sequence[str],
    plain: Sequence[str],
    colours: Mapping[str, tuple[str, str]],
) -> str:
    cols = [(f"{m}@{k}", m, j == 0) for k in (ks if metrics else []) for j, m in enumerate(metrics)]
    cols += [(p, p, i == 0) for i, p in enumerate(plain)]
    best: dict[str, float] = {}
    for key, metric, _ in cols:
        if metric in _BEST:
            vals = [v for s in rows.values() if (v := _num((s or {}).get(key))) is not None]
            if len(vals) > 1:
                best[key] = max(vals)
    head1 = ['<tr class="group"><th></th>']
    if metrics:
        head1 += [f'<th class="gs" colspan="{len(metrics)}">@{_k_label(k)}</th>' for k in ks]
    if plain:
        head1.append(f'<th class="gs" colspan="{len(plain)}"></th>')
    head1.append("</tr>")
    head2 = ["<tr><th>source</th>"]
    for _, metric, start in cols:
        cls = ' class="gs"' if start else ""
        head2.append(f"<th{cls}>{_e(_METRIC_LABEL.get(metric, metric))}</th>")
    head2.append("</tr>")
    body = []
    for name, stats in rows.items():
        stats = stats or {}
        swatch = ""
        if name in colours:
            swatch = f'<span class="sw" style="background:{colours[name][0]}"></span>'
        cls = ' class="blend"' if _is_blend(name) else ""
        cells = [f'<tr{cls}><td class="name">{swatch}{_e(name)}</td>']
        for key, metric, start in cols:
            v = _num(stats.get(key))
            classes = (["gs"] if start else []) + (
                ["best"] if v is not None and key in best and v >= best[key] - 1e-12 else []
            )
            attr = f' class="{" ".join(classes)}"' if classes else ""
            cells.append(f"<td{attr}>{_fmt(v, metric)}</td>")
        cells.append("</tr>")
        body.append("".join(cells))
    return (
        '<div class="table-wrap"><table class="summary"><thead>'
        + "".join(head1 + head2)
        + "</thead><tbody>"
        + "".join(body)
        + "</tbody></table></div>"
    )


def _hbar_layout(names: Sequence[str]) -> tuple[float, int]:
    """Left label column width and the characters that fit in it."""
    longest = max((len(n) for n in names), default=4)
    chars = min(longest, 30)
    return max(70.0, _text_w("x" * chars) + 14), chars


def _overlap_section(overlap: Mapping[str, Overlap]) -> str:
    names = list(overlap)
    label_w, chars = _hbar_layout(names)
    value_w = 210.0
    x0, top, row_h, bar_h = label_w, 34.0, 28.0, 16.0
    bar_w = CHART_WIDTH - x0 - value_w
    hits = {n: _num((overlap[n] or {}).get("hits")) for n in names}
    uniq = {n: _num((overlap[n] or {}).get("unique_hits")) for n in names}
    hi = max([v for v in [*hits.values(), *uniq.values()] if v is not None], default=0.0)
    _, x_hi, _ = _linear_range(0.0, hi, zero=True)

    def w(v: float | None) -> float:
        return 0.0 if v is None or x_hi <= 0 else max(0.0, v) / x_hi * bar_w

    parts = [
        '<g class="legend">',
        f'<rect x="{x0:.2f}" y="6" width="12" height="12" rx="2" fill="#bfdbfe"/>',
        _text(x0 + 18, 16, "hits"),
        f'<rect x="{x0 + 70:.2f}" y="6" width="12" height="12" rx="2" fill="#2563eb"/>',
        _text(x0 + 88, 16, "unique hits (found by no other source)"),
        "</g>",
    ]
    for i, name in enumerate(names):
        y = top + i * row_h
        h, u = hits[name], uniq[name]
        share = f" ({u / h:.1%})" if h and u is not None else ""
        value = f"{_fmt(h, 'hits')} hits \u00b7 {_fmt(u, 'hits')} unique{share}"
        parts += [
            f'<g class="bar" data-name="{_e(name)}"><title>{_e(name)}: {_e(value)}</title>',
            _text(x0 - 8, y + bar_h / 2 + 4, _clip(name, chars), 'text-anchor="end"'),
            f'<rect x="{x0:.2f}" y="{y:.2f}" width="{w(h):.2f}" height="{bar_h}" rx="2" '
            'fill="#bfdbfe"/>',
            f'<rect x="{x0:.2f}" y="{y:.2f}" width="{w(u):.2f}" height="{bar_h}" rx="2" '
            'fill="#2563eb"/>',
            _text(x0 + max(w(h), w(u)) + 6, y + bar_h / 2 + 4, value, 'class="muted"'),
            "</g>",
        ]
    height = top + len(names) * row_h + 2
    parts.append(_line(x0, top - 4, x0, height - 8, 'stroke="#9ca3af"'))
    svg = _svg_open("overlap", height, "hits and unique hits by source") + "".join(parts)
    return (
        '<section id="overlap"><h2>Overlap at the largest k</h2>'
        '<p class="caption">Targets each source found, and how many of them no other source '
        "found: a source with few unique hits adds little to the blend.</p>"
        + svg
        + "</svg></section>"
    )


def _latency_section(latency: Mapping[str, Latency]) -> str:
    names = list(latency)
    label_w, chars = _hbar_layout(names)
    x0, top, bar_h, gap = label_w, 34.0, 11.0, 12.0
    group_h = 2 * bar_h + 2 + gap
    bar_w = CHART_WIDTH - x0 - 90
    p50 = {n: _num((latency[n] or {}).get("p50_ms")) for n in names}
    p99 = {n: _num((latency[n] or {}).get("p99_ms")) for n in names}
    hi = max([v for v in [*p50.values(), *p99.values()] if v is not None], default=0.0)
    _, x_hi, x_step = _linear_range(0.0, hi, zero=True)

    def w(v: float | None) -> float:
        return 0.0 if v is None or x_hi <= 0 else max(0.0, v) / x_hi * bar_w

    height = top + len(names) * group_h + 26
    parts = [
        '<g class="legend">',
        f'<rect x="{x0:.2f}" y="6" width="12" height="12" rx="2" fill="#93c5fd"/>',
        _text(x0 + 18, 16, "p50"),
        f'<rect x="{x0 + 64:.2f}" y="6" width="12" height="12" rx="2" fill="#1e40af"/>',
        _text(x0 + 82, 16, "p99"),
        "</g>",
        '<g class="axis">',
    ]
    dec = _decimals(x_step)
    axis_y = top + len(names) * group_h - gap / 2
    if x_hi > 0:
        for i in range(round(x_hi / x_step) + 1):
            v = i * x_step
            x = x0 + w(v)
            parts.append(_line(x, top - 4, x, axis_y, 'stroke="#eef0f3"'))
            parts.append(_text(x, axis_y + 16, f"{v:.{dec}f}", 'text-anchor="middle"'))
        parts.append(_text(x0 + bar_w + 10, axis_y + 16, "ms", 'class="axis-title"'))
    parts.append("</g>")
    for i, name in enumerate(names):
        y = top + i * group_h
        a, b = p50[name], p99[name]
        parts += [
            f'<g class="bar" data-name="{_e(name)}">'
            f"<title>{_e(name)}: p50 {_fmt(a, 'p50_ms')} ms, p99 {_fmt(b, 'p99_ms')} ms</title>",
            _text(x0 - 8, y + bar_h + 5, _clip(name, chars), 'text-anchor="end"'),
            f'<rect x="{x0:.2f}" y="{y:.2f}" width="{w(a):.2f}" height="{bar_h}" rx="2" '
            'fill="#93c5fd"/>',
            _text(x0 + w(a) + 5, y + bar_h - 1.5, _fmt(a, "p50_ms"), 'class="muted"'),
            f'<rect x="{x0:.2f}" y="{y + bar_h + 2:.2f}" width="{w(b):.2f}" height="{bar_h}" '
            'rx="2" fill="#1e40af"/>',
            _text(x0 + w(b) + 5, y + 2 * bar_h + 0.5, _fmt(b, "p99_ms"), 'class="muted"'),
            "</g>",
        ]
    parts.append(_line(x0, top - 4, x0, axis_y, 'stroke="#9ca3af"'))
    svg = _svg_open("latency", height, "latency p50 and p99 by source") + "".join(parts)
    with_timeouts = any("timeouts" in (latency[n] or {}) for n in names)
    head = "<tr><th>source</th><th>p50 ms</th><th>p99 ms</th>"
    head += "<th>timeouts</th></tr>" if with_timeouts else "</tr>"
    rows = []
    for name in names:
        row = f'<tr><td class="name">{_e(name)}</td><td>{_fmt(p50[name], "p50_ms")}</td>'
        row += f"<td>{_fmt(p99[name], 'p99_ms')}</td>"
        if with_timeouts:
            row += f"<td>{_fmt((latency[name] or {}).get('timeouts'), 'timeouts')}</td>"
        rows.append(row + "</tr>")
    return (
        '<section id="latency"><h2>Latency</h2>'
        '<p class="caption">Per-request time of each source alone and of the whole blend '
        "(milliseconds).</p>"
        + svg
        + "</svg>"
        + '<div class="table-wrap"><table class="latency"><thead>'
        + head
        + "</thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div></section>"
    )


def _params_text(params: object) -> str:
    if not isinstance(params, Mapping) or not params:
        return "" if not params else str(params)
    out = []
    for key, value in params.items():
        shown = value if isinstance(value, str | int | float | bool | None) else None
        text = json.dumps(value, sort_keys=True, default=str) if shown is None else str(value)
        out.append(f"{key}={text}")
    return ", ".join(out)


def _trials_section(trials: Sequence[Trial]) -> str:
    stages: list[str] = []
    for t in trials:
        stage = str(t.get("stage", ""))
        if stage not in stages:
            stages.append(stage)
    colour = {s: _PALETTE[i % len(_PALETTE)] for i, s in enumerate(stages)}
    recalls = [_num(t.get("recall")) for t in trials]
    finite = [r for r in recalls if r is not None]
    n = len(trials)
    lo, hi = (min(finite), max(finite)) if finite else (0.0, 1.0)
    pad = (hi - lo) * 0.08
    y_lo, y_hi, y_step = _linear_range(max(0.0, lo - pad), hi + pad, zero=False)

    left, right, top, plot_h = 58.0, 22.0, 26.0, 220.0
    plot_w = CHART_WIDTH - left - right
    bottom = top + plot_h

    def sx(i: int) -> float:  # trial number 1..n, half a slot of margin at each end
        return left + (i - 0.5) / n * plot_w

    def sy(r: float) -> float:
        return bottom - (r - y_lo) / (y_hi - y_lo) * plot_h

    parts = [
        f'<rect class="plot-area" x="{left:.2f}" y="{top:.2f}" width="{plot_w:.2f}" '
        f'height="{plot_h:.2f}" fill="#fff" stroke="#d1d5db"/>'
    ]
    # contiguous runs of one stage: alternating bands, labelled where they fit
    start = 0
    band = 0
    for i in range(1, n + 1):
        if i == n or trials[i].get("stage", "") != trials[start].get("stage", ""):
            x1, x2 = left + start / n * plot_w, left + i / n * plot_w
            if band % 2:
                parts.append(
                    f'<rect x="{x1:.2f}" y="{top:.2f}" width="{x2 - x1:.2f}" '
                    f'height="{plot_h:.2f}" fill="#f6f7f9"/>'
                )
            label = str(trials[start].get("stage", ""))
            room = int((x2 - x1 - 6) / (_FONT * _CHAR_W))
            if room >= 3:
                parts.append(
                    _text(
                        (x1 + x2) / 2,
                        top - 8,
                        _clip(label, room),
                        'text-anchor="middle" class="muted"',
                    )
                )
            start, band = i, band + 1
    dec = _decimals(y_step)
    parts.append('<g class="axis">')
    for i in range(round((y_hi - y_lo) / y_step) + 1):
        v = y_lo + i * y_step
        y = sy(v)
        if i > 0:
            parts.append(_line(left, y, left + plot_w, y, 'stroke="#eef0f3"'))
        parts.append(_text(left - 7, y + 4, f"{v:.{dec}f}", 'text-anchor="end"'))
    step = max(1, math.ceil(n / 20))
    for i in range(1, n + 1):
        if i == 1 or i % step == 0:
            parts.append(_text(sx(i), bottom + 17, str(i), 'text-anchor="middle"'))
    parts.append(
        _text(left + plot_w / 2, bottom + 36, "trial", 'class="axis-title" text-anchor="middle"')
    )
    parts.append(
        f'<text class="axis-title" transform="translate(15 {top + plot_h / 2:.2f}) rotate(-90)" '
        f'text-anchor="middle">validation recall</text>'
    )
    parts.append("</g>")
    parts.append('<g class="points">')
    for i, (t, r) in enumerate(zip(trials, recalls, strict=True), start=1):
        if r is None:
            continue
        stage = str(t.get("stage", ""))
        tip = f"#{i} {stage} {t.get('source') or ''} {_params_text(t.get('params'))}: {_fmt(r)}"
        if t.get("chosen"):
            parts.append(
                f'<circle class="chosen" cx="{sx(i):.2f}" cy="{sy(r):.2f}" r="7.5" '
                f'fill="{colour[stage]}" stroke="#111827" stroke-width="2.5">'
                f"<title>{_e(tip)} (chosen)</title></circle>"
            )
        else:
            parts.append(
                f'<circle cx="{sx(i):.2f}" cy="{sy(r):.2f}" r="4.5" fill="{colour[stage]}" '
                f'fill-opacity="0.85"><title>{_e(tip)}</title></circle>'
            )
    parts.append("</g>")
    entries = [_Key(s or "(no stage)", colour[s], marker="dot") for s in stages]
    entries.append(_Key("chosen", "#111827", stroke=2.5, marker="ring"))
    legend, legend_h = _legend(entries, left, bottom + 58, plot_w)
    height = bottom + 58 + legend_h + 2
    svg = _svg_open("trials", height, "validation recall by trial") + "".join(parts) + legend
    with_notes = any(t.get("note") for t in trials)
    rows = []
    for i, t in enumerate(trials, start=1):
        chosen = bool(t.get("chosen"))
        note = f'<td class="params">{_e(t.get("note") or "")}</td>' if with_notes else ""
        rows.append(
            ('<tr class="chosen">' if chosen else "<tr>")
            + f'<td>{i}</td><td class="text">{_e(t.get("stage", ""))}</td>'
            + f'<td class="text">{_e(t.get("source") or _MISSING)}</td>'
            + f'<td class="params">{_e(_params_text(t.get("params")))}</td>'
            + f"<td>{_fmt(t.get('recall'))}</td><td>{_fmt(t.get('seconds'), 'seconds')}</td>"
            + f"<td>{_CHECK if chosen else ''}</td>{note}</tr>"
        )
    return (
        '<section id="trials"><h2>Tuning trials</h2>'
        '<p class="caption">Each configuration tried, in order, with its recall on the validation '
        "slice; ringed points and highlighted rows are the ones kept.</p>"
        + svg
        + "</svg>"
        + '<div class="table-wrap"><table class="trials"><thead><tr><th>#</th>'
        '<th class="text">stage</th><th class="text">source</th><th class="text">params</th>'
        "<th>recall</th><th>seconds</th><th>chosen</th>"
        + ('<th class="text">note</th>' if with_notes else "")
        + "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table></div></section>"
    )
