"""Recorded video files (MP4, AVI, MKV, ...), decoded with OpenCV one frame at a time.

Every frame is delivered, in order, as RGB uint8. Design choices:

- **Frame count.** ``CAP_PROP_FRAME_COUNT`` is exact for containers with a sample index (MP4/MOV,
  AVI) but only an estimate from duration x rate for others (MKV, WebM, MPEG), and a file cut
  short still announces its original count. The count is therefore checked when the file is
  opened, by counting the video packets without decoding them (FFmpeg raw mode: 1-4 ms for the
  100-frame H.264 clips of the shared data, against about 40 ms to decode them). Without FFmpeg,
  the last announced frame is decoded instead (a seek: at most one group of pictures). Only
  when the count and the check disagree are frames counted by decoding from the start.
- **Truncation.** A file whose frames end before the count its header announces was cut short.
  It opens with a :class:`TruncatedSourceWarning` and delivers the frames before the break. The
  last frame a decoder returns from a cut file is often only partly there (FFmpeg conceals the
  missing part with grey or stale blocks; seen with MJPEG and MPEG-4 AVI), so that frame is left
  out. A cut MP4 whose index ("moov" atom) was at the end cannot be opened at all and raises
  :class:`~usguide.errors.CorruptSourceError`.
- **Timestamps** come from the container (``CAP_PROP_POS_MSEC`` after each decode, relative to
  the first frame), so a variable frame rate keeps its true timing; where the container has none,
  ``index x frame_time_s``.
- **Random access** continues from the current position without seeking (or decodes through a
  short forward jump); longer jumps seek with ``CAP_PROP_POS_FRAMES`` and check that the
  position landed, else reopen the file and decode forward to the frame.
- **Quiet.** FFmpeg and OpenCV print their own diagnostics ("moov atom not found", "overread 8")
  straight to stderr; here the same problems become typed errors and warnings, so importing this
  module sets ``OPENCV_FFMPEG_LOGLEVEL`` to quiet (unless the user set it), and OpenCV's log is
  silenced while a capture opens.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from usguide.errors import (
    CorruptSourceError,
    EmptySourceError,
    SourceNotFoundError,
    TruncatedSourceWarning,
)
from usguide.frame import Region
from usguide.sources.base import BBox, SeekableSource

# Read by OpenCV when it first starts FFmpeg in this process: -8 is AV_LOG_QUIET.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

# A forward jump this short is cheaper to decode through than to seek (a seek decodes from the
# previous key frame, often further back than this).
_GRAB_AHEAD = 32
# Region detection samples this many frames spread over the clip's first DETECT_SPAN_S seconds:
# one frame's dark far field can pass for border, and a steady probe's imaging area is fixed.
_DETECT_FRAMES = 5
_DETECT_SPAN_S = 1.0
# A sampled box counts when it overlaps the median of the samples this much (IoU).
_DETECT_AGREE = 0.5


def fourcc_text(code: float) -> str:
    """The FourCC of ``CAP_PROP_FOURCC`` as text (``"h264"``, ``"MJPG"``), or ``"unknown"``."""
    if not math.isfinite(code) or code <= 0:
        return "unknown"
    raw = int(code).to_bytes(4, "little", signed=False)
    text = raw.decode("ascii", errors="replace").strip("\x00 ")
    if not text or not text.isprintable() or "\ufffd" in text:
        return f"0x{int(code):08x}"
    return text


_T = TypeVar("_T")
_LOG_LOCK = threading.Lock()


@contextmanager
def _opencv_log_silenced() -> Iterator[None]:
    cv_logging = getattr(getattr(cv2, "utils", None), "logging", None)
    if cv_logging is None or not hasattr(cv_logging, "setLogLevel"):
        yield
        return
    with _LOG_LOCK:
        previous = cv_logging.getLogLevel()
        cv_logging.setLogLevel(cv_logging.LOG_LEVEL_SILENT)
        try:
            yield
        finally:
            cv_logging.setLogLevel(previous)


def quietly(open_capture: Callable[[], _T]) -> _T:
    """Run ``open_capture`` with OpenCV's log silenced. A capture that fails to open logs
    warnings such as "can't open camera by index"; the caller raises a typed error instead."""
    with _opencv_log_silenced():
        return open_capture()


def _capture_api() -> int:
    """FFmpeg when the OpenCV build has it: it reads every common container, and naming it stops
    OpenCV from taking a file name with ``%d`` in it for an image sequence."""
    registry = getattr(cv2, "videoio_registry", None)
    if registry is not None and registry.hasBackend(cv2.CAP_FFMPEG):
        return cv2.CAP_FFMPEG
    return cv2.CAP_ANY


def to_rgb(image: np.ndarray) -> np.ndarray:
    """OpenCV's BGR (or grey, or BGRA) capture output as a new ``(H, W, 3)`` RGB uint8 array."""
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


class VideoFileSource(SeekableSource):
    """Every frame of a video file, in order, as RGB uint8 with container timestamps.

    Parameters
    ----------
    path : str or PathLike
        The video file (anything OpenCV's FFmpeg backend reads).
    spacing_mm : float or (float, float), optional
        Millimetres per pixel ``(row, col)``. Videos carry no calibration, so without it the
        spacing is unknown (None).
    region : (x0, y0, x1, y1), optional
        Imaging rectangle in inclusive pixels.
    detect_region : bool
        Find the imaging area in a few frames from the first second and take the union of
        their boxes (else the whole frame is the region).

    Raises
    ------
    SourceNotFoundError
        The file does not exist.
    CorruptSourceError
        OpenCV cannot open the file, or cannot decode its first frame.
    EmptySourceError
        The video opens but holds no frame.

    Warns
    -----
    TruncatedSourceWarning
        The file ends before the frames its header announces; the intact frames are delivered.
    """

    kind = "video"
    colour = "RGB"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        spacing_mm: float | Sequence[float] | None = None,
        region: BBox | None = None,
        detect_region: bool = True,
    ) -> None:
        super().__init__(
            str(path), spacing_mm=spacing_mm, region=region, detect_region=detect_region
        )
        self._cap: cv2.VideoCapture | None = None
        # One capture, one position: a decode must not interleave with another thread's seek.
        self._lock = threading.Lock()
        p = Path(path)
        if not p.is_file():
            raise SourceNotFoundError(path, "no such file")
        if p.stat().st_size == 0:
            raise CorruptSourceError(path, "the file is empty (0 bytes), not a video")
        self._path = str(p)
        try:
            self._open()
        except Exception:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------------
    def _new_capture(self) -> cv2.VideoCapture:
        cap = quietly(lambda: cv2.VideoCapture(self._path, _capture_api()))
        if not cap.isOpened():
            cap.release()
            raise CorruptSourceError(
                self.source, "OpenCV cannot open it as a video (corrupt, truncated or not a video)"
            )
        self._pos = 0  # index of the frame the next decode returns; -1 when unknown
        return cap

    def _open(self) -> None:
        self._bgr: np.ndarray | None = None  # decode buffer, reused for every frame
        self._exact_seek = True
        self._cap = cap = self._new_capture()
        fps = cap.get(cv2.CAP_PROP_FPS)
        self._frame_time = 1.0 / fps if math.isfinite(fps) and fps > 0 else None
        self.encoding = fourcc_text(cap.get(cv2.CAP_PROP_FOURCC))
        self._backend = cap.getBackendName()
        announced = cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self._announced = int(announced) if math.isfinite(announced) and announced > 0 else 0
        self._t0_ms = 0.0
        first = self._decode_next()
        if first is None:
            if self._announced == 0:
                raise EmptySourceError(self.source, "the video holds no frame")
            raise CorruptSourceError(self.source, "the first frame cannot be decoded")
        # Kept for region detection, so that detecting and then iterating decodes frame 0 once.
        self._first, ms = first
        self._t0_ms = ms if math.isfinite(ms) and ms > 0 else 0.0
        self._shape = (int(self._first.shape[0]), int(self._first.shape[1]))
        self._n, self._count_method = self._count_frames()

    def _count_frames(self) -> tuple[int, str]:
        """The exact number of intact frames, and how it was found (see the module notes)."""
        announced = self._announced
        packets = self._count_packets()
        if packets is not None:
            if announced > 0 and packets == announced:
                return announced, "container, every frame present"
        elif announced > 0 and self._goto(announced - 1, fallback=False) and self._grab():
            # No demuxing without decoding here: decode the last announced frame instead.
            if not self._grab():
                return announced, "container, last frame decoded"
            n = announced + 1  # more frames than announced: the count was an estimate
            while self._grab():
                n += 1
            return n, "counted by decoding (the container's count was short)"
        n = self._count_by_decoding()
        if announced == 0:
            return n, "counted by decoding (the container does not say)"
        if n >= announced:
            if packets is None:
                self._exact_seek = False  # the file is whole, so the seek to its end missed
            return n, "counted by decoding (the container's count was an estimate)"
        if n < 2:
            raise CorruptSourceError(
                self.source,
                f"truncated: the header announces {announced} frames, none can be read intact",
            )
        warnings.warn(
            f"{self.source}: truncated: the header announces {announced} frames but the file ends "
            f"after {n}; reading the first {n - 1} (the last one decoded may be incomplete)",
            TruncatedSourceWarning,
            stacklevel=4,
        )
        return n - 1, f"truncated; {n} of {announced} announced frames decode"

    def _count_packets(self) -> int | None:
        """Frames in the file, counted by reading their packets without decoding them (FFmpeg's
        raw mode: file reading only); None where the backend cannot do that."""
        if self._backend.upper() != "FFMPEG":
            return None
        cap = quietly(lambda: cv2.VideoCapture(self._path, cv2.CAP_FFMPEG))
        try:
            if not (cap.isOpened() and cap.set(cv2.CAP_PROP_FORMAT, -1)):
                return None
            if cap.get(cv2.CAP_PROP_FORMAT) != -1:
                return None
            n = 0
            while cap.grab():
                n += 1
            return n
        finally:
            cap.release()

    def _count_by_decoding(self) -> int:
        """Reopen and decode every frame without colour conversion, counting them."""
        self._reopen()
        n = 0
        while self._grab():
            n += 1
        return n

    def _reopen(self) -> None:
        if self._cap is not None:
            self._cap.release()
            self._cap = None
        self._cap = self._new_capture()

    # -- decoding ----------------------------------------------------------------------------------
    def _grab(self) -> bool:
        """Decode the next frame without converting it; False at the end (position unknown)."""
        assert self._cap is not None
        if not self._cap.grab():
            self._pos = -1
            return False
        self._pos += 1
        return True

    def _decode_next(self) -> tuple[np.ndarray, float] | None:
        """The next frame as new RGB pixels and its container time in ms, or None at the end."""
        assert self._cap is not None
        ok, bgr = self._cap.read(self._bgr) if self._bgr is not None else self._cap.read()
        if not ok or bgr is None:
            self._pos = -1
            return None
        self._bgr = bgr  # OpenCV decodes into it next time (a new one if the size changes)
        self._pos += 1
        return to_rgb(bgr), float(self._cap.get(cv2.CAP_PROP_POS_MSEC))

    def _goto(self, index: int, *, fallback: bool = True) -> bool:
        """Position the capture so the next decode returns frame ``index``.

        With ``fallback`` False a seek that misses returns False instead of decoding forward from
        the start; the frame count check uses that to spot a file that ends early.
        """
        assert self._cap is not None
        if self._pos == index:
            return True
        if self._pos >= 0 and 0 < index - self._pos <= _GRAB_AHEAD:
            while self._pos < index:
                if not self._grab():
                    return False
            return True
        if self._exact_seek:
            self._cap.set(cv2.CAP_PROP_POS_FRAMES, index)
            landed = self._cap.get(cv2.CAP_PROP_POS_FRAMES)
            if math.isfinite(landed) and round(landed) == index:
                self._pos = index
                return True
            self._pos = -1
        if not fallback:
            return False
        # No seek, or it missed: decode forward from the start (slow, but exact).
        self._reopen()
        while self._pos < index:
            if not self._grab():
                return False
        return True

    def _stamp(self, index: int, ms: float) -> float | None:
        """Seconds from the first frame: the container's time, else index x frame time."""
        if math.isfinite(ms):
            t = (ms - self._t0_ms) / 1000.0
            if t > 0 or (index == 0 and t == 0):
                return t
        return index * self._frame_time if self._frame_time is not None else None

    def _decode_at(self, index: int) -> tuple[np.ndarray, float | None] | None:
        with self._lock:
            if self._cap is None:
                raise ValueError(f"{self.source}: the video is closed")
            decoded = self._decode_next() if self._goto(index) else None
        if decoded is None:
            return None
        pixels, ms = decoded
        return pixels, self._stamp(index, ms)

    def _read_pixels(self, index: int) -> tuple[np.ndarray, float | None]:
        decoded = self._decode_at(index)
        if decoded is None:
            raise CorruptSourceError(self.source, f"frame {index} cannot be decoded")
        return decoded

    def _iter_pixels(self) -> Iterator[tuple[int, np.ndarray, float | None]]:
        for index in range(self._n):
            decoded = self._decode_at(index)
            if decoded is None:
                # Frames were counted at open, so this is damage inside the file.
                warnings.warn(
                    f"{self.source}: the video ended early: frame {index} of {self._n} "
                    "cannot be decoded",
                    TruncatedSourceWarning,
                    stacklevel=3,
                )
                return
            yield index, decoded[0], decoded[1]

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return self._n

    @property
    def frame_time_s(self) -> float | None:
        return self._frame_time

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def _native_regions(self) -> tuple[Region, ...]:
        return ()  # videos carry no calibration; the base detects the imaging area

    def _first_pixels(self) -> np.ndarray | None:
        return self._first

    def _fallback_region(self) -> Region:
        """The union of the imaging areas found in a few frames from the clip's start.

        Detection on one frame under-reads a dark far field that changes from frame to frame
        (lung B-mode: y1 266 on one frame, 344 on the next); the imaging area itself is fixed, so
        the union of the boxes that agree with the others holds it all. Boxes far from the
        median of the samples (a blank or frozen frame) are left out.
        """
        if not self._detect_region:
            return super()._fallback_region()
        from usguide.imaging_region import box_iou, find_imaging_region

        rate = 1.0 / self._frame_time if self._frame_time else 25.0
        last = min(self._n - 1, max(0, round(_DETECT_SPAN_S * rate) - 1))
        picks = sorted({round(x) for x in np.linspace(0, last, _DETECT_FRAMES)})
        boxes = []
        for index in picks:
            if index == 0:
                pixels: np.ndarray | None = self._first  # decoded at open; not again
            else:
                decoded = self._decode_at(index)
                pixels = None if decoded is None else decoded[0]
            bbox = None if pixels is None else find_imaging_region(pixels)
            if bbox is not None:
                boxes.append(bbox)
        if not boxes:
            return Region.whole(*self.shape, self._user_spacing)
        median = tuple(int(v) for v in np.median(np.array(boxes), axis=0))
        kept = [b for b in boxes if box_iou(b, median) >= _DETECT_AGREE] or boxes
        union = (
            min(b[0] for b in kept),
            min(b[1] for b in kept),
            max(b[2] for b in kept),
            max(b[3] for b in kept),
        )
        note = f"found in the pixels of {len(kept)} frames"
        if self._user_spacing is not None:
            note += "; spacing given by the user"
        return Region(union, self._user_spacing, True, "detected", note)

    def _info_details(self) -> dict[str, Any]:
        return {
            "decoder": f"opencv:{self._backend.lower()}",
            "frame_count_from": self._count_method,
        }

    def close(self) -> None:
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            cap, self._cap = self._cap, None
            if cap is not None:
                cap.release()
