"""Speed of the segmentation stage on 640 x 480 frames, fp32 and int8 side by side.

Usage::

    python benchmarks/segment_speed.py [--model-dir models/usguide-seg] [--frames 300]

Rows: the model's inference alone (onnxruntime run on a preprocessed input), and the whole stage
(crop, resize, normalise, infer, softmax, argmax, small regions dropped, labels back to frame
size), the whole stage keeping every region (``min_region_fraction={}``, what dropping small
regions costs) and, for a model that matches histograms, the whole stage without (what the
matching costs), for every model file in the folder (model.onnx as shipped, model_fp32.onnx when
present). Two inference threads.
Frames are the real SonoSite cine (tests/data/dicom/color3d_jpeg_baseline.dcm, 640 x 480),
cycled.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import time
from pathlib import Path

import numpy as np
from machine import machine_line

from usguide.segment import Segmenter, available_engines, without_histogram_matching
from usguide.sources.dicom import DicomSource

REPO = Path(__file__).resolve().parents[1]


def percentiles(times: list[float]) -> tuple[float, float, float]:
    ms = np.asarray(times) * 1000
    return float(np.median(ms)), float(np.percentile(ms, 95)), float(np.percentile(ms, 99))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", default=str(REPO / "models" / "usguide-seg"))
    parser.add_argument("--frames", type=int, default=300)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    with DicomSource(REPO / "tests" / "data" / "dicom" / "color3d_jpeg_baseline.dcm") as src:
        frames = list(src)
    models = [
        p
        for p in (Path(args.model_dir) / n for n in ("model.onnx", "model_fp32.onnx"))
        if p.exists()
    ]
    print(
        f"# segmentation speed: {machine_line()}, "
        f"{args.threads} inference threads, 640 x 480 frames x {args.frames}"
    )
    print("| engine | model | part | median ms | p95 ms | p99 ms | fps |")
    print("|---|---|---|---:|---:|---:|---:|")
    rows = {}
    for engine, path in itertools.product(available_engines(), models):
        seg = Segmenter(path, threads=args.threads, engine=engine)
        keep_all = Segmenter(path, threads=args.threads, engine=engine, min_region_fraction={})
        # One inference session for all: two sessions' idle threads would contend for 2 cores.
        keep_all._engine = seg._engine
        variants = [("whole stage, every region kept", keep_all)]
        if seg.info.normalisation.get("histogram_match"):
            unmatched = Segmenter(path, threads=args.threads, engine=engine)
            unmatched._engine = seg._engine
            plain = without_histogram_matching(seg.info.normalisation)
            unmatched.info = dataclasses.replace(seg.info, normalisation=plain)
            variants.append(("whole stage, no histogram matching", unmatched))
        x = np.random.default_rng(0).standard_normal((1, 1, *seg.info.input_size), np.float32)
        run = seg._engine.run
        stages = [("whole stage", seg), *variants]
        for _ in range(30):
            run(x)
            for _, stage in stages:
                stage(frames[0])
        times: dict[str, list[float]] = {"inference": []}
        times.update({part: [] for part, _ in stages})
        for i in range(args.frames):
            t = time.perf_counter()
            run(x)
            times["inference"].append(time.perf_counter() - t)
            frame = frames[i % len(frames)]
            for part, stage in stages:  # interleaved: each frame through each variant
                t = time.perf_counter()
                stage(frame)
                times[part].append(time.perf_counter() - t)
        for part, part_times in times.items():
            med, p95, p99 = percentiles(part_times)
            rows[(engine, path.name, part)] = med
            print(
                f"| {engine} | {path.name} | {part} | {med:.2f} | {p95:.2f} | {p99:.2f} | "
                f"{1000 / med:.0f} |"
            )
    base = rows.get(("onnxruntime", "model.onnx", "whole stage"))
    if base is not None:
        print("\nwhole stage, speed relative to onnxruntime with the shipped model.onnx:")
        for (engine, name, part), med in rows.items():
            if part == "whole stage":
                print(f"- {engine} {name}: {base / med:.2f}x")
    costs = [
        (engine, name, med / rows[(engine, name, "whole stage, no histogram matching")])
        for (engine, name, part), med in rows.items()
        if part == "whole stage" and (engine, name, "whole stage, no histogram matching") in rows
    ]
    if costs:
        print("\nwhole stage with histogram matching, time relative to without (same run):")
        for engine, name, ratio in costs:
            print(f"- {engine} {name}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
