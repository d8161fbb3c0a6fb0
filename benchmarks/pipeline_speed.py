"""Whole-pipeline speed: playback throughput, live latency and memory over a long run.

Usage::

    python benchmarks/pipeline_speed.py [--cine PATH] [--frames 1200] [--live-frames 600]
                                        [--memory-frames 100000]

On a 640 x 480 cine (default: the bundled SonoSite cine, repeated) it measures, in one run:

1. **playback**: every frame through source decode -> preprocess -> segment -> needle ->
   guidance -> overlay, frames per second, for each inference engine installed, 1 and 2
   inference threads, pipelined (segmenting ahead on a second thread) and serial, with no sink;
   then the default with the JSON-lines log and the mp4 overlay video (what a review writes);
2. **live**: the cine delivered in real time at 30 fps on a capture thread, newest frame wins;
   latency from a frame's capture to the end of its sinks (median, p95, p99) and drops;
3. **memory**: resident set size before, during and after ``--memory-frames`` frames through
   the default runner with the log sink (decoded frames cycled from memory, so decode is not
   what is measured).

Per-stage medians and p99 are printed for the playback run.
"""

from __future__ import annotations

import argparse
import itertools
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from machine import machine_line

from usguide.frame import Frame
from usguide.pipeline import STAGES, Pipeline, run_live, run_playback
from usguide.segment import available_engines
from usguide.sinks import JsonLinesLog, VideoSink
from usguide.sources import open_source

REPO = Path(__file__).resolve().parents[1]
CINE = REPO / "tests" / "data" / "dicom" / "color3d_jpeg_baseline.dcm"


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def repeated(cine: Path, frames: int) -> Iterator[Frame]:
    """The cine decoded again and again until ``frames`` frames (decode cost included)."""
    n = 0
    while n < frames:
        with open_source(cine) as source:
            for frame in source:
                yield frame
                n += 1
                if n == frames:
                    return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cine", type=Path, default=CINE)
    parser.add_argument("--frames", type=int, default=1200)
    parser.add_argument("--live-frames", type=int, default=600)
    parser.add_argument("--live-fps", type=float, default=30.0)
    parser.add_argument("--memory-frames", type=int, default=20_000)
    args = parser.parse_args()

    with open_source(args.cine) as source:
        rows, cols = source.shape
        cached = list(source)
    print(
        f"machine: {machine_line()}; "
        f"cine {args.cine.name}: {len(cached)} frames of {cols} x {rows}, repeated\n"
    )

    def fresh(pipeline: Pipeline) -> Pipeline:
        pipeline.reset()
        pipeline.timings = type(pipeline.timings)()
        return pipeline

    pipelines = {}
    for engine in available_engines():
        for threads in (1, 2):
            pipelines[engine, threads] = Pipeline(engine=engine, threads=threads)
            for frame in cached[:10]:  # warm-up: sessions, buffers
                pipelines[engine, threads].process(frame)
    default = pipelines[available_engines()[0], 1]

    # Every configuration on the same frames, one after the other, in one run.
    table = []
    with tempfile.TemporaryDirectory() as tmp:
        for (engine, threads), pipeline in pipelines.items():
            for pipelined in (True, False):
                summary = run_playback(
                    fresh(pipeline), repeated(args.cine, args.frames), [], pipelined=pipelined
                )
                how = "pipelined" if pipelined else "serial"
                table.append((f"{engine}, {threads} thread(s), {how}, no sink", summary))
        for name, make_sinks in (
            ("default, + log", lambda: [JsonLinesLog(Path(tmp) / "log.jsonl")]),
            (
                "default, + log + mp4",
                lambda: [JsonLinesLog(Path(tmp) / "log.jsonl"), VideoSink(Path(tmp) / "o.mp4")],
            ),
        ):
            summary = run_playback(fresh(default), repeated(args.cine, args.frames), make_sinks())
            table.append((name, summary))

    baseline = next(
        (s for n, s in table if n == "onnxruntime, 2 thread(s), serial, no sink"), table[0][1]
    )
    print("playback (every frame, decode included); default = the first row's configuration\n")
    print("| run | frames | fps | per frame ms | x target (60 fps) | x onnxruntime serial |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, s in table:
        print(
            f"| {name} | {s.frames_processed} | {s.fps:.1f} | {1e3 / s.fps:.2f} | "
            f"{s.fps / 60.0:.2f} | {s.fps / baseline.fps:.2f} |"
        )
    stages = table[0][1].timings
    print(f"\nper stage, {table[0][0]} (ms; the two threads overlap):\n")
    print("| stage | median | p95 | p99 |")
    print("|---|---:|---:|---:|")
    for stage in STAGES:
        t = stages[stage]
        print(f"| {stage} | {t['median_ms']:.2f} | {t['p95_ms']:.2f} | {t['p99_ms']:.2f} |")

    # Live: real-time delivery, newest frame wins; two inference threads (as `usguide run --live`).
    pipeline = fresh(pipelines[available_engines()[0], 2])
    live = run_live(
        pipeline,
        itertools.islice(itertools.cycle(cached), args.live_frames),
        [JsonLinesLog(os.devnull)],
        pace_s=1.0 / args.live_fps,
    )
    lat = live.timings["latency"]
    engine = available_engines()[0]
    print(f"\nlive at {args.live_fps:g} fps, {engine}, capture to end of sinks (ms):\n")
    print("| frames delivered | processed | dropped | median | p95 | p99 | max | target p99 |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {live.frames_read} | {live.frames_processed} | {live.frames_dropped} | "
        f"{lat['median_ms']:.2f} | {lat['p95_ms']:.2f} | {lat['p99_ms']:.2f} | "
        f"{lat['max_ms']:.2f} | 25 |"
    )

    # Memory over a long run: the default runner (pipelined playback) with the log sink.
    pipeline = fresh(default)
    start_rss = rss_mib()
    marks = []
    step = max(1, args.memory_frames // 10)
    done = 0

    def mark(result: object) -> None:
        nonlocal done
        done += 1
        if done % step == 0:
            marks.append((done, rss_mib()))

    t0 = time.perf_counter()
    run_playback(
        pipeline,
        itertools.islice(itertools.cycle(cached), args.memory_frames),
        [JsonLinesLog(os.devnull)],
        on_frame=mark,
    )
    wall = time.perf_counter() - t0
    print(f"\nmemory over {args.memory_frames} frames ({wall:.0f} s):\n")
    print("| frames | RSS MiB |")
    print("|---:|---:|")
    print(f"| 0 | {start_rss:.1f} |")
    for n, mib in marks:
        print(f"| {n} | {mib:.1f} |")
    growth = marks[-1][1] - marks[0][1] if marks else float("nan")
    print(f"\ngrowth after the first {step} frames: {growth:+.1f} MiB")


if __name__ == "__main__":
    main()
