"""Throughput of usguide's whole pipeline against FAST's segmentation alone, same model and cine.

FAST (https://github.com/smistad/FAST, ``pyfast`` on PyPI) runs ``DICOMMultiFrameStreamer``
(looping, no frame-rate pacing, crop to the DICOM ultrasound region) -> ``ColorToGrayscale`` ->
``SegmentationNetwork`` on the shipped ONNX model, once per inference engine (ONNXRuntime,
OpenVINO) and model file (``model.onnx`` int8 QDQ and ``model_fp32.onnx``), headless, pulling
every frame through a ``DataStream`` and turning each label image into a NumPy array. Each
(engine, model) pair runs in its own subprocess. usguide runs ``run_playback`` with
``Pipeline(model=...)`` (decode, segmentation, needle, guidance and overlay; pipelined: the next
frame is read and segmented on a second thread) on every frame of
``usguide.sources.open_source``, cycling the cine. Both sides are timed end to end over
``--frames`` frames after ``--warmup`` untimed frames, ``--repeats`` times round robin; each row
shows its fastest run.

Setup (Debian; FAST's wheel needs these libraries even headless)::

    apt-get update && apt-get install -y libusb-1.0-0 ocl-icd-libopencl1 pocl-opencl-icd
    python3 -m venv /tmp/fastvenv
    /tmp/fastvenv/bin/pip install pyfast numpy

Usage::

    python benchmarks/fast_comparison.py [--cine ../shared/data/dicom-us/color3d_jpeg_baseline.dcm]
        [--frames 1200] [--warmup 30] [--model models/usguide-seg/model.onnx]
        [--fast-python /tmp/fastvenv/bin/python] [--engines ONNXRuntime OpenVINO] [--cpus 2]
        [--repeats 3] [--skip-usguide]

``pyfast`` is kept out of the project's environment: when ``import fast`` fails in the current
interpreter, the FAST part runs with ``--fast-python``. Prints a markdown table (engine, model
file, frames, wall s, fps, ms/frame); its last row is usguide fps / best FAST fps.

What FAST's ``SegmentationNetwork`` cannot match: usguide z-scores every frame with that frame's
own mean and standard deviation; FAST only has a fixed scale factor and a fixed mean / standard
deviation, so the FAST runs use ``scaleFactor=1/255`` and the mean / standard deviation over the
whole cine (measured with FAST before timing), so its labels are not usguide's. FAST resizes
with its own OpenCL resampler, not INTER_AREA; it takes the argmax of the logits (``threshold``
far below any logit) and resizes the labels back to the region. FAST's API has no thread setting
for its engines (each uses its default); ``--cpus`` pins both sides to that many CPUs and caps
pocl's OpenCL threads (``POCL_MAX_PTHREAD_COUNT``); usguide's ``Pipeline`` uses its defaults
(OpenVINO where installed, one inference thread, the other core running the rest).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CINE = REPO.parent / "shared" / "data" / "dicom-us" / "color3d_jpeg_baseline.dcm"
DEFAULT_MODEL = REPO / "models" / "usguide-seg" / "model.onnx"
DEFAULT_FAST_PYTHON = "/tmp/fastvenv/bin/python"
RESULT_TAG = "FAST_RESULT_JSON "


# -- FAST side (runs in a subprocess, possibly another interpreter; stdlib and numpy only) ---------
def _fast_cine_stats(fast: Any, cine: Path, size: tuple[int, int]) -> tuple[float, float, int]:
    """Mean and standard deviation of the cine as the network sees it (grey, cropped, resized).

    Returns the average over frames of each frame's mean and standard deviation of pixels / 255:
    the fixed normalisation closest to usguide's per-frame z-score.
    """
    import numpy as np

    streamer = fast.DICOMMultiFrameStreamer.create(
        str(cine), loop=True, useFramerate=False, cropToROI=True
    )
    grey = fast.ColorToGrayscale.create().connect(streamer)
    resized = fast.ImageResizer.create(size[1], size[0]).connect(grey)
    n = streamer.getNrOfFrames()
    means, stds = [], []
    for k, image in enumerate(fast.DataStream(resized), 1):
        a = np.asarray(image, dtype=np.float32) / 255.0
        means.append(float(a.mean()))
        stds.append(float(a.std()))
        if k >= n:
            break
    streamer.stop()
    return float(np.mean(means)), float(np.mean(stds)), n


def fast_worker(
    cine: Path, model: Path, engine: str, frames: int, warmup: int, size: tuple[int, int]
) -> dict[str, Any]:
    """Time FAST's streamer -> grey -> segmentation on ``frames`` frames after ``warmup``."""
    import importlib.metadata

    import fast
    import numpy as np

    mean, std, cine_frames = _fast_cine_stats(fast, cine, size)
    t_load = time.perf_counter()
    streamer = fast.DICOMMultiFrameStreamer.create(
        str(cine), loop=True, useFramerate=False, cropToROI=True
    )
    streamer.setStreamingMode(fast.StreamingMode_ProcessAllFrames)
    grey = fast.ColorToGrayscale.create().connect(streamer)
    seg = fast.SegmentationNetwork.create(
        str(model), scaleFactor=1.0 / 255.0, threshold=-1e30, inferenceEngine=engine
    )
    seg.setMeanAndStandardDeviation(mean, std)
    seg.setResizeBackToOriginalSize(True)
    seg.connect(grey)
    used = seg.getInferenceEngine().getName()

    total = warmup + frames
    crcs: list[int] = []
    shape: tuple[int, ...] = ()
    t0 = first = 0.0
    threads = 0
    for k, image in enumerate(fast.DataStream(seg), 1):
        labels = np.asarray(image)
        crcs.append(zlib.crc32(labels))
        if k == 1:
            first = time.perf_counter() - t_load
            shape = labels.shape
        if k == warmup:
            threads = len(os.listdir("/proc/self/task"))
            t0 = time.perf_counter()
        if k >= total:
            break
    wall = time.perf_counter() - t0
    streamer.stop()
    # The cine loops, so without dropped or repeated frames the labels repeat with its period.
    period_ok = (
        all(crcs[i] == crcs[i + cine_frames] for i in range(len(crcs) - cine_frames))
        if len(crcs) > cine_frames
        else None
    )
    return {
        "engine": used,
        "model": model.name,
        "frames": len(crcs) - warmup,
        "wall_s": wall,
        "first_frame_s": first,
        "label_shape": list(shape),
        "cine_frames": cine_frames,
        "period_ok": period_ok,
        "threads": threads,
        "mean": mean,
        "std": std,
        "fast_version": importlib.metadata.version("pyfast"),
        "engines_available": [
            e
            for e in fast.InferenceEngineManager.getEngineList()
            if fast.InferenceEngineManager.isEngineAvailable(e)
        ],
    }


def fast_python(requested: str) -> str | None:
    """The interpreter to run FAST with: this one if it imports ``fast``, else ``requested``."""
    if importlib.util.find_spec("fast") is not None:
        return sys.executable
    return requested if Path(requested).exists() else None


def run_fast(
    python: str,
    cine: Path,
    model: Path,
    engine: str,
    frames: int,
    warmup: int,
    size: tuple[int, int],
    cpus: int,
) -> dict[str, Any]:
    """Run :func:`fast_worker` in a fresh ``python`` process; the result or ``{"error": ...}``."""
    cmd = [
        python,
        str(Path(__file__).resolve()),
        "--fast-worker",
        "--cine",
        str(cine),
        "--model",
        str(model),
        "--engines",
        engine,
        "--frames",
        str(frames),
        "--warmup",
        str(warmup),
        "--input-size",
        str(size[0]),
        str(size[1]),
    ]
    env = dict(os.environ, POCL_MAX_PTHREAD_COUNT=str(cpus))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_TAG):
            return json.loads(line[len(RESULT_TAG) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {
        "engine": engine,
        "model": model.name,
        "error": " / ".join(tail) or f"rc {proc.returncode}",
    }


# -- usguide side ----------------------------------------------------------------------------------
def _cycle_frames(cine: Path) -> Iterator[Any]:
    from usguide.sources import open_source

    while True:
        n = 0
        with open_source(cine) as source:
            for frame in source:
                n += 1
                yield frame
        if n == 0:
            raise RuntimeError(f"{cine} gave no frames")


def usguide_pipeline_fps(cine: Path, frames: int, model: Path, warmup: int = 30) -> dict:
    """Frames per second of usguide's whole pipeline (decode, segment, needle, guidance, overlay).

    Parameters
    ----------
    cine : Path
        Any source ``usguide.sources.open_source`` reads; cycled until enough frames went through.
    frames : int
        Frames timed.
    model : Path
        ONNX model given to ``Pipeline(model=model)``.
    warmup : int
        Untimed frames before the timed ones.

    Returns
    -------
    dict
        ``frames``, ``wall_s``, ``fps``, ``ms_per_frame``, and ``stage_ms``: mean ms per frame
        of reading the source (timed frames) and of each pipeline stage (``Pipeline.timings``).

    Raises
    ------
    ImportError
        When ``usguide.pipeline`` is not available.
    """
    from usguide.pipeline import Pipeline, run_playback

    pipeline = Pipeline(model=model)
    source = _cycle_frames(cine)
    decode = 0.0

    def timed(n: int) -> Iterator[Any]:
        nonlocal decode
        for _ in range(n):
            t = time.perf_counter()
            frame = next(source)
            decode += time.perf_counter() - t
            yield frame

    try:
        run_playback(pipeline, timed(warmup), [])
        pipeline.timings = type(pipeline.timings)()
        decode = 0.0
        summary = run_playback(pipeline, timed(frames), [])  # reads and segments ahead
        wall = summary.wall_s
    finally:
        source.close()
    stages = {"decode": 1000 * decode / frames}
    stages.update({k: v["mean_ms"] for k, v in summary.timings.items()})
    return {
        "frames": frames,
        "wall_s": wall,
        "fps": frames / wall,
        "ms_per_frame": 1000 * wall / frames,
        "stage_ms": stages,
        "engine": pipeline.segmenter.engine,
    }


def model_input_size(model: Path) -> tuple[int, int]:
    """The network's ``(H, W)`` from the model folder's metadata.json (256 x 256 if absent)."""
    meta = model.with_name("metadata.json")
    if meta.exists():
        h, w = json.loads(meta.read_text())["input_size"]
        return int(h), int(w)
    return 256, 256


# -- report ----------------------------------------------------------------------------------------
def _row(name: str, model: str, frames: int, wall: float) -> str:
    fps = frames / wall
    return f"| {name} | {model} | {frames} | {wall:.2f} | {fps:.1f} | {1000 / fps:.2f} |"


def _period_note(checks: list[bool | None]) -> str:
    if any(c is None for c in checks):
        return "not checked (run shorter than one loop of the cine)"
    return "yes" if all(checks) else "NO (labels did not repeat with the cine's period)"


def _pin(cpus: int) -> list[int]:
    """Pin this process (and so its children) to the first ``cpus`` CPUs it may use."""
    allowed = sorted(os.sched_getaffinity(0))[:cpus]
    os.sched_setaffinity(0, allowed)
    return allowed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cine", type=Path, default=DEFAULT_CINE)
    parser.add_argument("--frames", type=int, default=1200, help="timed frames per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed frames before timing")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument(
        "--fast-models",
        type=Path,
        nargs="*",
        default=None,
        help="model files for FAST (default: --model and its model_fp32.onnx sibling)",
    )
    parser.add_argument("--engines", nargs="+", default=["ONNXRuntime", "OpenVINO"])
    parser.add_argument("--fast-python", default=DEFAULT_FAST_PYTHON)
    parser.add_argument("--cpus", type=int, default=2, help="CPUs both sides are pinned to")
    parser.add_argument("--input-size", type=int, nargs=2, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=3, help="runs per row; the best is shown")
    parser.add_argument("--skip-usguide", action="store_true")
    parser.add_argument("--fast-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    cine, model = args.cine.resolve(), args.model.resolve()
    size = tuple(args.input_size or model_input_size(model))

    if args.fast_worker:
        result = fast_worker(cine, model, args.engines[0], args.frames, args.warmup, size)
        print(RESULT_TAG + json.dumps(result), flush=True)
        return

    cpus = _pin(args.cpus)
    fast_models = args.fast_models
    if fast_models is None:
        fp32 = model.with_name("model_fp32.onnx")
        fast_models = [model] + ([fp32] if fp32.exists() and fp32 != model else [])
    configs = [(engine, path.resolve()) for engine in args.engines for path in fast_models]

    python = fast_python(args.fast_python)
    if python is None:
        print(f"FAST: pyfast not importable here and {args.fast_python} not found")
        configs = []
    usguide_ok = not args.skip_usguide
    # Round robin over the repeats, so a slow spell on the machine does not hit one row only.
    fast_runs: dict[tuple[str, Path], list[dict[str, Any]]] = {c: [] for c in configs}
    usguide_runs: list[dict] = []
    for _ in range(args.repeats):
        for engine, path in configs:
            fast_runs[(engine, path)].append(
                run_fast(python, cine, path, engine, args.frames, args.warmup, size, len(cpus))
            )
        if usguide_ok:
            try:
                usguide_runs.append(usguide_pipeline_fps(cine, args.frames, model, args.warmup))
            except ImportError as exc:
                print(f"usguide pipeline: not available yet ({exc})")
                usguide_ok = False
            except Exception as exc:  # noqa: BLE001 - a half-built pipeline must not lose FAST's table
                print(f"usguide pipeline: failed ({type(exc).__name__}: {exc})")
                usguide_ok = False

    print(
        f"# usguide vs FAST: {cine.name}, {args.frames} timed frames after {args.warmup} warm-up, "
        f"best of {args.repeats} runs, CPUs {cpus} of {os.cpu_count()}"
    )
    ok = [r for runs in fast_runs.values() for r in runs if "error" not in r]
    if ok:
        r0 = ok[0]
        print(
            f"FAST {r0['fast_version']} ({python}); engines available: "
            f"{', '.join(r0['engines_available'])}; cine {r0['cine_frames']} frames looped; "
            f"labels {r0['label_shape']}; fixed normalisation mean {r0['mean']:.4f} "
            f"std {r0['std']:.4f} (FAST has no per-image z-score)"
        )
    print()
    print("| engine | model file | frames | wall s | fps | ms/frame |")
    print("|---|---|---:|---:|---:|---:|")
    best: dict[str, Any] | None = None
    for (engine, path), runs in fast_runs.items():
        good = [r for r in runs if "error" not in r]
        if not good:
            print(f"| FAST {engine} | {path.name} | failed: {runs[0]['error']} | | | |")
            continue
        top = min(good, key=lambda r: r["wall_s"] / r["frames"])
        print(_row(f"FAST {top['engine']}", path.name, top["frames"], top["wall_s"]))
        if best is None or top["wall_s"] / top["frames"] < best["wall_s"] / best["frames"]:
            best = top
    if usguide_runs:
        top_u = min(usguide_runs, key=lambda r: r["wall_s"] / r["frames"])
        name = f"usguide whole pipeline ({top_u['engine']})"
        print(_row(name, model.name, top_u["frames"], top_u["wall_s"]))
        if best is not None:
            ratio = top_u["fps"] / (best["frames"] / best["wall_s"])
            label = f"usguide / best FAST ({best['engine']}, {best['model']})"
            print(f"| {label} | | | | {ratio:.2f}x | |")
    print()
    for (engine, path), runs in fast_runs.items():
        good = [r for r in runs if "error" not in r]
        fps = ", ".join(f"{r['frames'] / r['wall_s']:.1f}" for r in good)
        notes = f"- FAST {engine} {path.name}: fps per run {fps or '-'}"
        if good:
            r = good[0]
            notes += (
                f"; first frame {r['first_frame_s']:.2f} s after building the pipeline; "
                f"{r['threads']} threads in the process; every frame through exactly once: "
                f"{_period_note([g['period_ok'] for g in good])}"
            )
        for r in runs:
            if "error" in r:
                notes += f"; failed run: {r['error']}"
        print(notes)
    if usguide_runs:
        fps = ", ".join(f"{r['fps']:.1f}" for r in usguide_runs)
        top_u = min(usguide_runs, key=lambda r: r["wall_s"] / r["frames"])
        stages = ", ".join(f"{k} {v:.1f}" for k, v in top_u["stage_ms"].items())
        print(
            f"- usguide pipeline {model.name}: fps per run {fps}; best run, mean ms per frame "
            f"of each stage (the two threads overlap): {stages}"
        )


if __name__ == "__main__":
    main()
