"""Tip localisation on needles bent in plane, as thin needles bend in tissue.

Usage::

    python benchmarks/needle_bend.py [--model PATH] [--data DIR] [--radii 0,500,250,150]
                                     [--per-image 4] [--baseline GIT_REV]

The sequences of ``needle_tracking.py`` mostly show 5-15 mm of shaft, over which a bend is too
small to matter. Here each validation image of both data sets (USGRA-Seg nerve-block scans and
DL_Track muscle scans) gets ``--per-image`` long needles (at least 20 mm inside the region, in
plane, the varied look of training), each drawn straight and then bent along circles of each
radius in ``--radii`` (mm, 0 = straight; one side, at random, per needle; the sagitta over a
40 mm chord is 1 mm at R = 200 mm). Every frame goes through the segmentation model and one
still-frame detection (:class:`usguide.needle.NeedleDetector`; a tracker adds nothing on a
single frame). Figures, in mm at the nominal 0.1 mm per pixel: the share of needles found
(``shaft_confidence >= min_confidence``); the tip error of those found (median, p90, share
further than 2 mm); the share whose tip is shown (``confidence >= min_confidence``, what the
tracker would report) and, of those, the share further than 2 mm from the tip: a wrong tip
shown. With ``--baseline REV`` the detector of ``usguide/needle.py`` as of that git
revision runs on the same frames and labels, side by side.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import replace

import cv2
import numpy as np
from needle_tracking import needle_module_at

from usguide.data.datasets import DlTrackApo, UsgraSeg, split
from usguide.data.needle_render import (
    DEFAULT_SPACING_MM,
    arc_bend_px,
    random_appearance,
    random_pose,
    render_needle,
)
from usguide.frame import Frame, Region
from usguide.imaging_region import find_imaging_region
from usguide.needle import NeedleDetector
from usguide.segment import DEFAULT_MODEL, Segmenter

WRONG_MM = 2.0
MIN_LENGTH_MM = 20.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=None)
    parser.add_argument("--radii", default="0,500,250,150", help="mm, comma-separated; 0 straight")
    parser.add_argument("--per-image", type=int, default=4)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--baseline", default=None, help="git revision run alongside")
    args = parser.parse_args()
    radii = [float(r) for r in args.radii.split(",")]
    cv2.setNumThreads(2)
    segmenter = Segmenter(args.model)
    detectors = {"current": NeedleDetector()}
    if args.baseline:
        detectors[args.baseline] = needle_module_at(args.baseline).NeedleDetector()
    # (detector, radius) -> per needle: found, tip shown, tip error in mm (nan when not found).
    results: dict[tuple[str, float], list[tuple[bool, bool, float]]] = {
        (name, r): [] for name in detectors for r in radii
    }
    sagittas: dict[float, list[float]] = {r: [] for r in radii}
    rng = np.random.default_rng(args.seed)
    for dataset in (UsgraSeg(args.data), DlTrackApo(args.data)):
        _, val = split(dataset, val_fraction=0.2, seed=0)
        for i in val:
            image = dataset[int(i)].image
            grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
            box = find_imaging_region(grey) or (0, 0, grey.shape[1] - 1, grey.shape[0] - 1)
            region = Region(box, None, True, "detected")
            for _ in range(args.per_image):
                pose = random_pose(
                    grey.shape, rng, region=box, p_out_of_plane=0.0, min_length_mm=MIN_LENGTH_MM
                )
                look = random_appearance(rng)
                side = float(rng.choice((-1.0, 1.0)))
                texture = int(rng.integers(1 << 31))
                for radius in radii:
                    curvature = side / radius if radius > 0 else 0.0
                    bend_px = arc_bend_px(pose.length_px, curvature, DEFAULT_SPACING_MM)
                    sagittas[radius].append(abs(bend_px) * DEFAULT_SPACING_MM)
                    drawn = render_needle(
                        grey,
                        replace(pose, bend_px=bend_px),
                        rng=np.random.default_rng(texture),
                        region=box,
                        **look,
                    )
                    frame = Frame(drawn.image, 0, 0.0, None, region, "bend")
                    labels = segmenter(frame).copy()
                    for name, detector in detectors.items():
                        detector.reset()  # each frame's RANSAC draws, whatever ran before
                        found = detector(frame, labels)
                        least = detector.config.min_confidence
                        if found is None or found.shaft_confidence < least:
                            results[(name, radius)].append((False, False, math.nan))
                            continue
                        error_px = math.dist(found.tip_xy, drawn.tip_xy)
                        shown = found.confidence >= least
                        results[(name, radius)].append((True, shown, error_px * DEFAULT_SPACING_MM))

    n = len(sagittas[radii[0]])
    print(
        f"# bent needles: {n} needles of >= {MIN_LENGTH_MM:g} mm on validation images, "
        f"one still frame each; mm at the nominal {DEFAULT_SPACING_MM} mm per pixel\n"
    )
    print(
        "| detector | bend radius | sagitta (median / max) | found | tip error median | p90 "
        f"| > {WRONG_MM:g} mm | tip shown | shown, > {WRONG_MM:g} mm |"
    )
    print("|---|---|---|---:|---:|---:|---:|---:|---:|")
    for name in detectors:
        for radius in radii:
            rows = results[(name, radius)]
            found = np.array([f for f, _, _ in rows])
            errors = np.array([e for f, _, e in rows if f])
            shown = np.array([e for f, t, e in rows if f and t])
            s = np.array(sagittas[radius])
            label = "straight" if radius <= 0 else f"{radius:g} mm"
            print(
                f"| {name} | {label} | {np.median(s):.2f} / {s.max():.2f} mm "
                f"| {found.mean():.3f} | {np.median(errors):.2f} mm "
                f"| {np.percentile(errors, 90):.2f} mm | {np.mean(errors > WRONG_MM):.3f} "
                f"| {len(shown) / len(rows):.3f} | {np.mean(shown > WRONG_MM):.3f} |"
            )


if __name__ == "__main__":
    main()
