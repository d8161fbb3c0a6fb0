"""Needle detection and tracking: where the shaft lies, where its tip is, and whether it is seen.

Per frame, :class:`NeedleDetector` combines the segmentation model's needle class with the image's
own line evidence:

1. **Candidates**, on a half-size copy of the imaging region: the pixels the model labels needle
   and the brightest thin ridges of the image (a white top-hat keeps bright structures thinner
   than ~2 mm, so thick fascia bands drop out).
2. **Shaft**: RANSAC line through the candidates, model pixels counting more (of its inliers,
   only the heaviest group with no gap over 6 mm along the line: a fleck in line with the needle
   is not its continuation); then a weighted fit to the shaft's centre line at full resolution.
   Each centre is the middle of the shaft's own cross-section (the run above half its maximum),
   so bright tissue beside the shaft does not tilt it, measured on a window symmetric about the
   axis, so the image's edge cutting the shaft does not tilt it either.
   When that line is not a convincing shaft, a second line through the model pixels more than
   1 mm from it is measured too, and the more needle-like of the two is kept (the model can mark
   a longer bright line beside the needle).
   A shaft must be a ridge, brighter than the tissue on both sides: where the image ends beside
   a sector (its straight sides, its arcs) there is a step, which the model may label needle.
3. **Tip**: the intensity profile along the axis, minus the tissue just above the shaft (the
   reverberations are below it). The tip is where the profile falls to half the shaft's level
   near its far end: the half-maximum point, which is also how the needle renderer defines it.
4. **Tip or out-of-plane end**: a real tip ends sharply with a bright bevel; a shaft leaving the
   beam's plane fades out. The ratio of the last 1.5 mm to the shaft before it tells the two
   apart, and a faded end is reported as "tip not visible".
5. **Insertion side**: the shaft is followed back, upward, to where it meets the region's edge.

:class:`NeedleTracker` filters the tip and angle with a constant-velocity Kalman filter. A single
detection far from the track, or on a line at another angle (a bright structure whose end lies
near the tip), is rejected rather than followed (no jump); a new track must be seen
on ``confirm_frames`` consecutive frames; after ``hold_s`` without a detection the tip is reported
not visible instead of a stale position.

Where the model stops marking a shaft it has just marked (a shallow needle among bright
fascicles, a steep one that dims), :class:`NeedleStage` measures the image along the line of the
shaft last reported (:meth:`NeedleDetector.follow`). A shaft found there on the same line, its end
within ``gate_mm`` of the last one, is still reported as a needle, but its tip is not: the tip
rests on the model's evidence.

Millimetres are reported only when the frame is calibrated. Physical thresholds (shortest shaft,
bevel length) use the frame's spacing, or ``NeedleConfig.nominal_spacing_mm`` when it is unknown;
that guess is never reported as a measurement.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import cv2
import numpy as np

from usguide.frame import Frame
from usguide.labels import NEEDLE

Side = Literal["left", "right"]

# Grey level below which a pixel is outside the image (the black corners of a sector's box).
_BLACK = 10
# Shafts whose angles differ by no more than this can be the same needle a frame later.
_SAME_LINE_DEG = 5.0
# The model's needle pixels on one line but further apart than this are separate structures (a
# fleck of fascia in line with the shaft); out-of-plane gaps in one shaft are shorter.
_SHAFT_GAP_MM = 6.0
# Points within this distance of the best RANSAC line are the shaft whose axis is fitted: all of
# a thick shaft (18 G is 1.3 mm) and its blur, not only the thin strip of inliers that chose the
# line, which on a short thick shaft runs along its diagonal.
_SHAFT_HALF_WIDTH_MM = 1.0
# A re-centring of the shaft's axis that moves it less than this anywhere along the band has
# converged (the tip is located to about a pixel).
_AXIS_SETTLED_PX = 0.1
# A thin needle bends in tissue. Its centre line is followed as a parabola fitted on at least
# _MIN_BEND_SPAN_MM of shaft, when the parabola's sagitta from where the shaft enters the image
# to its visible end exceeds _MIN_BEND_MM (below that a straight axis misses the tip by under
# 0.15 mm); more than _MAX_BEND_MM is not a needle's bend, and the straight axis is kept.
_MIN_BEND_MM = 0.2
_MAX_BEND_MM = 3.0
_MIN_BEND_SPAN_MM = 10.0
# Where the search for the tip reaches the end of the model's needle pixels with no fall in the
# profile, and the image's shaft runs on this far past them, at least this part of the shaft's
# level, the tip is not known: the model often stops short of the tip of a long shaft over bright
# tissue. (A true tip falls to half its level before bright tissue in line beyond it begins.)
_RUN_PAST_MODEL_MM = 2.0
_RUN_ON_LEVEL = 0.5
# Depth under the first echo of a column (the skin surface) within which a shaft point counts
# as lying on the surface (see NeedleDetection.surface_share).
_SURFACE_MM = 1.5


@dataclass(frozen=True, slots=True)
class NeedleConfig:
    """Settings of needle detection and tracking.

    Attributes
    ----------
    min_length_mm : float
        Shortest visible shaft taken as a needle.
    min_contrast : float
        Least grey-level excess of the shaft over the tissue just above it.
    max_width_mm : float
        The model's needle pixels across a shaft never span more than this (18 G is 1.27 mm);
        a wider region is not a needle.
    min_confidence : float
        Least confidence acted on: a tip's ``confidence`` to be tracked, a shaft's
        ``shaft_confidence`` to be reported as a needle.
    min_ridge : float
        Least share of a shaft's contrast by which it stands out from the brighter of the two
        sides along it (median over the shaft): a needle is a ridge, the image's edge (a
        sector's straight sides and arcs, which the model may label needle) a step.
    tip_ratio : float
        A shaft end whose last ``bevel_mm`` is dimmer than this fraction of the shaft before it
        is a shaft fading out of plane, not a tip.
    bevel_mm : float
        Length of the tip's end region compared with the shaft for ``tip_ratio``.
    run_fraction : float
        Part of the shaft's level (90th percentile) that counts as shaft evidence along the
        axis; lower keeps the faint, partly out-of-plane end of a shaft.
    beyond_model_mm : float
        How far past the model's needle pixels the shaft may be followed: to its tip, and back
        toward where it enters.
    hold_s : float
        How long the tracker coasts on its prediction before saying "tip not visible".
    shaft_hold_s : float
        How long a shaft reported as a needle vouches for a weaker detection on the same line
        (its tip within ``gate_mm``, its angle within 5 degrees, the same side) whose shaft
        confidence is at least ``shaft_keep_fraction`` of ``min_confidence``, or for the shaft
        the image shows along that line where the model marks none (see
        :meth:`NeedleDetector.follow`): hysteresis, so a shaft that dims, or that the model
        stops marking, is still reported while it stays on its line.
    shaft_keep_fraction : float
        See ``shaft_hold_s``.
    confirm_frames : int
        Consecutive detections needed to start a track.
    gate_mm : float
        A detection further than this from the predicted tip (plus 3 sigma of the filter) is an
        outlier; so is one whose shaft turns more than 5 degrees (plus 3 sigma) from the
        track's.
    reinit_frames : int
        Consecutive outliers that agree with each other (tips within ``gate_mm``, angles
        within 5 degrees) restart the track there.
    min_angle_deg, max_angle_deg : float
        Shaft angles to the probe surface that are searched.
    nominal_spacing_mm : float
        mm per pixel assumed for thresholds when the frame is not calibrated (never reported).
    frame_time_s : float
        Frame interval assumed when frames carry no timestamps (for ``hold_s``).
    ransac_iterations : int
        Line hypotheses tried per frame.
    seed : int
        Seed of the RANSAC sampling: the same frames give the same answers.
    confidence_weights : tuple of float
        Logistic weights of a detection's (tip) confidence over :func:`detection_features`.
    shaft_confidence_weights : tuple of float
        Logistic weights of a detection's shaft confidence over :func:`detection_features`.
    """

    min_length_mm: float = 2.5
    min_contrast: float = 20.0
    max_width_mm: float = 1.6
    min_confidence: float = 0.7
    min_ridge: float = 0.2
    tip_ratio: float = 0.6
    bevel_mm: float = 1.5
    beyond_model_mm: float = 1.0
    run_fraction: float = 0.3
    hold_s: float = 0.1
    shaft_hold_s: float = 0.25
    shaft_keep_fraction: float = 0.5
    confirm_frames: int = 2
    gate_mm: float = 3.0
    reinit_frames: int = 3
    min_angle_deg: float = 3.0
    max_angle_deg: float = 80.0
    nominal_spacing_mm: float = 0.1
    frame_time_s: float = 0.05
    ransac_iterations: int = 192
    seed: int = 0
    # Logistic weights over :func:`detection_features`, fitted on rendered sequences of the
    # training split by ``benchmarks/needle_confidence_fit.py`` (for model 1.4.0; the surface
    # share, added later, has no weight here).
    confidence_weights: tuple[float, ...] = (
        -16.459, 7.580, 0.881, 2.255, 0.685, 7.186, -7.149, -3.366, 0.0,
    )  # fmt: skip
    # The same fit for "this line is the needle's shaft", tip in plane or not, on linear and
    # convex views (``--with-sector``, a convex detection weighing 0.25), for model 1.5.0
    # (kept for 1.6.0: with them it finds as many needles and reports fewer false ones).
    shaft_confidence_weights: tuple[float, ...] = (
        -9.784, 4.688, 3.716, 2.248, -0.614, 3.669, -5.041, -3.494, -2.541,
    )  # fmt: skip

    def __post_init__(self) -> None:
        for name in ("confidence_weights", "shaft_confidence_weights"):
            weights = getattr(self, name)
            if len(weights) != N_DETECTION_FEATURES:
                raise ValueError(
                    f"{name}: expected {N_DETECTION_FEATURES} weights, one per detection "
                    f"feature (see detection_features), got {len(weights)}"
                )


@dataclass(frozen=True, slots=True)
class NeedleDetection:
    """The needle found in one frame, before tracking. Coordinates are frame pixels.

    Attributes
    ----------
    tip_xy : (float, float)
        Far end of the visible shaft (the tip when ``tip_in_plane``).
    entry_xy : (float, float)
        Where the shaft's axis meets the imaging region's edge on the insertion side.
    angle_deg : float
        Angle between shaft and probe surface (the region's top edge), degrees.
    side : "left" or "right"
        Side the needle comes from.
    visible_length_px : float
        Length of shaft with needle evidence, up to the tip (not bright tissue in line beyond
        it), pixels.
    contrast : float
        Grey-level excess of the shaft over the tissue above it.
    end_ratio : float
        Brightness of the last ``bevel_mm`` relative to the shaft before it.
    model_support : float
        Fraction of the visible shaft the segmentation model labels needle (0 to 1).
    model_width_mm : float
        Mean width of the model's needle pixels across the shaft, mm (at the nominal spacing
        when uncalibrated).
    wander_px : float
        RMS distance of the shaft's centre line from the fitted axis, pixels: a needle is
        straight, or bends smoothly (the axis is then the fitted parabola), and fascia waves.
    entry_gap_px : float
        Distance along the axis from where the image begins (the region's edge, or the first
        non-black pixel of a sector image) to where the visible shaft begins, pixels. A needle
        enters from the skin; a bright line that starts deep in the tissue is more likely
        fascia.
    surface_share : float
        Share of the visible shaft that lies within ``_SURFACE_MM`` under the first echo of its
        column (the skin, or a convex probe's near arc): a needle goes down into tissue, and a
        bright line that runs along where the image begins is the skin surface.
    tip_in_plane : bool
        The shaft ends in a tip, not by fading out of the imaging plane.
    confidence : float
        0 to 1: how likely ``tip_xy`` is the needle's tip (within 1 mm); 0 where the shaft runs
        on in the image, as bright, past the model's needle pixels (the tip is not known).
    shaft_confidence : float
        0 to 1: how likely the line is a needle's shaft, whether or not its tip is in plane
        (the needle-present answer; a shaft fading out of plane has a low ``confidence``).
    """

    tip_xy: tuple[float, float]
    entry_xy: tuple[float, float]
    angle_deg: float
    side: Side
    visible_length_px: float
    contrast: float
    end_ratio: float
    model_support: float
    model_width_mm: float
    wander_px: float
    entry_gap_px: float
    surface_share: float
    tip_in_plane: bool
    confidence: float
    shaft_confidence: float


@dataclass(frozen=True, slots=True)
class NeedleState:
    """What the tracker reports for one frame.

    Attributes
    ----------
    frame_index : int
    visible : bool
        The tip is seen (or was, less than ``hold_s`` ago, while coasting).
    tip_xy : (float, float) or None
        Tip in frame pixels; None when not visible.
    tip_mm : (float, float) or None
        Tip in mm from the imaging region's top-left corner (x across, y depth); None when not
        visible or the frame is not calibrated.
    angle_deg : float or None
        Shaft angle to the probe surface, degrees (in mm space when calibrated).
    inserted_length_mm : float or None
        Length along the shaft from the region's edge (entry) to the tip; None when not visible
        or not calibrated.
    inserted_length_px : float or None
        The same in pixels.
    side : "left", "right" or None
    shaft_visible : bool
        A needle is seen in this frame: a shaft detected with a ``shaft_confidence`` of at least
        ``min_confidence``, whether or not its tip is in plane, a shaft on the line of one
        reported within ``shaft_hold_s`` (see ``NeedleConfig.shaft_hold_s``), or a tip being
        tracked. The needle-present answer.
    confidence : float
        0 to 1; decays while coasting.
    status : str
        ``"tracking"``, ``"coasting"``, ``"acquiring"`` or ``"not visible"``.
    entry_xy : (float, float) or None
        Where the shaft meets the imaging region's edge, frame pixels; None when not visible.
    """

    frame_index: int
    visible: bool
    tip_xy: tuple[float, float] | None
    tip_mm: tuple[float, float] | None
    angle_deg: float | None
    inserted_length_mm: float | None
    inserted_length_px: float | None
    side: Side | None
    shaft_visible: bool
    confidence: float
    status: str
    entry_xy: tuple[float, float] | None = None


def _grey_region(frame: Frame) -> np.ndarray:
    x0, y0, x1, y1 = frame.region.bbox
    crop = frame.pixels[y0 : y1 + 1, x0 : x1 + 1]
    if crop.ndim == 3:
        return cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY)
    return crop


def _frame_spacing(frame: Frame) -> tuple[float, float] | None:
    spacing = frame.region_spacing_mm
    return (float(spacing[0]), float(spacing[1])) if spacing else None


def _mm_per_px(frame: Frame, config: NeedleConfig) -> float:
    """The frame's mean pixel spacing, or the config's nominal one when it is not calibrated."""
    spacing = _frame_spacing(frame)
    return math.sqrt(spacing[0] * spacing[1]) if spacing else config.nominal_spacing_mm


def _box_range(c: np.ndarray, d: np.ndarray, width: int, height: int) -> tuple[float, float] | None:
    """Parameters (s_lo, s_hi) where the line c + s d lies inside [-0.5, W-0.5] x [-0.5, H-0.5]."""
    lo, hi = -math.inf, math.inf
    for p, v, limit in ((c[0], d[0], width - 0.5), (c[1], d[1], height - 0.5)):
        if abs(v) < 1e-9:
            if not -0.5 <= p <= limit:
                return None
            continue
        a, b = (-0.5 - p) / v, (limit - p) / v
        lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    return (lo, hi) if lo < hi else None


class NeedleDetector:
    """Find the needle in one frame from its pixels and the segmentation labels.

    Call it with a :class:`~usguide.frame.Frame` and, optionally, the frame's label map
    (``(H, W)`` uint8, class 4 needle). Returns a :class:`NeedleDetection` or None.
    """

    def __init__(self, config: NeedleConfig | None = None) -> None:
        self.config = config or NeedleConfig()
        self._rng = np.random.default_rng(self.config.seed)
        self._kernels: dict[int, np.ndarray] = {}
        # The last frame's grey region: following a shaft measures the frame just searched.
        self._grey: tuple[Frame, np.ndarray] | None = None

    def reset(self) -> None:
        """Restart the RANSAC sampling sequence (a new source)."""
        self._rng = np.random.default_rng(self.config.seed)
        self._grey = None

    def _grey_of(self, frame: Frame) -> np.ndarray:
        """``frame``'s imaging region in grey: the one just searched when it is that frame (a
        colour frame is converted once, not again to follow a shaft on it)."""
        if self._grey is None or self._grey[0] is not frame:
            self._grey = (frame, _grey_region(frame))
        return self._grey[1]

    def __call__(
        self, frame: Frame, labels: np.ndarray | None = None, *, ridges: bool = True
    ) -> NeedleDetection | None:
        """The needle in ``frame``. With ``ridges`` False, the image's ridges are not searched
        when the model marks too few needle pixels (the stage follows a known shaft instead)."""
        cfg = self.config
        grey = _grey_region(frame)
        self._grey = (frame, grey)
        height, width = grey.shape
        if height < 16 or width < 16:
            return None
        mm_per_px = _mm_per_px(frame, cfg)
        # Work at ~0.2 mm per pixel for the search: a needle is >= 0.5 mm thick (a strip too
        # thin for that at a fine spacing is searched at less).
        f = max(1, min(round(0.2 / mm_per_px), min(height, width) // 16))
        model_points = self._model_points(frame, labels, (height // f, width // f), f)
        # The model's needle pixels define the shaft when it sees enough of them; the image's
        # ridges alone are a weaker fallback (confidence then rests on length and contrast).
        from_model = len(model_points) >= 8
        if from_model:
            points, weights = model_points, np.ones(len(model_points), np.float32)
        elif ridges:
            points, weights = self._ridge_points(grey, f, mm_per_px)
        else:
            return None
        if len(points) < 2:
            return None
        model_mask = None
        if labels is not None:
            x0, y0, x1, y1 = frame.region.bbox
            model_mask = labels[y0 : y1 + 1, x0 : x1 + 1]
        best: NeedleDetection | None = None
        # The model may also mark a bright line beside the needle, with more pixels than the
        # needle has: when the first line is not a convincing shaft, the line through the
        # remaining model pixels gets its chance, and the more needle-like of the two is kept.
        for _ in range(2 if from_model else 1):
            fit = self._ransac(
                points,
                weights,
                tol=1.5,
                width=_SHAFT_HALF_WIDTH_MM / (mm_per_px * f),
                split=_SHAFT_GAP_MM / (mm_per_px * f),
            )
            if fit is None:
                break
            centre, direction, extent = fit
            found = self._measure(
                grey,
                model_mask,
                (centre + 0.5) * f - 0.5,  # small-image pixel centres to region pixel centres
                direction,
                (extent[0] * f, extent[1] * f),
                from_model,
                mm_per_px,
                frame,
            )
            if found is not None and (
                best is None or found.shaft_confidence > best.shaft_confidence
            ):
                best = found
            if best is not None and best.shaft_confidence >= cfg.min_confidence:
                break
            # Everything within 1 mm of this line is this structure, edges included.
            off = (points - centre) @ _down_normal(direction)
            elsewhere = np.abs(off) > max(1.5, 1.0 / (mm_per_px * f))
            points, weights = points[elsewhere], weights[elsewhere]
            if len(points) < 8:
                break
        return best

    def follow(
        self, frame: Frame, shaft: NeedleDetection, labels: np.ndarray | None = None
    ) -> NeedleDetection | None:
        """The image's shaft along the line of ``shaft`` (a detection in an earlier frame): for a
        needle the model has stopped marking.

        The axis is re-centred on the image's shaft and its end found as in a detection. The
        result's tip ``confidence`` is 0: where the model sees no needle, the end of a line is
        not known to be a tip.
        """
        grey = self._grey_of(frame)
        height, width = grey.shape
        if height < 16 or width < 16:
            return None
        mm_per_px = _mm_per_px(frame, self.config)
        x0, y0, x1, y1 = frame.region.bbox
        entry = np.array(shaft.entry_xy) - (x0, y0)
        direction = np.array(shaft.tip_xy) - shaft.entry_xy
        length = math.hypot(direction[0], direction[1])
        if length < 1.0:
            return None
        direction /= length
        if direction[1] < 0:
            direction = -direction
        model_mask = labels[y0 : y1 + 1, x0 : x1 + 1] if labels is not None else None
        found = self._measure(
            grey, model_mask, entry, direction, (0.0, length), False, mm_per_px, frame
        )
        return None if found is None else dataclasses.replace(found, confidence=0.0)

    def _model_points(
        self, frame: Frame, labels: np.ndarray | None, shape: tuple[int, int], f: int
    ) -> np.ndarray:
        """The model's needle pixels, (x, y) in pixels of the region shrunk ``f`` times to
        ``shape``."""
        if labels is None:
            return np.empty((0, 2), np.float32)
        h, w = shape
        x0, y0 = frame.region.bbox[:2]
        # Each small pixel's label is the label at its centre in the full frame.
        sub = labels[y0 + f // 2 : y0 + h * f : f, x0 + f // 2 : x0 + w * f : f]
        is_needle = cv2.compare(np.ascontiguousarray(sub), NEEDLE, cv2.CMP_EQ)
        return self._at_most(_nonzero_xy(is_needle), 600).astype(np.float32)

    def _ridge_points(
        self, grey: np.ndarray, f: int, mm_per_px: float
    ) -> tuple[np.ndarray, np.ndarray]:
        """The image's brightest thin ridges, (x, y) in pixels of the region shrunk ``f`` times,
        and their weights."""
        height, width = grey.shape
        small = (
            cv2.resize(grey, (width // f, height // f), interpolation=cv2.INTER_AREA)
            if f > 1
            else grey
        )
        # Keep bright structures thinner than ~2 mm (needle shafts), drop thick bands.
        k = max(5, round(2.0 / (mm_per_px * f)) | 1)
        kernel = self._kernels.get(k)
        if kernel is None:
            kernel = self._kernels[k] = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
        ridge = cv2.morphologyEx(small, cv2.MORPH_TOPHAT, kernel)
        hist = cv2.calcHist([ridge], [0], None, [256], [0, 256]).ravel()
        # The brightest 0.5 % of ridges, and never below the least contrast of a shaft.
        above = np.cumsum(hist[::-1])
        top = 255 - int(np.searchsorted(above, 0.005 * ridge.size))
        least = max(int(self.config.min_contrast), top)
        bright = cv2.threshold(ridge, least - 1, 255, cv2.THRESH_BINARY)[1]
        xy = self._at_most(_nonzero_xy(bright), 600)
        weights = ridge[xy[:, 1], xy[:, 0]].astype(np.float32) / 255.0
        return xy.astype(np.float32), weights

    def _at_most(self, points: np.ndarray, n: int) -> np.ndarray:
        """A random ``n`` of the points when there are more (RANSAC needs no more)."""
        if len(points) <= n:
            return points
        return points[self._rng.choice(len(points), n, replace=False)]

    def _ransac(
        self, points: np.ndarray, weights: np.ndarray, tol: float, width: float, split: float
    ) -> tuple[np.ndarray, np.ndarray, tuple[float, float]] | None:
        """Best line by weighted inliers (within ``tol`` of it), then the major axis of the
        points within ``width`` of it: centre, unit direction pointing down the image, and their
        extent (s_min, s_max) along it from the centre.

        Points further apart along the line than ``split`` are separate structures; the
        heaviest group is the shaft."""
        cfg = self.config
        n = len(points)
        k = cfg.ransac_iterations
        i = self._rng.integers(0, n, k)
        j = self._rng.integers(0, n, k)
        d = points[j] - points[i]
        norm = np.hypot(d[:, 0], d[:, 1])
        ok = norm > 3.0
        if not ok.any():
            return None
        d = d[ok] / norm[ok, None]
        p = points[i[ok]]
        angle = np.degrees(np.arctan2(np.abs(d[:, 1]), np.abs(d[:, 0])))
        ok = (angle >= cfg.min_angle_deg) & (angle <= cfg.max_angle_deg)
        if not ok.any():
            return None
        d, p = d[ok], p[ok]
        # (hypotheses, points) distances, vectorised.
        dist = np.abs(
            (points[None, :, 0] - p[:, None, 0]) * d[:, None, 1]
            - (points[None, :, 1] - p[:, None, 1]) * d[:, None, 0]
        )
        best = int(np.argmax((dist <= tol) @ weights))
        mask = dist[best] <= width
        if mask.sum() < 2:
            return None
        pts, w = points[mask], weights[mask]
        along = pts @ d[best]
        order = np.argsort(along)
        breaks = np.flatnonzero(np.diff(along[order]) > split) + 1
        if breaks.size:
            groups = np.split(order, breaks)
            group = max(groups, key=lambda g: float(w[g].sum()))
            if len(group) < 2:
                return None
            pts, w = pts[group], w[group]
        centre = (pts * w[:, None]).sum(0) / w.sum()
        q = pts - centre
        wq = q * w[:, None]
        sxx, syy, sxy = (
            float(wq[:, 0] @ q[:, 0]),
            float(wq[:, 1] @ q[:, 1]),
            float(wq[:, 0] @ q[:, 1]),
        )
        # Major axis of the weighted scatter, in closed form (a 2 x 2 eigenproblem).
        theta = 0.5 * math.atan2(2.0 * sxy, sxx - syy)
        direction = np.array([math.cos(theta), math.sin(theta)])
        if direction[1] < 0:
            direction = -direction
        s = (pts - centre) @ direction
        return centre.astype(np.float64), direction.astype(np.float64), (s.min(), s.max())

    def _profile(
        self,
        image: np.ndarray,
        centre: np.ndarray,
        direction: np.ndarray,
        s: np.ndarray,
        half: int,
        interpolation: int = cv2.INTER_LINEAR,
        bend: np.ndarray | None = None,
    ) -> np.ndarray:
        """Grey levels on a band along the axis: ``(len(s), 2*half+1)``, rows along the shaft,
        columns across it (negative is above the shaft). ``bend``, per ``s``, shifts each
        cross-section's middle that far down the normal: the band follows a bent shaft."""
        normal = _down_normal(direction)
        # The maps in float32 from the start (remap's type): several bands are sampled a frame.
        along = s.astype(np.float32)
        across = np.arange(-half, half + 1, dtype=np.float32)
        x_mid = along * np.float32(direction[0]) + np.float32(centre[0])
        y_mid = along * np.float32(direction[1]) + np.float32(centre[1])
        if bend is not None:
            x_mid += bend.astype(np.float32) * np.float32(normal[0])
            y_mid += bend.astype(np.float32) * np.float32(normal[1])
        xs = np.add.outer(x_mid, across * np.float32(normal[0]))
        ys = np.add.outer(y_mid, across * np.float32(normal[1]))
        band = cv2.remap(
            image,
            xs,
            ys,
            interpolation,
            borderMode=cv2.BORDER_CONSTANT,
            borderValue=0,
        )
        return band.astype(np.float32)

    def _follow_bend(
        self,
        grey: np.ndarray,
        model_mask: np.ndarray | None,
        centre: np.ndarray,
        direction: np.ndarray,
        s: np.ndarray,
        extent: tuple[float, float],
        band: np.ndarray,
        background: np.ndarray,
        half: int,
        reach: int,
        mm_per_px: float,
    ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, tuple[float, float]]:
        """The shaft's centre line as a parabola about the straight axis, when the shaft bends.

        Returns the centre line's offset down the normal per ``s`` (None when the shaft is
        straight, or bends more than a needle does), the band and background sampled along it,
        and the extent of the model's needle pixels along it, grown to their whole run on the
        straight axis too: the candidates were gathered along one line, which a bent shaft
        leaves, tip first.
        """
        i0 = int(np.searchsorted(s, extent[0]))
        i1 = int(np.searchsorted(s, extent[1], side="right"))
        if i1 - i0 < 2:
            return None, band, background, extent  # the candidates lie off the sampled axis
        if model_mask is not None:
            i0, i1 = self._model_run(
                model_mask, centre, direction, s, reach, None, i0, i1, mm_per_px
            )
        straight = band, background, (min(extent[0], s[i0]), max(extent[1], s[i1 - 1]))
        if (s[i1 - 1] - s[i0]) * mm_per_px < _MIN_BEND_SPAN_MM:
            return None, *straight  # too short a shaft to measure a bend on
        bend: np.ndarray | None = None
        for _ in range(3):
            offsets, strength = _shaft_centre(
                band, background, s, slice(i0, i1), centre, direction, grey.shape, reach,
                _middle_offsets, bend,
            )  # fmt: skip
            use = strength > 0.25 * strength.max()
            if use.sum() < 8:
                break
            t = s[i0:i1][use]
            if (t[-1] - t[0]) * mm_per_px < _MIN_BEND_SPAN_MM:
                break
            y = offsets[use] if bend is None else offsets[use] + bend[i0:i1][use]
            c = _robust_parabola(t, y, np.sqrt(strength[use]))
            # The bend of the whole shaft, from where the axis enters the image to the end of
            # the part that shows it (the shaft between bends the same way).
            sagitta = abs(c[0]) * (t[-1] - s[0]) ** 2 / 4.0 * mm_per_px
            if not _MIN_BEND_MM <= sagitta <= _MAX_BEND_MM:
                bend = None  # straight after all, or curved as no needle is
                break
            new = _parabola_on(c, s, float(s[0]), float(t[-1]))
            settled = bend is not None and float(np.abs(new - bend).max()) < _AXIS_SETTLED_PX
            bend = new
            band = self._profile(grey, centre, direction, s, half, bend=bend)
            background = _background(band, half)
            if model_mask is not None:
                i0, i1 = self._model_run(
                    model_mask, centre, direction, s, reach, bend, i0, i1, mm_per_px
                )
            if settled:
                break
        if bend is None:
            return None, *straight
        return bend, band, background, (min(extent[0], s[i0]), max(extent[1], s[i1 - 1]))

    def _model_run(
        self,
        model_mask: np.ndarray,
        centre: np.ndarray,
        direction: np.ndarray,
        s: np.ndarray,
        reach: int,
        bend: np.ndarray | None,
        i0: int,
        i1: int,
        mm_per_px: float,
    ) -> tuple[int, int]:
        """``[i0, i1)`` grown to the run of the model's needle pixels along the (bent) axis that
        overlaps it, joined across gaps of 1 mm: the candidates were gathered along a straight
        line, which a bent shaft leaves, tip first."""
        across = self._profile(model_mask, centre, direction, s, reach, cv2.INTER_NEAREST, bend)
        runs = _runs((across == NEEDLE).any(1), max(2, round(1.0 / mm_per_px)))
        if runs:
            a, b = max(runs, key=lambda r: min(r[1], i1) - max(r[0], i0))
            if min(b, i1) > max(a, i0):
                return min(i0, a), max(i1, b)
        return i0, i1

    def _measure(
        self,
        grey: np.ndarray,
        model_mask: np.ndarray | None,
        centre: np.ndarray,
        direction: np.ndarray,
        extent: tuple[float, float],
        from_model: bool,
        mm_per_px: float,
        frame: Frame,
    ) -> NeedleDetection | None:
        cfg = self.config
        height, width = grey.shape
        # Half-width of the band: the shaft (<= 1.3 mm) plus tissue above it for the background.
        half = max(4, math.ceil(1.6 / mm_per_px))
        core = max(1, round(0.15 / mm_per_px))
        reach = min(half - 2, math.ceil(0.8 / mm_per_px))  # the widest shaft (18 G) and its blur
        s = np.empty(0)
        for step in range(4):
            span = _box_range(centre, direction, width, height)
            if span is None:
                return None
            s = np.arange(math.ceil(span[0]), math.floor(span[1]) + 1, dtype=np.float64)
            if len(s) < 8:
                return None
            band = self._profile(grey, centre, direction, s, half)
            background = _background(band, half)
            if step == 3:
                break
            # Re-centre the axis on the shaft: the middle of the shaft's cross-sections, fitted
            # along the part the candidates cover.
            i0 = int(np.searchsorted(s, extent[0]))
            i1 = int(np.searchsorted(s, extent[1], side="right"))
            if i1 - i0 < 4:
                break
            offsets, strength = _shaft_centre(
                band,
                background,
                s,
                slice(i0, i1),
                centre,
                direction,
                grey.shape,
                reach,
                _middle_offsets,
            )
            use = strength > 0.25 * strength.max()
            if use.sum() < 4:
                break
            along = s[i0:i1][use]
            slope, intercept = _robust_line(along, offsets[use], np.sqrt(strength[use]))
            if abs(intercept) + abs(slope) * max(-s[0], s[-1]) < _AXIS_SETTLED_PX:
                break  # the band already lies on the shaft: sampling it again gains nothing
            centre = centre + intercept * _down_normal(direction)
            direction = direction + slope * _down_normal(direction)
            direction /= math.hypot(direction[0], direction[1])
            if direction[1] < 0:
                direction = -direction

        bend = None
        if from_model:  # a bend is followed on the shaft the model marks, not on ridges alone
            bend, band, background, extent = self._follow_bend(
                grey, model_mask, centre, direction, s, extent, band, background, half, reach,
                mm_per_px,
            )  # fmt: skip

        # How far the shaft lifts the tissue toward white: a bright shaft over bright tissue adds
        # fewer grey levels than over dark tissue, but the same fraction of the way to 255.
        room = np.maximum(255.0 - background, 20.0)
        profile = (band[:, half - core : half + core + 1].mean(1) - background) * (255.0 / room)
        smooth_n = max(1, round(0.3 / mm_per_px))
        profile = np.convolve(profile, np.ones(smooth_n) / smooth_n, mode="same")
        covered = (s >= extent[0]) & (s <= extent[1])
        if not covered.any():
            return None
        level = float(np.percentile(profile[covered], 90))
        if level < cfg.min_contrast:
            return None
        # The shaft: the run of evidence that overlaps the candidates most, bridging gaps of up to
        # 1 mm (out-of-plane dips, speckle).
        gap = max(2, round(1.0 / mm_per_px))
        runs = _runs(profile >= cfg.run_fraction * level, gap)
        if not runs:
            return None
        start, stop = max(runs, key=lambda r: (covered[r[0] : r[1]].sum(), r[1]))
        if from_model:
            # Nor does bright tissue in line before the model's first needle pixel extend it.
            first_px = extent[0] - cfg.beyond_model_mm / mm_per_px
            start = min(stop - 1, max(start, int(np.searchsorted(s, first_px))))
        # Early exit: the whole run is never shorter than the shaft up to its tip (found below).
        if (profile[start:stop] >= cfg.run_fraction * level).sum() * mm_per_px < cfg.min_length_mm:
            return None
        contrast = float(np.percentile(profile[start:stop], 75))
        # A needle is straight or bends smoothly: its centre line stays on the fitted axis
        # (fascia waves about it).
        offsets, strength = _shaft_centre(
            band,
            background,
            s,
            slice(start, stop),
            centre,
            direction,
            grey.shape,
            reach,
            _centroid_offsets,
            bend,
        )
        on_shaft = strength > 0
        wander = float(np.sqrt(np.mean(offsets[on_shaft] ** 2))) if on_shaft.any() else 0.0
        # Tip: the half-maximum of the shaft's end (bevel included), crossed going outward.
        bevel = max(2, round(cfg.bevel_mm / mm_per_px))
        # The model's needle pixels end near the tip: bright tissue in line far beyond them does
        # not extend the shaft (a little does: the model may stop short of a faint tip).
        limit = len(s) - 1
        if from_model:
            reach_mm = cfg.beyond_model_mm
            limit = int(np.searchsorted(s, extent[1] + reach_mm / mm_per_px, side="right")) - 1
        last, s_tip, cut = _shaft_end(profile, s, start, stop, limit, bevel, mm_per_px)
        # The search for the shaft's end stopped at the model's needle pixels with no fall in
        # the profile there, and the shaft runs on in the image, as bright, well past them: the
        # tip may lie anywhere along it (see _RUN_PAST_MODEL_MM), so it is not reported.
        past = round(_RUN_PAST_MODEL_MM / mm_per_px)
        runs_on = (
            cut
            and stop - 1 - last >= past
            and float(np.median(profile[last + 1 : last + 1 + past])) >= _RUN_ON_LEVEL * level
        )
        # The visible shaft ends at the tip: bright tissue in line beyond it is not shaft.
        length_px = float((profile[start : last + 1] >= cfg.run_fraction * level).sum())
        if length_px * mm_per_px < cfg.min_length_mm:
            return None
        end = profile[max(start, last - bevel + 1) : last + 1]
        before = profile[max(start, last - 3 * bevel + 1) : max(start, last - bevel + 1)]
        end_ratio = float(end.mean() / before.mean()) if before.size and before.mean() > 0 else 1.0
        # Cross-sections that hold any image (the corners beside a sector's fan are black).
        holds_image = band.max(1) > _BLACK
        shaft = band[start : last + 1][holds_image[start : last + 1]]
        if _ridge_share(shaft, half, core, reach) < cfg.min_ridge:
            return None  # a step, not a ridge: the edge of a sector's image, say
        support = model_width = 0.0
        if model_mask is not None:
            # The model's needle pixels across the shaft, along its visible length: how much of
            # it the model sees, and how wide (a needle mask is as wide as the needle).
            # Labels sampled on the band only: no region-sized temporary per frame.
            across = (
                self._profile(
                    model_mask,
                    centre,
                    direction,
                    s[start : last + 1],
                    reach,
                    cv2.INTER_NEAREST,
                    None if bend is None else bend[start : last + 1],
                )
                == NEEDLE
            ).sum(1)
            support = float((across > 0).mean())
            if support > 0:
                model_width = float(across[across > 0].mean()) * mm_per_px
            if model_width > cfg.max_width_mm:
                return None  # wider than any needle: a blob the model mistook
        x0, y0 = frame.region.bbox[:2]
        tip = centre + s_tip * direction + (x0, y0)
        if bend is not None:
            tip += float(np.interp(s_tip, s, bend)) * _down_normal(direction)
        # Entry: where the axis, followed back up the image, meets the region's edge.
        entry = centre + s[0] * direction + (x0, y0)
        if bend is not None:
            entry += bend[0] * _down_normal(direction)
        spacing = _frame_spacing(frame)
        dx, dy = abs(direction[0]), abs(direction[1])
        if spacing:
            dx, dy = dx * spacing[1], dy * spacing[0]
        # Where the image begins along the axis: the corners of a sector image's box are black.
        imaged = np.flatnonzero(holds_image)
        first = int(imaged[0]) if imaged.size else 0
        entry_gap = max(0.0, float(s[start] - s[min(first, start)]))
        on_axis = centre + s[start : last + 1, None] * direction
        if bend is not None:
            on_axis += bend[start : last + 1, None] * _down_normal(direction)
        surface = _surface_share(grey, on_axis, _SURFACE_MM / mm_per_px)
        features = detection_features(
            support,
            model_width,
            contrast,
            length_px * mm_per_px,
            end_ratio,
            wander * mm_per_px,
            entry_gap * mm_per_px,
            surface,
        )
        confidence = 0.0 if runs_on else detection_confidence(cfg.confidence_weights, features)
        shaft_confidence = detection_confidence(cfg.shaft_confidence_weights, features)
        return NeedleDetection(
            tip_xy=(float(tip[0]), float(tip[1])),
            entry_xy=(float(entry[0]), float(entry[1])),
            angle_deg=math.degrees(math.atan2(dy, dx)),
            side="left" if direction[0] >= 0 else "right",
            visible_length_px=length_px,
            contrast=contrast,
            end_ratio=end_ratio,
            model_support=support,
            model_width_mm=model_width,
            wander_px=wander,
            entry_gap_px=entry_gap,
            surface_share=surface,
            tip_in_plane=end_ratio >= cfg.tip_ratio,
            confidence=confidence,
            shaft_confidence=shaft_confidence,
        )


# Length of detection_features' vector, the bias included.
N_DETECTION_FEATURES = 9


def detection_features(
    support: float,
    model_width_mm: float,
    contrast: float,
    length_mm: float,
    end_ratio: float,
    wander_mm: float,
    entry_gap_mm: float,
    surface_share: float,
) -> np.ndarray:
    """The numbers a detection's confidence is computed from (a logistic model over them):
    1 (bias), model support, width of the model's needle mask (mm, capped at 1.5), contrast / 100,
    visible length (mm, capped at 10) / 10, end ratio (capped at 1.2: a brighter end is a bevel,
    a much brighter one is no more needle-like), centre-line wander (mm), the gap between the
    image's edge and the visible shaft (mm, capped at 20) / 10, and the share of the shaft on the
    skin surface."""
    return np.array(
        [1.0, support, min(model_width_mm, 1.5), contrast / 100.0, min(length_mm, 10.0) / 10.0,
         min(end_ratio, 1.2), wander_mm, min(entry_gap_mm, 20.0) / 10.0, surface_share],
    )  # fmt: skip


def detection_confidence(weights: tuple[float, ...], features: np.ndarray) -> float:
    """Logistic of ``weights`` over :func:`detection_features`, in [0, 1]."""
    z = float(np.dot(weights, features))
    # Either branch keeps exp's argument <= 0: an extreme feature (an end ratio over a
    # near-zero shaft level) must give a confidence of 0 or 1, not an overflow.
    if z >= 0.0:
        return 1.0 / (1.0 + math.exp(-z))
    e = math.exp(z)
    return e / (1.0 + e)


def _shaft_end(
    profile: np.ndarray,
    s: np.ndarray,
    start: int,
    stop: int,
    limit: int,
    bevel: int,
    mm_per_px: float,
) -> tuple[int, float, bool]:
    """Index of the last shaft sample, the tip's position along the axis: the half-maximum of
    the shaft's end (bevel included), crossed going outward, at most to ``limit``; and whether
    ``limit`` cut the search short (the profile had not fallen to the half-maximum there).

    The end is the steepest fall of the profile within 3 mm before the run ``[start, stop)``
    ends (or ``limit``): a bright band in line beyond the tip (which the model may label too)
    ends with a smaller fall."""
    last = max(start, min(stop - 1, limit))
    fall_px = max(1, round(0.3 / mm_per_px))
    lo = max(start, last - round(3.0 / mm_per_px))
    hi = min(limit, len(s) - 1 - fall_px)
    if hi > lo:
        fall = profile[lo : hi + 1] - profile[lo + fall_px : hi + 1 + fall_px]
        last = lo + int(np.argmax(fall))
    local = float(profile[max(start, last - bevel + 1) : last + 1].max())
    half_level = 0.5 * local
    while last + 1 <= limit and profile[last + 1] >= half_level:
        last += 1
    while last > start and profile[last] < half_level:
        last -= 1
    s_tip = float(s[last])
    if last + 1 < len(s):
        a, b = profile[last], profile[last + 1]
        if a > b:
            s_tip += float(np.clip((a - half_level) / (a - b), 0.0, 1.0))
    cut = last == limit and last + 1 < len(s) and profile[last + 1] >= half_level
    return last, s_tip, bool(cut)


def _background(band: np.ndarray, half: int) -> np.ndarray:
    """Per cross-section, the tissue just above the shaft, but never brighter than its median
    along the axis: where the shaft passes just under a bright fascia band, the band is not
    background."""
    background = band[:, : max(2, half // 3)].mean(1)
    np.minimum(background, float(np.median(background)), out=background)
    return background


def _robust_parabola(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Weighted least-squares parabola ``y = c[0] t**2 + c[1] t + c[2]``, refitted without the
    points far from the first fit (as :func:`_robust_line`)."""
    design = np.stack([t * t, t, np.ones_like(t)], axis=1)
    c = np.linalg.lstsq(design * w[:, None], y * w, rcond=None)[0]
    residual = np.abs(y - design @ c)
    keep = residual <= max(1.0, 2.5 * 1.4826 * float(np.median(residual)))
    if 6 <= keep.sum() < len(t):
        c = np.linalg.lstsq(design[keep] * w[keep, None], y[keep] * w[keep], rcond=None)[0]
    return c


def _parabola_on(c: np.ndarray, s: np.ndarray, t0: float, t1: float) -> np.ndarray:
    """The parabola ``c`` at ``s`` between ``t0`` and ``t1``, and its tangents beyond them: a
    needle's bend is not extrapolated past the shaft that shows it."""
    t = np.clip(s, t0, t1)
    value = (c[0] * t + c[1]) * t + c[2]
    slope = 2.0 * c[0] * t + c[1]
    return value + slope * (s - t)


def _robust_line(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Weighted least-squares line y = a t + b, refitted without the points far from the first
    fit (a bright band crossing the shaft pulls a few centres off the axis)."""
    a, b = _weighted_line(t, y, w)
    residual = np.abs(y - (a * t + b))
    spread = 1.4826 * float(np.median(residual))
    keep = residual <= max(1.0, 2.5 * spread)
    if 4 <= keep.sum() < len(t):
        a, b = _weighted_line(t[keep], y[keep], w[keep])
    return a, b


def _weighted_line(t: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """Least-squares line y = a t + b with residuals weighted by ``w`` (as ``np.polyfit``'s
    ``w``), in closed form: it runs several times a frame, and polyfit's generality costs."""
    ww = w * w
    sw, st, sy = ww.sum(), ww @ t, ww @ y
    den = sw * (ww @ (t * t)) - st * st
    if sw <= 0 or abs(den) <= 1e-12 * max(1.0, sw * sw):
        return 0.0, float(sy / sw) if sw > 0 else 0.0
    a = (sw * (ww @ (t * y)) - st * sy) / den
    return float(a), float((sy - a * st) / sw)


def _ridge_share(band: np.ndarray, half: int, core: int, reach: int) -> float:
    """How far the centre of a band's cross-sections stands above the brighter of its two
    sides (beyond ``reach``), as a share of how far it stands above the darker one; medians over
    the cross-sections."""
    if not len(band):
        return 0.0
    centre = band[:, half - core : half + core + 1].mean(1)
    above = band[:, : half - reach].mean(1)
    below = band[:, half + reach + 1 :].mean(1)
    over_brighter = float(np.median(centre - np.maximum(above, below)))
    over_darker = float(np.median(centre - np.minimum(above, below)))
    return over_brighter / max(over_darker, 1.0)


def _shaft_centre(
    band: np.ndarray,
    background: np.ndarray,
    s: np.ndarray,
    rows: slice,
    centre: np.ndarray,
    direction: np.ndarray,
    shape: tuple[int, ...],
    reach: int,
    offsets_of: Callable[..., tuple[np.ndarray, np.ndarray]],
    bend: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``offsets_of`` (:func:`_middle_offsets` or :func:`_centroid_offsets`) on the
    cross-sections ``rows`` of a band sampled along ``centre + s * direction`` (shifted by
    ``bend`` down the normal, when given) in an image of ``shape``."""
    half = band.shape[1] // 2
    shift = None if bend is None else bend[rows]
    within = _within_across(centre, direction, s[rows], shape[1], shape[0], reach, shift)
    return offsets_of(band[rows], background[rows], half, reach, within)


def _within_across(
    c: np.ndarray,
    d: np.ndarray,
    s: np.ndarray,
    width: int,
    height: int,
    reach: int,
    bend: np.ndarray | None = None,
) -> np.ndarray:
    """Per position ``s`` on the axis (shifted by ``bend`` down the normal), how far (px, at
    most ``reach``) the cross-section stays inside the image on both sides of its middle."""
    normal = _down_normal(d)
    lo = np.full(s.shape, -float(reach))
    hi = np.full(s.shape, float(reach))
    for p0, v, n, limit in ((c[0], d[0], normal[0], width), (c[1], d[1], normal[1], height)):
        if abs(n) < 1e-9:
            continue
        p = p0 + s * v if bend is None else p0 + s * v + bend * n
        a, b = (-0.5 - p) / n, (limit - 0.5 - p) / n
        np.maximum(lo, np.minimum(a, b), out=lo)
        np.minimum(hi, np.maximum(a, b), out=hi)
    return np.clip(np.minimum(-lo, hi), 0.0, float(reach))


def _above_half(
    band: np.ndarray, background: np.ndarray, half: int, reach: int, within: np.ndarray
) -> np.ndarray:
    """Per cross-section, how far each pixel within ``reach`` of the axis stands above half the
    cross-section's maximum (negative below it). Only pixels at most ``within`` from the axis
    count (0 beyond): the image's edge may cut the window, and only a window symmetric about
    the axis measures a centre."""
    inner = band[:, half - reach : half + reach + 1] - background[:, None]
    cut = np.flatnonzero(within < reach)
    if cut.size:
        across = np.abs(np.arange(-reach, reach + 1, dtype=np.float32))
        inner[cut] *= across[None, :] <= within[cut, None] + 1e-6
    return inner - 0.5 * inner.max(1, keepdims=True)


def _centroid_offsets(
    band: np.ndarray, background: np.ndarray, half: int, reach: int, within: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Offset from the axis of the centroid of everything above half the maximum across the
    band, and its weight, at each position: how far bright structure lies off the axis (a
    bright band beside the shaft pulls it too, which is what a wander measure should see)."""
    above = _above_half(band, background, half, reach, within)
    np.maximum(above, 0.0, out=above)
    strength = above.sum(1)
    across = np.arange(-reach, reach + 1, dtype=np.float32)
    offsets = (above @ across) / np.maximum(strength, 1e-6)
    return offsets.astype(np.float64), strength


def _middle_offsets(
    band: np.ndarray, background: np.ndarray, half: int, reach: int, within: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Offset from the axis of the shaft's middle at each position, and its weight.

    The shaft's cross-section is the run above half the maximum that holds the maximum; its
    middle is the centre of a thick shaft whatever its wall pattern, and tissue beside the shaft
    but apart from it does not pull it (as it pulls a centroid). A run that reaches the edge of
    the window is wider than the window lets us see, or merges with bright tissue: its middle
    is no measure and gets no weight, unless fewer than 4 cross-sections are left.
    """
    above = _above_half(band, background, half, reach, within)
    index = np.arange(above.shape[1])[None, :]
    peak = above.argmax(1)[:, None]
    below = above <= 0.0
    # The run: between the last pixel below half before the peak and the first one after it.
    first = np.where(below & (index < peak), index, -1).max(1) + 1
    last = np.where(below & (index > peak), index, above.shape[1]).min(1) - 1
    offsets = 0.5 * (first + last) - reach
    in_run = (index >= first[:, None]) & (index <= last[:, None])
    strength = (above * in_run).sum(1)
    # The window's own edges on each side (the image may cut it).
    open_half = np.floor(within + 1e-6).astype(np.int64)
    clean = (first > reach - open_half) & (last < reach + open_half)
    if clean.sum() >= 4:
        strength = strength * clean
    return offsets.astype(np.float64), strength.astype(np.float32)


def _nonzero_xy(mask: np.ndarray) -> np.ndarray:
    """``(N, 2)`` int32 (x, y) of a uint8 mask's nonzero pixels, row by row (as ``np.nonzero``)."""
    xy = cv2.findNonZero(mask)
    return np.empty((0, 2), np.int32) if xy is None else xy.reshape(-1, 2)


def _down_normal(direction: np.ndarray) -> np.ndarray:
    """Unit normal to the axis pointing down the image (toward the reverberations)."""
    normal = np.array([-direction[1], direction[0]])
    return -normal if normal[1] < 0 else normal


def _runs(above: np.ndarray, gap: int) -> list[tuple[int, int]]:
    """[start, stop) runs of True, joining runs separated by fewer than ``gap`` False samples."""
    idx = np.flatnonzero(above)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) > gap)
    starts = np.concatenate([[idx[0]], idx[breaks + 1]])
    stops = np.concatenate([idx[breaks], [idx[-1]]]) + 1
    return list(zip(starts.tolist(), stops.tolist(), strict=True))


class NeedleTracker:
    """Kalman filter on the tip (x, y) and the shaft angle, constant velocity, with gating.

    Feed it one :class:`NeedleDetection` (or None) per frame through :meth:`update`. Time comes
    from the frames' timestamps, or from ``NeedleConfig.frame_time_s`` per frame index.
    """

    def __init__(self, config: NeedleConfig | None = None) -> None:
        self.config = config or NeedleConfig()
        self.reset()

    def reset(self) -> None:
        """Forget the track (a new source, a seek)."""
        self._state: np.ndarray | None = None  # x, y, angle, vx, vy, v_angle
        self._cov = np.eye(6)
        self._time: float | None = None
        self._clock: float | None = None  # the last frame's time, kept increasing
        self._seen_at = -math.inf
        self._pending: list[NeedleDetection] = []
        self._outliers: list[NeedleDetection] = []
        self._last: NeedleDetection | None = None
        self._confidence = 0.0
        self._shaft_seen: tuple[NeedleDetection, float] | None = None

    @property
    def tracking(self) -> bool:
        """A confirmed track exists (visible or coasting)."""
        return self._state is not None

    def update(
        self,
        detection: NeedleDetection | None,
        frame: Frame,
        followed: NeedleDetection | None = None,
    ) -> NeedleState:
        """The state at ``frame`` given its ``detection``. ``followed`` is the shaft measured along
        the line of the last one reported (:meth:`NeedleDetector.follow`): when the detection
        itself is no needle, it still reports the needle present if it lies on that line, seen
        within ``shaft_hold_s``; it never moves the tip."""
        cfg = self.config
        t = frame.timestamp_s if frame.timestamp_s is not None else frame.index * cfg.frame_time_s
        if self._clock is not None and t <= self._clock:
            if self._clock - t > cfg.hold_s:
                self.reset()  # time went back: a seek or another scan, not this track
            else:
                # A repeated (or jittering) time: a frame's time still passes, so a tip
                # unseen for hold_s is never shown as if current.
                t = self._clock + cfg.frame_time_s
        self._clock = t
        spacing = _frame_spacing(frame)
        mm_per_px = _mm_per_px(frame, cfg)
        gate_px = cfg.gate_mm / mm_per_px
        shaft_visible = detection is not None and (
            detection.shaft_confidence >= cfg.min_confidence
            or (
                detection.shaft_confidence >= cfg.shaft_keep_fraction * cfg.min_confidence
                and self._on_recent_shaft(detection, t, gate_px)
            )
        )
        if shaft_visible:
            self._shaft_seen = (detection, t)
        elif followed is not None and self._on_recent_shaft(followed, t, gate_px):
            shaft_visible = True
            self._shaft_seen = (followed, t)
        usable = detection if detection is not None and detection.tip_in_plane else None
        updated = False
        if self._state is not None:
            self._predict(t, mm_per_px)
            if usable is not None and usable.confidence >= 0.6 * cfg.min_confidence:
                spread = 3.0 * math.sqrt(max(self._cov[0, 0], self._cov[1, 1]))
                distance = math.hypot(
                    usable.tip_xy[0] - self._state[0], usable.tip_xy[1] - self._state[1]
                )
                # A line at another angle is another structure, even with its end near the tip.
                turn = abs(usable.angle_deg - self._state[2])
                same_line = turn <= _SAME_LINE_DEG + 3.0 * math.sqrt(self._cov[2, 2])
                if distance <= gate_px + spread and same_line:
                    self._correct(usable, mm_per_px)
                    self._outliers.clear()
                    updated = True
                elif usable.confidence >= cfg.min_confidence:
                    # One outlier moves nothing; several that agree mean the needle is there.
                    self._outliers.append(usable)
                    if len(self._outliers) >= cfg.reinit_frames and _agree(
                        self._outliers[-cfg.reinit_frames :], gate_px
                    ):
                        self._start(usable, t)
                        updated = True
            if updated:
                self._seen_at = t
                self._last = usable
                self._confidence = usable.confidence if usable else 0.0
            elif t - self._seen_at > cfg.hold_s + 1e-9:
                self._state = None  # lost: say so rather than show a stale tip
                self._outliers.clear()
        else:
            self._time = t
            if usable is not None and usable.confidence >= cfg.min_confidence:
                if self._pending and not _agree([self._pending[-1], usable], gate_px):
                    self._pending.clear()
                self._pending.append(usable)
                if len(self._pending) >= cfg.confirm_frames:
                    self._start(usable, t)
                    self._seen_at = t
                    self._last = usable
                    self._confidence = usable.confidence
                    updated = True
            else:
                self._pending.clear()

        if self._state is None:
            status = "acquiring" if self._pending else "not visible"
            return NeedleState(
                frame.index, False, None, None, None, None, None, None, shaft_visible, 0.0, status
            )
        assert self._last is not None
        tip = (float(self._state[0]), float(self._state[1]))
        confidence = self._confidence
        if not updated:
            confidence *= min(1.0, max(0.0, 1.0 - (t - self._seen_at) / max(cfg.hold_s, 1e-9)))
        x0, y0 = frame.region.bbox[:2]
        entry = self._last.entry_xy
        length_px = math.hypot(tip[0] - entry[0], tip[1] - entry[1])
        tip_mm = length_mm = None
        if spacing:
            tip_mm = ((tip[0] - x0) * spacing[1], (tip[1] - y0) * spacing[0])
            length_mm = math.hypot(
                (tip[0] - entry[0]) * spacing[1], (tip[1] - entry[1]) * spacing[0]
            )
        return NeedleState(
            frame_index=frame.index,
            visible=True,
            tip_xy=tip,
            tip_mm=tip_mm,
            angle_deg=float(self._state[2]),
            inserted_length_mm=length_mm,
            inserted_length_px=length_px,
            side=self._last.side,
            shaft_visible=True,
            confidence=float(confidence),
            status="tracking" if updated else "coasting",
            entry_xy=(float(entry[0]), float(entry[1])),
        )

    def shaft_to_follow(self) -> NeedleDetection | None:
        """The shaft last reported, while it can still vouch for the next frame's (seen within
        ``shaft_hold_s`` of the latest frame); None otherwise."""
        if self._shaft_seen is None or self._clock is None:
            return None
        seen, seen_at = self._shaft_seen
        return seen if self._clock - seen_at < self.config.shaft_hold_s else None

    def _on_recent_shaft(self, detection: NeedleDetection, t: float, gate_px: float) -> bool:
        """``detection`` lies on the line of a shaft reported within ``shaft_hold_s``: the same
        side, its angle within 5 degrees, its end within ``gate_px``."""
        cfg = self.config
        if self._shaft_seen is None:
            return False
        seen, seen_at = self._shaft_seen
        return (
            t - seen_at <= cfg.shaft_hold_s + 1e-9
            and detection.side == seen.side
            and abs(detection.angle_deg - seen.angle_deg) <= _SAME_LINE_DEG
            and math.hypot(
                detection.tip_xy[0] - seen.tip_xy[0], detection.tip_xy[1] - seen.tip_xy[1]
            )
            <= gate_px
        )

    def _start(self, detection: NeedleDetection, t: float) -> None:
        self._state = np.array([*detection.tip_xy, detection.angle_deg, 0.0, 0.0, 0.0])
        self._cov = np.diag([4.0, 4.0, 1.0, 400.0, 400.0, 25.0])
        self._time = t
        self._pending.clear()
        self._outliers.clear()

    def _predict(self, t: float, mm_per_px: float) -> None:
        assert self._state is not None
        dt = max(0.0, t - (self._time if self._time is not None else t))
        self._time = t
        if dt == 0.0:
            return
        f = np.eye(6)
        f[0, 3] = f[1, 4] = f[2, 5] = dt
        # White acceleration: hand-held needles change speed within a fraction of a second.
        accel = np.array([20.0 / mm_per_px, 20.0 / mm_per_px, 30.0])  # px/s^2, px/s^2, deg/s^2
        q = np.zeros((6, 6))
        for i in range(3):
            a2 = accel[i] ** 2
            q[i, i] = a2 * dt**4 / 4
            q[i, i + 3] = q[i + 3, i] = a2 * dt**3 / 2
            q[i + 3, i + 3] = a2 * dt**2
        self._state = f @ self._state
        self._cov = f @ self._cov @ f.T + q

    def _correct(self, detection: NeedleDetection, mm_per_px: float) -> None:
        assert self._state is not None
        sigma_px = (0.1 / mm_per_px) / max(detection.confidence, 0.2)
        r = np.diag([sigma_px**2, sigma_px**2, 0.5**2])
        h = np.zeros((3, 6))
        h[0, 0] = h[1, 1] = h[2, 2] = 1.0
        z = np.array([*detection.tip_xy, detection.angle_deg])
        innovation = z - h @ self._state
        s = h @ self._cov @ h.T + r
        gain = self._cov @ h.T @ np.linalg.inv(s)
        self._state = self._state + gain @ innovation
        self._cov = (np.eye(6) - gain @ h) @ self._cov


def _agree(detections: list[NeedleDetection], gate_px: float) -> bool:
    """Consecutive detections on one line: tips within the gate of each other, angles within
    ``_SAME_LINE_DEG``."""
    return all(
        math.hypot(a.tip_xy[0] - b.tip_xy[0], a.tip_xy[1] - b.tip_xy[1]) <= gate_px
        and abs(a.angle_deg - b.angle_deg) <= _SAME_LINE_DEG
        for a, b in itertools.pairwise(detections)
    )


class NeedleStage:
    """Detection and tracking together: one :class:`NeedleState` per frame.

    Call it with each frame and its label map (or None when no segmentation ran).
    :attr:`detection` holds the frame's raw detection, for display of the shaft.
    """

    def __init__(self, config: NeedleConfig | None = None) -> None:
        self.config = config or NeedleConfig()
        self.detector = NeedleDetector(self.config)
        self.tracker = NeedleTracker(self.config)
        self.detection: NeedleDetection | None = None

    def reset(self) -> None:
        self.detector.reset()
        self.tracker.reset()
        self.detection = None

    def __call__(self, frame: Frame, labels: np.ndarray | None) -> NeedleState:
        # A shaft reported a moment ago is followed along its line when the model loses it;
        # the image's ridges at large are then not searched: only that line could vouch.
        shaft = self.tracker.shaft_to_follow()
        self.detection = self.detector(frame, labels, ridges=shaft is None)
        followed = None
        weak = self.detection is None or (
            self.detection.shaft_confidence < self.config.min_confidence
        )
        if shaft is not None and weak:
            followed = self.detector.follow(frame, shaft, labels)
        return self.tracker.update(self.detection, frame, followed)


def _surface_share(grey: np.ndarray, points: np.ndarray, depth_px: float) -> float:
    """Share of ``points`` ((N, 2) x, y in region pixels) within ``depth_px`` under the first
    pixel of their column that holds image (the skin line; under a convex probe's near arc, the
    arc)."""
    if not len(points):
        return 0.0
    width = grey.shape[1]
    x = np.clip(np.rint(points[:, 0]).astype(np.intp), 0, width - 1)
    columns, at = np.unique(x, return_inverse=True)
    first = np.argmax(grey[:, columns] > _BLACK, axis=0)
    return float(np.mean(points[:, 1] - first[at] <= depth_px))
