"""Fit the needle detector's two confidences (logistic models) on rendered sequences of the
training split, and print the weights for ``NeedleConfig.confidence_weights`` and
``NeedleConfig.shaft_confidence_weights``.

Usage::

    python benchmarks/needle_confidence_fit.py [--model PATH] [--sequences 20] [--frames 60]
                                               [--with-sector [--sector-weight 0.25]]

- Tip confidence: a detection is a positive when the tip is truly visible and the detected tip
  lies within 1 mm of the truth (at the nominal 0.1 mm per pixel); everything else the detector
  returns (no needle, tip out of plane, wrong structure) is a negative.
- Shaft confidence: a positive when a needle is in the image (as ``needle_tracking.py`` counts
  it) and at least half of the detected shaft lies within 1 mm of the drawn needle, tip in plane
  or not; a line on anything else is a negative.

With ``--with-sector`` the same sequences are used twice: as the linear probe recorded them and
as a convex probe would show them (``needle_tracking.py --sector``), so the confidences hold on
both; each convex detection counts ``--sector-weight`` of a linear one in the fit. The shipped
shaft weights were fitted so, with the default 0.25: at equal weight the linear needles lose more
recall than the convex views gain precision (see the model card).

The validation split is never used here: ``benchmarks/needle_tracking.py`` measures on it.
"""

from __future__ import annotations

import argparse

import cv2
import numpy as np
from needle_tracking import needle_in_image, sequences

from usguide.data.needle_render import DEFAULT_SPACING_MM
from usguide.frame import Frame, Region
from usguide.needle import NeedleConfig, NeedleDetection, NeedleDetector, detection_features
from usguide.segment import DEFAULT_MODEL, Segmenter


def logistic_fit(
    x: np.ndarray, y: np.ndarray, weights: np.ndarray, l2: float = 1e-2, steps: int = 50
) -> np.ndarray:
    """Coefficients by Newton's method with a small ridge penalty (not on the bias), each row
    counting ``weights`` of one."""
    w = np.zeros(x.shape[1])
    penalty = np.full(x.shape[1], l2)
    penalty[0] = 0.0
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(x @ w)))
        grad = x.T @ (weights * (p - y)) + penalty * w
        hess = (x * (weights * p * (1 - p))[:, None]).T @ x + np.diag(penalty)
        w -= np.linalg.solve(hess + 1e-9 * np.eye(len(w)), grad)
    return w


def on_needle(detection: NeedleDetection, drawn: np.ndarray, mm_per_px: float) -> bool:
    """At least half of the detected shaft (tip back along its visible length) lies within 1 mm
    of the drawn needle."""
    r = max(1, round(1.0 / mm_per_px))
    near = cv2.dilate(drawn.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    tip, entry = np.array(detection.tip_xy), np.array(detection.entry_xy)
    axis = (tip - entry) / max(float(np.hypot(*(tip - entry))), 1e-9)
    points = tip - np.linspace(0.0, detection.visible_length_px, 40)[:, None] * axis
    x = np.clip(np.round(points[:, 0]).astype(int), 0, near.shape[1] - 1)
    y = np.clip(np.round(points[:, 1]).astype(int), 0, near.shape[0] - 1)
    return bool(near[y, x].mean() >= 0.5)


def report(
    name: str, x: np.ndarray, y: np.ndarray, convex: np.ndarray, sector_weight: float
) -> None:
    w = logistic_fit(x, y, np.where(convex, sector_weight, 1.0))
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    print(f"\n{name}: {len(y)} detections, {int(y.sum())} positives")
    print(f"{name} = (" + ", ".join(f"{v:.3f}" for v in w) + ")")
    views = {"linear": ~convex, "convex": convex} if convex.any() else {"linear": ~convex}
    for threshold in (0.3, 0.5, 0.7, 0.9):
        figures = []
        for view, rows in views.items():
            keep = rows & (p >= threshold)
            precision = (y[keep].sum() / keep.sum()) if keep.any() else float("nan")
            recall = y[keep].sum() / max(y[rows].sum(), 1)
            figures.append(f"{view} precision {precision:.3f}, recall {recall:.3f}")
        print(f"threshold {threshold}: " + "; ".join(figures))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--data", default=None)
    parser.add_argument("--sequences", type=int, default=20, help="per data set")
    parser.add_argument("--frames", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument(
        "--with-sector", action="store_true", help="fit on sector copies of the sequences too"
    )
    parser.add_argument(
        "--sector-weight", type=float, default=0.25,
        help="weight of a convex view's detection in the fit, a linear one's being 1",
    )  # fmt: skip
    args = parser.parse_args()
    if not args.sector_weight > 0:
        parser.error(f"--sector-weight must be positive, got {args.sector_weight}")
    segmenter = Segmenter(args.model)
    detector = NeedleDetector(NeedleConfig())
    mm = DEFAULT_SPACING_MM
    rows, tip_labels, shaft_labels, convex = [], [], [], []
    for sector in (False, True) if args.with_sector else (False,):
        for _, frames, truths, box in sequences(
            args.data, args.sequences, args.frames, args.seed, subset="train", sector=sector
        ):
            segmenter.reset()
            for i, (image, truth) in enumerate(zip(frames, truths, strict=True)):
                frame = Frame(image, i, None, None, Region(box, None, True, "detected"), "fit")
                d = detector(frame, segmenter(frame))
                if d is None:
                    continue
                rows.append(
                    detection_features(
                        d.model_support, d.model_width_mm, d.contrast, d.visible_length_px * mm,
                        d.end_ratio, d.wander_px * mm, d.entry_gap_px * mm, d.surface_share,
                    )
                )  # fmt: skip
                tip_labels.append(
                    truth.tip_visible and np.hypot(*np.subtract(d.tip_xy, truth.tip_xy)) * mm <= 1.0
                )
                shaft_labels.append(needle_in_image(truth) and on_needle(d, truth.mask, mm))
                convex.append(sector)
    x, views = np.array(rows), np.array(convex)
    report("confidence_weights", x, np.array(tip_labels, float), views, args.sector_weight)
    report("shaft_confidence_weights", x, np.array(shaft_labels, float), views, args.sector_weight)


if __name__ == "__main__":
    main()
