"""Frame sources: each an iterator of :class:`~usguide.frame.Frame`.

:func:`open_source` picks the right one for a path or device; the classes can also be used
directly. Importing this package is cheap: each source module loads its decoders when used.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from usguide.errors import SourceNotFoundError, UnsupportedFormatError

if TYPE_CHECKING:
    from usguide.sources.base import BBox, FrameSource

VIDEO_SUFFIXES = frozenset(
    {".mp4", ".avi", ".mov", ".mkv", ".m4v", ".wmv", ".mpg", ".mpeg", ".webm", ".ogv"}
)
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})


def is_dicom_file(path: str | os.PathLike[str]) -> bool:
    """True when the file carries the DICOM Part 10 preamble ('DICM' at byte 128)."""
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def is_device(spec: str | int | os.PathLike[str]) -> bool:
    """True for a capture device: an index (``0``, ``"1"``) or a ``/dev/video*`` path.

    A number that names an existing file or folder (a folder of frames called ``20240101``)
    is that path, not a device."""
    if isinstance(spec, int):
        return True
    text = str(spec)
    if text.startswith("/dev/video"):
        return True
    return text.isdigit() and not os.path.exists(text)


def _device_index(spec: str | int | os.PathLike[str]) -> int | str:
    """A capture device's spec as OpenCV takes it: an index as an int, a path as a string."""
    text = str(spec)
    return int(text) if text.isdigit() else text


def open_source(
    spec: str | int | os.PathLike[str],
    *,
    spacing_mm: float | Sequence[float] | None = None,
    region: BBox | None = None,
    detect_region: bool = True,
) -> FrameSource:
    """Open a DICOM file, video file, image file or folder, or a live capture device.

    Parameters
    ----------
    spec : str, int or PathLike
        A path, or a device index / ``/dev/video*`` path for live capture.
    spacing_mm : float or (float, float), optional
        Millimetres per pixel ``(row, col)``; overrides the file's calibration.
    region : (x0, y0, x1, y1), optional
        Imaging rectangle in inclusive pixels; overrides the file's or the detected one.
    detect_region : bool
        Find the imaging area in the pixels when the file does not give a valid one.

    Raises
    ------
    SourceNotFoundError, UnsupportedFormatError, and the errors of each source.
    """
    options = {"spacing_mm": spacing_mm, "region": region, "detect_region": detect_region}
    if is_device(spec):
        from usguide.sources.live import LiveSource

        return LiveSource(_device_index(spec), **options)
    path = Path(spec)
    if not path.exists():
        raise SourceNotFoundError(path, "no such file or folder")
    suffix = path.suffix.lower()
    if path.is_dir():
        from usguide.sources.images import ImageSource

        return ImageSource(path, **options)
    from usguide.sources.images import IMAGE_SUFFIXES

    if suffix in IMAGE_SUFFIXES:
        from usguide.sources.images import ImageSource

        return ImageSource(path, **options)
    if suffix in DICOM_SUFFIXES or is_dicom_file(path):
        from usguide.sources.dicom import DicomSource

        return DicomSource(path, **options)
    if suffix in VIDEO_SUFFIXES:
        from usguide.sources.video import VideoFileSource

        return VideoFileSource(path, **options)
    raise UnsupportedFormatError(
        path, "not a DICOM file, a video or an image (by name and content)"
    )


__all__ = ["DICOM_SUFFIXES", "VIDEO_SUFFIXES", "is_device", "is_dicom_file", "open_source"]
