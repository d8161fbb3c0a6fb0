"""Live capture devices (a frame grabber, a webcam, a stream URL), newest frame first.

A capture thread reads the device as fast as it delivers and puts each frame, converted to RGB,
into a small buffer that drops the OLDEST frame when full, so a slow consumer always gets a recent
frame instead of falling further behind. Every captured frame gets the next sequence number as its
:attr:`~usguide.frame.Frame.index`, so a gap in the indices shows the frames that were dropped;
:meth:`LiveSource.stats` counts them.

Timestamps are ``time.monotonic()`` when the frame reached this process, relative to the first
captured frame. Device clocks (``CAP_PROP_POS_MSEC``) differ by backend: V4L2 gives driver times,
FFmpeg a stream's own clock, many give nothing; the arrival time means the same on every device
and is what a latency budget is measured against.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import cv2
import numpy as np

from usguide.errors import DeviceError
from usguide.frame import Region
from usguide.sources.base import BBox, FrameSource
from usguide.sources.video import fourcc_text, quietly, to_rgb

logger = logging.getLogger("usguide")

# Reads that fail in a row before the device counts as gone. A camera may fail a read or two
# while it settles; a lost device fails every time.
_MAX_READ_FAILURES = 25
_FAILURE_BACKOFF_S = 0.01


class Capture(Protocol):
    """The part of ``cv2.VideoCapture`` a live source uses."""

    def isOpened(self) -> bool: ...  # OpenCV's name
    def read(self) -> tuple[bool, np.ndarray | None]: ...
    def get(self, prop: int) -> float: ...
    def release(self) -> None: ...


@dataclass(frozen=True, slots=True)
class CaptureStats:
    """Frame counts of a live source: ``captured == delivered + dropped + buffered``."""

    captured: int
    delivered: int
    dropped: int
    buffered: int


class LiveSource(FrameSource):
    """Frames of a live capture device, newest first; frames the consumer cannot keep up with
    are dropped and counted.

    Capture starts on the first frame asked for (iteration, :meth:`start`, or a region or shape
    that needs a frame), so the time a pipeline spends loading does not count as drops.

    Parameters
    ----------
    device : int or str
        A capture device index (``0``) or anything OpenCV opens: ``/dev/video0``, a stream URL,
        or a video file (read at decoding speed; iteration ends at its end).
    buffer_size : int
        Frames kept waiting for the consumer. 1 always gives the newest frame; more smooths
        jitter at the cost of up to ``buffer_size`` frames of latency.
    timeout_s : float
        How long iteration waits for a frame before giving up with :class:`DeviceError`.
    spacing_mm, region, detect_region
        As for every source (see :class:`~usguide.sources.base.FrameSource`).
    capture_factory : callable, optional
        Makes the capture object from ``device``; ``cv2.VideoCapture`` by default. Anything with
        its ``isOpened``, ``read``, ``get`` and ``release`` methods will do (tests, SDKs).

    Raises
    ------
    DeviceError
        The device cannot be opened; during iteration, when it stops delivering frames.
    """

    kind = "device"
    colour = "RGB"

    def __init__(
        self,
        device: int | str | os.PathLike[str],
        *,
        buffer_size: int = 2,
        timeout_s: float = 5.0,
        spacing_mm: float | Sequence[float] | None = None,
        region: BBox | None = None,
        detect_region: bool = True,
        capture_factory: Callable[[Any], Capture] | None = None,
    ) -> None:
        if not isinstance(device, int):
            device = os.fspath(device)
        name = f"device:{device}" if isinstance(device, int) else device
        super().__init__(name, spacing_mm=spacing_mm, region=region, detect_region=detect_region)
        if buffer_size < 1:
            raise ValueError(f"buffer_size must be at least 1, got {buffer_size}")
        if not (math.isfinite(timeout_s) and timeout_s > 0):
            raise ValueError(f"timeout_s must be a positive number of seconds, got {timeout_s}")
        self.device = device
        self.buffer_size = int(buffer_size)
        self.timeout_s = float(timeout_s)
        self._cond = threading.Condition()
        self._buffer: collections.deque[tuple[int, np.ndarray, float]] = collections.deque(
            maxlen=self.buffer_size
        )
        self._captured = self._delivered = self._dropped = 0
        self._first: np.ndarray | None = None
        self._t0: float | None = None
        self._finished = False  # the capture thread has stopped
        self._error: str | None = None  # why it stopped, when the device failed
        self._stop = threading.Event()
        self._closed = False
        self._released = False
        self._thread: threading.Thread | None = None
        # A file read as a device ends; a device that stops delivering has failed.
        self._is_file = isinstance(device, str) and Path(device).is_file()
        factory = capture_factory if capture_factory is not None else cv2.VideoCapture
        try:
            self._cap: Capture | None = quietly(lambda: factory(device))
        except (cv2.error, OSError, RuntimeError, ValueError) as e:
            raise DeviceError(name, f"cannot open capture device ({e})") from e
        if not self._cap.isOpened():
            self._release()
            raise DeviceError(
                name, "cannot open capture device (absent, busy, or no permission to read it)"
            )
        fps = self._get(cv2.CAP_PROP_FPS)
        self._frame_time = 1.0 / fps if fps > 0 else None
        self._prop_shape = (
            int(self._get(cv2.CAP_PROP_FRAME_HEIGHT)),
            int(self._get(cv2.CAP_PROP_FRAME_WIDTH)),
        )
        self.encoding = fourcc_text(self._get(cv2.CAP_PROP_FOURCC))

    def _get(self, prop: int) -> float:
        """A capture property, 0 when the device does not report it."""
        assert self._cap is not None
        try:
            value = float(self._cap.get(prop))
        except (TypeError, ValueError, cv2.error):
            return 0.0
        return value if math.isfinite(value) and value > 0 else 0.0

    # -- the capture thread ------------------------------------------------------------------------
    def start(self) -> None:
        """Start capturing (done for you by iteration). Safe to call twice."""
        with self._cond:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(
                target=self._capture_loop, name=f"usguide-capture-{self.source}", daemon=True
            )
            self._thread.start()

    def _capture_loop(self) -> None:
        cap = self._cap
        assert cap is not None
        # cv2.VideoCapture decodes into a buffer it is given; a duck-typed device may not.
        reuse = isinstance(cap, cv2.VideoCapture)
        bgr: np.ndarray | None = None
        failures = 0
        error: str | None = None
        try:
            while not self._stop.is_set():
                if reuse and bgr is not None:
                    ok, image = cap.read(bgr)  # type: ignore[call-arg]
                else:
                    ok, image = cap.read()
                if not ok or image is None:
                    if self._is_file:
                        break  # the end of a file: not an error
                    failures += 1
                    if failures >= _MAX_READ_FAILURES:
                        error = f"the device stopped delivering frames ({failures} reads failed)"
                        break
                    self._stop.wait(_FAILURE_BACKOFF_S)
                    continue
                failures = 0
                arrived = time.monotonic()
                if reuse:
                    bgr = image
                rgb = to_rgb(image)  # a new array: the frame owns its pixels
                with self._cond:
                    if self._t0 is None:
                        self._t0 = arrived
                        self._first = rgb.copy()  # for region detection, whatever befalls rgb
                    if len(self._buffer) == self.buffer_size:
                        self._dropped += 1  # append() below pushes the oldest out
                    self._buffer.append((self._captured, rgb, arrived - self._t0))
                    self._captured += 1
                    self._cond.notify_all()
        except Exception as e:  # noqa: BLE001 - a device failure must reach the consumer
            error = f"capture failed ({type(e).__name__}: {e})"
        finally:
            # The thread owns the device while it runs: releasing it from another thread in the
            # middle of a read() is not safe in OpenCV.
            self._release()
            with self._cond:
                self._finished = True
                self._error = error
                self._cond.notify_all()

    def _release(self) -> None:
        with self._cond:
            cap, self._cap = self._cap, None
            if cap is None or self._released:
                return
            self._released = True
        cap.release()

    def _wait_first(self) -> bool:
        """Start capturing and wait (up to ``timeout_s``) for the first frame."""
        self.start()
        with self._cond:
            return self._cond.wait_for(
                lambda: self._first is not None or self._finished or self._closed,
                timeout=self.timeout_s,
            ) and (self._first is not None)

    # -- iteration ---------------------------------------------------------------------------------
    def _iter_pixels(self) -> Iterator[tuple[int, np.ndarray, float | None]]:
        self.start()
        while True:
            with self._cond:
                ready = self._cond.wait_for(
                    lambda: self._buffer or self._finished or self._closed, timeout=self.timeout_s
                )
                if self._closed:
                    return
                if self._buffer:
                    index, pixels, stamp = self._buffer.popleft()
                    self._delivered += 1
                elif self._finished:
                    if self._error is not None:
                        raise DeviceError(self.source, self._error)
                    return
                else:
                    assert not ready
                    raise DeviceError(
                        self.source, f"no frame from the device for {self.timeout_s:g} s"
                    )
            yield index, pixels, stamp

    # -- counts ------------------------------------------------------------------------------------
    @property
    def captured_frames(self) -> int:
        """Frames read from the device so far."""
        with self._cond:
            return self._captured

    @property
    def delivered_frames(self) -> int:
        """Frames handed to the consumer so far."""
        with self._cond:
            return self._delivered

    @property
    def dropped_frames(self) -> int:
        """Frames pushed out of the buffer before the consumer took them."""
        with self._cond:
            return self._dropped

    def stats(self) -> CaptureStats:
        """Captured, delivered, dropped and still-buffered frames, counted at one instant."""
        with self._cond:
            return CaptureStats(self._captured, self._delivered, self._dropped, len(self._buffer))

    @property
    def capturing(self) -> bool:
        """True while the capture thread runs."""
        return self._thread is not None and self._thread.is_alive()

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def frame_count(self) -> None:
        return None

    @property
    def frame_time_s(self) -> float | None:
        return self._frame_time

    @property
    def shape(self) -> tuple[int, int]:
        if self._prop_shape[0] > 0 and self._prop_shape[1] > 0:
            return self._prop_shape
        if not self._wait_first():
            raise DeviceError(
                self.source, f"no frame from the device for {self.timeout_s:g} s (size unknown)"
            )
        assert self._first is not None
        return int(self._first.shape[0]), int(self._first.shape[1])

    def _native_regions(self) -> tuple[Region, ...]:
        return ()

    def _first_pixels(self) -> np.ndarray | None:
        return self._first if self._wait_first() else None

    def _info_details(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "buffer_size": self.buffer_size,
            "captured": stats.captured,
            "dropped": stats.dropped,
        }

    def close(self) -> None:
        """Stop the capture thread, release the device and log any dropped frames."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._stop.set()
        thread = self._thread
        if thread is not None:
            # A read() in progress finishes first; a device stuck inside one is given up on.
            thread.join(timeout=self.timeout_s + 1.0)
            if thread.is_alive():
                logger.warning(
                    "%s: the capture thread is stuck in a device read; "
                    "the device is released when that read returns",
                    self.source,
                )
        else:
            self._release()
        stats = self.stats()
        if stats.dropped:
            logger.info("%s: dropped %d of %d frames", self.source, stats.dropped, stats.captured)
