"""HTML report: well-formed, one chart per section, log-scale geometry, escaping, screenshots."""

from __future__ import annotations

import importlib.util
import itertools
import math
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from retrieval.evaluation.report import ReportData, render_report, write_report

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<script>alert(1)</script>"
VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "wbr"}


# --- a tiny DOM from html.parser ---------------------------------------------------------


@dataclass
class Node:
    tag: str
    attrs: dict[str, str]
    children: list[Node] = field(default_factory=list)
    text: str = ""

    def all(self, tag: str | None = None, **attrs: str) -> list[Node]:
        """Descendants with this tag whose attributes hold these values (class: one of)."""
        out = []
        for child in self.children:
            ok = tag is None or child.tag == tag
            for key, value in attrs.items():
                have = child.attrs.get(key.rstrip("_"), "")
                ok = ok and (value in have.split() if key == "class_" else have == value)
            if ok:
                out.append(child)
            out.extend(child.all(tag, **attrs))
        return out

    def all_text(self) -> str:
        return self.text + "".join(c.all_text() for c in self.children)


class Tree(HTMLParser):
    """Builds Nodes and records every end tag that does not close the innermost open one."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.root = Node("#root", {})
        self.stack = [self.root]
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        node = Node(tag, {k: v or "" for k, v in attrs})
        self.stack[-1].children.append(node)
        if tag not in VOID:
            self.stack.append(node)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.stack[-1].children.append(Node(tag, {k: v or "" for k, v in attrs}))

    def handle_endtag(self, tag: str) -> None:
        if tag in VOID:
            return
        if len(self.stack) == 1 or self.stack[-1].tag != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1].tag}>")
            return
        self.stack.pop()

    def handle_data(self, data: str) -> None:
        self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(text: str) -> Node:
    tree = Tree()
    tree.feed(text)
    tree.close()
    unclosed = [n.tag for n in tree.stack[1:]]
    assert not tree.errors, tree.errors
    assert not unclosed, f"unclosed: {unclosed}"
    return tree.root


def chart(root: Node, kind: str) -> Node:
    found = root.all("svg", **{"data-chart": kind})
    assert len(found) == 1, f"{len(found)} {kind} charts"
    return found[0]


def points(polyline: Node) -> list[tuple[float, float]]:
    pairs = polyline.attrs["points"].split()
    return [(float(x), float(y)) for x, y in (p.split(",") for p in pairs)]


# --- sample data --------------------------------------------------------------------------

K_MAX = 200


def sample() -> ReportData:
    ks = list(range(1, K_MAX + 1))
    return {
        "title": "eval of config.yaml",
        "subtitle": "retrieval eval config.yaml --events log.parquet",
        "curves": {
            "popularity": {
                "k": ks,
                "recall": [0.1 * math.log1p(k) / math.log1p(K_MAX) for k in ks],
            },
            EVIL: {"k": ks, "recall": [0.2 * (1 - math.exp(-k / 50)) for k in ks]},
            "sparse": {"k": [5, 20, 100], "recall": [0.01, 0.05, 0.12]},
            "blend": {"k": ks, "recall": [0.3 * (1 - math.exp(-k / 40)) for k in ks]},
            "blend:round_robin": {"k": ks, "recall": [0.25 * (1 - math.exp(-k / 40)) for k in ks]},
        },
        "table": {
            "ks": [20, 200],
            "rows": {
                "popularity": {"recall@20": 0.05, "recall@200": 0.1, "candidates@20": 20.0},
                EVIL: {"recall@20": 0.06, "recall@200": float("nan"), "unique_hits@20": 3.0},
                "blend": {"recall@20": 0.09, "recall@200": 0.3, "coverage": 0.41},
            },
        },
        "overlap": {
            "popularity": {"hits": 120, "unique_hits": 10},
            EVIL: {"hits": 300, "unique_hits": 90},
        },
        "latency": {
            "popularity": {"p50_ms": 0.2, "p99_ms": 0.9},
            EVIL: {"p50_ms": 3.0, "p99_ms": float("nan"), "timeouts": 2},
        },
        "trials": [
            {
                "stage": "ann",
                "source": "ann",
                "params": {"nprobe": 32},
                "recall": 0.2,
                "seconds": 3.0,
                "chosen": False,
            },
            {
                "stage": "ann",
                "source": "ann",
                "params": {"nprobe": 64},
                "recall": 0.25,
                "seconds": 5.0,
                "chosen": True,
            },
            {
                "stage": "quotas",
                "source": None,
                "params": {"quota": {EVIL: 2}},
                "recall": float("nan"),
                "seconds": 1.0,
                "chosen": False,
            },
        ],
        "notes": ["built on events before the cutoff", EVIL],
    }


# --- structure ----------------------------------------------------------------------------


def test_full_report_is_well_formed_with_one_svg_per_chart() -> None:
    root = parse(render_report(sample()))
    svgs = root.all("svg")
    assert sorted(s.attrs["data-chart"] for s in svgs) == ["curves", "latency", "overlap", "trials"]
    ids = {s.attrs["id"] for s in root.all("section")}
    assert ids == {"curves", "summary", "overlap", "latency", "trials", "notes"}


def test_every_series_is_in_the_curve_legend() -> None:
    legend = chart(parse(render_report(sample())), "curves").all("g", class_="legend")
    assert len(legend) == 1
    names = [t.all_text() for t in legend[0].all("tspan", class_="legend-name")]
    assert sorted(names) == sorted(sample()["curves"])


def test_each_polyline_has_one_point_per_k_on_a_log_x_axis() -> None:
    data = sample()
    svg = chart(parse(render_report(data)), "curves")
    plot = svg.all("rect", class_="plot-area")[0]
    left, right = float(plot.attrs["x"]), float(plot.attrs["x"]) + float(plot.attrs["width"])
    for name, curve in data["curves"].items():
        series = svg.all("g", class_="series", **{"data-name": name})
        assert len(series) == 1, name
        lines = series[0].all("polyline")
        assert len(lines) == 1, name
        pts = points(lines[0])
        assert len(pts) == len(curve["k"]), name
        xs = [x for x, _ in pts]
        assert all(a < b for a, b in itertools.pairwise(xs)), name
        if curve["k"][0] == 1:
            assert xs[0] == pytest.approx(left, abs=0.01)
        else:
            assert xs[0] > left + 1
        if curve["k"][-1] == K_MAX:
            assert xs[-1] == pytest.approx(right, abs=0.01)
        else:
            assert xs[-1] < right - 1
    # log scale: each decade is the same width (linear would make 1..10 tiny)
    pts = points(svg.all("g", **{"data-name": "blend"})[0].all("polyline")[0])
    x1, x10, x100 = pts[0][0], pts[9][0], pts[99][0]
    assert x10 - x1 == pytest.approx(x100 - x10, abs=0.02)
    assert (right - left) * 0.3 < x10 - x1 < (right - left) * 0.5  # 1 of log10(200) = 2.3 decades


def test_higher_recall_is_drawn_higher() -> None:
    svg = chart(parse(render_report(sample())), "curves")
    last_y = {
        name: points(svg.all("g", **{"data-name": name})[0].all("polyline")[0])[-1][1]
        for name in ("popularity", "blend")
    }
    assert last_y["blend"] < last_y["popularity"]  # SVG y grows downwards


def test_blend_is_drawn_thicker_than_sources() -> None:
    svg = chart(parse(render_report(sample())), "curves")

    def width(name: str) -> float:
        line = svg.all("g", **{"data-name": name})[0].all("polyline")[0]
        return float(line.attrs["stroke-width"])

    assert width("blend") > width("popularity")
    assert width("blend:round_robin") > width("popularity")


def test_user_strings_are_escaped() -> None:
    data = sample()
    text = render_report(data)
    assert "<script" not in text.lower()
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    root = parse(text)
    assert EVIL in [n.attrs.get("data-name") for n in root.all("g", class_="series")]
    assert any(EVIL in li.all_text() for li in root.all("li"))


def test_absent_sections_are_not_drawn() -> None:
    data = sample()
    only: ReportData = {"title": data["title"], "curves": data["curves"]}
    root = parse(render_report(only))
    assert [s.attrs["data-chart"] for s in root.all("svg")] == ["curves"]
    assert [s.attrs["id"] for s in root.all("section")] == ["curves"]
    assert not root.all("table")
    bare = parse(render_report({"title": "nothing", "overlap": {}, "trials": []}))
    assert not bare.all("svg")
    assert not bare.all("section")
    assert bare.all("h1")[0].all_text() == "nothing"


def test_title_is_required() -> None:
    with pytest.raises(ValueError, match="title"):
        render_report({"subtitle": "x"})  # type: ignore[typeddict-item]


def test_nan_and_missing_values_are_gaps_not_crashes() -> None:
    ks = list(range(1, 11))
    recall = [0.1 * k for k in ks]
    recall[4] = float("nan")
    recall[7] = None  # type: ignore[call-overload]
    data: ReportData = {
        "title": "gaps",
        "curves": {"a": {"k": ks, "recall": recall}, "empty": {"k": [], "recall": []}},
        "table": {"ks": [5, 10], "rows": {"a": {"recall@5": float("nan")}, "b": {}}},
        "overlap": {"a": {"hits": float("nan"), "unique_hits": 0}},  # type: ignore[typeddict-item]
        "latency": {"a": {"p50_ms": float("inf"), "p99_ms": float("nan")}},
    }
    text = render_report(data)
    shown = parse(text).all("body")[0].all_text()  # what a reader sees, tooltips included
    assert not re.search(r"\b(nan|inf|infinity|none)\b", shown, re.IGNORECASE)
    svg = chart(parse(text), "curves")
    runs = [points(p) for p in svg.all("g", **{"data-name": "a"})[0].all("polyline")]
    assert [len(r) for r in runs] == [4, 2, 2]  # split at k=5 and k=8
    assert not svg.all("g", **{"data-name": "empty"})[0].all("polyline")
    table = parse(text).all("table", class_="summary")[0]
    cells = [td.all_text() for td in table.all("td")]
    assert cells.count("\u2013") == 4  # a@5, a@10, b@5, b@10


def test_trials_table_highlights_chosen_and_chart_skips_nan() -> None:
    data = sample()
    root = parse(render_report(data))
    table = root.all("table", class_="trials")[0]
    body_rows = table.all("tbody")[0].all("tr")
    assert len(body_rows) == len(data["trials"])
    chosen = [r for r in body_rows if "chosen" in r.attrs.get("class", "")]
    assert len(chosen) == 1 and "nprobe=64" in chosen[0].all_text()
    dots = chart(root, "trials").all("g", class_="points")[0].all("circle")
    assert len(dots) == 2  # the NaN trial is not drawn
    assert len([d for d in dots if d.attrs.get("class") == "chosen"]) == 1


def test_overlap_bars_scale_with_hits() -> None:
    svg = chart(parse(render_report(sample())), "overlap")
    bars = {g.attrs["data-name"]: g.all("rect") for g in svg.all("g", class_="bar")}
    hits = {name: float(rects[0].attrs["width"]) for name, rects in bars.items()}
    unique = {name: float(rects[1].attrs["width"]) for name, rects in bars.items()}
    assert hits[EVIL] / hits["popularity"] == pytest.approx(300 / 120, rel=1e-3)
    assert unique[EVIL] / hits[EVIL] == pytest.approx(90 / 300, rel=1e-3)


def test_write_report_is_atomic(tmp_path: Path) -> None:
    path = tmp_path / "out" / "report.html"
    write_report(path, sample())
    first = path.read_text(encoding="utf-8")
    assert first == render_report(sample())
    with pytest.raises(ValueError):
        write_report(path, {"subtitle": "no title"})  # type: ignore[typeddict-item]
    assert path.read_text(encoding="utf-8") == first
    assert os.listdir(path.parent) == ["report.html"]  # no temp file left behind


# --- screenshots --------------------------------------------------------------------------


def _screenshot_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "report_screenshot", ROOT / "benchmarks" / "report_screenshot.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("report_screenshot", module)
    spec.loader.exec_module(module)
    return module


def test_png_encoder_round_trips(tmp_path: Path) -> None:
    shot = _screenshot_module()
    image = np.random.default_rng(0).integers(0, 256, size=(17, 23, 3), dtype=np.uint8)
    path = tmp_path / "roundtrip.png"
    path.write_bytes(shot.encode_png(image, None))
    assert np.array_equal(shot.read_png(path), image)
    few = image // 64 * 64  # 64 colours: the palette is exact
    path.write_bytes(shot.encode_png(few, 256))
    assert np.array_equal(shot.read_png(path), few)
    cropped = shot.crop_bottom(np.vstack([few, np.full((40, 23, 3), 255, np.uint8)]), margin=5)
    assert cropped.shape == (17 + 5, 23, 3)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium or chromium-browser on PATH")
def test_chromium_renders_a_non_trivial_page(tmp_path: Path) -> None:
    shot = _screenshot_module()
    html_path, png_path = tmp_path / "report.html", tmp_path / "report.png"
    write_report(html_path, sample())
    shot.screenshot(html_path, png_path, width=1000, height=2000, crop=False, colours=None)
    assert png_path.stat().st_size > 30_000
    image = shot.read_png(png_path)
    assert image.shape[:2] == (2000, 1000)
    colours = np.unique(image.reshape(-1, image.shape[2]), axis=0)
    assert len(colours) > 100  # text, anti-aliased lines, bars: far from a blank page
    # the blend's near-black curve and the bars' blues are on the page
    assert np.any(np.all(image[..., :3] == (0x11, 0x18, 0x27), axis=-1))
    assert np.any(np.all(image[..., :3] == (0x25, 0x63, 0xEB), axis=-1))


def test_trial_notes_get_a_column_only_when_present() -> None:
    data = sample()
    plain = parse(render_report(data)).all("table", class_="trials")[0]
    assert "note" not in [th.all_text() for th in plain.all("th")]
    data["trials"][1]["note"] = "kept: +0.05 recall"
    table = parse(render_report(data)).all("table", class_="trials")[0]
    assert "note" in [th.all_text() for th in table.all("th")]
    assert "kept: +0.05 recall" in table.all_text()


def test_summary_leaves_latency_to_the_latency_section() -> None:
    data = sample()
    data["table"]["rows"]["blend"].update({"p50_ms": 4.2, "p99_ms": 9.9, "over_timeout": 1.0})

    def headers(d: ReportData) -> list[str]:
        tables = parse(render_report(d)).all("table", class_="summary")
        return [th.all_text() for t in tables for th in t.all("th")]

    assert "coverage" in headers(data)
    assert "p50_ms" not in headers(data) and "over_timeout" not in headers(data)
    del data["latency"]
    assert "p50_ms" in headers(data) and "over_timeout" in headers(data)
