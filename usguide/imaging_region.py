"""Find the imaging area (the B-mode image rectangle) inside a frame that also carries scanner UI.

Screen captures, grabbed video frames and many DICOM frames hold the ultrasound image together with
burned-in text, scale bars, icons, colour bars, logos and black or grey borders.
:func:`find_imaging_region` finds the rectangle holding the image from the pixels alone, for when
no header region is known.

How, in short (all on a grey copy shrunk by a whole factor to at most ~250k pixels):

1. Background levels: flat areas (3x3 range within the border's noise) that reach the frame edge
   give the grey levels of the border and of UI panels.
2. Content: every pixel that is textured or flat at another level (a fan's floor one grey level
   above a black border), densified so that dim speckle counts, minus straight runs of a
   background level (the border itself, and the narrow gap between the image and a scale bar).
3. Morphological opening with a disk of ~3.5 % of the frame removes text, ticks and lines; the
   largest blob (and a twin of similar size beside it, for dual views) is the image. Corners
   the disk rounded off come back, and text blocks stuck onto an edge are cut off by their
   row / column occupancy profile. A flat canvas beside the tissue (not below it, where a fan's
   floor would be) is cut off too. The box is scaled back to the full frame.
"""

from __future__ import annotations

import cv2
import numpy as np

__all__ = ["box_iou", "find_imaging_region"]

# Most pixels in the working copy. Frames are shrunk by a whole factor (1152x864 and 640x480 by
# 2), which keeps the box within about that factor of the full-resolution answer and the whole
# analysis to a few milliseconds.
_WORK_PIXELS = 250_000
# Opening disk as a fraction of the working copy's short side: wider than a line of scanner text
# (lines are ~1.5-2.5 % of the frame height), far narrower than any imaging area.
_OPEN_FRACTION = 0.035
# Largest 3x3 grey range still called flat, whatever noise the border shows.
_MAX_TOL = 3
# Share of the border strip's dark pixels that must be flat under the chosen tolerance.
_FLAT_SHARE = 0.8
# A border level needs this share of the flat border area; at most this many levels are used.
_LEVEL_SHARE = 0.05
_MAX_LEVELS = 3
# Levels within this many grey levels of the darkest count as "black" (image floors, the ground
# between text strokes).
_NEAR_BLACK = 8
# Smallest enclosed flat area (fraction of the frame) considered as a darker background.
_DARK_AREA = 0.02
# Density filter: window (working pixels) and share of content pixels that make it content.
_DENSITY_WIN = 5
_DENSITY = 0.25
# Length (working pixels) of a straight run of one background level that is cut from content.
_RUN = 13
# A second blob of at least this fraction of the largest one is kept when it shares rows or
# columns with it (dual and split views).
_TWIN_FRACTION = 0.3
# Edge trimming: a step in occupancy of more than this fraction of the full width from one line
# to the next is abrupt; a run of lines is UI when at least this share of it is near background.
_STEP = 0.15
_HOLLOW = 0.3
# Widest line (fraction of the full width) of a cut: up to this share of the profile (one line of
# text) it may be half as wide as the image; a deeper cut (a block of text lines) only this narrow.
_TEXT_LINE_DEPTH = 0.04
_TEXT_LINE_WIDTH = 0.5
_TEXT_BLOCK_WIDTH = 0.3
# Side canvas: a 3x3 grey range of at least this is texture; a row (column) with this share of
# texture holds tissue; a column flat at a canvas level on this share of the tissue rows is canvas
# (an echo anywhere down the column, such as the skin line above a shadow, makes it image).
_TEXTURE_RANGE = 4
_TISSUE_SHARE = 0.3
_CANVAS_SHARE = 0.98
# Frames smaller than this (either side) hold no plausible imaging area.
_MIN_SIDE = 16


_SQUARE3 = np.ones((3, 3), dtype=np.uint8)


def _line_kernels(length: int) -> list[np.ndarray]:
    """Line structuring elements of ``length`` pixels: horizontal, vertical and both diagonals."""
    diag = np.eye(length, dtype=np.uint8)
    return [
        np.ones((1, length), dtype=np.uint8),
        np.ones((length, 1), dtype=np.uint8),
        diag,
        np.ascontiguousarray(diag[:, ::-1]),
    ]


_LINES = _line_kernels(_RUN)


def find_imaging_region(
    image: np.ndarray, *, min_fraction: float = 0.05
) -> tuple[int, int, int, int] | None:
    """Find the rectangle holding the ultrasound image inside a frame with scanner UI.

    Parameters
    ----------
    image : numpy.ndarray
        ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB frame (a screen capture, a grabbed video
        frame or a decoded DICOM frame).
    min_fraction : float, optional
        Smallest plausible imaging area as a fraction of the frame area; a smaller find returns
        None. Default 0.05.

    Returns
    -------
    tuple of int or None
        ``(x0, y0, x1, y1)`` in pixels, inclusive (``x1``, ``y1`` are the last column and row
        inside, as in DICOM RegionLocationMaxX1 / MaxY1), origin top-left; None when no plausible
        imaging area is found (for example an all-black or uniform frame).

    Raises
    ------
    ValueError
        When ``image`` is not a non-empty uint8 array of shape ``(H, W)`` or ``(H, W, 3)``, or
        ``min_fraction`` is not within [0, 1].

    Notes
    -----
    For a sector (curvilinear or phased-array) probe the box is the bounding box of the fan. Dark
    (anechoic) areas inside the image do not shrink the box while tissue surrounds them on both
    sides; a dark area that runs into a black border of the same grey level (a black far field)
    is indistinguishable from the border and is left out. A flat area one or a few grey levels
    above a black border (the floor of a fan in some palette images) counts as image. Colour is
    not used: RGB frames are converted to grey first.
    """
    _check(image)
    if not 0.0 <= min_fraction <= 1.0:
        raise ValueError(f"min_fraction must be within [0, 1], got {min_fraction}")
    height, width = image.shape[:2]
    if min(height, width) < _MIN_SIDE:
        return None
    small, f = _shrink(image)
    h, w = small.shape

    content, near_background = _content(small)
    # Opening removes everything thinner than the disk: text, ticks, calipers, lines.
    k = max(3, round(_OPEN_FRACTION * min(h, w)) | 1)
    disk = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k))
    opened = cv2.morphologyEx(content, cv2.MORPH_OPEN, disk, borderType=cv2.BORDER_REPLICATE)
    n, labels = cv2.connectedComponents(opened, connectivity=8)
    if n <= 1:
        return None
    blob = np.zeros((h, w), dtype=bool)
    for i in _choose_blobs(labels, n):
        blob |= labels == i

    region = _restore_edges(content, blob, k)
    box = _trimmed_box(region, near_background)
    if box is None:
        return None
    box = _without_side_canvas(box, small, near_background)
    x0, y0, x1, y1 = _to_full(box, f, (h, w), width, height)
    if (x1 - x0 + 1) * (y1 - y0 + 1) < min_fraction * width * height:
        return None
    return x0, y0, x1, y1


def _check(image: np.ndarray) -> None:
    """Raise ValueError unless ``image`` is a non-empty ``(H, W)`` or ``(H, W, 3)`` uint8 array."""
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a numpy array, got {type(image).__name__}")
    if image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (scale other frames to 8 bit), got {image.dtype}")
    if not (image.ndim == 2 or (image.ndim == 3 and image.shape[2] == 3)):
        raise ValueError(f"image must have shape (H, W) or (H, W, 3), got {image.shape}")
    if image.size == 0:
        raise ValueError(f"image is empty: shape {image.shape}")


def _shrink(image: np.ndarray) -> tuple[np.ndarray, int]:
    """Grey working copy, shrunk by a whole factor to at most ``_WORK_PIXELS`` pixels.

    Returns the ``(h, w)`` uint8 copy and the factor ``f`` (working pixel ``i`` covers frame
    pixels ``f * i`` to ``f * i + f - 1``).
    """
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    height, width = grey.shape
    f = max(1, int(np.ceil(np.sqrt(height * width / _WORK_PIXELS))))
    if f > 1:
        # Area averaging by a whole factor is a fast path in OpenCV (a fractional factor costs
        # ~30x more); it also smooths sensor and compression noise on black borders. The last
        # f - 1 rows / columns at most are left out of the analysis.
        h, w = height // f, width // f
        grey = cv2.resize(grey[: h * f, : w * f], (w, h), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(grey), f


def _content(small: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Content and near-background masks of the working copy.

    Returns
    -------
    content : numpy.ndarray
        ``(h, w)`` uint8 (0/1): everything that is not background.
    near_background : numpy.ndarray
        ``(h, w)`` uint8 (0/1): pixels within ``_NEAR_BLACK`` grey levels of a background level (the
        ground between the strokes of burned-in text, anechoic tissue).
    """
    # Morphological gradient = max - min over 3x3: zero on flat backgrounds and UI panels, large
    # on speckle. Masks below are uint8 0/255 so that OpenCV does the per-pixel work.
    grad = cv2.morphologyEx(small, cv2.MORPH_GRADIENT, _SQUARE3)
    tol = _flat_tolerance(small, grad)
    flat = cv2.threshold(grad, tol, 255, cv2.THRESH_BINARY_INV)[1]
    levels = _background_levels(small, flat, tol)

    at_level = np.zeros(256, dtype=np.uint8)
    near_level = np.zeros(256, dtype=np.uint8)
    for v in levels:
        at_level[max(0, v - tol) : v + tol + 1] = 255
        near_level[max(0, v - _NEAR_BLACK) : v + _NEAR_BLACK + 1] = 1
    # Content: anything textured, or flat at a level that is not background (the floor of a
    # fan one grey level above the black border).
    other = cv2.bitwise_not(cv2.bitwise_and(flat, cv2.LUT(small, at_level)))
    # Dim speckle is a sparse scatter of such pixels; count it as content where enough of its
    # neighbourhood is, which also drops isolated noise pixels on a compressed border.
    share = cv2.blur(other, (_DENSITY_WIN, _DENSITY_WIN))
    dense = cv2.threshold(share, round(255 * _DENSITY) - 1, 1, cv2.THRESH_BINARY)[1]
    # Cut pixels on straight runs of one background level (any of four directions): the border
    # itself, the 3x3 halo round every edge, and the narrow gap between the image and a scale bar
    # drawn beside it. Black pixels in dim speckle mix levels and do not form such runs.
    cut = np.zeros_like(small)
    for v in levels:
        run = cv2.inRange(small, max(0, v - tol), min(255, v + tol))
        for line in _LINES:
            cut |= cv2.morphologyEx(run, cv2.MORPH_OPEN, line)
    content = cv2.bitwise_and(dense, cv2.bitwise_not(cut))
    return content, cv2.LUT(small, near_level)


def _flat_tolerance(small: np.ndarray, grad: np.ndarray) -> int:
    """Noise level of the dark background, in grey levels, measured on the frame's outer strip.

    Lossless frames have exactly flat borders (tolerance 0, which keeps a fan floor one grey level
    above the black border apart from it); compressed or grabbed frames jitter by a level or two.
    Only the strip's near-black pixels count: where an image runs to the frame edge its smooth
    tissue must not pass for background noise. No dark border to measure gives 0.
    """
    h, w = grad.shape
    b = max(2, round(0.02 * min(h, w)))

    def strip(a: np.ndarray) -> np.ndarray:
        return np.concatenate(
            [a[:b].ravel(), a[-b:].ravel(), a[b:-b, :b].ravel(), a[b:-b, -b:].ravel()]
        )

    values, ranges = strip(small), strip(grad)
    dark = values <= int(values.min()) + 2 * _NEAR_BLACK
    quiet = ranges[dark & (ranges <= 2 * _MAX_TOL)]
    if quiet.size < 0.2 * ranges.size:
        return 0
    # Smallest tolerance under which most of the quiet strip is flat. Not a high percentile: the
    # strip also crosses edges of UI and compression ringing round text.
    share = np.cumsum(np.bincount(quiet, minlength=_MAX_TOL + 1)) / quiet.size
    return int(min(_MAX_TOL, np.searchsorted(share, _FLAT_SHARE)))


def _background_levels(small: np.ndarray, flat: np.ndarray, tol: int) -> list[int]:
    """Grey levels of the frame's background (at most ``_MAX_LEVELS`` + 1, most common first).

    ``flat`` is the uint8 mask (non-zero = flat) of the working copy ``small``.

    The levels of flat areas that reach the frame border, plus the level of any large flat area
    darker than all of those (the black inside a scanner's region rectangle drawn on a very dark
    grey screen); a flat area brighter than the border stays content (a fan's floor).
    """
    n, labels = cv2.connectedComponents(flat, connectivity=8)
    # Areas counted on every other row and column: a quarter of the work (OpenCV's own stats
    # cost more than the labelling), and precise enough for shares and thresholds.
    sub_labels = labels[::2, ::2]
    areas = np.bincount(sub_labels.ravel(), minlength=n)
    # Flat areas touching the frame edge, with the grey level of one of their edge pixels (a flat
    # area is one level within the tolerance) and their area as its weight.
    edge_labels = np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]])
    edge_values = np.concatenate([small[0], small[-1], small[:, 0], small[:, -1]])
    border, first = np.unique(edge_labels, return_index=True)
    keep = border > 0  # label 0 holds the pixels that are not flat
    border, first = border[keep], first[keep]
    if border.size == 0:
        return []
    hist = np.zeros(256)
    np.add.at(hist, edge_values[first], areas[border])
    order = np.argsort(hist)[::-1][:_MAX_LEVELS]
    levels = [int(v) for v in order if hist[v] >= _LEVEL_SHARE * hist.sum()]
    # A level just above the darkest one is the noise floor of an image that runs to the frame
    # edge (dark tissue quantised to one grey), not background: keep the darkest border level
    # and the clearly brighter ones (grey UI panels).
    darkest_border = min(levels) if levels else int(edge_values[first].min())
    levels = [v for v in levels if v == darkest_border or v > darkest_border + _NEAR_BLACK]
    if not levels:
        levels = [darkest_border]
    at_border = np.zeros(n, dtype=bool)
    at_border[border] = True
    # Large flat areas that do not reach the border: the darkest of them is background too when
    # it is a little darker than every border level (black on a near-black screen). Much darker
    # areas are anechoic tissue inside an image on a grey screen.
    big = np.flatnonzero((areas >= _DARK_AREA * sub_labels.size) & ~at_border)
    darkest = 256
    for i in big[big > 0]:
        darkest = min(darkest, int(np.median(small[::2, ::2][sub_labels == i])))
    if levels and min(levels) - _NEAR_BLACK <= darkest < min(levels) - tol:
        levels.append(darkest)
    return levels


def _choose_blobs(labels: np.ndarray, n: int) -> list[int]:
    """Labels of the largest blob and of any twin of similar size beside or below it.

    ``labels`` is the ``(h, w)`` int32 label image of ``n`` labels, 0 being the ground.
    """
    # Every other row and column is plenty to rank blobs that survived the opening.
    sub = labels[::2, ::2]
    areas = np.bincount(sub.ravel(), minlength=n)
    areas[0] = 0
    main = int(np.argmax(areas))
    if areas[main] == 0:  # blobs too small to show on the subsample
        return []
    chosen = [main]
    boxes = {}
    for i in np.flatnonzero(areas >= _TWIN_FRACTION * areas[main]):
        ys, xs = np.nonzero(sub == i)
        boxes[int(i)] = (xs.min(), ys.min(), xs.max(), ys.max())
    mx0, my0, mx1, my1 = boxes.pop(main)
    for i, (x0, y0, x1, y1) in boxes.items():
        rows = min(y1, my1) - max(y0, my0)
        cols = min(x1, mx1) - max(x0, mx0)
        # Dual views share rows (side by side) or columns (stacked) with the main image.
        if rows >= 0.5 * min(y1 - y0, my1 - my0) or cols >= 0.5 * min(x1 - x0, mx1 - mx0):
            chosen.append(i)
    return chosen


def _restore_edges(content: np.ndarray, blob: np.ndarray, k: int) -> np.ndarray:
    """Give the opened ``blob`` back the edge pixels the opening shaved off (fan corners).

    An opening with a disk keeps straight edges but rounds sharp corners off. Content within
    ``k`` pixels of the blob and connected to it comes back, after an opening three times finer
    that still removes one- and two-pixel lines (scale bars and their ticks touching the image).
    Returns a bool ``(h, w)`` mask.
    """
    fine = max(3, (k // 3) | 1)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (fine, fine))
    thick = cv2.morphologyEx(content, cv2.MORPH_OPEN, kernel, borderType=cv2.BORDER_REPLICATE)
    blob_u8 = blob.astype(np.uint8)
    grown = thick & cv2.dilate(blob_u8, np.ones((k, k), dtype=np.uint8))
    # The blob lies (all but always) inside the finer opening, so each of its parts is inside one
    # connected part of ``grown``: flood those from a pixel of each part.
    n, parts = cv2.connectedComponents(blob_u8, connectivity=8)
    sub = parts[::2, ::2]
    for i in range(1, n):
        ys, xs = np.nonzero(sub == i)
        if ys.size == 0:
            ys, xs = np.nonzero(parts == i)
            seed = (int(xs[0]), int(ys[0]))
        else:
            seed = (int(xs[0]) * 2, int(ys[0]) * 2)
        if grown[seed[1], seed[0]] == 1:
            cv2.floodFill(grown, None, seed, 2, flags=8)
    return (grown == 2) | blob


def _trimmed_box(
    region: np.ndarray, near_background: np.ndarray
) -> tuple[int, int, int, int] | None:
    """Inclusive ``(x0, y0, x1, y1)`` of ``region`` without UI stuck onto its edges.

    A block of text or a colour bar that touches the image survives the opening when it is
    bigger than the kernel. In the row (or column) occupancy it is a run of narrow lines followed
    by an abrupt step up to the image's full width, and much of it is background between the
    strokes. The tip of a fan widens gradually, and tissue beside a dark area inside the image
    is mostly not background; neither is cut.
    """
    rows = np.count_nonzero(region, axis=1)
    ys = np.flatnonzero(rows)
    if ys.size == 0:
        return None
    cols = np.count_nonzero(region, axis=0)
    xs = np.flatnonzero(cols)
    y0, y1, x0, x1 = int(ys[0]), int(ys[-1]), int(xs[0]), int(xs[-1])
    hollow = region & near_background
    hollow_rows = np.count_nonzero(hollow, axis=1)
    hollow_cols = np.count_nonzero(hollow, axis=0)
    y0, y1 = _trim_profile(rows[y0 : y1 + 1], hollow_rows[y0 : y1 + 1], y0)
    x0, x1 = _trim_profile(cols[x0 : x1 + 1], hollow_cols[x0 : x1 + 1], x0)
    return x0, y0, x1, y1


def _without_side_canvas(
    box: tuple[int, int, int, int], small: np.ndarray, near_background: np.ndarray
) -> tuple[int, int, int, int]:
    """Drop the flat canvas left and right of the image, at the depths that hold tissue.

    Some scanners draw the image on a flat canvas a grey level above the black border. Flat areas
    at such a level count as content, because a fan's floor (the echo-free far field of a sector)
    looks the same; but a floor only ever lies below tissue, never beside it. So columns at either
    side that are canvas over (nearly) all the rows where tissue is are cut, up to the last of
    them. A shadow beside tissue keeps its skin line and reverberations, so it stays.
    """
    x0, y0, x1, y1 = box
    view = np.s_[y0 : y1 + 1, x0 : x1 + 1]
    grad = cv2.morphologyEx(small, cv2.MORPH_GRADIENT, _SQUARE3)[view]
    textured = grad >= _TEXTURE_RANGE
    tissue_rows = textured.mean(1) >= _TISSUE_SHARE
    if not tissue_rows.any():
        return box
    canvas = (grad <= 1) & (near_background[view] > 0) & (small[view] > int(small.min()))
    canvas_cols = canvas[tissue_rows].mean(0) >= _CANVAS_SHARE
    tissue_cols = np.flatnonzero(textured[tissue_rows].mean(0) >= _TISSUE_SHARE)
    if tissue_cols.size == 0:
        return box
    first, last = int(tissue_cols[0]), int(tissue_cols[-1])
    left = np.flatnonzero(canvas_cols[:first])
    right = np.flatnonzero(canvas_cols[last + 1 :])
    new_x0 = x0 + (int(left[-1]) + 1 if left.size else 0)
    new_x1 = x1 - ((canvas_cols.size - last - 1) - int(right[0]) if right.size else 0)
    return new_x0, y0, new_x1, y1


def _trim_profile(profile: np.ndarray, hollow: np.ndarray, offset: int) -> tuple[int, int]:
    """First and last index (plus ``offset``) of an occupancy ``profile`` to keep.

    ``hollow`` counts, per line, the occupied pixels that are near background.
    """
    full = int(profile.max())
    step = _STEP * full
    keep = [0, profile.size - 1]
    for end, order, gaps in ((0, profile, hollow), (1, profile[::-1], hollow[::-1])):
        # First line reaching half the full width, then back while the width shrinks gently.
        i = int(np.argmax(order >= 0.5 * full))
        while i > 0 and order[i - 1] >= order[i] - step:
            i -= 1
        # Cut only narrow lines behind an abrupt step that are largely background (text).
        if i == 0 or gaps[:i].sum() < _HOLLOW * order[:i].sum():
            continue
        # A line or two (a ragged edge, one line of text) may be up to half as wide as the image;
        # a deeper cut must be a text block, far narrower than the image. The tapering far part
        # of a fan is as hollow (dark tissue) and steps down where its floor curves, but it stays
        # wide next to the step, so it is kept.
        if i <= _TEXT_LINE_DEPTH * profile.size:
            narrow = order[:i].max() <= _TEXT_LINE_WIDTH * full
        else:
            # The line at the step may straddle it (the image's first, partly covered line).
            narrow = order[: i - 1].max() <= _TEXT_BLOCK_WIDTH * full
        if narrow:
            keep[end] = i if end == 0 else profile.size - 1 - i
    return offset + keep[0], offset + keep[1]


def _to_full(
    box: tuple[int, int, int, int], f: int, small_shape: tuple[int, int], width: int, height: int
) -> tuple[int, int, int, int]:
    """Scale an inclusive working-copy box back to full-frame pixels, clipped to the frame."""
    x0, y0, x1, y1 = box
    h, w = small_shape
    # A box that reaches the working copy's last column / row reaches the frame's: the few
    # pixels beyond were only left out of the shrink.
    fx1 = width - 1 if x1 == w - 1 else f * x1 + f - 1
    fy1 = height - 1 if y1 == h - 1 else f * y1 + f - 1
    return f * x0, f * y0, min(fx1, width - 1), min(fy1, height - 1)


def box_iou(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> float:
    """Intersection over union of two inclusive ``(x0, y0, x1, y1)`` boxes."""
    ix = min(a[2], b[2]) - max(a[0], b[0]) + 1
    iy = min(a[3], b[3]) - max(a[1], b[1]) + 1
    if ix <= 0 or iy <= 0:
        return 0.0
    inter = ix * iy
    area_a = (a[2] - a[0] + 1) * (a[3] - a[1] + 1)
    area_b = (b[2] - b[0] + 1) * (b[3] - b[1] + 1)
    return inter / (area_a + area_b - inter)
