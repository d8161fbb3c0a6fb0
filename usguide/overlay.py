"""Colour overlays for people to look at: label maps, the needle, targets and text.

Two entry points share one way of painting classes (:func:`_paint_labels`):

- :class:`OverlayRenderer`, the live renderer: configured once, called per frame, it draws into
  buffers it keeps, so the hot path allocates nothing full-size.
- :func:`blend_labels`, a one-off blend of a label map (``usguide segment --overlay``).

Classes are painted with a 256-entry colour table indexed by label (fixed colours from
:data:`usguide.labels.CLASS_COLOURS`) blended on uint8 inside the labels' bounding box only;
background leaves the image untouched. Translucent fills of other masks (injectate) and the dark
boxes behind text are 256-entry tables on the pixel values, ``(1 - a) * v + a * colour``.

Coordinates are (x, y) pixels, origin top-left, and may be fractional (drawn with sub-pixel
precision). Colours are RGB.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import cv2
import numpy as np

from usguide.labels import CLASS_COLOURS, NEEDLE

__all__ = [
    "ACTIVE_TARGET_COLOUR",
    "INJECTATE_COLOUR",
    "NEEDLE_COLOUR",
    "TARGET_COLOUR",
    "TEXT_COLOUR",
    "WARNING_COLOUR",
    "OverlayRenderer",
    "blend_labels",
]

RGB = tuple[int, int, int]
XY = tuple[float, float]

NEEDLE_COLOUR: RGB = CLASS_COLOURS[NEEDLE]  # shaft, tip and projected path
TARGET_COLOUR: RGB = (235, 235, 235)
ACTIVE_TARGET_COLOUR: RGB = (0, 255, 255)
TEXT_COLOUR: RGB = (255, 255, 255)
WARNING_COLOUR: RGB = (255, 45, 45)
INJECTATE_COLOUR: RGB = (255, 0, 255)  # magenta: no class uses it

_SHIFT = 4  # fractional bits of drawing coordinates: 1/16 pixel
_ONE = 1 << _SHIFT
_DASH_PX, _GAP_PX = 8.0, 6.0
_TEXT_BOX_DIM = 0.3  # text boxes keep 30 % of the image beneath: readable, not opaque
_FONT = cv2.FONT_HERSHEY_SIMPLEX

# Class colours by label; labels without a class colour paint black, as they always have.
_CLASS_LUT = np.zeros((256, 1, 3), np.uint8)
_CLASS_LUT[: len(CLASS_COLOURS), 0] = CLASS_COLOURS


def _tint_table(colour: Sequence[float], alpha: float) -> np.ndarray:
    """``(256, 1, 3)`` uint8 table of ``round((1 - alpha) * v + alpha * colour)`` per channel."""
    v = np.arange(256, dtype=np.float64)[:, None, None]
    return np.rint((1.0 - alpha) * v + alpha * np.asarray(colour, np.float64)).astype(np.uint8)


_DIM_TABLE = _tint_table((0, 0, 0), 1.0 - _TEXT_BOX_DIM)


def _box(mask: np.ndarray, margin: int) -> tuple[slice, slice] | None:
    """``(rows, cols)`` slices of the bounding box of ``mask``'s non-zero pixels, grown by
    ``margin`` and clipped to the array; None when ``mask`` is all zero."""
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0:
        return None
    rows, cols = mask.shape
    return (
        slice(max(y - margin, 0), min(y + h + margin, rows)),
        slice(max(x - margin, 0), min(x + w + margin, cols)),
    )


def _paint_labels(
    out: np.ndarray,
    labels: np.ndarray,
    alpha: float,
    colour: np.ndarray,
    blended: np.ndarray,
    edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
) -> None:
    """Blend class colours into ``out`` where ``labels`` is non-zero, in place.

    Parameters
    ----------
    out : (H, W, 3) uint8
        Holds the RGB image on entry, the blend on return.
    labels : (H, W) uint8
        Class indices; 0 leaves ``out`` untouched.
    alpha : float
        Weight of the class colour.
    colour, blended : (H, W, 3) uint8
        Scratch buffers.
    edges : tuple of ((H, W) uint8, (H, W) uint8, kernel), optional
        Two scratch buffers and the structuring element: with them, each class's inner boundary
        (as wide as the kernel's half-size) is painted in its opaque colour.
    """
    margin = 0 if edges is None else edges[2].shape[0] // 2
    # Work only inside the labels' bounding box (grown so erosion sees the background around
    # it): structures are usually a small part of the frame.
    box = _box(labels, margin)
    if box is None:
        return
    lab, o, c, b = labels[box], out[box], colour[box], blended[box]
    cv2.cvtColor(lab, cv2.COLOR_GRAY2RGB, dst=b)
    cv2.LUT(b, _CLASS_LUT, dst=c)
    cv2.addWeighted(o, 1.0 - alpha, c, alpha, 0.0, dst=b)
    cv2.copyTo(b, lab, o)
    if edges is not None:
        hi, lo, kernel = edges[0][box], edges[1][box], edges[2]
        # dilate - erode is non-zero wherever a neighbour differs; min with the labels keeps
        # the side inside a class. Two ops into our buffers, as morphologyEx would allocate one.
        cv2.dilate(lab, kernel, dst=hi)
        cv2.erode(lab, kernel, dst=lo)
        cv2.subtract(hi, lo, dst=hi)
        cv2.min(hi, lab, dst=hi)
        cv2.copyTo(c, hi, o)


def _to_rgb(pixels: np.ndarray, out: np.ndarray) -> None:
    """Copy grey ``(H, W)`` or RGB ``(H, W, 3)`` uint8 ``pixels`` into RGB ``out``."""
    if pixels.ndim == 2:
        cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB, dst=out)
    else:
        np.copyto(out, pixels)


def _check_pixels(pixels: np.ndarray) -> None:
    if pixels.dtype != np.uint8 or not (
        pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)
    ):
        raise ValueError(
            f"pixels must be (H, W) or (H, W, 3) uint8, got {pixels.shape} {pixels.dtype}"
        )


def _check_mask(name: str, mask: np.ndarray, pixels: np.ndarray, dtypes: tuple[type, ...]) -> None:
    if mask.shape != pixels.shape[:2]:
        raise ValueError(f"{name} {mask.shape} and pixels {pixels.shape[:2]} differ in size")
    if mask.dtype not in dtypes:
        allowed = " or ".join(np.dtype(d).name for d in dtypes)
        raise ValueError(f"{name} must be {allowed}, got {mask.dtype}")


def blend_labels(
    pixels: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45, out: np.ndarray | None = None
) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 of ``pixels`` (grey or RGB) with ``labels`` painted in colour.

    The fills of :class:`OverlayRenderer` without its outlines or drawings; for one-off images.
    The live display should keep an :class:`OverlayRenderer`, which allocates nothing per frame.

    Parameters
    ----------
    pixels : (H, W) or (H, W, 3) uint8
    labels : (H, W) uint8 class indices
    alpha : float
        Weight of the class colour where a class is present.
    out : (H, W, 3) uint8, optional
        Buffer to write into (may be ``pixels`` itself when that is RGB).

    Raises
    ------
    ValueError
        ``labels`` and ``pixels`` differ in size, or have the wrong dtype.
    """
    _check_pixels(pixels)
    _check_mask("labels", labels, pixels, (np.uint8,))
    if out is None:
        out = np.empty((*labels.shape, 3), np.uint8)
    _to_rgb(pixels, out)
    _paint_labels(out, labels, alpha, np.empty_like(out), np.empty_like(out))
    return out


def _clip(p0: XY, p1: XY, width: int, height: int) -> tuple[XY, XY] | None:
    """The part of segment ``p0``-``p1`` inside the image's pixel centres
    ``[0, width-1] x [0, height-1]``; None when nothing is inside.

    Keeps the coordinates handed to OpenCV small (its fixed-point coordinates are int32).
    """
    x0, y0 = float(p0[0]), float(p0[1])
    dx, dy = float(p1[0]) - x0, float(p1[1]) - y0
    if not all(math.isfinite(v) for v in (x0, y0, dx, dy)):
        return None
    lo, hi = 0.0, 1.0
    for start, step, limit in ((x0, dx, width - 1), (y0, dy, height - 1)):
        if step == 0.0:
            if not 0.0 <= start <= limit:
                return None
            continue
        a, b = -start / step, (limit - start) / step
        lo, hi = max(lo, min(a, b)), min(hi, max(a, b))
    if lo > hi:
        return None
    return (x0 + lo * dx, y0 + lo * dy), (x0 + hi * dx, y0 + hi * dy)


def _fixed(p: XY) -> tuple[int, int]:
    """``p`` in OpenCV's fixed-point drawing coordinates (``shift=_SHIFT``)."""
    return round(p[0] * _ONE), round(p[1] * _ONE)


class OverlayRenderer:
    """Paints segmentation, needle, targets and messages over ultrasound frames for live display.

    Configured once, called per frame with :meth:`render`. Buffers are sized on the first call
    and again whenever the frame size changes; otherwise nothing full-size is allocated.
    Not thread-safe: give each display thread its own renderer.

    Parameters
    ----------
    alpha : float
        Weight of the class colour in the fills of nerve, vessel, fascia and needle labels
        (0 to 1).
    outlines : bool
        Outline each labelled structure (and the injectate pocket) in its opaque colour.
    outline_px : int
        Width of the outlines, pixels, inside the structure.
    injectate_alpha : float
        Weight of :data:`INJECTATE_COLOUR` in the injectate fill.
    line_px : int
        Thickness of the needle shaft and target crosshairs, pixels.
    tip_radius_px : int
        Radius of the tip marker, pixels.
    target_px : int
        Size of a target's crosshair, pixels (the active target's is 1.6 times as large).
    font_scale : float
        OpenCV Hershey font scale of text and warnings (0.5 is about 12 pixels high).
    antialias : bool
        Anti-aliased lines, circles and text.
    """

    def __init__(
        self,
        *,
        alpha: float = 0.45,
        outlines: bool = True,
        outline_px: int = 1,
        injectate_alpha: float = 0.35,
        line_px: int = 2,
        tip_radius_px: int = 6,
        target_px: int = 15,
        font_scale: float = 0.5,
        antialias: bool = True,
    ) -> None:
        for name, value in (("alpha", alpha), ("injectate_alpha", injectate_alpha)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {value}")
        if outline_px < 1 or line_px < 1 or tip_radius_px < 1 or target_px < 1:
            raise ValueError("outline_px, line_px, tip_radius_px and target_px must be >= 1")
        self.alpha = float(alpha)
        self.outlines = bool(outlines)
        self.line_px = int(line_px)
        self.tip_radius_px = int(tip_radius_px)
        self.target_px = int(target_px)
        self.font_scale = float(font_scale)
        self._line_type = cv2.LINE_AA if antialias else cv2.LINE_8
        self._kernel = np.ones((2 * outline_px + 1, 2 * outline_px + 1), np.uint8)
        self._injectate_table = _tint_table(INJECTATE_COLOUR, injectate_alpha)
        self._injectate_colour = np.array(INJECTATE_COLOUR, np.uint8)
        self._text_h = cv2.getTextSize("Ag", _FONT, self.font_scale, 1)[0][1]
        self._shape: tuple[int, int] | None = None

    def _buffers(self, rows: int, columns: int) -> None:
        """(Re)allocate the buffers for ``rows`` x ``columns`` frames."""
        if self._shape == (rows, columns):
            return
        self._out = np.empty((rows, columns, 3), np.uint8)
        self._colour = np.empty_like(self._out)
        self._blended = np.empty_like(self._out)
        self._hi = np.empty((rows, columns), np.uint8)
        self._lo = np.empty_like(self._hi)
        self._shape = (rows, columns)

    def render(
        self,
        pixels: np.ndarray,
        labels: np.ndarray | None = None,
        *,
        shaft: tuple[XY, XY] | None = None,
        tip_xy: XY | None = None,
        tip_confident: bool = True,
        path: tuple[XY, XY] | None = None,
        targets: Sequence[XY] = (),
        active_target: int | None = None,
        text: Sequence[str] = (),
        warnings: Sequence[str] = (),
        injectate: np.ndarray | None = None,
    ) -> np.ndarray:
        """Draw one frame's overlay.

        Layers, bottom to top: label fills and outlines, injectate, projected path, shaft,
        targets, tip, text (top-left) and warnings (bottom-left). Anything partly outside the
        frame is clipped.

        Parameters
        ----------
        pixels : (H, W) or (H, W, 3) uint8
            The frame, grey or RGB; not modified.
        labels : (H, W) uint8, optional
            Class indices (0 background, 1 nerve, 2 vessel, 3 fascia, 4 needle).
        shaft : ((x, y), (x, y)), optional
            ``(entry_xy, tip_xy)``: the needle shaft, drawn as a solid line.
        tip_xy : (x, y), optional
            The tip marker's centre: a filled disc, or a ring when ``tip_confident`` is False
            (the tracker is coasting or unsure).
        tip_confident : bool
            Whether the tip is tracked (filled) or only predicted (hollow).
        path : ((x, y), (x, y)), optional
            ``(start_xy, end_xy)``: the projected path, dashed, usually from the tip along the
            shaft to the frame's edge (or wherever the caller ends it, such as just past the
            target: ``usguide.guidance`` decides).
        targets : sequence of (x, y)
            Crosshairs.
        active_target : int, optional
            Index into ``targets`` of the one to highlight (larger, coloured, ringed).
        text : sequence of str
            Lines of information (distances...), white on a darkened box, top-left.
        warnings : sequence of str
            Lines in red on a darkened box, bottom-left.
        injectate : (H, W) bool or uint8, optional
            Injectate pocket; non-zero pixels get a translucent magenta fill.

        Returns
        -------
        (H, W, 3) uint8
            The RGB overlay. It is the renderer's own buffer, overwritten by the next call:
            copy it to keep it.

        Raises
        ------
        ValueError
            ``pixels`` is not uint8 grey or RGB; ``labels`` or ``injectate`` has a different
            size than ``pixels`` or the wrong dtype; ``active_target`` is not an index into
            ``targets``.
        """
        _check_pixels(pixels)
        if labels is not None:
            _check_mask("labels", labels, pixels, (np.uint8,))
        if injectate is not None:
            _check_mask("injectate", injectate, pixels, (np.bool_, np.uint8))
        if active_target is not None and not 0 <= active_target < len(targets):
            raise ValueError(
                f"active_target {active_target} is not an index into {len(targets)} targets"
            )
        rows, columns = pixels.shape[:2]
        self._buffers(rows, columns)
        out = self._out
        _to_rgb(pixels, out)
        edges = (self._hi, self._lo, self._kernel) if self.outlines else None
        if labels is not None:
            _paint_labels(out, labels, self.alpha, self._colour, self._blended, edges)
        if injectate is not None:
            self._injectate(injectate.view(np.uint8))
        if path is not None:
            self._dashed(path)
        if shaft is not None and (seg := _clip(shaft[0], shaft[1], columns, rows)) is not None:
            cv2.line(
                out,
                _fixed(seg[0]),
                _fixed(seg[1]),
                NEEDLE_COLOUR,
                self.line_px,
                self._line_type,
                _SHIFT,
            )
        for i, target in enumerate(targets):
            self._crosshair(target, active=i == active_target)
        if tip_xy is not None and all(math.isfinite(v) for v in tip_xy):
            self._tip(tip_xy, tip_confident)
        y = 0
        for line in text:
            y = self._label(line, y, TEXT_COLOUR) + 1
        y = rows
        for line in reversed(warnings):
            y = self._label(line, y, WARNING_COLOUR, upward=True) - 1
        return out

    def _injectate(self, mask: np.ndarray) -> None:
        """Translucent fill (and outline) of the non-zero pixels of ``mask``."""
        margin = self._kernel.shape[0] // 2 if self.outlines else 0
        box = _box(mask, margin)
        if box is None:
            return
        m, o, b = mask[box], self._out[box], self._blended[box]
        cv2.LUT(o, self._injectate_table, dst=b)
        cv2.copyTo(b, m, o)
        if self.outlines:
            lo, c = self._lo[box], self._colour[box]
            cv2.erode(m, self._kernel, dst=lo)
            cv2.subtract(m, lo, dst=lo)  # the mask's inner boundary
            c[...] = self._injectate_colour
            cv2.copyTo(c, lo, o)

    def _dashed(self, path: tuple[XY, XY]) -> None:
        """Dashed line from ``path[0]`` to ``path[1]``, the first dash at ``path[0]``."""
        rows, columns = self._out.shape[:2]
        seg = _clip(path[0], path[1], columns, rows)
        if seg is None:
            return
        (x0, y0), (x1, y1) = seg
        length = math.hypot(x1 - x0, y1 - y0)
        if length < 1.0:
            return
        # All dashes in one polylines call: a Python loop of cv2.line costs 4x as much.
        start = np.arange(0.0, length, _DASH_PX + _GAP_PX)
        ends = np.stack((start, np.minimum(start + _DASH_PX, length)), axis=1)  # (n, 2)
        step = np.array([x1 - x0, y1 - y0]) / length
        pts = np.rint((np.array([x0, y0]) + ends[..., None] * step) * _ONE).astype(np.int32)
        cv2.polylines(self._out, pts, False, NEEDLE_COLOUR, 1, self._line_type, _SHIFT)

    def _crosshair(self, target: XY, *, active: bool) -> None:
        x, y = target
        if not (math.isfinite(x) and math.isfinite(y)):
            return
        rows, columns = self._out.shape[:2]
        size = round(self.target_px * 1.6) if active else self.target_px
        if not (-size <= x <= columns + size and -size <= y <= rows + size):
            return  # far outside: nothing to draw, and keeps int32 coordinates safe
        centre = (round(x), round(y))
        colour = ACTIVE_TARGET_COLOUR if active else TARGET_COLOUR
        thickness = self.line_px if active else max(self.line_px - 1, 1)
        cv2.drawMarker(
            self._out, centre, colour, cv2.MARKER_CROSS, size, thickness, self._line_type
        )
        if active:
            cv2.circle(
                self._out,
                _fixed((x, y)),
                round(size * 0.4 * _ONE),
                colour,
                thickness,
                self._line_type,
                _SHIFT,
            )

    def _tip(self, tip_xy: XY, confident: bool) -> None:
        rows, columns = self._out.shape[:2]
        r = self.tip_radius_px
        x, y = tip_xy
        if not (-r <= x <= columns + r and -r <= y <= rows + r):
            return
        centre, radius = _fixed(tip_xy), r * _ONE
        if confident:
            # A dark rim keeps the disc visible on bright tissue and on the green needle label.
            cv2.circle(self._out, centre, radius + _ONE, (0, 0, 0), -1, self._line_type, _SHIFT)
            cv2.circle(self._out, centre, radius, NEEDLE_COLOUR, -1, self._line_type, _SHIFT)
        else:
            cv2.circle(self._out, centre, radius, NEEDLE_COLOUR, 2, self._line_type, _SHIFT)

    def _label(self, line: str, y: int, colour: RGB, *, upward: bool = False) -> int:
        """Draw ``line`` on a darkened box whose top (or, ``upward``, bottom) edge is row ``y``
        at the left margin; the row of the box's other edge."""
        out = self._out
        pad = 3
        (width, _), baseline = cv2.getTextSize(line, _FONT, self.font_scale, 1)
        box_h = self._text_h + baseline + 2 * pad  # fixed line height: boxes line up
        top = y - box_h if upward else y
        bottom = top + box_h
        box = out[max(top, 0) : max(bottom, 0), : width + 2 * pad]
        if box.size:
            cv2.LUT(box, _DIM_TABLE, dst=box)
        baseline_y = top + pad + self._text_h
        cv2.putText(
            out, line, (pad, baseline_y), _FONT, self.font_scale, colour, 1, self._line_type
        )
        return top if upward else bottom
