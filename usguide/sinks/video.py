"""The overlay video file (mp4)."""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import numpy as np

from usguide.errors import UsguideError
from usguide.frame import FrameResult


class VideoSink:
    """Write each frame's overlay (or the frame itself when no overlay was drawn) to an mp4.

    The writer opens on the first frame, at its size. A later frame of another size is scaled
    to fit, keeping its aspect ratio, on black (a video has one size). The file is written as
    ``NAME.partial.mp4`` and takes its name when closed, so a finished name means a whole file.

    Parameters
    ----------
    path : path-like
        The ``.mp4`` to write.
    fps : float
        Frame rate stored in the file (the source's rate, for real-time playback).
    """

    def __init__(self, path: str | os.PathLike[str], fps: float = 20.0) -> None:
        self.path = Path(path)
        if self.path.suffix.lower() != ".mp4":
            raise UsguideError(str(self.path), "the overlay video must be an .mp4 file")
        if not fps > 0:
            raise ValueError(f"fps must be > 0, got {fps}")
        self.fps = float(fps)
        self.partial = self.path.with_name(self.path.stem + ".partial.mp4")
        self._writer: cv2.VideoWriter | None = None
        self._size: tuple[int, int] | None = None
        self._bgr: np.ndarray | None = None
        self._fit: np.ndarray | None = None
        self.frames = 0
        self.resized_frames = 0

    def write(self, result: FrameResult) -> None:
        picture = result.overlay if result.overlay is not None else result.frame.pixels
        h, w = picture.shape[:2]
        if self._writer is None:
            if self.path.parent != Path():
                self.path.parent.mkdir(parents=True, exist_ok=True)
            writer = cv2.VideoWriter(
                str(self.partial), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, (w, h)
            )
            if not writer.isOpened():
                # Kept unset: close() must not rename a file that was never written, and
                # hide this error behind its own.
                writer.release()
                raise UsguideError(str(self.path), "cannot open an mp4 writer here (OpenCV/FFmpeg)")
            self._writer, self._size = writer, (w, h)
            self._bgr = np.empty((h, w, 3), np.uint8)
        assert self._size is not None and self._bgr is not None
        if (w, h) != self._size:
            picture = self._letterbox(picture)
            self.resized_frames += 1
        if picture.ndim == 2:
            cv2.cvtColor(picture, cv2.COLOR_GRAY2BGR, dst=self._bgr)
        else:
            cv2.cvtColor(picture, cv2.COLOR_RGB2BGR, dst=self._bgr)
        self._writer.write(self._bgr)
        self.frames += 1

    def _letterbox(self, picture: np.ndarray) -> np.ndarray:
        assert self._size is not None
        w, h = self._size
        ph, pw = picture.shape[:2]
        scale = min(w / pw, h / ph)
        nw, nh = max(1, round(pw * scale)), max(1, round(ph * scale))
        shape = (h, w) if picture.ndim == 2 else (h, w, 3)
        if self._fit is None or self._fit.shape != shape:
            self._fit = np.zeros(shape, np.uint8)
        self._fit.fill(0)
        x, y = (w - nw) // 2, (h - nh) // 2
        self._fit[y : y + nh, x : x + nw] = cv2.resize(picture, (nw, nh))
        return self._fit

    def close(self) -> None:
        if self._writer is not None:
            self._writer.release()
            self._writer = None
            os.replace(self.partial, self.path)
