"""The frame every stage passes along, its imaging region, and the result of later stages.

Units: millimetres and seconds in public values; pixels only where a name ends in ``_px`` or for
image coordinates. Image coordinates are (x, y) with the origin top-left; arrays are (row, col).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

if TYPE_CHECKING:  # the stages import Frame; only their result types are named here
    from usguide.guidance import GuidanceResult
    from usguide.needle import NeedleState

RegionOrigin = Literal["dicom", "detected", "user", "frame"]
SpacingMM = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Region:
    """A rectangle of the frame that holds one ultrasound image.

    Attributes
    ----------
    bbox : tuple of int
        ``(x0, y0, x1, y1)`` in pixels, inclusive: ``x1`` and ``y1`` are the last column and row
        inside, as in DICOM's RegionLocationMaxX1 / MaxY1.
    spacing_mm : tuple of float or None
        Millimetres per pixel as ``(row, col)``; None when unknown. Never a guess.
    valid : bool
        False when the file described the region wrongly (for example outside the image).
    origin : str
        Where the rectangle came from: ``"dicom"`` (file header), ``"detected"`` (found in the
        pixels), ``"user"`` (given by the user) or ``"frame"`` (the whole frame, nothing known).
    note : str
        Why the region is invalid or its spacing unknown; empty otherwise.
    """

    bbox: tuple[int, int, int, int]
    spacing_mm: SpacingMM | None = None
    valid: bool = True
    origin: RegionOrigin = "frame"
    note: str = ""

    @classmethod
    def whole(cls, rows: int, columns: int, spacing_mm: SpacingMM | None = None) -> Region:
        """The whole frame as a region."""
        return cls((0, 0, columns - 1, rows - 1), spacing_mm, True, "frame")

    @property
    def width(self) -> int:
        return self.bbox[2] - self.bbox[0] + 1

    @property
    def height(self) -> int:
        return self.bbox[3] - self.bbox[1] + 1

    @property
    def slices(self) -> tuple[slice, slice]:
        """``(rows, cols)`` slices that cut the region out of a frame array."""
        x0, y0, x1, y1 = self.bbox
        return slice(y0, y1 + 1), slice(x0, x1 + 1)

    def inside(self, rows: int, columns: int) -> bool:
        """True when the whole rectangle lies within a ``rows`` x ``columns`` frame."""
        x0, y0, x1, y1 = self.bbox
        return 0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used by ``usguide info --json``."""
        return {
            "bbox": list(self.bbox),
            "spacing_mm": list(self.spacing_mm) if self.spacing_mm is not None else None,
            "valid": self.valid,
            "origin": self.origin,
            "note": self.note,
        }


@dataclass(frozen=True, slots=True)
class Frame:
    """One ultrasound frame with its calibration and timing.

    Attributes
    ----------
    pixels : ndarray
        ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB.
    index : int
        Position in the source, from 0. For a live device it counts captured frames, so a gap
        shows frames that were dropped.
    timestamp_s : float or None
        Time of the frame in seconds from the start of the source; None when unknown.
    spacing_mm : tuple of float or None
        Millimetres per pixel ``(row, col)`` inside ``region``; None when unknown.
    region : Region
        The primary imaging region (the whole frame when nothing better is known).
    source : str
        Where the frame came from (a path or ``device:N``); never a patient identifier.
    regions : tuple of Region
        Every imaging region of the frame, primary first (two for side-by-side views).
    """

    pixels: np.ndarray
    index: int
    timestamp_s: float | None
    spacing_mm: SpacingMM | None
    region: Region
    source: str
    regions: tuple[Region, ...] = ()

    def __post_init__(self) -> None:
        p = self.pixels
        if p.dtype != np.uint8 or not (p.ndim == 2 or (p.ndim == 3 and p.shape[2] == 3)):
            raise ValueError(
                f"Frame pixels must be (H, W) or (H, W, 3) uint8, got {p.shape} {p.dtype}"
            )

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def is_colour(self) -> bool:
        return self.pixels.ndim == 3

    @property
    def region_spacing_mm(self) -> SpacingMM | None:
        """Millimetres per pixel ``(row, col)`` inside the primary region; None when unknown."""
        return self.region.spacing_mm or self.spacing_mm


@dataclass(slots=True)
class FrameResult:
    """What the pipeline's stages found in one frame; the frame itself stays unchanged.

    Attributes
    ----------
    frame : Frame
        The input frame.
    labels : ndarray or None
        ``(H, W)`` uint8 class indices (0 background, 1 nerve, 2 vessel, 3 fascia, 4 needle),
        once segmentation has run.
    stage_ms : dict of str to float
        Time each stage took on this frame, in milliseconds.
    needle : NeedleState or None
        The needle tracker's answer, once the needle stage has run.
    guidance : GuidanceResult or None
        Targets, distances and warnings, once the guidance stage has run.
    overlay : ndarray or None
        ``(H, W, 3)`` uint8 RGB picture for display; reused by the next frame, copy to keep it.
    errors : dict of str to str
        Stages that failed on this frame and why; their output is None and not drawn.
    """

    frame: Frame
    labels: np.ndarray | None = None
    stage_ms: dict[str, float] = field(default_factory=dict)
    needle: NeedleState | None = None
    guidance: GuidanceResult | None = None
    overlay: np.ndarray | None = None
    errors: dict[str, str] = field(default_factory=dict)
