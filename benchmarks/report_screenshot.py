"""Screenshot an HTML report to PNG with headless Chromium, trimmed to the page's content.

Chromium's ``--screenshot`` captures the window, not the page, so the window is made tall and
the uniform background below the last content row is cut off afterwards (PNG decoded and
re-encoded with zlib and numpy: no imaging library needed). ``--demo`` first writes a report
of made-up but realistic figures to INPUT, which is how docs/report.png was produced:

    PYTHONPATH=. python benchmarks/report_screenshot.py report.html report.png
    PYTHONPATH=. python benchmarks/report_screenshot.py --demo /tmp/demo.html docs/report.png

Chromium on Debian/Ubuntu: ``apt-get install -y --no-install-recommends chromium``.
"""

from __future__ import annotations

import argparse
import math
import shutil
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import numpy as np
import numpy.typing as npt

from retrieval.evaluation.report import Curve, Latency, ReportData, Trial, write_report

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def find_chromium() -> str | None:
    """The first Chromium-like browser on PATH, or None."""
    for name in CHROMIUM_NAMES:
        path = shutil.which(name)
        if path:
            return path
    return None


def screenshot(
    html_path: Path,
    png_path: Path,
    *,
    width: int = 1000,
    height: int = 6000,
    crop: bool = True,
    colours: int | None = 256,
    timeout: float = 180.0,
) -> Path:
    """Render ``html_path`` in headless Chromium at ``width`` x ``height`` and write a PNG.

    With ``crop``, rows of background colour at the bottom are trimmed (keeping a margin);
    ``colours`` (default 256) writes a palette PNG, ``None`` truecolour. A throwaway profile
    directory keeps concurrent runs from fighting over one profile lock.
    """
    browser = find_chromium()
    if browser is None:
        raise RuntimeError(f"no Chromium on PATH (looked for {', '.join(CHROMIUM_NAMES)})")
    png_path = Path(png_path)
    with tempfile.TemporaryDirectory(prefix="report-shot-") as tmp:
        raw = Path(tmp) / "shot.png"
        cmd = [
            browser,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--hide-scrollbars",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--force-device-scale-factor=1",
            f"--user-data-dir={tmp}/profile",
            f"--window-size={width},{height}",
            f"--screenshot={raw}",
            Path(html_path).resolve().as_uri(),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        if proc.returncode != 0 or not raw.exists():
            raise RuntimeError(f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}")
        if not crop and colours is None:
            shutil.copyfile(raw, png_path)
            return png_path
        image = read_png(raw)
        if crop:
            trimmed = crop_bottom(image)
            if trimmed.shape[0] == image.shape[0]:
                print(
                    f"warning: content reaches the bottom: try --height > {height}", file=sys.stderr
                )
            image = trimmed
        png_path.write_bytes(encode_png(image, colours))
    return png_path


def read_png(path: Path) -> npt.NDArray[np.uint8]:
    """Pixels (height, width, channels) of an 8-bit, non-interlaced RGB, RGBA or palette PNG."""
    data = Path(path).read_bytes()
    if not data.startswith(_PNG_MAGIC):
        raise ValueError(f"{path}: not a PNG")
    pos, idat, header, plte = 8, [], b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        pos += 12 + length
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"PLTE":
            plte = body
        elif kind == b"IEND":
            break
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    if depth != 8 or colour not in (2, 3, 6) or interlace or (colour == 3 and not plte):
        raise ValueError(f"{path}: only 8-bit RGB/RGBA/palette non-interlaced PNGs are read")
    c = {2: 3, 3: 1, 6: 4}[colour]
    raw = np.frombuffer(zlib.decompress(b"".join(idat)), np.uint8).reshape(h, 1 + w * c)
    out = np.empty((h, w * c), np.uint8)
    prev = np.zeros(w * c, np.uint8)
    for y in range(h):
        ftype, line = int(raw[y, 0]), raw[y, 1:]
        if ftype == 0:
            cur = line.copy()
        elif ftype == 1:  # Sub: a running sum per channel, mod 256
            cur = np.cumsum(line.reshape(w, c), axis=0, dtype=np.uint8).reshape(-1)
        elif ftype == 2:  # Up
            cur = line + prev
        elif ftype in (3, 4):  # Average, Paeth: sequential, rare in Chromium's output
            cur = _unfilter_slow(ftype, line.tolist(), prev.tolist(), c)
        else:
            raise ValueError(f"{path}: bad filter type {ftype} on row {y}")
        out[y] = cur
        prev = out[y]
    if colour == 3:
        palette = np.frombuffer(plte, np.uint8).reshape(-1, 3)
        return palette[out]
    return out.reshape(h, w, c)


def _unfilter_slow(kind: int, line: list[int], prev: list[int], c: int) -> npt.NDArray[np.uint8]:
    cur = [0] * len(line)
    for i, x in enumerate(line):
        a = cur[i - c] if i >= c else 0
        b = prev[i]
        if kind == 3:
            cur[i] = (x + (a + b) // 2) & 0xFF
            continue
        up_left = prev[i - c] if i >= c else 0
        p = a + b - up_left
        pa, pb, pc = abs(p - a), abs(p - b), abs(p - up_left)
        pred = a if pa <= pb and pa <= pc else (b if pb <= pc else up_left)
        cur[i] = (x + pred) & 0xFF
    return np.array(cur, np.uint8)


def crop_bottom(image: npt.NDArray[np.uint8], margin: int = 24) -> npt.NDArray[np.uint8]:
    """Drop the rows below the last one that differs from the bottom-right pixel's colour."""
    background = image[-1, -1]
    differs = np.any(image != background, axis=(1, 2))
    rows = np.flatnonzero(differs)
    if rows.size == 0:
        return image
    return image[: min(image.shape[0], int(rows[-1]) + 1 + margin)]


def encode_png(image: npt.NDArray[np.uint8], colours: int | None = 256) -> bytes:
    """A PNG of an RGB(A) image: 8-bit palette when ``colours`` is set, else truecolour.

    A screenshot of a report is mostly flat colour plus anti-aliasing, so its most frequent
    256 colours cover ~98% of pixels and the rest map to the nearest of them invisibly; the
    palette file is under half the size of the RGB one. ``colours=None`` keeps it lossless.
    """
    h, w, c = image.shape
    if colours is not None and c == 3:
        index, palette = _quantize(image, colours)
        rows = np.hstack([np.zeros((h, 1), np.uint8), index])  # filter None: best on a palette
        ihdr = struct.pack(">IIBBBBB", w, h, 8, 3, 0, 0, 0)
        return (
            _PNG_MAGIC
            + _chunk(b"IHDR", ihdr)
            + _chunk(b"PLTE", palette.tobytes())
            + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
            + _chunk(b"IEND", b"")
        )
    flat = image.reshape(h, w * c)
    up = flat - np.vstack([np.zeros((1, w * c), np.uint8), flat[:-1]])
    rows = np.hstack([np.full((h, 1), 2, np.uint8), up])
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 6, 0, 0, 0)
    return (
        _PNG_MAGIC
        + _chunk(b"IHDR", ihdr)
        + _chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + _chunk(b"IEND", b"")
    )


def _quantize(
    image: npt.NDArray[np.uint8], colours: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """(index per pixel, palette): the most frequent colours, every other one to its nearest."""
    h, w, _ = image.shape
    rgb = image.astype(np.uint32)
    packed = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    uniq, inverse, counts = np.unique(packed.ravel(), return_inverse=True, return_counts=True)
    keep = uniq[np.argsort(-counts, kind="stable")[: min(colours, 256)]]

    def split(x: npt.NDArray[np.uint32]) -> npt.NDArray[np.int32]:
        return np.stack([(x >> 16) & 255, (x >> 8) & 255, x & 255], axis=1).astype(np.int32)

    u, p = split(uniq), split(keep)
    nearest = np.empty(len(u), np.int64)
    for i in range(0, len(u), 4096):  # bounded memory: 4096 x 256 distances at a time
        d = ((u[i : i + 4096, None, :] - p[None, :, :]) ** 2).sum(axis=2)
        nearest[i : i + 4096] = d.argmin(axis=1)
    index = nearest[inverse.reshape(-1)].reshape(h, w).astype(np.uint8)
    return index, p.astype(np.uint8)


def _chunk(kind: bytes, body: bytes) -> bytes:
    crc = zlib.crc32(kind + body) & 0xFFFFFFFF
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def sample_data() -> ReportData:
    """Made-up figures shaped like a real eval (recall@1..1000 of five sources, three blends)."""
    kmax = 1000
    ks = list(range(1, kmax + 1))
    # (ceiling, scale, shape): recall(k) = ceiling * (1 - exp(-(k / scale) ** shape))
    shapes = {
        "covisitation": (0.34, 60.0, 0.55),
        "item_cf": (0.31, 90.0, 0.55),
        "ann": (0.27, 160.0, 0.6),
        "popularity": (0.16, 400.0, 0.7),
        "recent_views": (0.09, 4.0, 0.9),
        "blend": (0.47, 120.0, 0.55),
        "blend:round_robin": (0.43, 150.0, 0.55),
        "blend:calibrated": (0.49, 105.0, 0.55),
    }
    curves: dict[str, Curve] = {
        name: {"k": ks, "recall": [a * (1 - math.exp(-((k / s) ** b))) for k in ks]}
        for name, (a, s, b) in shapes.items()
    }
    table_ks = [20, 100, 1000]
    rows: dict[str, dict[str, float]] = {}
    for name, curve in curves.items():
        stats: dict[str, float] = {}
        for k in table_ks:
            r = curve["recall"][k - 1]
            stats[f"recall@{k}"] = r
            stats[f"recall_new@{k}"] = r * 0.82
            stats[f"hitrate@{k}"] = min(1.0, r * 1.9)
            stats[f"unique_hits@{k}"] = round(r * 900 * (0.5 if name.startswith("blend") else 1))
            stats[f"candidates@{k}"] = k if name != "recent_views" else min(k, 37.4)
        rows[name] = stats
    hits = {n: round(c["recall"][-1] * 21_400) for n, c in curves.items()}
    uniq = {
        "covisitation": 1480,
        "item_cf": 1130,
        "ann": 2210,
        "popularity": 640,
        "recent_views": 95,
        "blend": 310,
    }
    latency: dict[str, Latency] = {
        "covisitation": {"p50_ms": 1.84, "p99_ms": 5.1},
        "item_cf": {"p50_ms": 2.31, "p99_ms": 7.9},
        "ann": {"p50_ms": 6.72, "p99_ms": 18.4, "timeouts": 3},
        "popularity": {"p50_ms": 0.21, "p99_ms": 0.6},
        "recent_views": {"p50_ms": 0.35, "p99_ms": 1.2},
        "blend": {"p50_ms": 8.9, "p99_ms": 24.7, "timeouts": 3},
    }
    trials: list[Trial] = []
    for i, nprobe in enumerate((16, 32, 64, 128, 256)):
        recall = 0.231 + 0.04 * (1 - math.exp(-i / 1.3))
        trials.append(
            {
                "stage": "ann.nprobe",
                "source": "ann",
                "params": {"nprobe": nprobe},
                "recall": recall,
                "seconds": 14.0 * 2**i,
                "chosen": nprobe == 128,
            }
        )
    for window in (1, 3, 7, 14, 30):
        recall = 0.30 + 0.05 * math.exp(-(((math.log(window) - math.log(7)) / 1.2) ** 2))
        trials.append(
            {
                "stage": "covisitation.window",
                "source": "covisitation",
                "params": {"window_days": window, "max_neighbours": 200},
                "recall": recall,
                "seconds": 31.0 + window,
                "chosen": window == 7,
            }
        )
    for j, (cv, ann, ic) in enumerate(((1, 1, 1), (2, 1, 1), (2, 2, 1), (3, 2, 1), (2, 1, 2))):
        trials.append(
            {
                "stage": "blend.quotas",
                "source": None,
                "params": {"quota": {"covisitation": cv, "ann": ann, "item_cf": ic}},
                "recall": (0.445, 0.459, 0.463, 0.457, float("nan"))[j],
                "seconds": 9.5,
                "chosen": j == 2,
            }
        )
    return {
        "title": "Offline evaluation: examples/config.yaml",
        "subtitle": "retrieval eval examples/config.yaml --events data/log.parquet "
        "--test-fraction 0.1 --k 20,100,1000 \u00b7 2,000 users \u00b7 2024-05-02 14:07 UTC",
        "curves": curves,
        "table": {"ks": table_ks, "rows": rows},
        "overlap": {n: {"hits": hits[n], "unique_hits": u} for n, u in uniq.items()},
        "latency": latency,
        "trials": trials,
        "notes": [
            "Sources were built on events before 2024-03-20; targets are each test user's "
            "distinct later items.",
            "blend.quotas trial 5 failed (NaN): shown as missing.",
        ],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("html", type=Path, help="the report to render (written first with --demo)")
    ap.add_argument("png", type=Path)
    ap.add_argument("--width", type=int, default=1000)
    ap.add_argument("--height", type=int, default=6000, help="window height before cropping")
    ap.add_argument("--no-crop", action="store_true", help="keep the whole window")
    ap.add_argument("--lossless", action="store_true", help="RGB, not a 256-colour palette")
    ap.add_argument("--demo", action="store_true", help="write a sample report to HTML first")
    args = ap.parse_args()
    if args.demo:
        write_report(args.html, sample_data())
    out = screenshot(
        args.html, args.png, width=args.width, height=args.height, crop=not args.no_crop
    )
    print(f"{out}: {out.stat().st_size / 1024:.0f} KB")


if __name__ == "__main__":
    main()
