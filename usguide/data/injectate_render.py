"""Anechoic injectate pockets rendered onto real B-mode frames, with exact ground truth.

Hydrodissection puts a few millilitres of local anaesthetic or saline around the needle tip; in
B-mode the fluid is a dark, growing pocket. No labelled recording of one is available to usguide,
so the injectate-spread stage (:mod:`usguide.spread`) is tested and measured on pockets drawn
here onto real frames. The renderer is a handful of cheap approximations of what a pocket of
fluid looks like with a linear probe at the top of the image (depth increasing downward):

- an **irregular outline**: an ellipse whose radius is modulated by a smooth random profile
  (harmonics 2 to 6 around it), fixed for a whole sequence so the pocket keeps its shape as it
  grows (:func:`random_outline`);
- a **near-black interior** (fluid has no scatterers): the noise floor, a little smooth noise and
  a trace of the tissue behind it. The floor scales with the frame's brightness: gain lifts
  tissue and noise alike, so a dimly set scanner shows fluid blacker than a bright one;
- a **soft edge**: a linear ramp about as wide as the point-spread function (~0.2 mm), exactly
  half-way at the outline, so the ground truth is the set of pixels whose centre lies inside it;
- **posterior acoustic enhancement**: tissue below the fluid is brighter (fluid attenuates less
  than tissue), in proportion to the path length through fluid above it, fading with depth;
- optionally, tissue **pushed** aside: an area-preserving radial displacement compresses the
  tissue into a rim around the pocket (labels move with it);
- optionally, structures the fluid flows around rather than over (``exclude``, e.g. a nerve
  floating in the pocket: the "donut sign").

Only numpy and OpenCV: no torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from usguide.data.needle_render import _grey, _spacing
from usguide.labels import NERVE, VESSEL

# Edge ramp width (the point-spread function, ~0.2 mm), at least this many pixels.
_MIN_EDGE_PX = 1.0
# Harmonics of the outline's random radial profile: low orders only, so the outline is smooth.
_HARMONICS = (2, 3, 4, 5, 6)
# Fluid's mean level and noise as fractions of the tissue's median level (the same gain lifts
# both); grey levels below _BLACK are the margins around a sector, not tissue.
_FLOOR, _NOISE, _BLACK = 0.08, 0.06, 8


@dataclass(frozen=True, eq=False)  # eq=False: == on arrays has no single truth value
class RenderedInjectate:
    """A frame with an injectate pocket drawn on it, and its exact ground truth.

    Attributes
    ----------
    image : ndarray
        ``(H, W)`` uint8 grey frame with the pocket, its enhancement and pushed tissue.
    mask : ndarray
        ``(H, W)`` bool: pixels whose centre lies inside the pocket's outline (the edge ramp is
        exactly half-way there), less ``exclude``; clipped to the region.
    labels : ndarray or None
        ``(H, W)`` uint8 class indices moved with the pushed tissue; None when none were given.
    radii_px : tuple of float
        ``(rx, ry)`` of the pocket's ellipse before the outline's modulation, pixels.
    """

    image: np.ndarray
    mask: np.ndarray
    labels: np.ndarray | None
    radii_px: tuple[float, float]

    @property
    def area_px(self) -> int:
        """Pixels in :attr:`mask` (the true area, px^2)."""
        return int(np.count_nonzero(self.mask))


def random_outline(rng: np.random.Generator, irregularity: float = 0.12, n: int = 72) -> np.ndarray:
    """A smooth random relative radius profile for :func:`render_injectate`.

    Parameters
    ----------
    rng : numpy.random.Generator
    irregularity : float
        Standard deviation of the relative radius around the outline (0 gives an ellipse).
    n : int
        Samples around the outline.

    Returns
    -------
    ndarray
        ``(n,)`` float64 relative radius changes at angles ``2 pi k / n``, within [-0.4, 0.4].
    """
    theta = np.linspace(0.0, 2.0 * np.pi, n, endpoint=False)
    profile = np.zeros(n)
    for k in _HARMONICS:
        # 1/k amplitudes: a lobed, not a jagged, outline.
        profile += rng.standard_normal() / k * np.cos(k * theta + rng.uniform(0, 2 * np.pi))
    std = float(profile.std())
    if std > 0:
        profile *= irregularity / std
    return np.clip(profile, -0.4, 0.4)


def _tissue_level(grey: np.ndarray) -> float:
    """Median grey level of the tissue (pixels at least ``_BLACK``); 0 for a black image."""
    hist = np.bincount(grey.ravel(), minlength=256)
    hist[:_BLACK] = 0
    total = int(hist.sum())
    return float(np.searchsorted(np.cumsum(hist), 0.5 * total)) if total else 0.0


def _box(shape: tuple[int, int], region: tuple[int, int, int, int] | None) -> tuple[int, ...]:
    height, width = shape
    if region is None:
        return (0, 0, width - 1, height - 1)
    x0, y0, x1, y1 = (int(v) for v in region)
    if not (0 <= x0 <= x1 < width and 0 <= y0 <= y1 < height):
        raise ValueError(f"region {region} is not inside a {width}x{height} image")
    return (x0, y0, x1, y1)


def render_injectate(
    image: np.ndarray,
    centre_xy: tuple[float, float],
    radii_px: tuple[float, float],
    *,
    rng: np.random.Generator,
    angle_deg: float = 0.0,
    outline: np.ndarray | None = None,
    irregularity: float = 0.12,
    spacing_mm: float | tuple[float, float] | None = None,
    interior: float | None = None,
    noise: float | None = None,
    residual: float = 0.06,
    enhancement: float = 0.3,
    push: float = 0.0,
    exclude: np.ndarray | None = None,
    labels: np.ndarray | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> RenderedInjectate:
    """Draw an anechoic fluid pocket onto a B-mode frame and return it with exact ground truth.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 frame; not modified.
    centre_xy : tuple of float
        ``(x, y)`` centre of the pocket, pixels.
    radii_px : tuple of float
        ``(rx, ry)`` semi-axes of the pocket's ellipse, pixels; a zero radius draws nothing.
    rng : numpy.random.Generator
        Source of the interior noise (and of the outline when ``outline`` is None); the same
        seed gives the same image.
    angle_deg : float
        Rotation of the ``rx`` axis from the image's x axis, degrees, clockwise on screen.
    outline : ndarray or None
        ``(K,)`` relative radius changes at evenly spaced angles (see :func:`random_outline`);
        None draws one from ``rng`` with ``irregularity``. Pass the same one to every frame of a
        sequence.
    irregularity : float
        Used only when ``outline`` is None.
    spacing_mm : float or (float, float) or None
        mm per pixel; None assumes 0.1. Sets the edge width (~0.2 mm) and the noise grain.
    interior : float or None
        Mean grey level of the fluid; None: 8 % of the region's median tissue level.
    noise : float or None
        Standard deviation of the fluid's smooth noise, grey levels; None: 6 % of the region's
        median tissue level (at least 1).
    residual : float
        Fraction of the tissue's texture that shows through the fluid.
    enhancement : float
        Relative brightening of the tissue below the thickest part of the pocket (0 disables it).
    push : float
        0 to 1: how far tissue is pushed aside (1 conserves its area: what was under the pocket
        is compressed into a rim around it). Labels move with it.
    exclude : ndarray or None
        ``(H, W)`` bool: pixels the fluid flows around (a nerve inside the pocket); they keep
        their tissue and are not in the mask. Not moved by ``push``.
    labels : ndarray or None
        ``(H, W)`` uint8 class indices to move with the pushed tissue.
    region : tuple of int or None
        Imaging region ``(x0, y0, x1, y1)``, inclusive pixels: nothing is drawn outside it.

    Returns
    -------
    RenderedInjectate
    """
    grey = _grey(image)
    height, width = grey.shape
    x0, y0, x1, y1 = _box(grey.shape, region)
    rx, ry = float(radii_px[0]), float(radii_px[1])
    if outline is None:
        outline = random_outline(rng, irregularity)
    out_labels = None if labels is None else labels.copy()
    if rx <= 0 or ry <= 0:
        return RenderedInjectate(grey.copy(), np.zeros((height, width), bool), out_labels, (rx, ry))
    spacing = _spacing(spacing_mm)
    edge = max(_MIN_EDGE_PX, 0.2 / spacing)
    profile = np.asarray(outline, np.float64).reshape(-1)

    # Only the box the pocket can change is computed: its outline, or 4 radii when it pushes
    # tissue aside; the posterior enhancement runs down to the region's bottom. The tissue
    # level is the whole region's.
    level = _tissue_level(grey[y0 : y1 + 1, x0 : x1 + 1])
    radius = max(rx, ry) * (1.0 + float(np.abs(profile).max()))
    reach = (4.0 if push > 0 else 1.0) * radius + 4.0 * edge + 4.0
    cx, cy = float(centre_xy[0]), float(centre_xy[1])
    x0, x1 = max(x0, math.floor(cx - reach)), min(x1, math.ceil(cx + reach))
    y0 = max(y0, math.floor(cy - reach))
    if enhancement <= 0:
        y1 = min(y1, math.ceil(cy + reach))
    if x0 > x1 or y0 > y1:  # the pocket lies wholly outside the region
        return RenderedInjectate(grey.copy(), np.zeros((height, width), bool), out_labels, (rx, ry))
    # Polar coordinates in the ellipse's own frame, for every pixel of the box.
    ys, xs = np.mgrid[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    a = math.radians(angle_deg)
    dx, dy = xs - np.float32(centre_xy[0]), ys - np.float32(centre_xy[1])
    u = dx * np.float32(math.cos(a)) + dy * np.float32(math.sin(a))
    v = -dx * np.float32(math.sin(a)) + dy * np.float32(math.cos(a))
    rho = np.hypot(u, v)
    phi = np.arctan2(v, u)
    # Outline radius in each pixel's direction: the ellipse's, times 1 + the profile there.
    ellipse_r = (rx * ry) / np.hypot(ry * np.cos(phi), rx * np.sin(phi))
    k = profile.size
    pos = (phi % np.float32(2 * np.pi)) * np.float32(k / (2 * np.pi))
    i0 = np.floor(pos).astype(np.int64) % k
    frac = pos - np.floor(pos)
    outline_r = ellipse_r * (1.0 + profile[i0] * (1 - frac) + profile[(i0 + 1) % k] * frac)
    outline_r = outline_r.astype(np.float32)
    dist = rho - outline_r  # radial distance outside the outline, px (negative inside)

    tissue = grey[y0 : y1 + 1, x0 : x1 + 1].astype(np.float32)
    if push > 0:
        # Tissue at radius rho came from sqrt(rho^2 - R^2) (area conserved), tapered to no
        # displacement at 4 R so the warp stays local; inside, the middle is squeezed outward.
        r2 = np.maximum(rho * rho - outline_r * outline_r, 0.0)
        taper = np.clip(1.0 - dist / (3.0 * outline_r), 0.0, 1.0) ** 2
        source = np.where(
            dist > 0,
            rho - push * (rho - np.sqrt(r2)) * taper,
            rho * (1.0 - push),
        )
        scale = np.where(rho > 1e-6, source / np.maximum(rho, 1e-6), 0.0).astype(np.float32)
        map_x = np.float32(centre_xy[0]) + dx * scale
        map_y = np.float32(centre_xy[1]) + dy * scale
        if exclude is not None:  # excluded structures stay where they are
            keep = exclude[y0 : y1 + 1, x0 : x1 + 1]
            map_x[keep], map_y[keep] = xs[keep], ys[keep]
        tissue = cv2.remap(
            grey.astype(np.float32), map_x, map_y, cv2.INTER_LINEAR,
            borderMode=cv2.BORDER_REFLECT_101,
        )  # fmt: skip
        if out_labels is not None:
            out_labels[y0 : y1 + 1, x0 : x1 + 1] = cv2.remap(
                labels, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT_101
            )

    # Fluid coverage: a linear ramp of width `edge`, exactly 0.5 on the outline.
    alpha = np.clip(0.5 - dist / np.float32(edge), 0.0, 1.0)
    inside = dist <= 0
    if exclude is not None:
        ex = exclude[y0 : y1 + 1, x0 : x1 + 1]
        soft = cv2.GaussianBlur(ex.astype(np.float32), (0, 0), max(0.5, 0.4 * edge))
        alpha *= 1.0 - np.where(ex, 1.0, soft)
        inside &= ~ex

    if enhancement > 0:
        # Posterior enhancement: proportional to the path through fluid above each pixel (the
        # beam runs down the columns), slightly spread sideways, fading below the pocket.
        path = np.cumsum(alpha, axis=0)
        full = float(path[-1].max())
        if full > 0:
            path = cv2.GaussianBlur(path, (0, 0), sigmaX=max(1.0, edge), sigmaY=0.1)
            fade_len = max(4.0 * ry, 20.0)
            rows = np.arange(path.shape[0], dtype=np.float32)[:, None]
            last = np.where(alpha.any(axis=0), path.shape[0] - 1 - np.argmax(alpha[::-1] > 0, 0), 0)
            below = np.maximum(rows - last[None, :], 0.0)
            gain = 1.0 + enhancement * (path / full) * np.exp(-below / fade_len)
            tissue = tissue * gain

    grain = max(0.6, 0.1 / spacing)
    fluid = rng.standard_normal(alpha.shape).astype(np.float32)
    fluid = cv2.GaussianBlur(fluid, (0, 0), grain)
    interior = _FLOOR * level if interior is None else interior
    noise = max(1.0, _NOISE * level) if noise is None else noise
    fluid *= noise / max(float(fluid.std()), 1e-6)
    fluid = np.abs(interior + fluid) + residual * tissue
    drawn = (1.0 - alpha) * tissue + alpha * fluid

    out = grey.copy()
    out[y0 : y1 + 1, x0 : x1 + 1] = np.clip(np.rint(drawn), 0, 255).astype(np.uint8)
    mask = np.zeros((height, width), bool)
    mask[y0 : y1 + 1, x0 : x1 + 1] = inside
    return RenderedInjectate(out, mask, out_labels, (rx, ry))


def random_pocket(
    image: np.ndarray,
    mask: np.ndarray,
    rng: np.random.Generator,
    beside_nerve: float = 0.7,
    spacing_mm: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    """A random anechoic fluid pocket (injectate, hydrodissection) with its labels: a training
    sample and a benchmark case.

    The pocket's long semi-axis is 0.8-4 mm. With probability ``beside_nerve`` (when ``mask``
    has a nerve) it lies against the nerve's outline, up to 1.5 mm off it; else anywhere below
    the image's top tenth. Fluid flows around nerves and vessels and may push tissue aside
    (labels move with it); its pixels are labelled background, so fluid next to a nerve is never
    nerve. ``image`` is ``(H, W)`` uint8, ``mask`` its class-index map; returns both, drawn.
    """
    height, width = mask.shape
    rx = rng.uniform(0.8, 4.0) / spacing_mm
    ry = rx * rng.uniform(0.6, 1.0)
    nerve = mask == NERVE
    if nerve.any() and rng.random() < beside_nerve:
        inner = cv2.erode(nerve.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
        ys, xs = np.nonzero(nerve & ~inner)
        k = int(rng.integers(len(xs)))
        out = np.array([xs[k] - xs.mean(), ys[k] - ys.mean()])
        out /= max(float(np.hypot(*out)), 1e-9)
        reach = 0.5 * (rx + ry) + rng.uniform(0.0, 1.5) / spacing_mm
        centre = (float(xs[k] + out[0] * reach), float(ys[k] + out[1] * reach))
    else:
        centre = (rng.uniform(0, width - 1), rng.uniform(0.1 * height, height - 1))
    rendered = render_injectate(
        image,
        centre,
        (rx, ry),
        rng=rng,
        angle_deg=rng.uniform(-30.0, 30.0),
        spacing_mm=spacing_mm,
        push=rng.uniform(0.0, 0.6),
        exclude=nerve | (mask == VESSEL),
        labels=mask,
    )
    assert rendered.labels is not None
    labels = rendered.labels.copy()
    labels[rendered.mask] = 0
    return rendered.image, labels


def _smooth_walk(rng: np.random.Generator, n: int, sigma_frames: float) -> np.ndarray:
    """``(n,)`` smooth random signal with unit standard deviation."""
    radius = max(1, int(3 * sigma_frames))
    white = rng.standard_normal(n + 2 * radius)
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / max(sigma_frames, 1e-3)) ** 2)
    walk = np.convolve(white, kernel / kernel.sum(), "valid")
    walk -= walk.mean()
    return walk / max(float(walk.std()), 1e-6)


def injectate_sequence(
    image: np.ndarray,
    n_frames: int,
    rng: np.random.Generator,
    *,
    centre_xy: tuple[float, float],
    final_radii_px: tuple[float, float],
    origin_xy: tuple[float, float] | None = None,
    start_frame: int = 0,
    grow_frames: int | None = None,
    angle_deg: float = 0.0,
    irregularity: float = 0.12,
    labels: np.ndarray | None = None,
    exclude: np.ndarray | None = None,
    push: float = 0.3,
    enhancement: float = 0.3,
    frame_noise: float = 2.0,
    shift_px: float = 0.0,
    spacing_mm: float | tuple[float, float] | None = None,
    region: tuple[int, int, int, int] | None = None,
) -> Iterator[RenderedInjectate]:
    """A pocket growing from nothing on a real frame, frame by frame.

    The pocket's area grows linearly with time (a steady injection) from ``start_frame`` over
    ``grow_frames`` frames to ``final_radii_px``, then stays. Each frame gets fresh grey noise
    (speckle decorrelation and electronic noise) and, optionally, a smooth random translation of
    the imaging region (a hand-held probe), applied to the image, the mask and the labels alike.

    Parameters
    ----------
    image : ndarray
        ``(H, W)`` grey or ``(H, W, 3)`` RGB uint8 real frame.
    n_frames : int
        Frames to yield.
    rng : numpy.random.Generator
        Randomness; the same seed gives the same sequence.
    centre_xy : tuple of float
        ``(x, y)`` centre of the pocket, pixels.
    final_radii_px : tuple of float
        ``(rx, ry)`` once the injection is over, pixels. ``(0, 0)`` gives a sequence with no
        injection (noise and probe motion only).
    origin_xy : tuple of float or None
        Where the fluid first appears (the needle tip): the pocket's centre moves from here to
        ``centre_xy`` as its radii grow, so it spreads from the tip around a structure rather
        than appearing in the middle of it. None: ``centre_xy`` throughout.
    start_frame : int
        First frame with fluid.
    grow_frames : int or None
        Frames the pocket grows for; None grows until the last frame.
    angle_deg, irregularity, push, enhancement, spacing_mm, region
        As :func:`render_injectate`; the outline is drawn once for the sequence.
    labels : ndarray or None
        ``(H, W)`` uint8 class indices, moved with the tissue and the probe.
    exclude : ndarray or None
        ``(H, W)`` bool pixels the fluid flows around.
    frame_noise : float
        Standard deviation of the per-frame grey noise, grey levels.
    shift_px : float
        Standard deviation of the probe's translation, pixels (0: a still probe).

    Yields
    ------
    RenderedInjectate
        Per frame: image, mask and labels after probe motion, and the pocket's radii.
    """
    grey = _grey(image)
    height, width = grey.shape
    x0, y0, x1, y1 = _box(grey.shape, region)
    outline = random_outline(rng, irregularity)
    grow = max(1, n_frames - start_frame if grow_frames is None else grow_frames)
    span = max(n_frames, 2)
    tx = _smooth_walk(rng, span, 6.0) * shift_px
    ty = _smooth_walk(rng, span, 6.0) * shift_px
    inner = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    for i in range(n_frames):
        # Area linear in time: the radii grow as its square root.
        f = math.sqrt(min(max((i - start_frame + 1) / grow, 0.0), 1.0))
        radii = (final_radii_px[0] * f, final_radii_px[1] * f)
        ox, oy = origin_xy if origin_xy is not None else centre_xy
        centre = (ox + f * (centre_xy[0] - ox), oy + f * (centre_xy[1] - oy))
        drawn = render_injectate(
            grey, centre, radii, rng=rng, angle_deg=angle_deg, outline=outline,
            spacing_mm=spacing_mm, enhancement=enhancement, push=push, exclude=exclude,
            labels=labels, region=region,
        )  # fmt: skip
        img, mask, lab = drawn.image, drawn.mask, drawn.labels
        if shift_px > 0:
            matrix = np.float32([[1, 0, tx[i]], [0, 1, ty[i]]])
            size = (width, height)
            moved = cv2.warpAffine(img, matrix, size, flags=cv2.INTER_LINEAR,
                                   borderMode=cv2.BORDER_REFLECT_101)  # fmt: skip
            img[inner] = moved[inner]  # only the imaging region moves, the interface stays
            mask = cv2.warpAffine(mask.view(np.uint8), matrix, size, flags=cv2.INTER_NEAREST)
            mask = mask.astype(bool)
            if lab is not None:
                lab = cv2.warpAffine(lab, matrix, size, flags=cv2.INTER_NEAREST,
                                     borderMode=cv2.BORDER_REFLECT_101)  # fmt: skip
        if frame_noise > 0:
            noisy = img[inner].astype(np.float32)
            noisy += rng.standard_normal(noisy.shape).astype(np.float32) * frame_noise
            img[inner] = np.clip(np.rint(noisy), 0, 255).astype(np.uint8)
        yield RenderedInjectate(img, mask, lab, radii)
