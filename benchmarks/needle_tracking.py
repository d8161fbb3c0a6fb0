"""Needle tip localisation and tracking against exact ground truth, and its cost per frame.

Usage::

    python benchmarks/needle_tracking.py [--model PATH] [--data DIR] [--sequences 32] [--frames 80]
                                         [--sector | --phantom] [--bend-radius-mm R]
                                         [--baseline GIT_REV]

Sequences: a needle rendered (``usguide.data.needle_render.needle_sequence``) onto real frames of
the validation split of both data sets (USGRA-Seg nerve-block scans and DL_Track muscle scans),
with simulated probe motion; the needle advances, pauses, withdraws, pivots, drifts partly out
of plane and is absent for stretches. Each frame goes through the shipped segmentation model,
then :class:`usguide.needle.NeedleStage`. With ``--sector`` the same sequences are shown as a
curvilinear probe shows them (the frames of both data sets come from linear probes): the
imaging region is shown in a fan (:func:`usguide.data.augment.sector_view`: the probe's face
indents the skin, so the skin line follows the fan's near arc, deeper tissue keeps its shape,
and beside the fan is black), the needle is drawn straight, as a convex probe displays it, and
the truth is cut to the fan. With ``--bend-radius-mm R`` every needle bends in plane, as thin
needles do in tissue (each insertion a curvature from straight to 1/R, either way; R = 200 mm
bends a 40 mm shaft 1 mm from its chord). With ``--phantom`` the needles move over simulated
gel phantoms instead of the scans (:func:`gel_phantom`: homogeneous speckle, no anatomy), the
background of bench tests and of many needle-tracking papers: how the stage does where no
fascia or vessel wall can be mistaken for the shaft.

Figures:

- tip error (median, 95th percentile) and shaft angle error over frames where the tip is truly
  visible and reported visible, in mm at the nominal 0.1 mm per pixel (these PNG data sets carry
  no calibration; a Mindray L14-6Ns at ~5 cm depth over ~500 rows is about 0.1 mm per pixel);
- needle in the image vs absent (the issue's "needle present vs absent"): recall and precision of
  ``shaft_visible`` against frames where at least ``MIN_DRAWN_MM`` of shaft is drawn (less is a
  speck no one could call a needle; such frames count as absent);
- tip visible vs not, the stricter figure: recall and precision of ``visible`` against the
  truth's ``tip_visible`` (a needle whose tip has left the plane must not show a tip);
- needle-in-image recall by insertion angle, by how far the drawn shaft stands above the tissue
  just above it (grey levels; steep and out-of-plane shafts fade) and by kind of scan (frames
  in brackets), to show where the misses are;
- shaft angle error p95 by drawn shaft length (frames in brackets): a few mm of shaft fix its
  angle poorly;
- frames to pick the tip up again after it was invisible for at least 3 frames;
- real scans without a needle: every cine, video and still of the mirror's ``lung-videos``,
  ``dicom-us`` and ``screen-captures`` (convex, phased-array and linear probes, several
  scanners; none shows a needle) through the same model and stage: frames reported with a
  needle, and with a visible tip. Every one is a false alarm on real pixels;
- cost of detection and tracking per 640 x 480 frame (segmentation excluded), 2 threads. With
  ``--baseline REV``, ``usguide/needle.py`` as of that git revision is timed on the same frames
  in the same run, rounds alternating, and the ratio is reported.
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import time
import types
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
from machine import machine_line

from usguide.data.augment import sector_view
from usguide.data.datasets import DlTrackApo, UsgraSeg, data_root, split
from usguide.data.needle_render import DEFAULT_SPACING_MM, NeedleTruth, needle_sequence
from usguide.evaluate import bootstrap_ci
from usguide.frame import Frame, Region
from usguide.imaging_region import find_imaging_region
from usguide.needle import NeedleStage
from usguide.segment import DEFAULT_MODEL, Segmenter
from usguide.sources import open_source

REPO = Path(__file__).resolve().parents[1]
WRONG_MM = 2.0  # a reported tip further than this from the truth is on the wrong structure
MIN_DRAWN_MM = 2.5  # shortest drawn shaft that counts as a needle in the image
ANGLE_BINS = {"< 15 deg": (0.0, 15.0), "15-50 deg": (15.0, 50.0), ">= 50 deg": (50.0, 90.0)}
# How far the drawn shaft stands above the tissue just above it, grey levels (see shaft_contrast).
CONTRAST_BINS = {"< 30": (-math.inf, 30.0), "30-80": (30.0, 80.0), ">= 80": (80.0, math.inf)}
# Rows above the shaft where shaft_contrast takes the tissue's level (0.6 mm at 0.1 mm/px).
ABOVE_PX = 6
SCANS = {"UsgraSeg": "nerve-block scans", "DlTrackApo": "muscle scans", "Phantom": "gel phantoms"}
# Real recordings in the data mirror that show no needle.
NO_NEEDLE = {"lung-videos": "*.mp4", "dicom-us": "*.dcm", "screen-captures": "*.png"}
DRAWN_BINS = {"< 5 mm": (0.0, 5.0), "5-10 mm": (5.0, 10.0), ">= 10 mm": (10.0, math.inf)}


def sequences(
    root: str | None,
    n_per_set: int,
    n_frames: int,
    seed: int,
    subset: str = "validation",
    sector: bool = False,
    bend_radius_mm: float | None = None,
    phantom: bool = False,
):
    """(name, frames, truths, region) per sequence, from images of one split of both sets.

    Every image of the split is used once before any is used again (with another needle). With
    ``sector``, the region's tissue is shown in a fan, and nothing beside the fan is imaged (the
    same needles otherwise). ``bend_radius_mm`` bends the needles in plane (see
    :func:`~usguide.data.needle_render.needle_sequence`). With ``phantom``, twice
    ``n_per_set`` sequences on :func:`gel_phantom` backgrounds instead (no scan is read)."""
    rng = np.random.default_rng(seed)
    if phantom:
        for k in range(2 * n_per_set):
            scan = gel_phantom(rng)
            box = (0, 0, scan.shape[1] - 1, scan.shape[0] - 1)
            frames, truths = [], []
            for image, truth in needle_sequence(
                scan, n_frames, rng, region=box, bend_radius_mm=bend_radius_mm
            ):
                frames.append(image)
                truths.append(truth)
            yield f"Phantom/{k}", frames, truths, box
        return
    for dataset in (UsgraSeg(root), DlTrackApo(root)):
        train, val = split(dataset, val_fraction=0.2, seed=0)
        pool = val if subset == "validation" else train
        picks: list[int] = []
        while len(picks) < n_per_set:
            size = min(n_per_set - len(picks), len(pool))
            picks.extend(rng.choice(len(pool), size=size, replace=False).tolist())
        for k in picks:
            sample = dataset[int(pool[int(k)])]
            box = find_imaging_region(sample.image) or (
                0, 0, sample.image.shape[1] - 1, sample.image.shape[0] - 1
            )  # fmt: skip
            scan, imaged = sample.image, None
            if sector:
                grey = scan if scan.ndim == 2 else cv2.cvtColor(scan, cv2.COLOR_RGB2GRAY)
                scan, _, imaged = sector_view(grey, np.zeros_like(grey), box)
            frames, truths = [], []
            for image, truth in needle_sequence(
                scan, n_frames, rng, region=box, bend_radius_mm=bend_radius_mm
            ):
                if imaged is not None:
                    image = image * imaged  # a needle is imaged only inside the fan
                    truth = truth.within(imaged)
                frames.append(image)
                truths.append(truth)
            yield f"{dataset.__class__.__name__}/{sample.name}", frames, truths, box


def gel_phantom(rng: np.random.Generator, shape: tuple[int, int] = (480, 640)) -> np.ndarray:
    """A B-mode image of a homogeneous gel phantom at the nominal 0.1 mm per pixel: fully
    developed speckle (the envelope of complex Gaussian scatterers blurred by a beam about
    0.6 mm wide and 0.25 mm long), attenuated with depth and log-compressed to a 45-60 dB
    dynamic range, at a random overall gain."""
    height = shape[0]
    field = [
        cv2.GaussianBlur(rng.standard_normal(shape), (0, 0), sigmaX=2.5, sigmaY=1.0)
        for _ in range(2)
    ]
    envelope = np.hypot(*field)
    depth_cm = np.arange(height)[:, None] * DEFAULT_SPACING_MM / 10.0
    envelope *= 10.0 ** (-rng.uniform(0.5, 1.5) * depth_cm / 20.0)  # dB per cm, after TGC
    decibels = 20.0 * np.log10(envelope / envelope.max() + 1e-9)
    dynamic_range = rng.uniform(45.0, 60.0)
    level = np.clip(1.0 + decibels / dynamic_range, 0.0, 1.0) * rng.uniform(0.45, 0.8)
    return np.round(255.0 * level).astype(np.uint8)


def drawn_mm(truth: NeedleTruth) -> float:
    """Length of shaft drawn in the frame, mm at the nominal spacing."""
    if truth.pose is None:
        return 0.0
    return float(truth.mask.sum()) / truth.pose.width_px * DEFAULT_SPACING_MM


def needle_in_image(truth: NeedleTruth) -> bool:
    """At least ``MIN_DRAWN_MM`` of shaft is drawn."""
    return drawn_mm(truth) >= MIN_DRAWN_MM


def run(
    model: str,
    root: str | None,
    n_per_set: int,
    n_frames: int,
    seed: int,
    sector: bool = False,
    bend_radius_mm: float | None = None,
    phantom: bool = False,
) -> dict:
    segmenter = Segmenter(model)
    stage = NeedleStage()
    tip_err, angle_err, reacquire = [], [], []
    angle_err_by: dict[str, list[float]] = {k: [] for k in DRAWN_BINS}
    tp = fp = fn = tn = wrong = 0
    present_tp = present_fp = present_fn = 0
    # Needle-in-image frames and those found, by insertion angle and by kind of scan.
    found_by: dict[str, list[int]] = {
        k: [0, 0] for k in (*ANGLE_BINS, *SCANS.values(), *CONTRAST_BINS)
    }
    misses = 0
    # Per frame, with its scan's name: the intervals resample whole scans (the frames of one
    # sequence, and sequences drawn on the same image, are not independent).
    found, found_scan, right, right_scan = [], [], [], []
    for name, frames, truths, box in sequences(
        root,
        n_per_set,
        n_frames,
        seed,
        sector=sector,
        bend_radius_mm=bend_radius_mm,
        phantom=phantom,
    ):
        scan = SCANS[name.split("/")[0]]
        segmenter.reset()
        stage.reset()
        invisible_run, waiting_since = 0, None
        for i, (image, truth) in enumerate(zip(frames, truths, strict=True)):
            frame = Frame(image, i, i / 20.0, None, Region(box, None, True, "detected"), "bench")
            state = stage(frame, segmenter(frame))
            in_image = needle_in_image(truth)
            present_tp += in_image and state.shaft_visible
            present_fn += in_image and not state.shaft_visible
            present_fp += state.shaft_visible and not in_image
            if in_image:
                found.append(state.shaft_visible)
                found_scan.append(name)
            if state.shaft_visible:
                right.append(in_image)
                right_scan.append(name)
            if in_image and truth.angle_deg is not None:
                contrast = shaft_contrast(image, truth.mask)
                keys = [_bin(ANGLE_BINS, truth.angle_deg), scan]
                if contrast is not None:
                    keys.append(_bin(CONTRAST_BINS, contrast))
                for key in keys:
                    found_by[key][0] += 1
                    found_by[key][1] += state.shaft_visible
            err = None
            if state.visible and truth.tip_visible:
                err = float(np.hypot(*np.subtract(state.tip_xy, truth.tip_xy)))
            if truth.tip_visible:
                if waiting_since is None and invisible_run >= 3:
                    waiting_since = i
                invisible_run = 0
            else:
                invisible_run += 1
                if waiting_since is not None:
                    misses += 1  # the tip went away again before it was picked up
                    waiting_since = None
            if (
                waiting_since is not None
                and err is not None
                and err * DEFAULT_SPACING_MM <= WRONG_MM
            ):
                reacquire.append(i - waiting_since)
                waiting_since = None
            if truth.tip_visible and state.visible:
                tp += 1
                assert (
                    err is not None and truth.angle_deg is not None and state.angle_deg is not None
                )
                tip_err.append(err * DEFAULT_SPACING_MM)
                angle_err.append(abs(state.angle_deg - truth.angle_deg))
                length = drawn_mm(truth)
                for key, (lo, hi) in DRAWN_BINS.items():
                    if lo <= length < hi:
                        angle_err_by[key].append(angle_err[-1])
                wrong += err * DEFAULT_SPACING_MM > WRONG_MM
            elif truth.tip_visible:
                fn += 1
            elif state.visible:
                fp += 1
            else:
                tn += 1
        if waiting_since is not None:
            misses += 1  # the sequence ended with the tip back and not picked up
    e, a = np.array(tip_err), np.array(angle_err)
    return {
        "frames": tp + fp + fn + tn,
        "tip_visible_frames": tp + fn,
        "median_mm": float(np.median(e)) if e.size else float("nan"),
        "p95_mm": float(np.percentile(e, 95)) if e.size else float("nan"),
        "angle_median_deg": float(np.median(a)) if a.size else float("nan"),
        "angle_mean_deg": float(np.mean(a)) if a.size else float("nan"),
        "angle_p95_deg": float(np.percentile(a, 95)) if a.size else float("nan"),
        "wrong_structure": wrong / max(tp, 1),
        "present_recall": present_tp / max(present_tp + present_fn, 1),
        "present_precision": present_tp / max(present_tp + present_fp, 1),
        "present_recall_ci": bootstrap_ci(found, groups=found_scan),
        "present_precision_ci": bootstrap_ci(right, groups=right_scan),
        "recall": tp / max(tp + fn, 1),
        "precision": tp / max(tp + fp, 1),
        "reacquire_median": float(np.median(reacquire)) if reacquire else float("nan"),
        "reacquire_p90": float(np.percentile(reacquire, 90)) if reacquire else float("nan"),
        "reacquire_events": len(reacquire) + misses,
        "reacquire_missed": misses,
        "present_recall_by": {k: f / max(n, 1) for k, (n, f) in found_by.items()},
        "present_frames_by": {k: n for k, (n, _) in found_by.items()},
        "angle_p95_by": {
            k: float(np.percentile(v, 95)) if v else float("nan") for k, v in angle_err_by.items()
        },
        "angle_frames_by": {k: len(v) for k, v in angle_err_by.items()},
    }


def false_alarms(model: str, root: str | None) -> dict[str, int]:
    """Frames of real recordings without a needle reported with a needle (``shaft_visible``) and
    with a visible tip, over all of them; each recording is its own sequence."""
    seg = Segmenter(model)
    stage = NeedleStage()
    out = {"recordings": 0, "frames": 0, "needle": 0, "tip": 0}
    mirror = data_root(root)
    for folder, pattern in NO_NEEDLE.items():
        for path in sorted((mirror / folder).glob(pattern)):
            seg.reset()
            stage.reset()
            with open_source(path) as source:
                for frame in source:
                    state = stage(frame, seg(frame))
                    out["frames"] += 1
                    out["needle"] += state.shaft_visible
                    out["tip"] += state.visible
            out["recordings"] += 1
    return out


def _bin(bins: dict[str, tuple[float, float]], value: float) -> str:
    for key, (lo, hi) in bins.items():
        if lo <= value < hi:
            return key
    return next(reversed(bins))


def shaft_contrast(image: np.ndarray, mask: np.ndarray) -> float | None:
    """Mean grey level of the drawn shaft less that of the tissue ``ABOVE_PX`` rows above it
    (not below: the shaft's shadow and reverberations lie there); None when no tissue lies
    above it in the frame (such a frame is left out of the contrast breakdown)."""
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    above = np.zeros_like(mask)
    above[:-ABOVE_PX] = mask[ABOVE_PX:]
    above &= ~mask
    if not above.any():
        return None
    return float(grey[mask].mean()) - float(grey[above].mean())


def needle_module_at(rev: str) -> types.ModuleType:
    """``usguide/needle.py`` as of git revision ``rev``, loaded beside the current one, for
    measuring both in one run."""
    repo = Path(__file__).resolve().parents[1]
    source = subprocess.run(
        ["git", "show", f"{rev}:usguide/needle.py"],
        cwd=repo, check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType(f"needle_at_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{rev}:usguide/needle.py", "exec"), module.__dict__)
    return module


def baseline_stage(rev: str) -> Callable[[], NeedleStage]:
    """``NeedleStage`` as of git revision ``rev``."""
    return needle_module_at(rev).NeedleStage


def cost(
    model: str,
    root: str | None,
    n_frames: int,
    seed: int,
    stages: dict[str, Callable[[], NeedleStage]],
    rounds: int = 3,
) -> dict[str, dict[str, float]]:
    """ms per 640 x 480 frame for detection + tracking, labels computed beforehand, for each of
    ``stages`` on the same frames, rounds alternating between them."""
    sample = UsgraSeg(root)[0]
    image = cv2.resize(sample.image, (640, 480), interpolation=cv2.INTER_AREA)
    box = find_imaging_region(image) or (0, 0, 639, 479)
    rng = np.random.default_rng(seed)
    segmenter = Segmenter(model)
    frames = []
    for i, (img, _) in enumerate(needle_sequence(image, n_frames, rng, region=box)):
        frame = Frame(img, i, i / 20.0, None, Region(box, None, True, "detected"), "bench")
        frames.append((frame, segmenter(frame).copy()))
    times: dict[str, list[float]] = {name: [] for name in stages}
    for _ in range(rounds):
        for name, make in stages.items():
            stage = make()
            for frame, labels in frames[:10]:
                stage(frame, labels)
            stage.reset()
            for frame, labels in frames:
                t0 = time.perf_counter()
                stage(frame, labels)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return {
        name: {
            "median": float(np.median(t)),
            "p95": float(np.percentile(t, 95)),
            "p99": float(np.percentile(t, 99)),
        }
        for name, t in times.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=None)
    parser.add_argument("--sequences", type=int, default=32, help="per data set")
    parser.add_argument("--frames", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--sector", action="store_true", help="show the sequences as a curvilinear probe would"
    )
    parser.add_argument(
        "--phantom",
        action="store_true",
        help="move the needles over simulated gel phantoms instead of the scans",
    )
    parser.add_argument(
        "--bend-radius-mm",
        type=float,
        default=None,
        help="bend every needle in plane, with radii down to this (none: straight needles)",
    )
    parser.add_argument(
        "--baseline", default=None, help="git revision whose needle stage is timed alongside"
    )
    args = parser.parse_args()
    if args.sector and args.phantom:
        parser.error("--sector and --phantom: choose one")
    cv2.setNumThreads(2)
    print(f"# needle tracking: {machine_line()}")
    print(
        f"model: {args.model}; {args.sequences} sequences per data set x {args.frames} frames; "
        f"mm at the nominal {DEFAULT_SPACING_MM} mm per pixel"
        + ("; shown as a curvilinear probe's sector" if args.sector else "")
        + ("; on simulated gel phantoms, not the scans" if args.phantom else "")
        + (
            f"; needles bent in plane, radius >= {args.bend_radius_mm:g} mm"
            if args.bend_radius_mm
            else ""
        )
    )
    r = run(
        args.model,
        args.data,
        args.sequences,
        args.frames,
        args.seed,
        args.sector,
        args.bend_radius_mm,
        args.phantom,
    )
    print(f"frames {r['frames']}, tip truly visible in {r['tip_visible_frames']}\n")
    negatives = false_alarms(args.model, args.data)
    stages: dict[str, Callable[[], NeedleStage]] = {"current": NeedleStage}
    if args.baseline:
        stages[args.baseline] = baseline_stage(args.baseline)
    costs = cost(args.model, args.data, 300, args.seed, stages)
    c = costs["current"]
    kinds = [k for k in SCANS.values() if r["present_frames_by"][k]]
    rows = [
        ("median tip error", f"{r['median_mm']:.2f} mm", "<= 0.5 mm"),
        ("95th percentile tip error", f"{r['p95_mm']:.2f} mm", "<= 1.5 mm"),
        (
            "shaft angle error (median / mean / p95)",
            f"{r['angle_median_deg']:.2f} / {r['angle_mean_deg']:.2f} / "
            f"{r['angle_p95_deg']:.2f} deg",
            "<= 2 deg",
        ),
        (
            "shaft angle error p95 by drawn shaft (" + " / ".join(DRAWN_BINS) + ")",
            " / ".join(
                f"{r['angle_p95_by'][k]:.2f} ({r['angle_frames_by'][k]})" for k in DRAWN_BINS
            )
            + " deg",
            "report",
        ),
        (
            f"needle in the image (>= {MIN_DRAWN_MM} mm drawn) vs absent: recall / precision",
            f"{r['present_recall']:.3f} / {r['present_precision']:.3f} (95% CI "
            + " / ".join(
                f"{lo:.3f}-{hi:.3f}"
                for lo, hi in (r["present_recall_ci"], r["present_precision_ci"])
            )
            + ")",
            ">= 0.98 / >= 0.98",
        ),
        (
            "needle-in-image recall by angle (" + " / ".join(ANGLE_BINS) + ")",
            " / ".join(
                f"{r['present_recall_by'][k]:.2f} ({r['present_frames_by'][k]})" for k in ANGLE_BINS
            ),
            "report",
        ),
        (
            "needle-in-image recall by the drawn shaft's contrast over the tissue above it ("
            + " / ".join(CONTRAST_BINS)
            + " grey levels)",
            " / ".join(
                f"{r['present_recall_by'][k]:.2f} ({r['present_frames_by'][k]})"
                for k in CONTRAST_BINS
            ),
            "report",
        ),
        (
            "needle-in-image recall by scan (" + " / ".join(kinds) + ")",
            " / ".join(
                f"{r['present_recall_by'][k]:.2f} ({r['present_frames_by'][k]})" for k in kinds
            ),
            "report",
        ),
        (
            "tip visible vs not: recall / precision",
            f"{r['recall']:.3f} / {r['precision']:.3f}",
            "report",
        ),
        (f"visible tips > {WRONG_MM} mm off", f"{100 * r['wrong_structure']:.1f} %", ""),
        (
            f"real scans without a needle ({negatives['recordings']} recordings, "
            f"{negatives['frames']} frames): frames with a needle / with a tip",
            f"{negatives['needle']} / {negatives['tip']}",
            "",
        ),
        (
            "frames to pick the tip up again (median / p90)",
            f"{r['reacquire_median']:.0f} / {r['reacquire_p90']:.0f} "
            f"({r['reacquire_events']} events, {r['reacquire_missed']} not picked up)",
            "report",
        ),
        (
            "detection + tracking, 640 x 480 (median / p95 / p99)",
            f"{c['median']:.2f} / {c['p95']:.2f} / {c['p99']:.2f} ms",
            "<= 3 ms",
        ),
    ]
    print("| figure | measured | target |")
    print("|---|---|---|")
    for name, value, target in rows:
        print(f"| {name} | {value} | {target} |")
    if args.baseline:
        base = costs[args.baseline]
        print("\n| detection + tracking, same frames, rounds alternating | median | p95 | p99 |")
        print("|---|---|---|---|")
        for name, t in costs.items():
            print(f"| {name} | {t['median']:.2f} | {t['p95']:.2f} | {t['p99']:.2f} ms |")
        ratios = " | ".join(f"{c[k] / base[k]:.2f}" for k in ("median", "p95", "p99"))
        print(f"| ratio current / {args.baseline} | {ratios} |")


if __name__ == "__main__":
    main()
