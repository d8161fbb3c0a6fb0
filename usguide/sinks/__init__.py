"""Where the pipeline's results go: an overlay video, a JSON-lines log, a window.

A sink is any object with ``write(result)`` and ``close()``; the runner calls ``write`` once per
processed frame, in order, and ``close`` once at the end (also after an error).
"""

from __future__ import annotations

from typing import Protocol

from usguide.frame import FrameResult
from usguide.sinks.log import JsonLinesLog, result_record
from usguide.sinks.video import VideoSink
from usguide.sinks.window import WindowSink


class Sink(Protocol):
    def write(self, result: FrameResult) -> None: ...
    def close(self) -> None: ...


__all__ = ["JsonLinesLog", "Sink", "VideoSink", "WindowSink", "result_record"]
