"""Speed and per-frame allocation of the overlay renderer on 640 x 480 frames.

Usage::

    python benchmarks/overlay_speed.py [--frames 500]

Rows, side by side in one run (ratios to the first row, since the machines are shared):

- the previous ``blend_labels`` (before the renderer; copied here, it allocated per call);
- ``blend_labels`` now (shares the renderer's painting, still allocates its result);
- the renderer, labels only;
- the renderer, full content: labels, shaft, tip, dashed path, 3 targets (one active), 3 text
  lines, 1 warning and an injectate pocket, with the tip moving and the text changing per frame;
- the same with fascia bands across the top and bottom, so the labels' bounding box is the
  whole frame (the worst case for the fills).

The frame is a real scan (tests/data/usgra-seg/images/0050.png, grey, with its nerve and vessel
mask), resized to 640 x 480. "alloc" is the largest peak of Python-visible allocations (numpy
arrays, Python objects, via tracemalloc) in any steady-state frame; OpenCV's own C++ scratch is
not seen by tracemalloc.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from machine import machine_line

from usguide.labels import CLASS_COLOURS, FASCIA
from usguide.overlay import OverlayRenderer, blend_labels
from usguide.sources.images import read_image, read_mask

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "tests" / "data" / "usgra-seg"
SIZE = (640, 480)  # (width, height)


def old_blend_labels(
    pixels: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45, out: np.ndarray | None = None
) -> np.ndarray:
    """``usguide.overlay.blend_labels`` as it was before the renderer, for comparison."""
    if labels.shape != pixels.shape[:2]:
        raise ValueError(f"labels {labels.shape} and pixels {pixels.shape[:2]} differ in size")
    rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    if out is None:
        out = np.empty((*labels.shape, 3), np.uint8)
    colours = np.zeros((256, 1, 3), np.uint8)
    colours[: len(CLASS_COLOURS), 0] = CLASS_COLOURS
    painted = cv2.LUT(cv2.cvtColor(labels, cv2.COLOR_GRAY2RGB), colours)
    cv2.addWeighted(rgb, 1.0 - alpha, painted, alpha, 0.0, dst=out)
    background = labels == 0
    out[background] = rgb[background]
    return out


def percentiles(times: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(times) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def sample() -> tuple[np.ndarray, np.ndarray]:
    """The grey 640 x 480 frame and its label map."""
    image = read_image(SAMPLE / "images" / "0050.png")
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    grey = cv2.resize(grey, SIZE, interpolation=cv2.INTER_AREA)
    labels = read_mask(SAMPLE / "masks" / "0050.png")
    return grey, cv2.resize(labels, SIZE, interpolation=cv2.INTER_NEAREST)


def full_content(frames: int) -> list[dict]:
    """Per-frame keyword arguments of a busy guidance display, the tip advancing."""
    injectate = np.zeros(SIZE[::-1], bool)
    cv2.ellipse(injectate.view(np.uint8), (430, 210), (40, 18), 0, 0, 360, 1, -1)
    entry = (0.0, 60.0)
    kwargs = []
    for i in range(frames):
        s = 0.8 + 0.2 * (i % 50) / 50  # fraction of the way to (400, 197)
        tip = (entry[0] + s * 400.0, entry[1] + s * 137.0)
        kwargs.append(
            dict(
                shaft=(entry, tip),
                tip_xy=tip,
                tip_confident=i % 10 != 0,
                path=(tip, (tip[0] + 40.0, tip[1] + 13.7)),
                targets=[(440.0, 200.0), (470.0, 260.0), (380.0, 250.0)],
                active_target=0,
                text=[f"Tip to nerve {9.5 - 5 * s:.1f} mm", f"Angle {18.9:.0f} deg", "Depth 18 mm"],
                warnings=["Tip near vessel"],
                injectate=injectate,
            )
        )
    return kwargs


def measure(
    call: Callable[[int], object], frames: int, warmup: int = 30
) -> tuple[list[float], int]:
    """Seconds per frame, and the largest per-frame peak of traced allocations in bytes."""
    for i in range(warmup):
        call(i)
    times = []
    for i in range(frames):
        t = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - t)
    # A separate pass: tracemalloc slows Python down, so it must not share the timed one.
    tracemalloc.start()
    peak = 0
    for i in range(min(frames, 100)):
        tracemalloc.reset_peak()
        before = tracemalloc.get_traced_memory()[0]
        call(i)
        peak = max(peak, tracemalloc.get_traced_memory()[1] - before)
    tracemalloc.stop()
    return times, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=500)
    parser.add_argument("--no-antialias", action="store_true", help="LINE_8 lines and text.")
    parser.add_argument("--threads", type=int, help="OpenCV threads (default: its own choice).")
    args = parser.parse_args()
    if args.threads is not None:
        cv2.setNumThreads(args.threads)
    grey, labels = sample()
    spanning = labels.copy()
    spanning[40:46] = FASCIA  # fascia planes cross the whole width
    spanning[440:446] = FASCIA
    content = full_content(args.frames + 30)
    renderer = OverlayRenderer(antialias=not args.no_antialias)
    rows: list[tuple[str, Callable[[int], object]]] = [
        ("blend_labels before (allocating)", lambda i: old_blend_labels(grey, labels)),
        ("blend_labels now (allocating)", lambda i: blend_labels(grey, labels)),
        ("renderer: labels only", lambda i: renderer.render(grey, labels)),
        ("renderer: full content", lambda i: renderer.render(grey, labels, **content[i])),
        (
            "renderer: full content, labels span frame",
            lambda i: renderer.render(grey, spanning, **content[i]),
        ),
    ]
    box = cv2.boundingRect(labels)
    print(
        f"# overlay speed: {machine_line()} ({cv2.getNumThreads()} OpenCV threads), "
        f"{SIZE[0]} x {SIZE[1]} grey frames x {args.frames}, "
        f"antialias {not args.no_antialias}; labels' box {box[2]} x {box[3]} px"
    )
    print()
    print("| what | median ms | p95 ms | p99 ms | fps | x before | alloc / frame |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    base = None
    for name, call in rows:
        times, peak = measure(call, args.frames)
        med, p95, p99 = percentiles(times)
        base = base or med
        print(
            f"| {name} | {med:.3f} | {p95:.3f} | {p99:.3f} | {1000 / med:.0f} | "
            f"{med / base:.2f} | {peak / 1024:.1f} KiB |"
        )


if __name__ == "__main__":
    main()
