"""Augmentations for B-mode training pairs: image and class mask moved together.

Every transform is a small callable class configured in its constructor (as in MONAI) and called
as ``transform(image, mask, rng) -> (image, mask)`` with

- ``image`` ``(H, W)`` uint8 grey,
- ``mask`` ``(H, W)`` uint8 class indices (:mod:`usguide.labels`),
- ``rng`` a :class:`numpy.random.Generator`, the only source of randomness: the same generator
  state gives the same result.

It returns new arrays of the same shapes and dtypes; the inputs are never written. Geometry is
applied identically to both; the mask is resampled with nearest neighbour only, so it never holds
a value that is not a class of its input, except 0 where pixels come from outside the frame (0 in
image and mask: there is no tissue there). Intensity transforms change the image only.

Which classes a sample labels (``Sample.labelled``) is never changed by augmentation: use
:meth:`UltrasoundAugment.augment_sample`, or carry ``labelled`` alongside unchanged.

What is modelled, and why:

- :class:`RandomGain`: the overall gain knob.
- :class:`DepthGain`: time-gain compensation, a smooth gain curve over depth (rows), monotone or
  bumpy, as sonographers set the TGC sliders.
- :class:`Speckle`: multiplicative Rayleigh speckle, smoothed to a random grain size.
- :class:`GreyMap`: the scanner's grey map and dynamic range, a power curve over grey levels
  (sites and scanners differ far more in this than in overall gain).
- :class:`EdgeEnhance`: the scanner's edge enhancement, an unsharp mask.
- :class:`RandomAffine`: small probe moves: rotation, scale (depth setting), translation.
- :class:`RandomFlip`: left-right, as probes are held either way round. Never up-down: depth is
  physical (the probe is at the top).
- :class:`RandomCropScale`: a crop of 60-100 % of the area resized back (zoom).
- :func:`convex_view_pair`: the same tissue as a convex probe pressed on the skin shows it, in
  a fan (outside the chain: training draws it for a share of samples, before needles are
  rendered, because a needle is straight in the displayed image).

:class:`UltrasoundAugment` chains them with probabilities and folds consecutive geometric
transforms into one warp (one interpolation, one pass). For 256x256 the default chain takes
about 0.4 ms (median; 0.7 ms with every transform applied) on one core.

Only numpy and OpenCV: no torch here.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from usguide.data.datasets import Sample

__all__ = [
    "DepthGain",
    "EdgeEnhance",
    "GeometricTransform",
    "GreyMap",
    "IntensityTransform",
    "RandomAffine",
    "RandomCropScale",
    "RandomFlip",
    "RandomGain",
    "Speckle",
    "Transform",
    "UltrasoundAugment",
    "convex_view_pair",
    "default_transforms",
    "resize_pair",
    "sector_mask",
    "sector_view",
    "warp_pair",
]


def _check_pair(image: np.ndarray, mask: np.ndarray) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 2 or image.dtype != np.uint8:
        raise ValueError(
            f"image must be a (H, W) uint8 array, got {getattr(image, 'shape', image)}"
        )
    if not isinstance(mask, np.ndarray) or mask.shape != image.shape or mask.dtype != np.uint8:
        raise ValueError(
            f"mask must be a uint8 array of the image's shape {image.shape}, "
            f"got {getattr(mask, 'dtype', type(mask))} {getattr(mask, 'shape', '')}"
        )


def _check_p(p: float) -> float:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"probability p must be within [0, 1], got {p}")
    return float(p)


def _check_range(
    name: str, lo_hi: tuple[float, float], lo: float, hi: float
) -> tuple[float, float]:
    a, b = float(lo_hi[0]), float(lo_hi[1])
    if not lo <= a <= b <= hi:
        raise ValueError(f"{name} must be (low, high) within [{lo}, {hi}], got {lo_hi}")
    return a, b


def resize_pair(
    image: np.ndarray, mask: np.ndarray, size: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Resize an image and its mask to ``size`` (the network input), stretching as inference does.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` uint8 grey image.
    mask : numpy.ndarray
        ``(H, W)`` uint8 class indices.
    size : tuple of int
        ``(rows, cols)`` of the result.

    Returns
    -------
    image, mask : numpy.ndarray
        ``(rows, cols)`` uint8 each, new arrays.

    Notes
    -----
    The image uses ``INTER_AREA``, as :class:`usguide.segment.Segmenter` does at run time, so
    training sees the same resampling. The mask uses ``INTER_NEAREST_EXACT``: nearest neighbour
    with pixel centres aligned like the image's (plain ``INTER_NEAREST`` in ``cv2.resize`` is
    shifted by up to half a source pixel).
    """
    _check_pair(image, mask)
    rows, cols = int(size[0]), int(size[1])
    if rows < 1 or cols < 1:
        raise ValueError(f"size must be positive (rows, cols), got {size}")
    if image.shape == (rows, cols):
        return image.copy(), mask.copy()
    out_image = cv2.resize(image, (cols, rows), interpolation=cv2.INTER_AREA)
    out_mask = cv2.resize(mask, (cols, rows), interpolation=cv2.INTER_NEAREST_EXACT)
    return out_image, out_mask


def warp_pair(
    image: np.ndarray, mask: np.ndarray, matrix: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Apply one affine map to an image (bilinear) and its mask (nearest), same output size.

    Parameters
    ----------
    image, mask : numpy.ndarray
        ``(H, W)`` uint8.
    matrix : numpy.ndarray
        ``(3, 3)`` or ``(2, 3)`` map from input to output pixel coordinates ``(x, y)``, pixel
        centres at integers.

    Returns
    -------
    image, mask : numpy.ndarray
        ``(H, W)`` uint8 each; outside the input is 0 in both.
    """
    _check_pair(image, mask)
    m = np.asarray(matrix, dtype=np.float64)[:2]
    size = (image.shape[1], image.shape[0])
    out_image = cv2.warpAffine(
        image, m, size, flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    out_mask = cv2.warpAffine(
        mask, m, size, flags=cv2.INTER_NEAREST, borderMode=cv2.BORDER_CONSTANT, borderValue=0
    )
    return out_image, out_mask


class Transform:
    """Base of the random transforms: applied with probability ``p``.

    Parameters
    ----------
    p : float
        Probability of applying the transform on a call. Each call draws one uniform number for
        this coin, then the transform's parameters when it applies.
    """

    def __init__(self, p: float = 1.0) -> None:
        self.p = _check_p(p)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        _check_pair(image, mask)
        if rng.random() >= self.p:
            return image.copy(), mask.copy()
        return self.apply(image, mask, rng)

    def apply(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Apply unconditionally (parameters drawn from ``rng``); new arrays."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({fields})"


class GeometricTransform(Transform):
    """A transform that moves pixels: an affine map applied to image and mask alike."""

    def matrix(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        """A random ``(3, 3)`` map from input to output pixel coordinates ``(x, y)`` for a frame
        of ``shape`` ``(H, W)``."""
        raise NotImplementedError

    def apply(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return warp_pair(image, mask, self.matrix(image.shape, rng))


class IntensityTransform(Transform):
    """A transform of grey levels only; the mask is returned unchanged (as a copy)."""

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The transformed image, a new ``(H, W)`` uint8 array."""
        raise NotImplementedError

    def apply(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        return self.apply_image(image, rng), mask.copy()


def _about_centre(
    linear: np.ndarray, shape: tuple[int, int], shift: tuple[float, float]
) -> np.ndarray:
    """3x3 map applying ``linear`` (2x2) about the frame centre, then moving by ``shift``."""
    h, w = shape
    cx, cy = (w - 1) / 2.0, (h - 1) / 2.0
    m = np.eye(3)
    m[:2, :2] = linear
    m[:2, 2] = np.array([cx + shift[0], cy + shift[1]]) - linear @ np.array([cx, cy])
    return m


class RandomAffine(GeometricTransform):
    """Small probe moves: rotation, isotropic scale and translation about the frame centre.

    Parameters
    ----------
    rotation_deg : float, optional
        Largest rotation either way, degrees. Default 10.
    scale : tuple of float, optional
        Range of the scale factor (log-uniform). Default (0.85, 1.15).
    translate : float, optional
        Largest shift either way as a fraction of the frame's width (x) and height (y).
        Default 0.08.
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(
        self,
        rotation_deg: float = 10.0,
        scale: tuple[float, float] = (0.85, 1.15),
        translate: float = 0.08,
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        if not 0.0 <= rotation_deg <= 180.0:
            raise ValueError(f"rotation_deg must be within [0, 180], got {rotation_deg}")
        if not 0.0 <= translate <= 1.0:
            raise ValueError(f"translate must be within [0, 1], got {translate}")
        self.rotation_deg = float(rotation_deg)
        self.scale = _check_range("scale", scale, 1e-3, 1e3)
        self.translate = float(translate)

    def matrix(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        angle = math.radians(rng.uniform(-self.rotation_deg, self.rotation_deg))
        s = math.exp(rng.uniform(math.log(self.scale[0]), math.log(self.scale[1])))
        tx = rng.uniform(-self.translate, self.translate) * w
        ty = rng.uniform(-self.translate, self.translate) * h
        c, si = math.cos(angle) * s, math.sin(angle) * s
        return _about_centre(np.array([[c, -si], [si, c]]), shape, (tx, ty))


class RandomFlip(GeometricTransform):
    """Left-right mirror (probe held the other way round). Never up-down: depth is physical.

    Parameters
    ----------
    p : float, optional
        Probability of applying. Default 0.5.
    """

    def __init__(self, p: float = 0.5) -> None:
        super().__init__(p)

    def matrix(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        return np.array([[-1.0, 0.0, shape[1] - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])

    def apply(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        # Exact and faster than a warp.
        return np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(mask[:, ::-1])


class RandomCropScale(GeometricTransform):
    """A random crop resized back to the full frame (zoom in).

    Parameters
    ----------
    area : tuple of float, optional
        Range of the crop's area as a fraction of the frame; the crop keeps the frame's aspect
        ratio. Default (0.6, 1.0).
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(self, area: tuple[float, float] = (0.6, 1.0), p: float = 1.0) -> None:
        super().__init__(p)
        self.area = _check_range("area", area, 1e-3, 1.0)

    def matrix(self, shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
        h, w = shape
        f = math.sqrt(rng.uniform(*self.area))  # side fraction
        x0 = rng.uniform(0.0, (1.0 - f) * w)
        y0 = rng.uniform(0.0, (1.0 - f) * h)
        # Pixel-edge coordinates: the crop [x0, x0 + f w) fills [0, w) of the output.
        m = np.eye(3)
        m[0, 0] = m[1, 1] = 1.0 / f
        m[0, 2] = (0.5 - x0) / f - 0.5
        m[1, 2] = (0.5 - y0) / f - 0.5
        return m


def _lut_scale(image: np.ndarray, gain: float) -> np.ndarray:
    lut = np.clip(np.arange(256, dtype=np.float64) * gain + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(image, lut)


class RandomGain(IntensityTransform):
    """Overall gain: grey levels multiplied by one factor and clipped to 255.

    Parameters
    ----------
    gain : tuple of float, optional
        Range of the factor (log-uniform). Default (0.7, 1.4).
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(self, gain: tuple[float, float] = (0.7, 1.4), p: float = 1.0) -> None:
        super().__init__(p)
        self.gain = _check_range("gain", gain, 0.0, 100.0)
        if self.gain[0] <= 0:
            raise ValueError(f"gain must be positive, got {gain}")

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        g = math.exp(rng.uniform(math.log(self.gain[0]), math.log(self.gain[1])))
        return _lut_scale(image, g)


class DepthGain(IntensityTransform):
    """Time-gain compensation: a smooth random gain curve over depth (rows).

    Parameters
    ----------
    max_db : float, optional
        Largest gain change either way at any depth, in dB (20 log10 of the factor). Default 6.
    knots : tuple of int, optional
        Range of the number of control depths, evenly spaced from top to bottom. Default (3, 6).
    monotone : float, optional
        Probability that the curve only rises or only falls with depth (an uncompensated or
        overcompensated attenuation); otherwise it is bumpy (sliders set unevenly). Default 0.5.
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(
        self,
        max_db: float = 6.0,
        knots: tuple[int, int] = (3, 6),
        monotone: float = 0.5,
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        if not 0.0 <= max_db <= 40.0:
            raise ValueError(f"max_db must be within [0, 40], got {max_db}")
        if not 2 <= knots[0] <= knots[1]:
            raise ValueError(f"knots must be (low, high) with 2 <= low <= high, got {knots}")
        self.max_db = float(max_db)
        self.knots = (int(knots[0]), int(knots[1]))
        self.monotone = _check_p(monotone)

    def curve(self, rows: int, rng: np.random.Generator) -> np.ndarray:
        """A random ``(rows,)`` float32 gain factor per row."""
        k = int(rng.integers(self.knots[0], self.knots[1] + 1))
        db = rng.uniform(-self.max_db, self.max_db, size=k)
        if rng.random() < self.monotone:
            db = np.sort(db) if rng.random() < 0.5 else np.sort(db)[::-1]
        depth = np.linspace(0.0, rows - 1.0, k)
        per_row = np.interp(np.arange(rows, dtype=np.float64), depth, db)
        # Smooth the corners; a positive kernel keeps a monotone curve monotone.
        sigma = max(1.0, rows / (2.0 * k))
        per_row = cv2.GaussianBlur(
            per_row.reshape(-1, 1),
            (1, 0),
            sigmaX=0.1,
            sigmaY=sigma,
            borderType=cv2.BORDER_REPLICATE,
        ).ravel()
        return (10.0 ** (per_row / 20.0)).astype(np.float32)

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        gain = self.curve(image.shape[0], rng)
        out = image.astype(np.float32)
        out *= gain[:, None]
        np.clip(out, 0.0, 255.0, out=out)
        return out.astype(np.uint8)


class Speckle(IntensityTransform):
    """Multiplicative speckle: Rayleigh-distributed factors of mean 1, smoothed to a grain size.

    Parameters
    ----------
    strength : tuple of float, optional
        Range of the blend ``s`` in ``factor = 1 + s (r - 1)`` with ``r`` Rayleigh of mean 1
        (coefficient of variation ~0.52 s). Within [0, 1]. Default (0.1, 0.4).
    grain : tuple of float, optional
        Range of the speckle grain size in pixels: the noise is drawn on a grid that many times
        coarser and resized up bilinearly. Default (1.0, 2.5).
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(
        self,
        strength: tuple[float, float] = (0.1, 0.4),
        grain: tuple[float, float] = (1.0, 2.5),
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        self.strength = _check_range("strength", strength, 0.0, 1.0)
        self.grain = _check_range("grain", grain, 1.0, 64.0)

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        h, w = image.shape
        s = rng.uniform(*self.strength)
        g = rng.uniform(*self.grain)
        gh, gw = max(1, math.ceil(h / g)), max(1, math.ceil(w / g))
        r = rng.rayleigh(1.0 / math.sqrt(math.pi / 2.0), size=(gh, gw)).astype(np.float32)
        factor = 1.0 + np.float32(s) * (r - 1.0)
        if (gh, gw) != (h, w):
            factor = cv2.resize(factor, (w, h), interpolation=cv2.INTER_LINEAR)
        out = image.astype(np.float32)
        out *= factor
        np.clip(out, 0.0, 255.0, out=out)
        return out.astype(np.uint8)


def _fan(
    height: int, width: int, apex_above: float, sides_at: float
) -> tuple[np.ndarray, np.ndarray]:
    """The fan of :func:`sector_mask` in a box, and the depth of its near arc per column."""
    if height < 1 or width < 1 or apex_above <= 0 or sides_at <= 0:
        raise ValueError("a sector needs a non-empty box and positive apex_above and sides_at")
    cx = (width - 1) / 2.0
    apex_y = -apex_above * height
    half_angle = math.atan2(width / 2.0, sides_at * height - apex_y)
    # The near arc (the probe's face) ends on the box's top edge and dips below it between.
    inner = -apex_y / math.cos(half_angle)
    outer = height - apex_y  # the far arc's lowest point is the box's bottom edge
    dx = np.arange(width, dtype=np.float32) - np.float32(cx)
    arc = np.maximum(apex_y + np.sqrt(np.maximum(inner**2 - dx**2, 0.0)), 0.0)
    yy = np.arange(height, dtype=np.float32)[:, None]
    angle = np.arctan2(np.abs(dx)[None, :], yy - apex_y)
    radius = np.hypot(dx[None, :], yy - apex_y)
    fan = (angle <= half_angle) & (radius >= inner) & (radius <= outer)
    return fan, arc.astype(np.float32)


def sector_mask(
    height: int, width: int, apex_above: float = 0.6, sides_at: float = 0.75
) -> np.ndarray:
    """Where a curvilinear (convex) probe's image lies in a ``height`` x ``width`` box: ``(H, W)``
    bool, True inside the fan.

    The fan's apex is ``apex_above`` x ``height`` above the box's top edge, over its centre; its
    straight sides reach the box's left and right edges at ``sides_at`` x ``height``. Its near
    arc (the probe's face) ends on the top edge and dips below it in the middle; its far arc's
    lowest point is on the bottom edge. The box's top corners, the dip above the near arc, and
    the bottom corners below the far arc hold no image, as beside a real sector.
    """
    return _fan(height, width, apex_above, sides_at)[0]


def convex_view_pair(
    image: np.ndarray, mask: np.ndarray, apex_above: float = 0.6, sides_at: float = 0.75
) -> tuple[np.ndarray, np.ndarray]:
    """The image and mask (from a linear probe) as a convex probe pressed on the same skin would
    show them, in the fan of :func:`sector_mask`.

    The probe's curved face indents the skin: the skin line and the tissue just under it follow
    the fan's near arc, and the indentation fades over the first ``CONFORM_DEPTH`` of the
    height, so deeper tissue keeps its shape (a flat fascia plane stays flat and meets the fan's
    sides). Same shape out; beside the fan is 0 in both (nothing imaged, no class). The image is
    resampled bilinearly, the mask by nearest neighbour.
    """
    _check_pair(image, mask)
    out_image, out_mask, fan = _convex_remap(image, mask, apex_above, sides_at)
    out_image[~fan] = 0
    out_mask[~fan] = 0
    return out_image, out_mask


def sector_view(
    image: np.ndarray,
    mask: np.ndarray,
    box: tuple[int, int, int, int],
    apex_above: float = 0.6,
    sides_at: float = 0.75,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A frame as a convex probe would show the tissue of its imaging region ``box``
    (x0, y0, x1, y1, inclusive), for making sector sequences: inside the box, image and mask
    as by :func:`convex_view_pair`; outside it, unchanged.

    Beside the fan the tissue goes on instead of being black, so that a sequence moving the
    frame under a probe moves tissue, never the fan's edge: black out ``~imaged`` after drawing
    and moving.

    Returns the new image and mask, and ``imaged`` ``(H, W)`` bool: False beside the fan inside
    the box, True elsewhere.
    """
    _check_pair(image, mask)
    x0, y0, x1, y1 = box
    inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    out_image, out_mask = image.copy(), mask.copy()
    imaged = np.ones(image.shape, bool)
    out_image[inside], out_mask[inside], imaged[inside] = _convex_remap(
        image[inside], mask[inside], apex_above, sides_at
    )
    return out_image, out_mask, imaged


# Share of the box's height over which a convex probe's indentation of the skin fades out.
CONFORM_DEPTH = 0.3


def _convex_remap(
    image: np.ndarray, mask: np.ndarray, apex_above: float, sides_at: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Image and mask indented by the probe's face (tissue continued beside the fan), and the
    fan."""
    h, w = image.shape
    fan, arc = _fan(h, w, apex_above, sides_at)
    yy = np.arange(h, dtype=np.float32)[:, None]
    fade = np.clip(1.0 - (yy - arc[None, :]) / np.float32(CONFORM_DEPTH * h), 0.0, 1.0)
    map_y = yy - arc[None, :] * fade
    map_x = np.broadcast_to(np.arange(w, dtype=np.float32)[None, :], (h, w)).copy()
    out_image = cv2.remap(image, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    out_mask = cv2.remap(mask, map_x, map_y, cv2.INTER_NEAREST, borderMode=cv2.BORDER_REFLECT)
    return out_image, out_mask, fan


class GreyMap(IntensityTransform):
    """The scanner's grey map (dynamic range, log compression): grey levels ``v`` in [0, 1]
    mapped to ``v ** g``, one exponent ``g`` per call. Above 1 the mid-greys darken and
    contrast rises; below 1 the image looks flatter.

    Parameters
    ----------
    exponent : tuple of float, optional
        Range of ``g`` (log-uniform). Default (0.6, 1.7).
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(self, exponent: tuple[float, float] = (0.6, 1.7), p: float = 1.0) -> None:
        super().__init__(p)
        self.exponent = _check_range("exponent", exponent, 0.0, 10.0)
        if self.exponent[0] <= 0:
            raise ValueError(f"exponent must be positive, got {exponent}")

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        lo, hi = self.exponent
        g = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        lut = np.clip(255.0 * (np.arange(256) / 255.0) ** g + 0.5, 0, 255).astype(np.uint8)
        return cv2.LUT(image, lut)


class EdgeEnhance(IntensityTransform):
    """The scanner's edge enhancement: an unsharp mask, ``image + amount (image - blurred)``
    with a Gaussian blur of ``sigma`` pixels, clipped to [0, 255].

    Parameters
    ----------
    amount : tuple of float, optional
        Range of the amount (uniform). Default (0.3, 1.2).
    sigma : tuple of float, optional
        Range of the blur's sigma in pixels (uniform). Default (1.0, 3.0).
    p : float, optional
        Probability of applying. Default 1.
    """

    def __init__(
        self,
        amount: tuple[float, float] = (0.3, 1.2),
        sigma: tuple[float, float] = (1.0, 3.0),
        p: float = 1.0,
    ) -> None:
        super().__init__(p)
        self.amount = _check_range("amount", amount, 0.0, 10.0)
        self.sigma = _check_range("sigma", sigma, 0.1, 32.0)

    def apply_image(self, image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        amount = rng.uniform(*self.amount)
        sigma = rng.uniform(*self.sigma)
        grey = image.astype(np.float32)
        blurred = cv2.GaussianBlur(grey, (0, 0), sigmaX=sigma, sigmaY=sigma)
        out = grey + np.float32(amount) * (grey - blurred)
        np.clip(out, 0.0, 255.0, out=out)
        return out.astype(np.uint8)


def default_transforms(scanner_looks: bool = False) -> tuple[Transform, ...]:
    """The chain :class:`UltrasoundAugment` uses by default: geometry first, then grey levels.

    ``scanner_looks`` adds :class:`GreyMap` and :class:`EdgeEnhance` at the end (so that
    without them the same generator gives the same chain as before).
    """
    chain: tuple[Transform, ...] = (
        RandomCropScale(area=(0.6, 1.0), p=0.3),
        RandomAffine(rotation_deg=10.0, scale=(0.85, 1.15), translate=0.08, p=0.7),
        RandomFlip(p=0.5),
        RandomGain(gain=(0.7, 1.4), p=0.8),
        DepthGain(max_db=6.0, p=0.5),
        Speckle(strength=(0.1, 0.4), p=0.3),
    )
    if scanner_looks:
        chain += (GreyMap(p=0.5), EdgeEnhance(p=0.3))
    return chain


class UltrasoundAugment:
    """A chain of random transforms, each applied with its own probability.

    Parameters
    ----------
    transforms : sequence of Transform, optional
        In order of application; default :func:`default_transforms`.
    p : float, optional
        Probability of augmenting a call at all. Default 1.

    Notes
    -----
    Deterministic given the generator: one uniform for the chain's coin, then for each
    transform one for its coin and its parameters when it applies. Consecutive geometric
    transforms are composed into one affine map and applied in one warp, so the image is
    interpolated once however many apply.
    """

    def __init__(self, transforms: Sequence[Transform] | None = None, *, p: float = 1.0) -> None:
        self.transforms: tuple[Transform, ...] = (
            tuple(transforms) if transforms is not None else default_transforms()
        )
        for t in self.transforms:
            if not isinstance(t, Transform):
                raise TypeError(f"not a Transform: {t!r}")
        self.p = _check_p(p)

    def __call__(
        self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Augmented copies of ``image`` ``(H, W)`` uint8 and ``mask`` ``(H, W)`` uint8."""
        _check_pair(image, mask)
        if rng.random() >= self.p:
            return image.copy(), mask.copy()
        out_image, out_mask = image, mask
        pending: np.ndarray | None = None  # composed geometric map not yet applied
        for t in self.transforms:
            if rng.random() >= t.p:
                continue
            if isinstance(t, GeometricTransform):
                m = t.matrix(out_image.shape, rng)
                pending = m if pending is None else m @ pending
                continue
            if pending is not None:
                out_image, out_mask = warp_pair(out_image, out_mask, pending)
                pending = None
            out_image, out_mask = t.apply(out_image, out_mask, rng)
        if pending is not None:
            out_image, out_mask = warp_pair(out_image, out_mask, pending)
        # Never hand back the caller's arrays.
        if out_image is image:
            out_image = image.copy()
        if out_mask is mask:
            out_mask = mask.copy()
        return out_image, out_mask

    def augment_sample(self, sample: Sample, rng: np.random.Generator) -> Sample:
        """The sample with augmented image and mask; ``labelled``, name and group unchanged."""
        image, mask = self(sample.image, sample.mask, rng)
        return dataclasses.replace(sample, image=image, mask=mask)

    def __repr__(self) -> str:
        inner = ", ".join(repr(t) for t in self.transforms)
        return f"UltrasoundAugment([{inner}], p={self.p})"
