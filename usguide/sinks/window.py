"""An OpenCV window showing the overlay, where a display exists."""

from __future__ import annotations

import contextlib
import os

import cv2
import numpy as np

from usguide.errors import UsguideError
from usguide.frame import FrameResult


def display_available() -> bool:
    """Whether OpenCV can open a window here (a GUI build and a display)."""
    if os.name != "nt" and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        cv2.namedWindow("usguide-probe", cv2.WINDOW_AUTOSIZE)
        cv2.destroyWindow("usguide-probe")
    except cv2.error:
        return False  # opencv-python-headless has no GUI
    return True


class WindowSink:
    """Show each overlay in a window; closing the window or pressing q/Esc sets :attr:`stopped`."""

    def __init__(self, title: str = "usguide") -> None:
        if not display_available():
            raise UsguideError(
                "window", "no display here (or OpenCV without GUI: install opencv-python)"
            )
        self.title = title
        self.stopped = False
        self._bgr: np.ndarray | None = None
        cv2.namedWindow(title, cv2.WINDOW_AUTOSIZE)

    def write(self, result: FrameResult) -> None:
        picture = result.overlay if result.overlay is not None else result.frame.pixels
        code = cv2.COLOR_GRAY2BGR if picture.ndim == 2 else cv2.COLOR_RGB2BGR
        if self._bgr is None or self._bgr.shape[:2] != picture.shape[:2]:
            self._bgr = np.empty((*picture.shape[:2], 3), np.uint8)
        cv2.cvtColor(picture, code, dst=self._bgr)
        cv2.imshow(self.title, self._bgr)
        key = cv2.waitKey(1) & 0xFF
        if key in (ord("q"), 27) or cv2.getWindowProperty(self.title, cv2.WND_PROP_VISIBLE) < 1:
            self.stopped = True

    def close(self) -> None:
        with contextlib.suppress(cv2.error):
            cv2.destroyWindow(self.title)
