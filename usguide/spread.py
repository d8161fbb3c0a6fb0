"""Injectate spread: the dark pocket of fluid growing around the needle tip (hydrodissection).

Once the tip reaches its target, :meth:`InjectateSpread.arm` keeps the imaging region as it was
before any fluid: the **baseline**. On every later frame the stage looks for tissue that has
become much darker than the baseline, connected to the tip:

1. **Working copy**: the region in grey, reduced by a whole factor to ~``work_spacing_mm`` per
   pixel (area average) and lightly blurred: speckle and per-frame noise average out, and the
   rest is cheap.
2. **Probe motion**: a hand-held probe drifts. The global shift between the baseline and the
   frame is found by phase correlation at half the working resolution, leaving out the tip's
   surroundings and the pocket (tissue there moves on its own), and the baseline is compared at
   the shifted place. What motion is left (rotation, rounding) is absorbed by comparing with the
   *darkest* baseline pixel within ``motion_tolerance_mm`` (a min-filter): tissue that merely
   moved that little is never darker than it.
3. **Newly dark**, with hysteresis: *core* pixels are darker than ``max_ratio`` x that local
   minimum, by at least ``min_drop`` grey levels; *spread* pixels only ``grow_ratio`` x and
   ``grow_drop``. Both are no brighter than the fluid ceiling: ``max_grey``, and
   ``dark_fraction`` of the baseline's median tissue level (fluid is anechoic; this also keeps
   out dark tissue pushed aside by the pocket). A structure that was already dark (a vessel, a
   dark fascicle) never becomes "newly" dark; a 3 x 3 opening removes the one-pixel slivers
   left by motion at the edges of dark structures.
4. **Pocket**: the connected regions of spread pixels holding a core pixel within
   ``seed_radius_mm`` of the tip: a pocket starts clearly at the tip and may then run on over
   darker tissue, where fluid contrasts less. Other such regions along the outline ring of a
   nerve the pocket touches join it (fluid tracking around a nerve shows as separate crescents
   where it leaves the imaging plane). The min-filter puts the pocket's edge inside the real
   one, so the edge is then placed where the grey level is ``edge_level`` of the way from the
   baseline down to the fluid's own level (the middle of the edge's ramp for 0.5), at most
   ``edge_mm`` outside the core.
5. **Needle** (class 4 in the labels): its shaft and the reverberations below it cross the
   fluid as bright lines. Gaps up to ``needle_gap_mm`` over them are bridged, and counted as
   fluid; where the needle has been since arming, the baseline is compared with a wider
   tolerance (``needle_tolerance_mm``), as the needle moves with the hand and a withdrawn tip
   uncovers tissue that was behind it.
6. **Confirmation and growth**: a pocket is reported once it is at least ``min_area_mm2`` on
   ``confirm_frames`` consecutive frames. It is growing when its area rose by ``min_growth``
   (and ``min_growth_mm2``) over the last ``growth_window_s``.
7. **Around the nerve**: the outline ring of the nerve (class 1), a band ``ring_mm`` wide just
   outside it, for the nerve(s) the pocket touches (parts closer than two ring widths count as
   one nerve: the fascicles of a plexus). The share of the ring the pocket covers is
   :attr:`SpreadState.nerve_coverage`; ``surround_fraction`` or more is circumferential spread
   (the "donut sign").

The area is in mm^2 only when the frame is calibrated; otherwise ``area_mm2`` is None and only
``area_px`` (px^2) is given. Physical sizes (search radius, smallest pocket, ring width) use the
frame's spacing, or ``nominal_spacing_mm`` when it is unknown; that guess never becomes a
reported number.

Limits: fluid over tissue that was already near black (an acoustic shadow, a vessel) cannot be
seen and is not counted; a pocket larger than ``max_extent_mm`` around the tip is cut there; a
fluid film thinner than ~0.5 mm is not resolved; probe drift beyond ~1 mm, or rotation beyond
the motion tolerance, makes the baseline stale (re-arm); without needle labels the bright shaft
and its reverberations inside a pocket are not counted as fluid.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import cv2
import numpy as np

from usguide.frame import Frame
from usguide.labels import NEEDLE, NERVE

Point = tuple[float, float]
Box = tuple[int, int, int, int]

_KERNEL3 = np.ones((3, 3), np.uint8)
# Grey levels below this are the black margins around a sector, not tissue.
_BLACK = 8


@dataclass(frozen=True, slots=True)
class SpreadConfig:
    """Settings of injectate-spread detection; lengths in mm, times in seconds.

    Attributes
    ----------
    max_ratio : float
        A core pixel is at most this fraction of the darkest baseline pixel near it ...
    min_drop : float
        ... and darker than it by at least this many grey levels.
    grow_ratio, grow_drop : float
        The same for the pixels a pocket may spread over from its core.
    max_grey : float
        No pocket pixel is brighter than this grey level (fluid is anechoic: near black) ...
    dark_fraction : float
        ... nor than this fraction of the baseline's median tissue level.
    edge_level : float
        The pocket's edge lies where the grey level is this fraction of the way from the
        baseline down to the fluid's mean level (0.5: half-way down the edge's ramp).
    edge_mm : float
        How far outside the core the edge may be placed.
    min_area_mm2 : float
        Smallest pocket reported.
    seed_radius_mm : float
        The pocket must reach within this distance of the tip.
    max_extent_mm : float
        Half-size of the square searched around the tip; a pocket reaching beyond it is cut.
    motion_tolerance_mm : float
        Radius of the baseline's min-filter: residual motion up to this never looks darker.
    track_motion : bool
        Compensate the probe's global shift against the baseline (phase correlation).
    max_shift_mm : float
        A shift estimated beyond this is not trusted (the last trusted one is kept).
    work_spacing_mm : float
        Approximate pixel size of the working copy; the frame is reduced by a whole factor.
    smooth_mm : float
        Standard deviation of the working copy's blur.
    needle_gap_mm : float
        Gaps in the pocket up to this wide over the needle (class 4) or its reverberations are
        fluid: the shaft crossing a pocket hides the fluid behind it.
    needle_reverb_mm : float
        Depth below the needle's label where its reverberations may cross the pocket.
    needle_tolerance_mm : float
        The motion tolerance wherever the needle (and its reverberations) has been since
        arming: it moves with the hand, not with the tissue. Pass the labels on the frame the
        stage is armed in, so the baseline's needle is known.
    ring_mm : float
        Width of the band just outside the nerve used for :attr:`SpreadState.nerve_coverage`.
    surround_fraction : float
        Share of that band the pocket must cover to surround the nerve.
    confirm_frames : int
        Consecutive frames a pocket must be seen before it is reported.
    growth_window_s : float
        Time over which growth is judged.
    min_growth : float
        Relative area increase over ``growth_window_s`` that counts as growing ...
    min_growth_mm2 : float
        ... and the least absolute increase.
    nominal_spacing_mm : float
        mm per pixel assumed for the sizes above when the frame is not calibrated.
    frame_time_s : float
        Frame interval assumed when frames carry no timestamps.
    """

    max_ratio: float = 0.5
    min_drop: float = 12.0
    grow_ratio: float = 0.75
    grow_drop: float = 3.0
    max_grey: float = 50.0
    dark_fraction: float = 0.6
    edge_level: float = 0.5
    edge_mm: float = 0.4
    min_area_mm2: float = 2.0
    seed_radius_mm: float = 3.0
    max_extent_mm: float = 30.0
    motion_tolerance_mm: float = 0.3
    track_motion: bool = True
    max_shift_mm: float = 4.0
    work_spacing_mm: float = 0.2
    smooth_mm: float = 0.2
    needle_gap_mm: float = 3.0
    needle_reverb_mm: float = 3.0
    needle_tolerance_mm: float = 1.0
    ring_mm: float = 1.0
    surround_fraction: float = 0.6
    confirm_frames: int = 2
    growth_window_s: float = 1.0
    min_growth: float = 0.05
    min_growth_mm2: float = 0.5
    nominal_spacing_mm: float = 0.1
    frame_time_s: float = 0.05

    def __post_init__(self) -> None:
        for name in ("max_ratio", "grow_ratio", "dark_fraction", "edge_level", "surround_fraction"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")
        for name in (
            "seed_radius_mm", "max_extent_mm", "work_spacing_mm", "ring_mm", "needle_gap_mm",
            "nominal_spacing_mm", "frame_time_s", "growth_window_s",
        ):  # fmt: skip
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in (
            "min_drop", "grow_drop", "edge_mm", "min_area_mm2", "motion_tolerance_mm",
            "smooth_mm", "max_shift_mm", "needle_reverb_mm", "needle_tolerance_mm",
        ):  # fmt: skip
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.confirm_frames < 1:
            raise ValueError(f"confirm_frames must be >= 1, got {self.confirm_frames}")


@dataclass(frozen=True, slots=True)
class SpreadState:
    """What the injectate-spread stage reports for one frame.

    Attributes
    ----------
    frame_index : int
    armed : bool
        A baseline is held (the tip has reached its target).
    detected : bool
        A pocket of fluid is seen at the tip (confirmed over ``confirm_frames``).
    area_mm2 : float or None
        Pocket area, mm^2; None when not detected or the frame is not calibrated.
    area_px : int
        Pocket area in frame pixels (px^2); 0 when not detected.
    calibrated : bool
        The frame has a spacing: areas are in mm^2. False: only ``area_px`` is known.
    growing : bool
        The area rose over the last ``growth_window_s``.
    surrounds_nerve : bool or None
        The pocket covers at least ``surround_fraction`` of the nerve's outline ring; None when
        no nerve is labelled (class 1), no labels were given, or not armed.
    nerve_coverage : float or None
        Share (0 to 1) of the outline ring of the nerve(s) the pocket touches that it covers;
        0 when nothing is detected; None as for ``surrounds_nerve``.
    bbox : tuple of int or None
        ``(x0, y0, x1, y1)`` inclusive frame pixels around the pocket; None when not detected.
    shift_xy : tuple of float
        Probe motion since the baseline, compensated, ``(x, y)`` frame pixels.
    """

    frame_index: int
    armed: bool
    detected: bool
    area_mm2: float | None
    area_px: int
    calibrated: bool
    growing: bool
    surrounds_nerve: bool | None
    nerve_coverage: float | None
    bbox: Box | None = None
    shift_xy: Point = (0.0, 0.0)


def _disc(radius: int) -> np.ndarray:
    """``(2r+1, 2r+1)`` uint8 disc structuring element."""
    size = 2 * radius + 1
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))


def _square(radius: int) -> np.ndarray:
    """``(2r+1, 2r+1)`` square structuring element: separable, so fast at large sizes."""
    return np.ones((2 * radius + 1, 2 * radius + 1), np.uint8)


def _fft_size(n: int) -> int:
    """The largest even size <= ``n`` whose DFT is fast (2^a 3^b 5^c); 0 when ``n`` < 2."""
    for m in range(n - n % 2, 1, -2):
        if cv2.getOptimalDFTSize(m) == m:
            return m
    return 0


def _labels_at(labels: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Distinct non-zero values of ``labels`` where the uint8 ``mask`` is non-zero."""
    points = cv2.findNonZero(mask)  # x, y of each: small, unlike a full boolean index
    if points is None:
        return np.zeros(0, np.int32)
    points = points.reshape(-1, 2)
    found = np.unique(labels[points[:, 1], points[:, 0]])
    return found[found > 0]


def _overlap(start: int, stop: int, offset: int, size: int) -> tuple[int, int]:
    """The part of ``[start, stop)`` whose copy shifted by ``-offset`` lies in ``[0, size)``."""
    return max(start, offset), min(stop, size + offset)


class InjectateSpread:
    """The injectate-spread stage: armed once at the target, then called with each frame.

    Parameters
    ----------
    config : SpreadConfig, optional

    Attributes
    ----------
    mask : ndarray
        ``(H, W)`` bool pocket of the last frame, in frame pixels, for the overlay; all False
        when nothing is detected. The same buffer is rewritten by the next call: copy to keep.

    Examples
    --------
    >>> spread = InjectateSpread()                  # doctest: +SKIP
    >>> spread.arm(frame, tip_xy)                   # doctest: +SKIP
    >>> state = spread(next_frame, labels, tip_xy)  # doctest: +SKIP
    >>> state.area_mm2, state.surrounds_nerve       # doctest: +SKIP
    """

    def __init__(self, config: SpreadConfig | None = None) -> None:
        self.config = config or SpreadConfig()
        self._geometry: tuple[tuple[int, ...], Box, int] | None = None
        self._mask = np.zeros((0, 0), np.uint8)
        self._mask_box: Box | None = None
        self._pocket_box: Box | None = None
        self._last_box: Box | None = None
        self._rings_ready = False
        self._needle_seen_any = False
        self.reset()

    # -- state ---------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        """A baseline is held."""
        return self._armed

    @property
    def anchor_xy(self) -> Point | None:
        """Where the tip was when armed, frame pixels, moved with the probe motion since; None
        when not armed."""
        if not self._armed or self._anchor is None:
            return None
        f = self._factor
        return (self._anchor[0] + self._shift[0] * f, self._anchor[1] + self._shift[1] * f)

    @property
    def mask(self) -> np.ndarray:
        """``(H, W)`` bool pocket of the last frame (a view of a reused buffer)."""
        return self._mask.view(bool)

    def reset(self) -> None:
        """Forget the baseline and the history (another cine, a seek, a new block)."""
        self._armed = False
        self._anchor: Point | None = None
        self._shift = (0, 0)
        self._history: deque[tuple[float, int]] = deque()
        self._run = 0
        self._clear()
        self._last_box: Box | None = None

    def arm(self, frame: Frame, tip_xy: Point) -> None:
        """Keep ``frame``'s imaging region as the baseline: the tip is at the target, no fluid yet.

        Arming again replaces the baseline. Call the stage with the same frame and its labels
        next, so the needle's place in the baseline is known.

        Parameters
        ----------
        frame : Frame
            The frame in which the tip reached the target.
        tip_xy : (float, float)
            The tip, frame pixels.
        """
        cfg = self.config
        self.reset()
        self._prepare(frame)
        if self._h < 3 or self._w < 3:  # too small a region to find anything in
            return
        cur = self._working(frame)
        self._base = cur.copy()
        tol = round(cfg.motion_tolerance_mm / self._work_spacing)
        base_min = (cv2.erode(cur, _disc(tol)) if tol > 0 else cur).astype(np.float32)
        # The fluid's ceiling: the median of the tissue (the black margins of a sector left out).
        hist = np.bincount(cur.ravel(), minlength=256)
        hist[:_BLACK] = 0
        tissue = float(np.searchsorted(np.cumsum(hist), 0.5 * hist.sum())) if hist.sum() else 0.0
        ceiling = min(cfg.max_grey, cfg.dark_fraction * tissue)

        def threshold(base_min: np.ndarray, ratio: float, drop: float) -> np.ndarray:
            # cur < this map: the three bounds in one (ceil for "<" on integers; 0 = never).
            bound = np.minimum(np.minimum(ratio * base_min, base_min - drop), ceiling)
            return np.clip(np.floor(bound) + 1, 0, 255).astype(np.uint8)

        self._core_thr = threshold(base_min, cfg.max_ratio, cfg.min_drop)
        self._grow_thr = threshold(base_min, cfg.grow_ratio, cfg.grow_drop)
        # Around the needle, whose shaft and reverberations move with the hand, not the tissue.
        wide = cv2.erode(cur, _disc(max(1, round(cfg.needle_tolerance_mm / self._work_spacing))))
        wide = wide.astype(np.float32)
        self._core_wide = threshold(wide, cfg.max_ratio, cfg.min_drop)
        self._grow_wide = threshold(wide, cfg.grow_ratio, cfg.grow_drop)
        if cfg.track_motion and self._window is not None:
            self._coarse_base = self._coarse(cur).copy()
        self._needle_seen.fill(0)
        self._needle_seen_any = False
        self._anchor = (float(tip_xy[0]), float(tip_xy[1]))
        self._armed = True

    # -- per frame -----------------------------------------------------------------------------
    def __call__(
        self, frame: Frame, labels: np.ndarray | None, tip_xy: Point | None
    ) -> SpreadState:
        """Find the pocket in ``frame``.

        Parameters
        ----------
        frame : Frame
        labels : ndarray or None
            ``(H, W)`` uint8 class indices of the frame (the nerve is class 1); None when
            unknown.
        tip_xy : (float, float) or None
            The tip, frame pixels; None uses :attr:`anchor_xy`.

        Returns
        -------
        SpreadState
        """
        cfg = self.config
        spacing = frame.region_spacing_mm
        calibrated = spacing is not None
        idle = SpreadState(frame.index, False, False, None, 0, calibrated, False, None, None)
        self._clear()
        if not self._armed:
            return idle
        if self._geometry != self._geometry_of(frame):
            # Depth or layout changed: the baseline no longer describes this image.
            self.reset()
            return idle
        if labels is not None and labels.shape != frame.pixels.shape[:2]:
            raise ValueError(f"labels {labels.shape} do not match the frame {frame.pixels.shape}")
        t = frame.timestamp_s if frame.timestamp_s is not None else frame.index * cfg.frame_time_s
        f, h, w = self._factor, self._h, self._w
        x0, y0 = self._box[0], self._box[1]
        px_mm = self._spacing_for(frame)
        work_mm = px_mm * f

        tip = tip_xy if tip_xy is not None else self.anchor_xy
        assert tip is not None
        tx, ty = (tip[0] - x0) / f, (tip[1] - y0) / f
        cur = self._working(frame)
        if cfg.track_motion and self._coarse_base is not None:
            self._track(cur, (tx, ty), cfg.max_shift_mm / work_mm, cfg.seed_radius_mm / work_mm)
        sx, sy = self._shift

        # Search window around the tip, where the shifted baseline exists too.
        ext = max(2, round(cfg.max_extent_mm / work_mm))
        wx0, wx1 = _overlap(max(0, math.floor(tx) - ext), min(w, math.ceil(tx) + ext + 1), sx, w)
        wy0, wy1 = _overlap(max(0, math.floor(ty) - ext), min(h, math.ceil(ty) + ext + 1), sy, h)
        has_nerve = has_needle = False
        if labels is not None:
            has_nerve, has_needle = self._classes_small(labels)
        self._rings_ready = False
        count = 0
        min_area_px = cfg.min_area_mm2 / (px_mm * px_mm)
        if wx1 - wx0 >= 3 and wy1 - wy0 >= 3:
            window = (wx0, wy0, wx1, wy1)
            count = self._find_pocket(
                cur, window, (tx, ty), work_mm, has_nerve, has_needle, min_area_px
            )
        area_px = count * f * f
        raw = count > 0 and area_px >= min_area_px
        self._run = self._run + 1 if raw else 0
        detected = raw and self._run >= cfg.confirm_frames
        if not detected:
            area_px = 0
        growing = self._growth(t, area_px, cfg.min_growth_mm2 / (px_mm * px_mm))

        coverage = None
        if has_nerve:
            coverage = self._coverage(work_mm) if detected else 0.0
        bbox = None
        if detected and self._pocket_box is not None:
            bx0, by0, bx1, by1 = self._pocket_box
            fx0, fy0 = x0 + bx0 * f, y0 + by0 * f
            fw, fh = (bx1 - bx0) * f, (by1 - by0) * f
            cv2.resize(
                self._pocket[by0:by1, bx0:bx1], (fw, fh),
                dst=self._mask[fy0 : fy0 + fh, fx0 : fx0 + fw], interpolation=cv2.INTER_NEAREST,
            )  # fmt: skip
            self._mask_box = (fx0, fy0, fx0 + fw, fy0 + fh)
            bbox = (fx0, fy0, fx0 + fw - 1, fy0 + fh - 1)
        return SpreadState(
            frame_index=frame.index,
            armed=True,
            detected=detected,
            area_mm2=area_px * spacing[0] * spacing[1] if (spacing and detected) else None,
            area_px=int(area_px),
            calibrated=calibrated,
            growing=growing,
            surrounds_nerve=None if coverage is None else coverage >= cfg.surround_fraction,
            nerve_coverage=coverage,
            bbox=bbox,
            shift_xy=(float(sx * f), float(sy * f)),
        )

    # -- set-up ----------------------------------------------------------------------------------
    def _spacing_for(self, frame: Frame) -> float:
        """One mm-per-pixel number for physical sizes: the frame's, or the nominal guess."""
        spacing = frame.region_spacing_mm
        if spacing is None:
            return self.config.nominal_spacing_mm
        return math.sqrt(spacing[0] * spacing[1])

    def _geometry_of(self, frame: Frame) -> tuple[tuple[int, ...], Box, int]:
        factor = max(1, round(self.config.work_spacing_mm / self._spacing_for(frame)))
        return (frame.pixels.shape, frame.region.bbox, factor)

    def _prepare(self, frame: Frame) -> None:
        """Allocate the buffers for this frame's size, region and working scale (once)."""
        geometry = self._geometry_of(frame)
        if geometry == self._geometry:
            return
        f = geometry[2]
        x0, y0, x1, y1 = frame.region.bbox
        self._box = (x0, y0, x1, y1)
        self._factor = f
        self._h, self._w = (y1 - y0 + 1) // f, (x1 - x0 + 1) // f
        h, w = self._h, self._w
        self._work_spacing = self._spacing_for(frame) * f
        self._sigma = max(0.5, self.config.smooth_mm / self._work_spacing)
        self._grey = np.empty((h * f, w * f), np.uint8)
        self._small = np.empty((h, w), np.uint8)
        self._cur = np.empty((h, w), np.uint8)
        self._cand = np.zeros((h, w), np.uint8)
        self._edge = np.zeros((h, w), np.uint8)
        self._pocket = np.zeros((h, w), np.uint8)
        self._labels = np.zeros((h, w), np.int32)
        self._nerve = np.zeros((h, w), np.uint8)
        self._ring = np.zeros((h, w), np.uint8)
        self._scratch = np.zeros((h, w), np.uint8)
        self._needle = np.zeros((h, w), np.uint8)
        self._needle_seen = np.zeros((h, w), np.uint8)
        self._grow_buf = np.zeros((h, w), np.uint8)
        self._core_buf = np.zeros((h, w), np.uint8)
        self._nerve_labels = np.zeros((h, w), np.int32)
        self._mask = np.zeros(frame.pixels.shape[:2], np.uint8)
        self._mask_box = self._pocket_box = None
        # Phase correlation is biased by half a pixel on odd sizes: the largest even fast DFT
        # size that fits, from the middle of the half-size copy.
        hh, hw = max(h // 2, 1), max(w // 2, 1)
        self._ch, self._cw = _fft_size(hh), _fft_size(hw)
        self._coarse_at = ((hh - self._ch) // 2, (hw - self._cw) // 2)
        self._coarse_buf = np.empty((hh, hw), np.uint8)
        self._coarse_f = np.empty((self._ch, self._cw), np.float32)
        self._coarse_tmp = np.empty_like(self._coarse_f)
        self._window = None
        if self._ch >= 16 and self._cw >= 16:
            self._hann = cv2.createHanningWindow((self._cw, self._ch), cv2.CV_32F)
            self._window = np.empty_like(self._hann)
            self._hole = np.empty_like(self._hann)
        self._coarse_base: np.ndarray | None = None
        self._geometry = geometry

    # -- per-frame work ------------------------------------------------------------------------
    def _working(self, frame: Frame) -> np.ndarray:
        """The region, grey, reduced by the working factor and blurred, into ``_cur``."""
        f, h, w = self._factor, self._h, self._w
        x0, y0 = self._box[0], self._box[1]
        crop = frame.pixels[y0 : y0 + h * f, x0 : x0 + w * f]
        if crop.ndim == 3:
            crop = cv2.cvtColor(crop, cv2.COLOR_RGB2GRAY, dst=self._grey)
        if f > 1:
            crop = cv2.resize(crop, (w, h), dst=self._small, interpolation=cv2.INTER_AREA)
        return cv2.GaussianBlur(crop, (0, 0), self._sigma, dst=self._cur)

    def _coarse(self, cur: np.ndarray) -> np.ndarray:
        """Half the working resolution, float32, cropped to the DFT size."""
        buf = self._coarse_buf
        cv2.resize(cur, (buf.shape[1], buf.shape[0]), dst=buf, interpolation=cv2.INTER_AREA)
        oy, ox = self._coarse_at
        self._coarse_f[...] = buf[oy : oy + self._ch, ox : ox + self._cw]
        return self._coarse_f

    def _track(self, cur: np.ndarray, tip: Point, max_shift: float, seed_r: float) -> None:
        """Update ``_shift``, the probe's translation since the baseline (working pixels).

        The tip's surroundings and the last pocket, grown by half its size (pushed tissue), are
        left out with a soft hole in the window: they move on their own.
        """
        tx, ty = tip
        hx0, hy0, hx1, hy1 = tx - seed_r, ty - seed_r, tx + seed_r, ty + seed_r
        if self._last_box is not None:
            bx0, by0, bx1, by1 = self._last_box
            hx0, hy0 = min(hx0, bx0), min(hy0, by0)
            hx1, hy1 = max(hx1, bx1), max(hy1, by1)
        grow = 0.5 * max(hx1 - hx0, hy1 - hy0)
        oy, ox = self._coarse_at
        hole = self._hole
        hole.fill(1.0)
        cx0, cx1 = max(0, int((hx0 - grow) / 2) - ox), min(self._cw, int((hx1 + grow) / 2) - ox + 1)
        cy0, cy1 = max(0, int((hy0 - grow) / 2) - oy), min(self._ch, int((hy1 + grow) / 2) - oy + 1)
        if cx0 < cx1 and cy0 < cy1:
            hole[cy0:cy1, cx0:cx1] = 0.0
            if (cx1 - cx0) * (cy1 - cy0) > 0.7 * self._cw * self._ch:
                return  # too little left to measure the motion by: keep the last shift
            cv2.GaussianBlur(hole, (0, 0), 2.0, dst=hole)  # soft: no edge for both to share
        cv2.multiply(self._hann, hole, dst=self._window)
        # phaseCorrelate windows its inputs in place: hand it a scratch copy of the baseline.
        np.copyto(self._coarse_tmp, self._coarse_base)
        (dx, dy), response = cv2.phaseCorrelate(self._coarse_tmp, self._coarse(cur), self._window)
        dx, dy = 2.0 * dx, 2.0 * dy  # coarse -> working pixels
        # A weak or implausible peak is not trusted: keep the last shift.
        if response > 0.1 and math.hypot(dx, dy) <= max_shift:
            self._shift = (round(dx), round(dy))

    def _find_pocket(
        self,
        cur: np.ndarray,
        window: Box,
        tip: Point,
        work_mm: float,
        has_nerve: bool,
        has_needle: bool,
        min_area_px: float,
    ) -> int:
        """The pocket in working pixels within ``window`` (x0, y0, x1, y1 exclusive), 0/1 in
        ``_pocket`` with its exclusive box in ``_pocket_box``; returns its pixel count (0: none).

        With a nerve in ``_nerve``, other newly dark regions along the outline ring of a nerve
        the pocket touches join it: fluid tracking around a nerve shows as separate crescents
        where it runs out of the imaging plane. With a needle in ``_needle``, the needle pixels
        the pocket closes over (a shaft crossing it) are fluid hidden behind the shaft.
        """
        cfg = self.config
        wx0, wy0, wx1, wy1 = window
        sx, sy = self._shift
        in_base = (slice(wy0 - sy, wy1 - sy), slice(wx0 - sx, wx1 - sx))
        cur_w = cur[wy0:wy1, wx0:wx1]
        grow_thr, core_thr = self._grow_thr[in_base], self._core_thr[in_base]
        if self._needle_seen_any:
            # Where the needle has been since arming (its shaft and reverberations move with
            # the hand, not the tissue; a withdrawn tip uncovers tissue), compare with the
            # darkest baseline within a wider radius.
            part = (slice(wy0, wy1), slice(wx0, wx1))
            zone = self._needle_seen[part]
            np.copyto(self._grow_buf[part], grow_thr)
            np.copyto(self._core_buf[part], core_thr)
            grow_thr = cv2.copyTo(self._grow_wide[in_base], zone, self._grow_buf[part])
            core_thr = cv2.copyTo(self._core_wide[in_base], zone, self._core_buf[part])
        cand = self._cand[wy0:wy1, wx0:wx1]
        cv2.compare(cur_w, grow_thr, cv2.CMP_LT, dst=cand)
        gap = max(1, round(0.5 * cfg.needle_gap_mm / work_mm))
        if has_needle:
            # Bridge the shaft and its reverberation lines where fluid lies on both sides, so
            # the pieces they cut the pocket into stay one.
            bridged = self._scratch[wy0:wy1, wx0:wx1]
            cv2.morphologyEx(cand, cv2.MORPH_CLOSE, _square(gap), dst=bridged)
            cv2.bitwise_and(bridged, self._needle[wy0:wy1, wx0:wx1], dst=bridged)
            cv2.bitwise_or(cand, bridged, dst=cand)
        cv2.morphologyEx(cand, cv2.MORPH_OPEN, _KERNEL3, dst=cand)

        # Core pixels in the tip's disc: the seeds.
        r = max(1.0, cfg.seed_radius_mm / work_mm)
        lx, ly = tip[0] - wx0, tip[1] - wy0
        ww, wh = wx1 - wx0, wy1 - wy0
        sx0, sx1 = max(0, math.floor(lx - r)), min(ww, math.ceil(lx + r) + 1)
        sy0, sy1 = max(0, math.floor(ly - r)), min(wh, math.ceil(ly + r) + 1)
        if sx0 >= sx1 or sy0 >= sy1 or not cv2.countNonZero(cand[sy0:sy1, sx0:sx1]):
            return 0
        disc = (slice(sy0, sy1), slice(sx0, sx1))
        yy, xx = np.ogrid[disc]
        seeds = (cur_w[disc] < core_thr[disc]) & (cand[disc] > 0)
        seeds &= (xx - lx) ** 2 + (yy - ly) ** 2 <= r * r
        if not seeds.any():
            return 0
        lab = self._labels[wy0:wy1, wx0:wx1]
        cv2.connectedComponents(cand, labels=lab, connectivity=8)
        ids = np.unique(lab[disc][seeds])
        ids = ids[ids > 0]
        in_window = self._pocket[wy0:wy1, wx0:wx1]
        cv2.compare(lab, int(ids[0]), cv2.CMP_EQ, dst=in_window)
        for k in ids[1:]:
            scratch = cv2.compare(lab, int(k), cv2.CMP_EQ, dst=self._scratch[wy0:wy1, wx0:wx1])
            cv2.bitwise_or(in_window, scratch, dst=in_window)
        if has_nerve:
            lobe_px = min_area_px / (self._factor * self._factor)
            self._add_lobes(cur_w, core_thr, window, ids, work_mm, lobe_px)

        # Their box, grown by the edge's reach, in working pixels.
        reach = max(1, round(cfg.edge_mm / work_mm))
        x, y, bw, bh = cv2.boundingRect(in_window)
        bx0, bx1 = wx0 + max(0, x - reach), wx0 + min(ww, x + bw + reach)
        by0, by1 = wy0 + max(0, y - reach), wy0 + min(wh, y + bh + reach)
        box = (slice(by0, by1), slice(bx0, bx1))
        pocket = self._pocket[box]

        # Edge: `edge_level` of the way from the baseline down to the fluid's own level, within
        # `reach` of the core (the core's min-filter put its edge inside the real one).
        dark = pocket
        if has_needle:  # the fluid's level from the fluid, not the bridged needle
            dark = cv2.subtract(pocket, self._needle[box], dst=self._scratch[box])
            if not cv2.countNonZero(dark):
                dark = pocket
        fluid = cv2.mean(cur[box], mask=dark)[0]
        e = cfg.edge_level
        edge = self._edge[box]
        base = self._base[by0 - sy : by1 - sy, bx0 - sx : bx1 - sx]
        cv2.convertScaleAbs(base, dst=edge, alpha=1.0 - e, beta=e * fluid)
        cv2.compare(cur[box], edge, cv2.CMP_LE, dst=edge)
        grown = cv2.dilate(pocket, _disc(reach))
        cv2.bitwise_and(grown, edge, dst=edge)
        cv2.bitwise_or(pocket, edge, dst=pocket)
        if has_needle:
            # The shaft crossing the pocket, and its reverberations below it, hide fluid: the
            # pocket's closing over them counts. (The closing stays within the pocket's box.)
            h, w = self._h, self._w
            gx0, gx1 = max(0, bx0 - gap), min(w, bx1 + gap)
            gy0, gy1 = max(0, by0 - gap), min(h, by1 + gap)
            near = (slice(gy0, gy1), slice(gx0, gx1))
            closed = cv2.morphologyEx(self._pocket[near], cv2.MORPH_CLOSE, _square(gap))
            cv2.bitwise_and(closed, self._needle[near], dst=closed)
            cv2.bitwise_or(self._pocket[near], closed, dst=self._pocket[near])
        np.minimum(pocket, 1, out=pocket)  # 0/1: the overlay's bool view
        self._pocket_box = (bx0, by0, bx1, by1)
        return cv2.countNonZero(pocket)

    def _add_lobes(
        self,
        cur_w: np.ndarray,
        core_thr: np.ndarray,
        window: Box,
        ids: np.ndarray,
        work_mm: float,
        min_px: float,
    ) -> None:
        """Add to the pocket the newly dark regions (with a core, at least ``min_px``) that reach
        the outline ring of a nerve the pocket touches."""
        wx0, wy0, wx1, wy1 = window
        part = (slice(wy0, wy1), slice(wx0, wx1))
        self._nerve_rings(work_mm)
        rings, nerve = self._nerve_labels[part], self._nerve[part]
        pocket, lab, cand = self._pocket[part], self._labels[part], self._cand[part]
        scratch, band = self._scratch[part], self._ring[part]
        touched = _labels_at(rings, cv2.subtract(pocket, nerve, dst=scratch))
        if touched.size == 0:
            return
        band[...] = 0
        for k in touched:
            cv2.bitwise_or(band, cv2.compare(rings, int(k), cv2.CMP_EQ, dst=scratch), dst=band)
        cv2.subtract(band, nerve, dst=band)
        lobes = np.setdiff1d(_labels_at(lab, cv2.bitwise_and(band, cand, dst=band)), ids)
        if lobes.size == 0:
            return
        core = cv2.compare(cur_w, core_thr, cv2.CMP_LT, dst=band)
        lobes = np.intersect1d(lobes, _labels_at(lab, cv2.bitwise_and(core, cand, dst=core)))
        for k in lobes:
            lobe = cv2.compare(lab, int(k), cv2.CMP_EQ, dst=scratch)
            if cv2.countNonZero(lobe) >= min_px:
                cv2.bitwise_or(pocket, lobe, dst=pocket)

    def _nerve_rings(self, work_mm: float) -> None:
        """Components of the nerve dilated by ``ring_mm`` into ``_nerve_labels`` (once a frame):
        nerve parts closer than two ring widths are one nerve (the fascicles of a plexus)."""
        if self._rings_ready:
            return
        ring_px = max(1, round(self.config.ring_mm / work_mm))
        grown = cv2.dilate(self._nerve, _disc(ring_px), dst=self._ring)
        cv2.connectedComponents(grown, labels=self._nerve_labels, connectivity=8)
        self._rings_ready = True

    def _growth(self, t: float, area_px: int, min_growth_px: float) -> bool:
        """Record the area; True when it rose over the last ``growth_window_s``."""
        cfg = self.config
        hist = self._history
        if area_px == 0 and hist and hist[-1][1] > 0:
            # A frame without the pocket (the tip looked away) is no reference: growth a second
            # later would be measured from nothing.
            return False
        hist.append((t, area_px))
        while len(hist) >= 2 and hist[1][0] <= t - cfg.growth_window_s:
            hist.popleft()
        if area_px == 0 or len(hist) < 2:
            return False
        ref = hist[0][1]
        return area_px - ref >= max(cfg.min_growth * ref, min_growth_px)

    def _classes_small(self, labels: np.ndarray) -> tuple[bool, bool]:
        """Nerve (class 1) and needle (class 4, with its reverberation zone below it) at working
        resolution (nearest sample), 0/255 in ``_nerve`` and ``_needle``; whether each is
        present."""
        f, h, w = self._factor, self._h, self._w
        x0, y0 = self._box[0], self._box[1]
        crop = labels[y0 : y0 + h * f, x0 : x0 + w * f]
        if crop.dtype != np.uint8:
            crop = crop.astype(np.uint8)
        # Nearest by a whole factor samples every f-th pixel, like crop[::f, ::f], without a copy.
        cv2.resize(crop, (w, h), dst=self._scratch, interpolation=cv2.INTER_NEAREST)
        cv2.compare(self._scratch, NERVE, cv2.CMP_EQ, dst=self._nerve)
        needle = cv2.compare(self._scratch, NEEDLE, cv2.CMP_EQ, dst=self._needle)
        has_needle = cv2.countNonZero(needle) > 0
        if has_needle:
            # The needle's zone: spread down the beam over its reverberations (a column kernel
            # anchored at its bottom row) and a pixel sideways.
            depth = max(1, round(self.config.needle_reverb_mm / self._work_spacing))
            cv2.dilate(needle, np.ones((depth + 1, 3), np.uint8), dst=needle, anchor=(1, depth))
            cv2.bitwise_or(self._needle_seen, needle, dst=self._needle_seen)
            self._needle_seen_any = True
        return cv2.countNonZero(self._nerve) > 0, has_needle

    def _coverage(self, work_mm: float) -> float:
        """Share of the outline ring of the nerve(s) the pocket touches that the pocket covers."""
        if self._pocket_box is None:
            return 0.0
        self._nerve_rings(work_mm)
        nerve, lab = self._nerve, self._nerve_labels
        bx0, by0, bx1, by1 = self._pocket_box
        box = (slice(by0, by1), slice(bx0, bx1))
        outside = cv2.subtract(self._pocket[box], nerve[box], dst=self._scratch[box])
        ring = covered = 0
        for k in _labels_at(lab[box], outside):
            part = cv2.compare(lab, int(k), cv2.CMP_EQ, dst=self._ring)
            cv2.subtract(part, nerve, dst=part)  # the band outside the nerve only
            ring += cv2.countNonZero(part)
            covered += cv2.countNonZero(cv2.bitwise_and(part, self._pocket, dst=part))
        return covered / ring if ring else 0.0

    def _clear(self) -> None:
        """Zero the overlay mask and the working pocket where the last pocket was."""
        if self._mask_box is not None:
            fx0, fy0, fx1, fy1 = self._mask_box
            self._mask[fy0:fy1, fx0:fx1] = 0
            self._mask_box = None
        if self._pocket_box is not None:
            bx0, by0, bx1, by1 = self._pocket_box
            self._pocket[by0:by1, bx0:bx1] = 0
            self._pocket_box = None
            self._last_box = (bx0, by0, bx1, by1)
