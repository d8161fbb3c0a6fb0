"""What every frame source shares: calibration overrides, frame assembly, the ``info`` summary."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from usguide.frame import Frame, Region, SpacingMM

BBox = tuple[int, int, int, int]


def parse_spacing(value: float | Sequence[float] | None) -> SpacingMM | None:
    """Turn a user's mm-per-pixel (one number, or ``(row, col)``) into ``(row, col)``.

    Raises
    ------
    ValueError
        When a value is not a finite positive number.
    """
    if value is None:
        return None
    # numbers.Real covers NumPy scalars (np.float32, np.int64) too; a 0-d array is one number.
    if isinstance(value, (int, float, numbers.Real)) or (
        isinstance(value, np.ndarray) and value.ndim == 0
    ):
        pair: tuple[Any, ...] = (value, value)
    else:
        pair = tuple(value)
    if len(pair) != 2:
        raise ValueError(f"spacing must be one number or (row, col), got {value!r}")
    row, col = (float(v) for v in pair)
    if not (np.isfinite(row) and np.isfinite(col) and row > 0 and col > 0):
        raise ValueError(f"spacing must be positive millimetres per pixel, got {value!r}")
    return row, col


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """What a source holds, for ``usguide info``. Carries no patient identifier.

    ``frames`` is None for a live device. ``frame_time_s`` is the nominal time between frames.
    """

    kind: str
    source: str
    frames: int | None
    rows: int
    columns: int
    frame_time_s: float | None
    regions: tuple[Region, ...]
    encoding: str
    colour: str
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing_mm(self) -> SpacingMM | None:
        """Spacing of the primary (first valid) region."""
        return next((r.spacing_mm for r in self.regions if r.valid), None)

    @property
    def frame_rate_hz(self) -> float | None:
        return 1.0 / self.frame_time_s if self.frame_time_s else None

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of ``usguide info --json``."""
        spacing = self.spacing_mm
        return {
            "kind": self.kind,
            "source": self.source,
            "frames": self.frames,
            "rows": self.rows,
            "columns": self.columns,
            "frame_time_s": self.frame_time_s,
            "frame_rate_hz": self.frame_rate_hz,
            "spacing_mm": list(spacing) if spacing is not None else None,
            "regions": [r.to_dict() for r in self.regions],
            "encoding": self.encoding,
            "colour": self.colour,
            **self.details,
        }


class FrameSource(ABC):
    """An iterator of :class:`~usguide.frame.Frame` with size, rate and calibration where known.

    Subclasses read pixels; this base applies the user's overrides once, so every source honours
    them the same way: a user ``region`` replaces the file's regions; a user ``spacing_mm``
    replaces the spacing of every valid region (rejected file regions stay reported as invalid,
    and the fallback imaging region then carries the user's spacing).

    Use as a context manager, or call :meth:`close`.
    """

    kind: str = "source"

    def __init__(
        self,
        source: str,
        *,
        spacing_mm: float | Sequence[float] | None = None,
        region: BBox | None = None,
        detect_region: bool = True,
    ) -> None:
        self.source = source
        self._detect_region = detect_region
        self._user_spacing = parse_spacing(spacing_mm)
        self._user_region = tuple(int(v) for v in region) if region is not None else None
        if self._user_region is not None and len(self._user_region) != 4:
            raise ValueError(f"region must be (x0, y0, x1, y1), got {region!r}")
        self._regions: tuple[Region, ...] | None = None
        self._primary: Region | None = None

    # -- what subclasses provide ----------------------------------------------------------------
    @property
    @abstractmethod
    def frame_count(self) -> int | None:
        """Number of frames, or None when unknown (a live device)."""

    @property
    @abstractmethod
    def frame_time_s(self) -> float | None:
        """Nominal time between frames in seconds, or None when unknown."""

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of every frame."""

    @abstractmethod
    def _native_regions(self) -> tuple[Region, ...]:
        """Regions the source itself knows (header, detection); may be empty."""

    @abstractmethod
    def _iter_pixels(self) -> Iterator[tuple[int, np.ndarray, float | None]]:
        """Yield ``(index, pixels, timestamp_s)`` in order."""

    def info(self) -> SourceInfo:
        """A summary of the source for people and for ``--json``."""
        rows, columns = self.shape
        return SourceInfo(
            kind=self.kind,
            source=self.source,
            frames=self.frame_count,
            rows=rows,
            columns=columns,
            frame_time_s=self.frame_time_s,
            regions=self.regions,
            encoding=self.encoding,
            colour=self.colour,
            details=self._info_details(),
        )

    encoding: str = "unknown"
    colour: str = "unknown"

    def _info_details(self) -> dict[str, Any]:
        return {}

    # -- shared behaviour -------------------------------------------------------------------------
    @property
    def frame_rate_hz(self) -> float | None:
        t = self.frame_time_s
        return 1.0 / t if t else None

    @property
    def regions(self) -> tuple[Region, ...]:
        """Every region known, for reporting: valid ones first, then rejected ones, then the
        fallback imaging region when no valid one exists. Never empty."""
        if self._regions is None:
            self._regions = self._resolve_regions()
        return self._regions

    @property
    def imaging_region(self) -> Region:
        """The primary imaging region: the first valid one (header, user, detected or whole)."""
        return next(r for r in self.regions if r.valid)

    @property
    def spacing_mm(self) -> SpacingMM | None:
        """Millimetres per pixel ``(row, col)`` of the primary region, or None when unknown."""
        return self.imaging_region.spacing_mm

    def _resolve_regions(self) -> tuple[Region, ...]:
        rows, columns = self.shape
        if self._user_region is not None:
            user = Region(self._user_region, self._user_spacing, True, "user")  # type: ignore[arg-type]
            if not user.inside(rows, columns):
                raise ValueError(
                    f"region {list(user.bbox)} lies outside the {columns} x {rows} frame "
                    "(x0, y0, x1, y1 are inclusive pixel coordinates)"
                )
            return (user,)
        native = self._native_regions()
        if self._user_spacing is not None:
            note = "spacing given by the user"
            native = tuple(
                replace(r, spacing_mm=self._user_spacing, note=note) if r.valid else r
                for r in native
            )
        if any(r.valid for r in native):
            return native
        return (*native, self._fallback_region())

    def _fallback_region(self) -> Region:
        """The imaging area found in the first frame's pixels, else the whole frame."""
        rows, columns = self.shape
        pixels = self._first_pixels() if self._detect_region else None
        if pixels is not None:
            from usguide.imaging_region import find_imaging_region

            bbox = find_imaging_region(pixels)
            if bbox is not None:
                note = (
                    "found in the pixels"
                    if self._user_spacing is None
                    else ("found in the pixels; spacing given by the user")
                )
                return Region(bbox, self._user_spacing, True, "detected", note)
        return Region.whole(rows, columns, self._user_spacing)

    def _first_pixels(self) -> np.ndarray | None:
        """Pixels of the first frame for region detection; None where it cannot be had."""
        return None

    def make_frame(self, index: int, pixels: np.ndarray, timestamp_s: float | None) -> Frame:
        """Wrap decoded pixels as a :class:`Frame` carrying this source's calibration."""
        if self._primary is None:
            self._primary = self.imaging_region
            self._valid_regions = tuple(r for r in self.regions if r.valid)
        return Frame(
            pixels=pixels,
            index=index,
            timestamp_s=timestamp_s,
            spacing_mm=self._primary.spacing_mm,
            region=self._primary,
            source=self.source,
            regions=self._valid_regions,
        )

    def __iter__(self) -> Iterator[Frame]:
        for index, pixels, timestamp_s in self._iter_pixels():
            yield self.make_frame(index, pixels, timestamp_s)

    def close(self) -> None:  # noqa: B027 - sources holding nothing need not override it
        """Release files or devices. Safe to call twice."""

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SeekableSource(FrameSource):
    """A recorded source whose frames can be read in any order (DICOM, video file, images)."""

    @property
    @abstractmethod
    def frame_count(self) -> int: ...

    @abstractmethod
    def _read_pixels(self, index: int) -> tuple[np.ndarray, float | None]:
        """Decode frame ``index`` (already range-checked); return ``(pixels, timestamp_s)``."""

    def _first_pixels(self) -> np.ndarray | None:
        return self._read_pixels(0)[0]

    def _iter_pixels(self) -> Iterator[tuple[int, np.ndarray, float | None]]:
        # Frames in order through random access; a source with a cheaper sequential path
        # (a video stream) overrides this.
        for i in range(self.frame_count):
            pixels, stamp = self._read_pixels(i)
            yield i, pixels, stamp

    def read(self, index: int) -> Frame:
        """Frame ``index`` (negative counts from the end)."""
        n = self.frame_count
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"frame {index} out of range for {n} frames in {self.source}")
        pixels, timestamp_s = self._read_pixels(index)
        return self.make_frame(index, pixels, timestamp_s)

    def __len__(self) -> int:
        return self.frame_count
