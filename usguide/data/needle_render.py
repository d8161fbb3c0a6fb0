"""Physically plausible in-plane needles rendered onto real B-mode frames, with exact ground truth.

No real scan available to usguide shows a labelled needle, so the needle class of the segmentation
model and the needle-tracking benchmark are fed by needles drawn here onto real frames. The
renderer is a handful of cheap, documented approximations of what a steel needle looks like in
B-mode with a linear probe at the top of the image (depth increasing downward):

- a bright specular **shaft**, anti-aliased analytically: pixel coverage is a box ramp of the
  signed distance to the shaft's rectangle, as wide as the point-spread function (~0.2 mm across,
  ~0.3 mm along, at least 1 px) and symmetric, so coverage is exactly 0.5 on the geometric edge;
  a front wall, a dimmer back wall and, for wide needles, a dimmer lumen between them; a
  speckle-like texture;
- a brighter, slightly wider **bevel** at the tip, with a sharp end exactly at the tip;
- **angular fading**: specular echo strength falls beyond ~30 degrees to the probe surface
  (:func:`angular_gain`); the bevel fades less, as in real images;
- **out-of-plane** parts: a visibility profile along the shaft (0 to 1); where it is below
  :data:`VISIBILITY_THRESHOLD` nothing is drawn;
- **reverberations** (comet tail): fainter, blurrier parallel copies below the shaft along the
  beam (vertical), spaced by about the shaft's acoustic thickness, decaying geometrically;
- an optional slight acoustic **shadow** below the shaft.

Composition is "screen" in grey levels, ``out = in + (255 - in) * layer / 255``: it never darkens
(except the shadow, applied to the background first), never saturates a mid-grey pixel, never
wraps around and keeps the underlying speckle visible through the shaft.

Ground truth (see :class:`RenderedNeedle`): the mask holds the pixels whose drawn shaft or bevel
coverage is at least :data:`MASK_COVERAGE` (0.5), i.e. pixels whose centre lies inside the
visible part of the shaft rectangle; reverberations and shadow are never in the mask. The tip is
the geometric end of the drawn shaft: the drawn intensity along the axis falls to half exactly
there.

Only numpy and OpenCV: no torch, so evaluation and tests run without it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Literal

import cv2
import numpy as np

# A shaft sample is drawn (and labelled) only where its visibility reaches this value.
VISIBILITY_THRESHOLD = 0.3
# A pixel is in the mask when the drawn shaft/bevel covers at least this fraction of it.
MASK_COVERAGE = 0.5
# mm per pixel assumed when the calibration is unknown: a linear probe at 3-5 cm depth over
# ~450 rows. Only used to turn physical sizes (gauge, bevel length, speeds) into pixels.
DEFAULT_SPACING_MM = 0.1
# Display dynamic range over which a weaker echo fades (log compression of B-mode).
_DISPLAY_RANGE_DB = 25.0
# Angle (degrees) up to which the shaft echo keeps its full strength, and the floor beyond.
_FULL_ECHO_DEG = 30.0
_MIN_ECHO = 0.2
# Vertical reverberation spacing in units of the shaft's vertical (acoustic) thickness; a bit
# above 1 so the copies stay separate lines, as in real comet tails.
_REVERB_GAP = 1.8
_REVERB_DECAY = 0.55
_BEVEL_MM = 1.5
_BEVEL_WIDEN = 0.3

Side = Literal["left", "right"]
SpacingArg = float | tuple[float, float] | None
PhaseKind = Literal["absent", "advance", "pause", "withdraw"]


@dataclass(frozen=True, eq=False)
class NeedlePose:
    """Where an in-plane needle lies in the image, in pixels.

    Attributes
    ----------
    entry_xy : tuple of float
        ``(x, y)`` where the shaft enters the image (an image edge or the skin line), pixels,
        origin top-left at the centre of the first pixel (so the left image edge is ``x = -0.5``).
    tip_xy : tuple of float
        ``(x, y)`` exact tip position, sub-pixel.
    width_px : float
        Drawn shaft width (its acoustic thickness across the axis), pixels, > 0.
    visibility : ndarray or None
        ``(K,)`` float, K >= 2, values in [0, 1], sampled evenly along the shaft from entry
        (first) to tip (last), linearly interpolated between samples: how much of the shaft lies
        within the beam's elevation thickness. None means fully in plane.
    bend_px : float
        In-plane bend: the shaft's centre line is a parabola through entry and tip whose middle
        lies this far from the straight entry-tip chord, pixels, positive toward the deeper side.
        Thin needles bend in tissue by up to a few millimetres; 0 draws a straight shaft.
    """

    entry_xy: tuple[float, float]
    tip_xy: tuple[float, float]
    width_px: float
    visibility: np.ndarray | None = None
    bend_px: float = 0.0

    def __post_init__(self) -> None:
        entry = (float(self.entry_xy[0]), float(self.entry_xy[1]))
        tip = (float(self.tip_xy[0]), float(self.tip_xy[1]))
        object.__setattr__(self, "entry_xy", entry)
        object.__setattr__(self, "tip_xy", tip)
        if not (math.isfinite(self.width_px) and self.width_px > 0):
            raise ValueError(f"width_px must be a positive number, got {self.width_px}")
        if math.hypot(tip[0] - entry[0], tip[1] - entry[1]) < 1e-6:
            raise ValueError("entry_xy and tip_xy coincide: a needle needs a length")
        if not (math.isfinite(self.bend_px) and abs(self.bend_px) <= 0.25 * self.length_px):
            raise ValueError(
                f"bend_px must be finite and at most a quarter of the length, got {self.bend_px}"
            )
        if self.visibility is not None:
            vis = np.array(self.visibility, dtype=np.float64).reshape(-1)
            if vis.size < 2 or not np.all(np.isfinite(vis)):
                raise ValueError("visibility needs at least 2 finite samples")
            if vis.min() < 0 or vis.max() > 1:
                raise ValueError("visibility samples must lie in [0, 1]")
            vis.setflags(write=False)
            object.__setattr__(self, "visibility", vis)

    @property
    def length_px(self) -> float:
        """Shaft length from entry to tip, pixels."""
        return math.hypot(self.tip_xy[0] - self.entry_xy[0], self.tip_xy[1] - self.entry_xy[1])

    @property
    def angle_deg(self) -> float:
        """Angle between the shaft and the probe surface (the horizontal), degrees in [0, 90]."""
        dx = abs(self.tip_xy[0] - self.entry_xy[0])
        dy = abs(self.tip_xy[1] - self.entry_xy[1])
        return math.degrees(math.atan2(dy, dx))

    @property
    def side(self) -> Side:
        """The side the needle comes from: ``"left"`` when the tip is right of the entry."""
        return "left" if self.tip_xy[0] >= self.entry_xy[0] else "right"

    def visibility_at(self, s: np.ndarray | float) -> np.ndarray:
        """Visibility at fractions ``s`` (0 entry, 1 tip) along the shaft; 1 where in plane."""
        s = np.asarray(s, dtype=np.float64)
        if self.visibility is None:
            return np.ones_like(s)
        grid = np.linspace(0.0, 1.0, self.visibility.size)
        return np.interp(s, grid, self.visibility)

    @property
    def tip_visible(self) -> bool:
        """True when the tip itself is in plane (visibility >= :data:`VISIBILITY_THRESHOLD`)."""
        return bool(self.visibility_at(1.0) >= VISIBILITY_THRESHOLD)


@dataclass(frozen=True, eq=False)
class RenderedNeedle:
    """A frame with a needle drawn on it, and its exact ground truth.

    Attributes
    ----------
    image : ndarray
        ``(H, W)`` uint8 grey frame with the needle, its reverberations and shadow.
    mask : ndarray
        ``(H, W)`` bool: pixels whose drawn shaft or bevel coverage is >= :data:`MASK_COVERAGE`
        (their centre lies inside the visible shaft rectangle). Reverberations and shadow are not
        in it; out-of-plane parts (visibility < :data:`VISIBILITY_THRESHOLD`) are not in it.
    tip_xy : tuple of float
        ``(x, y)`` exact tip, pixels (the pose's tip), known even when the tip is out of plane.
    tip_visible : bool
        The tip's visibility is >= :data:`VISIBILITY_THRESHOLD`, so the tip is drawn.
    angle_deg : float
        Shaft angle to the probe surface, degrees.
    """

    image: np.ndarray
    mask: np.ndarray
    tip_xy: tuple[float, float]
    tip_visible: bool
    angle_deg: float


@dataclass(frozen=True, eq=False)
class NeedleTruth:
    """Ground truth of one frame of :func:`needle_sequence`.

    Attributes
    ----------
    present : bool
        A needle is inserted in this frame (it may still be entirely out of plane).
    tip_xy : tuple of float or None
        ``(x, y)`` exact tip, pixels; None when absent.
    tip_visible : bool
        The tip is drawn (present and in plane).
    angle_deg : float or None
        Shaft angle to the probe surface, degrees; None when absent.
    mask : ndarray
        ``(H, W)`` bool needle mask, as :attr:`RenderedNeedle.mask`; all False when absent.
    pose : NeedlePose or None
        The full pose; None when absent.
    """

    present: bool
    tip_xy: tuple[float, float] | None
    tip_visible: bool
    angle_deg: float | None
    mask: np.ndarray
    pose: NeedlePose | None

    def within(self, imaged: np.ndarray) -> NeedleTruth:
        """The truth of the same frame with no image outside ``imaged`` (``(H, W)`` bool, the
        frame's pixels outside it blacked out, as beside a sector): only the shaft inside is
        drawn, and the tip is visible only inside."""
        tip_visible = False
        if self.tip_visible and self.tip_xy is not None:
            x, y = round(self.tip_xy[0]), round(self.tip_xy[1])
            h, w = imaged.shape
            tip_visible = 0 <= x < w and 0 <= y < h and bool(imaged[y, x])
        return replace(self, mask=self.mask & imaged, tip_visible=tip_visible)


def angular_gain(angle_deg: float) -> float:
    """Relative specular echo strength of the shaft at an angle to the probe surface.

    Full strength up to 30 degrees, then ``(cos(angle) / cos(30))**2`` (a specular reflector
    sends ever less of the echo back to the probe), floored at 0.2 so a steep needle stays faintly
    visible as in real scans: 1.0 at 15 and 30 degrees, 0.67 at 45, 0.33 at 60.

    Parameters
    ----------
    angle_deg : float
        Angle between shaft and probe surface, degrees in [0, 90].

    Returns
    -------
    float
        Gain in [0.2, 1].
    """
    if angle_deg <= _FULL_ECHO_DEG:
        return 1.0
    ratio = math.cos(math.radians(angle_deg)) / math.cos(math.radians(_FULL_ECHO_DEG))
    return max(_MIN_ECHO, ratio * ratio)


def _spacing(spacing_mm: SpacingArg) -> float:
    """One mm-per-pixel number: the given one, the geometric mean of (row, col), or the default."""
    if spacing_mm is None:
        return DEFAULT_SPACING_MM
    if isinstance(spacing_mm, tuple | list):
        value = math.sqrt(float(spacing_mm[0]) * float(spacing_mm[1]))
    else:
        value = float(spacing_mm)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"spacing_mm must be positive, got {spacing_mm}")
    return value


def _grey(image: np.ndarray) -> np.ndarray:
    """A (H, W) uint8 grey view or copy of a grey, RGB or RGBA uint8 image."""
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8, got {image.dtype}")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_RGBA2GRAY)
    raise ValueError(f"image must be (H, W), (H, W, 3) or (H, W, 4), got {image.shape}")


def _echo_level(grey: np.ndarray) -> float:
    """The in-plane shaft's grey level for this frame: just above its bright tissue.

    1.2 x the 99th percentile of the non-black pixels (black is outside the sector or shadow),
    kept within [225, 250] so the shaft is among the brightest structures without becoming a
    saturated flat block.
    """
    hist = np.bincount(grey.ravel(), minlength=256)[1:]
    total = int(hist.sum())
    if total == 0:  # an all-black frame
        return 225.0
    p99 = 1 + int(np.searchsorted(np.cumsum(hist), 0.99 * total))
    return float(np.clip(1.2 * p99, 225.0, 250.0))


def _visible_intervals(pose: NeedlePose) -> list[tuple[float, float]]:
    """Intervals ``[start, end]`` of arc length (px from entry) where visibility >= threshold.

    Crossings are exact for the piecewise-linear visibility profile.
    """
    length = pose.length_px
    if pose.visibility is None:
        return [(0.0, length)]
    vis = pose.visibility
    s = np.linspace(0.0, length, vis.size)
    inside = vis >= VISIBILITY_THRESHOLD
    intervals: list[tuple[float, float]] = []
    start = 0.0 if inside[0] else None
    for k in range(vis.size - 1):
        if inside[k] == inside[k + 1]:
            continue
        # Exact crossing of the threshold on the linear piece between samples k and k+1.
        frac = (VISIBILITY_THRESHOLD - vis[k]) / (vis[k + 1] - vis[k])
        cross = float(s[k] + frac * (s[k + 1] - s[k]))
        if inside[k + 1]:
            start = cross
        else:
            intervals.append((start, cross))  # type: ignore[arg-type]
            start = None
    if start is not None:
        intervals.append((start, length))
    return [(a, b) for a, b in intervals if b > a]


def _axial_coverage(
    u: np.ndarray, intervals: list[tuple[float, float]], window: float = 1.0
) -> np.ndarray:
    """Fraction of a ``window``-px window centred at arc length ``u`` in the visible intervals.

    A box filter of the visible indicator: exactly 0.5 at each end of a visible part (the tip
    included) whatever the window, so ends are anti-aliased and sub-pixel accurate.
    """
    cov = np.zeros(u.shape, np.float32)
    h = 0.5 * window
    for a, b in intervals:
        cov += np.clip(np.minimum(u + h, b) - np.maximum(u - h, a), 0.0, window)
    cov /= window
    return np.minimum(cov, 1.0, out=cov)


def _noise_1d(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """``(n,)`` float32 Gaussian-smoothed white noise (``sigma`` in samples), unit std."""
    radius = max(1, int(3 * sigma))
    noise = rng.standard_normal(n + 2 * radius).astype(np.float32)
    x = np.arange(-radius, radius + 1, dtype=np.float32)
    kernel = np.exp(-0.5 * (x / sigma) ** 2)
    noise = np.convolve(noise, kernel / kernel.sum(), "valid")
    return (noise - noise.mean()) / max(float(noise.std()), 1e-6)


def _noise_2d(
    rng: np.random.Generator, shape: tuple[int, int], sigma_x: float, sigma_y: float
) -> np.ndarray:
    """``shape`` float32 Gaussian-smoothed white noise (sigmas in px), unit std."""
    noise = rng.standard_normal(shape).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigmaX=sigma_x, sigmaY=sigma_y)
    return noise / max(float(noise.std()), 1e-6)


def render_needle(
    image: np.ndarray,
    pose: NeedlePose,
    *,
    rng: np.random.Generator,
    spacing_mm: SpacingArg = None,
    brightness: float = 1.0,
    reverb: float = 0.4,
    shadow: float = 0.15,
    region: tuple[int, int, int, int] | None = None,
) -> RenderedNeedle:
    """Draw an in-plane needle onto a B-mode frame and return the frame with exact ground truth.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB (or RGBA) uint8 frame; not modified.
    pose : NeedlePose
        Needle geometry in image pixels.
    rng : numpy.random.Generator
        Source of the speckle texture of the shaft; the same seed gives the same image.
    spacing_mm : float or (float, float) or None
        mm per pixel (a ``(row, col)`` pair is reduced to its geometric mean); None assumes
        :data:`DEFAULT_SPACING_MM`. Sets the bevel length (1.5 mm) and the texture grain.
    brightness : float
        Multiplies the frame-derived shaft level (see :func:`_echo_level`); 1 is typical.
    reverb : float
        Strength of the first reverberation copy relative to the shaft (0 disables them); the
        following copies decay by a factor 0.55 each.
    shadow : float
        Fraction by which tissue below the visible shaft is darkened (0 disables the shadow).
    region : tuple of int or None
        Imaging region ``(x0, y0, x1, y1)``, inclusive pixels: nothing is drawn outside it (the
        scanner's interface and black margins stay as they are). None draws anywhere.

    Returns
    -------
    RenderedNeedle
        ``image`` (H, W) uint8 grey, ``mask`` (H, W) bool, exact tip, tip visibility and angle.
    """
    grey = _grey(image)
    height, width = grey.shape
    out = grey.copy()
    mask = np.zeros((height, width), bool)
    angle = pose.angle_deg
    result = RenderedNeedle(out, mask, pose.tip_xy, pose.tip_visible, angle)
    intervals = _visible_intervals(pose)
    if not intervals:
        return result

    spacing = _spacing(spacing_mm)
    length = pose.length_px
    ex, ey = pose.entry_xy
    tx, ty = pose.tip_xy
    ax, ay = (tx - ex) / length, (ty - ey) / length
    # Unit normal pointing down the image, so v > 0 is below the shaft.
    nx, ny = (-ay, ax) if ax >= 0 else (ay, -ax)
    cos_a = max(abs(ax), 1e-3)
    gain = angular_gain(angle)
    level = min(255.0, _echo_level(grey) * brightness)
    shaft_amp = 0.95 * gain
    # The bevel's facets reflect over a wider range of angles: it fades less than the shaft.
    bevel_amp = min(1.15, 1.3 * 0.95 * max(gain, 0.55))

    w = pose.width_px
    half_max = 0.5 * w * (1.0 + _BEVEL_WIDEN)
    bevel_len = min(max(_BEVEL_MM / spacing, 2.0), 0.3 * length)
    # Reverberation copies: vertical step = gap x the shaft's vertical thickness (w / cos).
    step = _REVERB_GAP * w / cos_a
    n_rev = 0
    if reverb > 0:
        n_rev = max(1, math.ceil(math.log(0.04 / reverb) / math.log(_REVERB_DECAY)) + 1)
        n_rev = min(n_rev, 8)
    # Edge blur: ~0.2 mm axial / ~0.3 mm lateral PSF, at least 1 px (anti-aliasing), and no more
    # than half the width across so a thin shaft keeps a full-coverage core.
    ramp_perp = min(max(1.0, 0.2 / spacing), max(1.0, 0.5 * w))
    ramp_axial = min(max(1.0, 0.3 / spacing), 3.0)
    wall = max(1.0, 0.25 / spacing)  # echo thickness of one steel wall, px
    lumen = 1.0 - 0.3 * min(max((w - 2.0 * wall) / (2.0 * wall), 0.0), 1.0)
    # Reverberation lines are about one axial pulse (~0.6 mm, never more than the shaft) thick.
    sigma_rev = max(0.6, 0.25 * min(w, 0.6 / spacing))

    # Along-axis profiles on a 0.25-px grid, looked up per pixel (nearest sample).
    grid = np.arange(-2.0, length + 2.0, 0.25, dtype=np.float32)
    vis = np.maximum(pose.visibility_at(np.clip(grid / length, 0, 1)), VISIBILITY_THRESHOLD)
    # Log-compressed display: a partly out-of-plane echo fades in dB, not linearly.
    fade = (1.0 + 20.0 * np.log10(vis) / _DISPLAY_RANGE_DB).astype(np.float32)
    grain_sigma = max(1.0, 0.3 / spacing) / 0.25  # ~0.3 mm beads along the shaft
    grain = np.clip(1.0 + 0.08 * _noise_1d(rng, grid.size, grain_sigma), 0.85, 1.15)
    bevel = np.clip((grid - (length - bevel_len)) / (0.5 * bevel_len), 0.0, 1.0)
    amp = fade * grain * (shaft_amp + (bevel_amp - shaft_amp) * bevel)

    def lookup(table: np.ndarray, u: np.ndarray) -> np.ndarray:
        idx = ((u + 2.0) * 4.0 + 0.5).astype(np.int32)
        return table[np.clip(idx, 0, table.size - 1, out=idx)]

    # Each component is computed on a band of rows that follows the shaft column by column
    # (a sheared strip), not on the bounding box: most of a diagonal needle's box is empty.
    pad = half_max + ramp_perp + ramp_axial
    bend = pose.bend_px
    curve_x = curve_y = None
    x_lo, x_hi = min(ex, tx), max(ex, tx)
    if bend:
        # The bent centre line, densely. Steep and bent, it leaves the chord's columns, and its
        # rows within one column spread far beyond a straight shaft's.
        along = np.arange(-pad, length + pad + 0.25, 0.25, dtype=np.float32)
        off = _sagitta(along, length, bend)
        curve_x, curve_y = ex + along * ax + off * nx, ey + along * ay + off * ny
        x_lo, x_hi = min(x_lo, float(curve_x.min())), max(x_hi, float(curve_x.max()))
    c0 = max(0, math.floor(x_lo - pad))
    c1 = min(width - 1, math.ceil(x_hi + pad))
    if c0 > c1:
        return result
    cols = np.arange(c0, c1 + 1)
    dx = (cols - ex).astype(np.float32)[None, :]
    y_axis = ey + dx[0] * (ay / ax) if abs(ax) > 1e-6 else np.full(cols.size, ey, np.float32)
    y_lo, y_hi = min(ey, ty), max(ey, ty)
    bow = abs(bend) / cos_a

    def curve_rows(reach: float) -> tuple[np.ndarray, np.ndarray]:
        """Per column, the first and last row of the bent centre line within ``reach`` px
        across (the chord's row where it passes no column)."""
        assert curve_x is not None and curve_y is not None
        first = np.full(cols.size, np.inf, np.float32)
        last = np.full(cols.size, -np.inf, np.float32)
        for shift in range(-math.ceil(reach), math.ceil(reach) + 1):
            c = np.rint(curve_x + shift).astype(np.int64) - c0
            ok = (c >= 0) & (c < cols.size)
            np.minimum.at(first, c[ok], curve_y[ok])
            np.maximum.at(last, c[ok], curve_y[ok])
        none = ~np.isfinite(first)
        first[none], last[none] = y_axis[none], y_axis[none]
        return first, last

    def band(offset: float, half_perp: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Rows ``(n, C)`` around the shaft shifted ``offset`` px down; u, v in that copy (v from
        the bent centre line)."""
        hv = half_perp / cos_a + 1.0
        lo = math.floor(y_lo - bow + offset - half_perp - 3.0)  # 3: the widest axial end ramp
        hi = math.ceil(y_hi + bow + offset + half_perp + 3.0)
        if curve_x is None:
            n = min(math.ceil(2.0 * hv) + 2, hi - lo + 1)
            top = np.clip(np.floor(y_axis + offset - hv), lo, hi - n + 1).astype(np.int64)
        else:
            first, last = curve_rows(half_perp + 1.0)
            n = min(math.ceil(float((last - first).max()) + 2.0 * half_perp) + 4, hi - lo + 1)
            top = np.floor(first + offset - half_perp - 1.0)
            top = np.clip(top, lo, hi - n + 1).astype(np.int64)
        rows = top[None, :] + np.arange(n)[:, None]
        dy = (rows - (ey + offset)).astype(np.float32)
        u = dx * ax + dy * ay
        v = dx * nx + dy * ny
        if bend:
            v -= _sagitta(u, length, bend)
        return rows, u, v

    # Shaft and bevel.
    rows, u, v = band(0.0, half_max + 0.5 * ramp_perp)
    sig = max(0.6, 0.15 / spacing)  # speckle grain: lateral longer than axial, as in B-mode
    speckle = np.clip(0.92 + 0.08 * _noise_2d(rng, u.shape, 2.0 * sig, sig), 0.75, 1.0)
    half = 0.5 * w * (1.0 + _BEVEL_WIDEN * lookup(bevel, u))
    # Coverage: symmetric box ramps (PSF-sized, >= 1 px) keep the 0.5 level on the exact edge.
    cov = np.clip((half - np.abs(v)) / ramp_perp + 0.5, 0.0, 1.0)
    cov *= _axial_coverage(u, intervals, window=ramp_axial)
    # Front wall brightest, back wall a little dimmer, the lumen between them dimmer still
    # (only a wide needle shows it; a thin one is one solid line).
    depth_in = v + half  # px below the front (upper) surface
    front = np.clip(wall - depth_in + 0.5, 0.0, 1.0)
    back = 0.85 * np.clip(wall - (half - v) + 0.5, 0.0, 1.0)
    cross = np.maximum(np.maximum(front, back), lumen)
    parts = [(rows, level * lookup(amp, u) * speckle * cross * cov)]
    shaft_rows, shaft_in_mask = rows, cov >= MASK_COVERAGE

    # Reverberations: vertical copies (along the beam), thin, blurrier and decaying.
    rev_amp = level * reverb * gain * gain  # reverberation needs a near-normal incidence
    for k in range(1, n_rev + 1):
        sigma = sigma_rev * (1.0 + 0.15 * k)
        rows, u, v = band(k * step, 3.0 * sigma)
        rev = np.exp(-0.5 * (v / sigma) ** 2) * lookup(fade, u)
        rev *= (rev_amp * _REVERB_DECAY ** (k - 1)) * (0.85 + 0.1 * _noise_2d(rng, u.shape, sig, 1))
        rev *= _axial_coverage(u, intervals, window=3.0)  # soft ends: not ground truth
        parts.append((rows, rev))

    r_first = min(int(r[0].min()) for r, _ in parts)
    r_last = max(int(r[-1].max()) for r, _ in parts)
    canvas = np.zeros((r_last - r_first + 1, cols.size), np.float32)
    col_idx = np.arange(cols.size)[None, :]
    for rows, value in parts:
        at = (rows - r_first, col_idx)
        canvas[at] = np.maximum(canvas[at], value)
    r0, r1 = max(0, r_first), min(height - 1, r_last)
    if r0 > r1:
        return result
    layer = np.minimum(canvas[r0 - r_first : r1 - r_first + 1], 255.0)
    mask_canvas = np.zeros(canvas.shape, bool)
    mask_canvas[shaft_rows - r_first, col_idx] = shaft_in_mask
    mask[r0 : r1 + 1, c0 : c1 + 1] = mask_canvas[r0 - r_first : r1 - r_first + 1]

    # Per-column shadow (tissue under the visible shaft, cast straight down the beam).
    bg = grey[r0:, c0 : c1 + 1].astype(np.float32)
    if shadow > 0 and abs(ax) > 0.05:
        onset = y_axis + (half_max + ramp_perp) / cos_a  # below every drawn shaft pixel
        if curve_x is not None:
            sag = _sagitta(dx[0] / ax, length, bend) / cos_a  # the bend, down each column
            onset = np.maximum(onset + sag, curve_rows(half_max + ramp_perp + 1.0)[1] + 1.0)
        rows_f = np.arange(r0, height, dtype=np.float32)[:, None]
        ramp = np.clip((rows_f - onset[None, :]) / 3.0, 0.0, 1.0)
        # Soft lateral edges: the beam is ~1 mm wide, so the shadow does not end on a column.
        soft = _axial_coverage(dx[0] / ax, intervals, window=max(4.0, 1.0 / spacing) / cos_a)
        bg *= 1.0 - shadow * ramp * soft[None, :]

    # Screen composition: brightens only, toward 255 and never past it.
    roi_bg = bg[: r1 - r0 + 1]
    roi_bg += (255.0 - roi_bg) * (layer / 255.0)
    out[r0:, c0 : c1 + 1] = np.clip(np.rint(bg), 0, 255).astype(np.uint8)
    if region is not None:
        _keep_inside(out, mask, grey, _region(grey.shape, region))
    return result


def arc_bend_px(length_px: float, curvature_per_mm: float, spacing_mm: SpacingArg = None) -> float:
    """:attr:`NeedlePose.bend_px` of a shaft of ``length_px`` along a circle of signed curvature
    ``curvature_per_mm`` (1 / radius): the arc's sagitta over its chord, ``L**2 / (8 R)``, at
    most a quarter of the length."""
    spacing = _spacing(spacing_mm)
    bend = curvature_per_mm * (length_px * spacing) ** 2 / 8.0 / spacing
    return float(np.clip(bend, -0.25 * length_px, 0.25 * length_px))


def _sagitta(u: np.ndarray, length: float, bend: float) -> np.ndarray:
    """Offset of a bent shaft's centre line from its chord at distance ``u`` along the chord."""
    s = np.clip(u / length, 0.0, 1.0)
    return (4.0 * bend) * s * (1.0 - s)


def _keep_inside(out: np.ndarray, mask: np.ndarray, grey: np.ndarray, box: tuple[int, ...]) -> None:
    """Undo everything drawn outside ``box`` (x0, y0, x1, y1 inclusive), in place."""
    x0, y0, x1, y1 = box
    inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    kept, kept_mask = out[inside].copy(), mask[inside].copy()
    out[:] = grey
    mask[:] = False
    out[inside] = kept
    mask[inside] = kept_mask


def _box_exit(
    x: float, y: float, dx: float, dy: float, box: tuple[float, float, float, float]
) -> float:
    """Distance along unit direction (dx, dy) from (x, y) to the edge of box (x0, y0, x1, y1)."""
    x0, y0, x1, y1 = box
    t = math.inf
    if dx > 1e-9:
        t = min(t, (x1 - x) / dx)
    elif dx < -1e-9:
        t = min(t, (x0 - x) / dx)
    if dy > 1e-9:
        t = min(t, (y1 - y) / dy)
    elif dy < -1e-9:
        t = min(t, (y0 - y) / dy)
    return max(0.0, t)


def _region(shape: tuple[int, int], region: tuple[int, int, int, int] | None) -> tuple[int, ...]:
    """``region`` (x0, y0, x1, y1 inclusive) clipped to a frame of ``shape``; None: all of it."""
    height, width = shape[:2]
    if region is None:
        return (0, 0, width - 1, height - 1)
    x0, y0, x1, y1 = (int(c) for c in region)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(width - 1, x1), min(height - 1, y1)
    if x1 - x0 < 8 or y1 - y0 < 8:
        raise ValueError(f"region {region} is too small to hold a needle")
    return (x0, y0, x1, y1)


def random_visibility(rng: np.random.Generator, n: int = 33) -> np.ndarray:
    """A random out-of-plane visibility profile along the shaft.

    The shaft's elevation offset from the beam centre is ``e(s) = a + b s + c 4 s (1 - s)`` (s from
    0 at entry to 1 at tip, in units of the beam's elevation half-width): an offset, a yaw and a
    bend. Visibility is the beam's Gaussian elevation profile, ``exp(-e**2 / 2)``. One third of
    profiles lose the tip, one third have a gap in the middle, one third drift at random.

    Returns
    -------
    ndarray
        ``(n,)`` float64 in [0, 1], entry first.
    """
    s = np.linspace(0.0, 1.0, n)
    kind = rng.integers(3)
    if kind == 0:  # yawed: in plane at entry, leaving the beam toward the tip
        a, b, c = rng.uniform(-0.3, 0.3), rng.uniform(1.0, 3.0) * rng.choice((-1, 1)), 0.0
    elif kind == 1:  # bent: out of plane in the middle
        a, b, c = rng.uniform(-0.3, 0.3), 0.0, rng.uniform(1.6, 3.0) * rng.choice((-1, 1))
    else:
        a, b, c = rng.uniform(-1.5, 1.5), rng.uniform(-2.0, 2.0), rng.uniform(-1.0, 1.0)
    e = a + b * s + c * 4.0 * s * (1.0 - s)
    return np.exp(-0.5 * e * e)


# Needle brightness range of the benchmark's sequences (relative to the image's echo level).
NEEDLE_BRIGHTNESS = (0.9, 1.05)


def random_appearance(
    rng: np.random.Generator, brightness: tuple[float, float] = NEEDLE_BRIGHTNESS
) -> dict[str, float]:
    """Random ``reverb``, ``shadow`` and ``brightness`` (uniform over ``brightness``) for
    :func:`render_needle`: needles differ in gauge, coating and tissue above them, so one fixed
    look would teach a model one needle."""
    reverb, shadow = rng.uniform(0.3, 0.6), rng.uniform(0.0, 0.25)
    return {"reverb": reverb, "shadow": shadow, "brightness": rng.uniform(*brightness)}


def random_pose(
    shape: tuple[int, int],
    rng: np.random.Generator,
    *,
    spacing_mm: SpacingArg = None,
    region: tuple[int, int, int, int] | None = None,
    angle_range_deg: tuple[float, float] = (10.0, 60.0),
    gauge_mm: tuple[float, float] = (0.5, 1.3),
    p_out_of_plane: float = 0.3,
    min_length_mm: float = 8.0,
    margin_px: float = 4.0,
    area: np.ndarray | None = None,
) -> NeedlePose:
    """A plausible random in-plane needle pose inside the imaging region.

    The needle enters from the left or right edge of the region (upper half, 65 %) or through the
    skin line at its top, in the outer third (35 %), heads down and inward at an angle drawn
    uniformly from ``angle_range_deg``, and its tip lies inside the region, ``margin_px`` from
    its edges.

    Parameters
    ----------
    shape : tuple of int
        ``(H, W)`` of the frame (further dimensions ignored).
    rng : numpy.random.Generator
        Randomness.
    spacing_mm : float or (float, float) or None
        mm per pixel; None assumes :data:`DEFAULT_SPACING_MM`.
    region : tuple of int or None
        Imaging region ``(x0, y0, x1, y1)``, inclusive pixels; None is the whole frame.
    angle_range_deg : tuple of float
        Angle to the probe surface, degrees.
    gauge_mm : tuple of float
        Range of outer diameters, mm (25 G is 0.51 mm, 18 G 1.27 mm). The drawn width is the
        diameter in pixels, at least 1.5 px so that a coarse frame still shows a shaft.
    p_out_of_plane : float
        Probability of a random out-of-plane profile (:func:`random_visibility`).
    min_length_mm : float
        Shortest visible-in-image shaft, mm (reduced when the region cannot hold it).
    margin_px : float
        Distance of the tip from the region's edges, pixels.
    area : ndarray or None
        ``(H, W)`` bool, where the frame holds tissue (for example a sector's fan inside its
        bounding box). When given, the tip and at least half of the shaft lie inside it.

    Returns
    -------
    NeedlePose
    """
    spacing = _spacing(spacing_mm)
    x0, y0, x1, y1 = _region(shape, region)
    inner = (x0 + margin_px, y0 + margin_px, x1 - margin_px, y1 - margin_px)
    min_len = min_length_mm / spacing
    for attempt in range(200):
        from_left = bool(rng.random() < 0.5)
        sign = 1.0 if from_left else -1.0
        theta = math.radians(rng.uniform(*angle_range_deg))
        dx, dy = sign * math.cos(theta), math.sin(theta)
        if rng.random() < 0.65:
            ex = x0 - 0.5 if from_left else x1 + 0.5
            ey = rng.uniform(y0, y0 + 0.5 * (y1 - y0))
        else:
            third = (x1 - x0) / 3.0
            ex = rng.uniform(x0, x0 + third) if from_left else rng.uniform(x1 - third, x1)
            ey = y0 - 0.5
        # Enter the inner box, then travel until its far edge.
        start = 0.0
        if not (inner[0] <= ex <= inner[2] and inner[1] <= ey <= inner[3]):
            start = _entry_distance(ex, ey, dx, dy, inner)
            if start is None:
                continue
        far = start + _box_exit(ex + start * dx, ey + start * dy, dx, dy, inner)
        lo = max(min_len * (0.98**attempt), start + 1.0)
        if far <= lo:
            continue
        length = rng.uniform(lo, far)
        if area is not None and not _inside_area(area, ex, ey, dx, dy, start, length):
            continue
        break
    else:
        raise ValueError(f"no needle pose fits region {(x0, y0, x1, y1)}")
    diameter = rng.uniform(*gauge_mm)
    vis = random_visibility(rng) if rng.random() < p_out_of_plane else None
    return NeedlePose(
        (ex, ey),
        (ex + length * dx, ey + length * dy),
        max(1.5, diameter / spacing),
        vis,
    )


def _inside_area(
    area: np.ndarray, ex: float, ey: float, dx: float, dy: float, start: float, length: float
) -> bool:
    """The tip, and at least half of the shaft within the image, lie in ``area``."""
    t = np.linspace(start, length, 32)
    xs = np.rint(ex + t * dx).astype(np.int64)
    ys = np.rint(ey + t * dy).astype(np.int64)
    ok = (xs >= 0) & (xs < area.shape[1]) & (ys >= 0) & (ys < area.shape[0])
    hits = area[ys[ok], xs[ok]]
    return bool(ok[-1] and hits[-1] and hits.mean() >= 0.5)


def _entry_distance(
    x: float, y: float, dx: float, dy: float, box: tuple[float, float, float, float]
) -> float | None:
    """Distance along (dx, dy) at which a ray from (x, y) enters the box; None if it misses."""
    t0, t1 = 0.0, math.inf
    for p, d, lo, hi in ((x, dx, box[0], box[2]), (y, dy, box[1], box[3])):
        if abs(d) < 1e-12:
            if not lo <= p <= hi:
                return None
            continue
        a, b = (lo - p) / d, (hi - p) / d
        t0, t1 = max(t0, min(a, b)), min(t1, max(a, b))
    return t0 + 1e-6 if t0 < t1 else None


def _random_phases(rng: np.random.Generator, n_frames: int) -> list[tuple[PhaseKind, int]]:
    """A plausible script: insert, advance, pause, withdraw, sometimes leave and re-enter."""
    phases: list[tuple[PhaseKind, int]] = []
    kind: PhaseKind = "absent" if rng.random() < 0.5 else "advance"
    total = 0
    durations = {"absent": (5, 20), "advance": (8, 40), "pause": (5, 30), "withdraw": (5, 25)}
    follow: dict[str, tuple[tuple[PhaseKind, ...], tuple[float, ...]]] = {
        "absent": (("advance",), (1.0,)),
        "advance": (("pause", "withdraw", "advance"), (0.5, 0.3, 0.2)),
        "pause": (("advance", "withdraw"), (0.6, 0.4)),
        "withdraw": (("pause", "advance", "absent"), (0.3, 0.35, 0.35)),
    }
    while total < n_frames:
        lo, hi = durations[kind]
        n = int(rng.integers(lo, hi + 1))
        phases.append((kind, n))
        total += n
        options, probs = follow[kind]
        kind = options[int(rng.choice(len(options), p=probs))]
    return phases


def needle_sequence(
    image: np.ndarray,
    n_frames: int,
    rng: np.random.Generator,
    *,
    spacing_mm: SpacingArg = None,
    region: tuple[int, int, int, int] | None = None,
    fps: float = 20.0,
    phases: Sequence[tuple[PhaseKind, int]] | None = None,
    probe_motion: bool = True,
    angle_range_deg: tuple[float, float] = (10.0, 60.0),
    area: np.ndarray | None = None,
    bend_radius_mm: float | None = None,
) -> Iterator[tuple[np.ndarray, NeedleTruth]]:
    """A moving needle on a real frame, with simulated probe motion, frame by frame.

    The needle is inserted, advances (1.5-6 mm/s), pauses, withdraws (2-8 mm/s), pivots a few
    degrees about its entry point, drifts partly out of plane, and is sometimes absent (before
    insertion, after a complete withdrawal; a new insertion then starts from a new pose). The
    background frame moves smoothly (translation with a standard deviation of 0.3-1 mm, rotation
    0.3-1.5 degrees about the top centre of the region, as a hand-held probe does); only the
    imaging region moves, the scanner's interface around it stays. The needle pose is defined in
    image coordinates.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 real frame.
    n_frames : int
        Number of frames to yield.
    rng : numpy.random.Generator
        Randomness; the same seed gives the same sequence.
    spacing_mm : float or (float, float) or None
        mm per pixel; None assumes :data:`DEFAULT_SPACING_MM`.
    region : tuple of int or None
        Imaging region ``(x0, y0, x1, y1)`` inclusive; None is the whole frame.
    fps : float
        Frame rate, frames per second: turns speeds in mm/s into pixels per frame.
    phases : sequence of (str, int) or None
        Explicit script of ``(kind, n_frames)`` with kind ``"absent"``, ``"advance"``,
        ``"pause"`` or ``"withdraw"``, played in order and cut at ``n_frames``; the needle pauses
        once it runs out. None draws a random script.
    probe_motion : bool
        Move the background as a hand-held probe would.
    angle_range_deg : tuple of float
        Range of the insertion angle, degrees.
    area : ndarray or None
        ``(H, W)`` bool tissue area for :func:`random_pose` (a sector's fan).
    bend_radius_mm : float or None
        Smallest radius of the shaft's in-plane bend, mm. Each insertion bends one way with a
        curvature drawn uniformly from straight to ``1 / bend_radius_mm``, so its sagitta grows
        with the inserted length (``L**2 / (8 R)``: 1 mm for 40 mm at R = 200 mm). None draws
        straight needles and draws nothing more from ``rng`` (the same seed gives the same
        sequence as before bends existed).

    Yields
    ------
    image : ndarray
        ``(H, W)`` uint8 grey frame.
    truth : NeedleTruth
        Ground truth of that frame.
    """
    grey = _grey(image)
    height, width = grey.shape
    spacing = _spacing(spacing_mm)
    box = _region(grey.shape, region)
    x0, y0, x1, y1 = box
    margin = 4.0
    inner = (x0 + margin, y0 + margin, x1 - margin, y1 - margin)
    script: list[tuple[PhaseKind, int]] = (
        list(phases) if phases is not None else _random_phases(rng, n_frames)
    )
    per_frame: list[PhaseKind] = [k for k, n in script for _ in range(int(n))][:n_frames]
    if per_frame and per_frame[-1] != "absent":
        per_frame += ["pause"] * (n_frames - len(per_frame))
    else:
        per_frame += ["absent"] * (n_frames - len(per_frame))
    for kind in per_frame:
        if kind not in ("absent", "advance", "pause", "withdraw"):
            raise ValueError(f"unknown phase {kind!r}")

    # Smooth random signals over the whole sequence (unit std): pivot, elevation, probe motion.
    span = max(n_frames, 2)

    def signal(sigma_frames: float) -> np.ndarray:
        return _noise_1d(rng, span, sigma_frames)

    pivot = signal(0.6 * fps) * rng.uniform(1.0, 3.0)
    oop_amp = rng.uniform(0.2, 1.2)
    elev_a, elev_b = signal(fps) * oop_amp, signal(fps) * oop_amp
    shift_amp = rng.uniform(0.3, 1.0) / spacing if probe_motion else 0.0
    rot_amp = rng.uniform(0.3, 1.5) if probe_motion else 0.0
    tx, ty, rot = (
        signal(2 * fps) * shift_amp,
        signal(2 * fps) * shift_amp,
        signal(2 * fps) * rot_amp,
    )
    appearance = random_appearance(rng)
    s_grid = np.linspace(0.0, 1.0, 17)

    min_len = max(6.0, 3.0 / spacing)
    base: NeedlePose | None = None
    length = 0.0
    adv_speed = wd_speed = curvature = 0.0
    previous: PhaseKind = "absent"
    ry0, ry1, rx0, rx1 = y0, y1 + 1, x0, x1 + 1
    for i, kind in enumerate(per_frame):
        background = grey.copy()  # never hand out the caller's own array
        if probe_motion:
            matrix = cv2.getRotationMatrix2D(((x0 + x1) / 2.0, float(y0)), float(rot[i]), 1.0)
            matrix[:, 2] += (float(tx[i]), float(ty[i]))
            moved = cv2.warpAffine(
                grey, matrix, (width, height), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT_101,
            )  # fmt: skip
            background[ry0:ry1, rx0:rx1] = moved[ry0:ry1, rx0:rx1]

        if kind == "absent":
            base = None
            previous = kind
            yield background, NeedleTruth(False, None, False, None, np.zeros_like(grey, bool), None)
            continue
        if base is None or previous == "absent":
            base = random_pose(
                grey.shape, rng, spacing_mm=spacing, region=box,
                angle_range_deg=angle_range_deg, p_out_of_plane=0.0, area=area,
            )  # fmt: skip
            length = min(min_len + rng.uniform(0, 3.0 / spacing), base.length_px)
            adv_speed = rng.uniform(1.5, 6.0) / spacing / fps
            wd_speed = rng.uniform(2.0, 8.0) / spacing / fps
            if bend_radius_mm is not None:
                curvature = rng.uniform(0.0, 1.0 / bend_radius_mm) * rng.choice((-1.0, 1.0))
        if kind == "advance":
            length += adv_speed
        elif kind == "withdraw":
            length -= wd_speed
        previous = kind

        # Pivot about the entry point, keeping the insertion side and a downward heading.
        lowest = max(2.0, angle_range_deg[0] - 5.0)
        theta = math.radians(float(np.clip(base.angle_deg + pivot[i], lowest, 85.0)))
        sign = 1.0 if base.side == "left" else -1.0
        dx, dy = sign * math.cos(theta), math.sin(theta)
        ex, ey = base.entry_xy
        start: float | None = 0.0
        if not (inner[0] <= ex <= inner[2] and inner[1] <= ey <= inner[3]):
            start = _entry_distance(ex, ey, dx, dy, inner)
            if start is None:  # pivoted out of the region: keep the planned heading
                dx = (base.tip_xy[0] - ex) / base.length_px
                dy = (base.tip_xy[1] - ey) / base.length_px
                start = _entry_distance(ex, ey, dx, dy, inner) or 0.0
        far = start + _box_exit(ex + start * dx, ey + start * dy, dx, dy, inner)
        # The random pose's length is the planned depth: the needle never goes past it.
        length = float(np.clip(length, min(min_len, far), min(far, base.length_px)))
        elev = elev_a[i] + elev_b[i] * s_grid
        pose = NeedlePose(
            (ex, ey),
            (ex + length * dx, ey + length * dy),
            base.width_px,
            np.exp(-0.5 * elev**2),
            arc_bend_px(length, curvature, spacing),
        )
        # Shadow and reverberations stop at the imaging region; the interface around it stays.
        drawn = render_needle(
            background, pose, rng=rng, spacing_mm=spacing, region=box, **appearance
        )  # fmt: skip
        truth = NeedleTruth(True, pose.tip_xy, drawn.tip_visible, drawn.angle_deg, drawn.mask, pose)
        yield drawn.image, truth
