"""Decode throughput of each source kind, side by side with the plain library calls underneath.

Usage::

    python benchmarks/decode_throughput.py [--data DIR] [--repeat N] [--json OUT]

DIR defaults to ``$USGUIDE_DATA``, else ``../shared/data`` beside the repository, else the bundled
``tests/data``. Every row decodes every frame of its file ``--repeat`` times and reports per-frame
median and p95 time, frames per second, and the ratio against a baseline decoded in the same run
(the way a user would read the same file without usguide). On both sides each pass opens the
file (or folder) anew, and the opening counts in the first frame's time: a one-frame file is
mostly its opening. Times vary on shared machines: read the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_line

REPO = Path(__file__).resolve().parents[1]


def data_dir(arg: str | None) -> Path:
    for candidate in (arg, os.environ.get("USGUIDE_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return REPO / "tests" / "data"


def time_frames(make_iter: Callable[[], Iterable[object]], repeat: int) -> list[float]:
    """Seconds spent producing each frame, over ``repeat`` full passes."""
    times: list[float] = []
    for _ in range(repeat):
        it = iter(make_iter())
        while True:
            t0 = time.perf_counter()
            try:
                next(it)
            except StopIteration:
                break
            times.append(time.perf_counter() - t0)
    return times


def opened(open_source: Callable[[], Any]) -> Iterator[object]:
    """The frames of a source opened at the first ``next`` (so its opening is timed), closed at
    the end: as the baselines' generators open their files."""
    source = open_source()
    try:
        yield from source
    finally:
        source.close()


def row(kind: str, name: str, times: list[float], base: list[float] | None, base_name: str) -> dict:
    med = statistics.median(times)
    fps = len(times) / sum(times)
    out = {
        "kind": kind,
        "file": name,
        "frames": len(times),
        "median_ms": 1000 * med,
        "p95_ms": 1000 * float(np.percentile(times, 95)),
        "fps": fps,
        "baseline": base_name,
        "baseline_fps": None,
        "speedup": None,
    }
    if base:
        base_fps = len(base) / sum(base)
        out.update(baseline_fps=base_fps, speedup=fps / base_fps)
    return out


def bench_dicom(folder: Path, repeat: int) -> list[dict]:
    import pydicom
    from pydicom.pixels import apply_color_lut, iter_pixels

    from usguide.sources.dicom import DicomSource

    rows = []
    for path in sorted(folder.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with DicomSource(path, detect_region=False) as src:
                decoder = src.decoder_name
            ours = time_frames(
                lambda p=path: opened(lambda: DicomSource(p, detect_region=False)), repeat
            )
        # Baseline: what a user gets from pydicom alone: its streaming decode with its default
        # plugin choice, and the palette applied where there is one.
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        if ds.PhotometricInterpretation == "PALETTE COLOR":
            base = time_frames(
                lambda p=path, d=ds: (apply_color_lut(a, d) for a in iter_pixels(p)), repeat
            )
        else:
            base = time_frames(lambda p=path: iter_pixels(p), repeat)
        rows.append(
            row(f"dicom ({decoder})", path.name, ours, base, "pydicom iter_pixels (+ palette LUT)")
        )
    return rows


def bench_video(folder: Path, repeat: int) -> list[dict]:
    import cv2

    from usguide.sources.live import LiveSource
    from usguide.sources.video import VideoFileSource

    def raw_frames(path: Path) -> Iterable[np.ndarray]:
        cap = cv2.VideoCapture(str(path))
        try:
            while True:
                ok, frame = cap.read()
                if not ok:
                    return
                yield frame
        finally:
            cap.release()

    rows = []
    for path in sorted(folder.glob("*.mp4")):
        ours = time_frames(
            lambda p=path: opened(lambda: VideoFileSource(p, detect_region=False)), repeat
        )
        base = time_frames(lambda p=path: raw_frames(p), repeat)
        rows.append(row("video", path.name, ours, base, "cv2.VideoCapture.read (BGR)"))
    # A live device, played by the longest clip opened as a capture device: the capture thread
    # reads as fast as the file decodes, the consumer takes the newest frame and drops are counted.
    longest = max(folder.glob("*.mp4"), key=lambda p: p.stat().st_size, default=None)
    if longest is not None:
        times, dropped, captured = [], 0, 0
        for _ in range(repeat):
            lives: list[LiveSource] = []

            def live_frames(lives: list[LiveSource] = lives) -> Iterator[object]:
                lives.append(LiveSource(str(longest), buffer_size=2, detect_region=False))
                yield from lives[0]

            times += time_frames(live_frames, 1)
            stats = lives[0].stats()
            dropped, captured = dropped + stats.dropped, captured + stats.captured
            lives[0].close()
        name = f"{longest.name} as a device ({dropped} of {captured} dropped)"
        base = time_frames(lambda p=longest: raw_frames(p), repeat)
        rows.append(row("live", name, times, base, "cv2.VideoCapture.read (BGR)"))
    return rows


def bench_images(folder: Path, repeat: int, limit: int = 60) -> list[dict]:
    import cv2

    from usguide.sources.images import ImageSource, list_images

    files = list_images(folder)[:limit]
    if not files:
        return []
    # A new source each pass: a built one holds its first image decoded.
    ours = time_frames(lambda: opened(lambda: ImageSource(files, detect_region=False)), repeat)
    base = time_frames(lambda: (cv2.imread(str(f)) for f in files), repeat)
    return [
        row(
            "images",
            f"{folder.parent.name}/{folder.name} ({len(files)})",
            ours,
            base,
            "cv2.imread (BGR)",
        )
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="data mirror (see module doc)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", help="also write the rows as JSON here")
    args = parser.parse_args()
    root = data_dir(args.data)
    dicom = root / "dicom-us" if (root / "dicom-us").is_dir() else root / "dicom"

    rows = bench_dicom(dicom, args.repeat)
    if (root / "lung-videos").is_dir():
        rows += bench_video(root / "lung-videos", args.repeat)
    for sub in ("usgra-seg/images", "screen-captures"):
        if (root / sub).is_dir():
            rows += bench_images(root / sub, args.repeat)

    print(f"# decode throughput: {machine_line()}; data {root}")
    header = "| kind | file | frames | median ms | p95 ms | fps | baseline | baseline fps | ratio |"
    print(header)
    print("|---|---|---:|---:|---:|---:|---|---:|---:|")
    for r in rows:
        base_fps = f"{r['baseline_fps']:.0f}" if r["baseline_fps"] else "-"
        ratio = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        print(
            f"| {r['kind']} | {r['file']} | {r['frames']} | {r['median_ms']:.2f} | "
            f"{r['p95_ms']:.2f} | {r['fps']:.0f} | {r['baseline']} | {base_fps} | {ratio} |"
        )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS of this run: {peak_mb:.0f} MB")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
