"""The pipeline: source -> preprocess -> segment -> needle -> guidance -> overlay -> sinks.

:class:`Pipeline` holds the stages, each configured once, and runs them on one frame with
:meth:`Pipeline.process`, timing every stage on every frame (:class:`StageTimings`). Two runners
feed it:

- :func:`run_playback`: every frame of a recorded scan, in order;
- :func:`run_live`: capture on its own thread, the newest frame wins, dropped frames are
  counted and latency is measured from a frame's capture to the end of its sinks.

A stage that raises on a frame does not stop the run: its output is None for that frame (so the
overlay hides what it would have drawn), the error is kept in ``FrameResult.errors`` and counted,
and the next frame runs every stage again.
"""

from __future__ import annotations

import collections
import logging
import math
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from usguide.errors import UsguideError
from usguide.frame import Frame, FrameResult, Region, SpacingMM
from usguide.guidance import Guidance, GuidanceConfig, GuidanceResult
from usguide.needle import NeedleConfig, NeedleStage, NeedleState
from usguide.sinks import Sink

logger = logging.getLogger("usguide")

STAGES = ("preprocess", "segment", "needle", "guidance", "overlay")


class StageTimings:
    """Latency of each stage (and any other named step), kept for every frame.

    The last ``window`` values of each name are kept for percentiles; counts and totals cover
    the whole run.
    """

    def __init__(self, window: int = 10_000) -> None:
        self.window = window
        self._values: dict[str, collections.deque[float]] = {}
        self._count: dict[str, int] = {}
        self._total: dict[str, float] = {}
        self.failures: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()  # a pipelined runner times stages on two threads

    def add(self, name: str, ms: float) -> None:
        with self._lock:
            values = self._values.get(name)
            if values is None:
                values = self._values[name] = collections.deque(maxlen=self.window)
                self._count[name] = 0
                self._total[name] = 0.0
            values.append(ms)
            self._count[name] += 1
            self._total[name] += ms

    def summary(self) -> dict[str, dict[str, float]]:
        """Per name: count, mean, median, p95, p99 and max in ms (recent window for the
        percentiles), and failures."""
        out = {}
        with self._lock:
            snapshot = {name: list(values) for name, values in self._values.items()}
        for name, values in snapshot.items():
            a = np.asarray(values, np.float64)
            out[name] = {
                "count": self._count[name],
                "mean_ms": self._total[name] / max(1, self._count[name]),
                "median_ms": float(np.median(a)),
                "p95_ms": float(np.percentile(a, 95)),
                "p99_ms": float(np.percentile(a, 99)),
                "max_ms": float(a.max()),
                "failures": self.failures.get(name, 0),
            }
        return out


class Pipeline:
    """The per-frame stages, configured once.

    Parameters
    ----------
    model : path, optional
        Segmentation model (default: the shipped ``usguide-seg``).
    threads : int
        Inference threads. One leaves the second core to the rest of the pipeline, which
        :func:`run_playback` runs beside segmentation; two give the lowest latency for one
        frame at a time (live mode).
    engine : str
        Inference engine: "auto", "openvino" or "onnxruntime" (:func:`usguide.segment.open_model`).
    smoothing : float
        Temporal smoothing of the segmentation, 0 to <1 (no added latency).
    needle : NeedleConfig, optional
    guidance : GuidanceConfig, optional
    targets : sequence of (x, y)
        User targets to start with, frame pixels.
    overlay : bool
        Draw the overlay picture (``FrameResult.overlay``).

    Examples
    --------
    >>> pipeline = Pipeline()                                 # doctest: +SKIP
    >>> for frame in open_source("scan.dcm"):                 # doctest: +SKIP
    ...     result = pipeline.process(frame)
    ...     print(result.needle.visible, result.guidance.warnings)
    """

    def __init__(
        self,
        model: str | os.PathLike[str] | None = None,
        *,
        threads: int = 1,
        engine: str = "auto",
        smoothing: float = 0.5,
        needle: NeedleConfig | None = None,
        guidance: GuidanceConfig | None = None,
        targets: Sequence[tuple[float, float]] = (),
        overlay: bool = True,
    ) -> None:
        from usguide.overlay import OverlayRenderer
        from usguide.segment import Segmenter

        self.segmenter = Segmenter(model, threads=threads, engine=engine, smoothing=smoothing)
        self.needle = NeedleStage(needle)
        self.guidance = Guidance(guidance, tuple(targets))
        self.renderer = OverlayRenderer() if overlay else None
        self.timings = StageTimings()
        self._shape: tuple[int, ...] | None = None
        # The region and spacing frames last arrived with, and the frame size they came with.
        self._calibration: tuple[Region, SpacingMM | None] | None = None
        self._calibration_size: tuple[int, int] | None = None
        self._restarted = False
        self._notes: set[str] = set()

    def reset(self) -> None:
        """Forget the sequence (another source, a seek); user targets stay."""
        self.segmenter.reset()
        self.needle.reset()
        self.guidance.reset()
        self._shape = None
        self._calibration = self._calibration_size = None

    def process(self, frame: Frame) -> FrameResult:
        """Run every stage on one frame. The result's overlay buffer is reused next frame."""
        return self.finish(*self.segment(frame))

    def segment(self, frame: Frame, *, keep_labels: bool = False) -> tuple[FrameResult, bool]:
        """The first half, preprocess and segment: what a pipelined runner does on its own
        thread for the next frame while :meth:`finish` handles this one.

        Returns the result so far and whether the sequence restarted on this frame (the frame
        size changed): :meth:`finish` then restarts the trackers. ``keep_labels`` copies the
        label map, which the segmenter otherwise reuses on its next call.
        """
        result = FrameResult(frame)
        prepared = self._stage(result, "preprocess", self._preprocess, frame)
        if prepared is None:
            return result, False
        restarted = self._restarted
        result.frame = prepared
        labels = self._stage(result, "segment", self.segmenter, prepared)
        result.labels = labels.copy() if keep_labels and labels is not None else labels
        return result, restarted

    def finish(self, result: FrameResult, restarted: bool = False) -> FrameResult:
        """The second half, needle -> guidance -> overlay, in frame order."""
        if "preprocess" in result.errors:
            return result
        if restarted:
            self.needle.reset()
            self.guidance.reset()
        prepared = result.frame
        result.needle = self._stage(result, "needle", self.needle, prepared, result.labels)
        result.guidance = self._stage(
            result, "guidance", self.guidance, prepared, result.labels, result.needle
        )
        if self.renderer is not None:
            result.overlay = self._stage(result, "overlay", self._draw, result)
        return result

    def _stage(self, result: FrameResult, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        start = time.perf_counter()
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - a failing stage must not stop the display
            result.errors[name] = f"{type(e).__name__}: {e}"
            self.timings.failures[name] += 1
            if self.timings.failures[name] == 1:
                logger.warning("stage %s failed on frame %d: %s", name, result.frame.index, e)
            return None
        finally:
            ms = (time.perf_counter() - start) * 1e3
            result.stage_ms[name] = ms
            self.timings.add(name, ms)

    def _preprocess(self, frame: Frame) -> Frame:
        """Check the frame against the sequence: a new size resets the trackers, and a region
        that no longer fits becomes the whole frame, uncalibrated (its spacing was for the
        old layout).

        A region and spacing belong to the frame size they first came with. A source attaches
        its imaging region to every frame (:meth:`FrameSource.make_frame`), so a frame of
        another size arriving with the very same region and spacing carries the old layout's
        calibration: it too is measured over the whole frame, uncalibrated. A frame that comes
        with a region or spacing of its own (an image folder gives each size its own region),
        or with the region the user gave, is believed; one equal to the old, even if rebuilt for
        the new size, is not.
        """
        shape = frame.pixels.shape
        self._restarted = self._shape is not None and shape != self._shape
        if self._restarted:
            self.segmenter.reset()  # the trackers restart in finish(), in frame order
            self._note(f"frame size changed to {shape[1]} x {shape[0]}: tracking restarted")
        self._shape = shape
        size = (frame.rows, frame.columns)
        calibration = (frame.region, frame.spacing_mm)
        if not frame.region.inside(frame.rows, frame.columns):
            self._note(
                f"imaging region {list(frame.region.bbox)} lies outside a "
                f"{frame.columns} x {frame.rows} frame: using the whole frame, uncalibrated"
            )
        else:
            if frame.region.origin == "user":
                return frame  # the user's own region and spacing: theirs to vouch for
            if calibration != self._calibration:  # a new calibration: it is for this size
                self._calibration, self._calibration_size = calibration, size
            if size == self._calibration_size:
                return frame
            assert self._calibration_size is not None
            rows, columns = self._calibration_size
            self._note(
                f"imaging region {list(frame.region.bbox)} and its spacing belong to a "
                f"{columns} x {rows} frame, not {frame.columns} x {frame.rows}: using the "
                "whole frame, uncalibrated"
            )
        whole = Region.whole(frame.rows, frame.columns)
        return replace(frame, region=whole, spacing_mm=None, regions=(whole,))

    def _note(self, text: str) -> None:
        if text not in self._notes:
            self._notes.add(text)
            logger.warning(text)

    def _draw(self, result: FrameResult) -> np.ndarray:
        assert self.renderer is not None
        needle, guidance = result.needle, result.guidance
        shaft = tip = None
        confident = False
        if needle is not None and needle.visible and needle.tip_xy is not None:
            tip = needle.tip_xy
            confident = needle.status == "tracking"
            if needle.entry_xy is not None:
                shaft = (needle.entry_xy, tip)
        targets: list[tuple[float, float]] = []
        active = None
        path = injectate = None
        text = describe(guidance, needle)
        warnings: list[str] = []
        if guidance is not None:
            targets = [t.xy for t in guidance.targets]
            ids = [t.id for t in guidance.targets]
            active = ids.index(guidance.active_target) if guidance.active_target in ids else None
            path = guidance.path
            warnings = [w.message for w in guidance.warnings]
            if guidance.spread is not None and guidance.spread.detected:
                injectate = self.guidance.spread.mask
        return self.renderer.render(
            result.frame.pixels,
            result.labels,
            shaft=shaft,
            tip_xy=tip,
            tip_confident=confident,
            path=path,
            targets=targets,
            active_target=active,
            text=text,
            warnings=warnings,
            injectate=injectate,
        )


def needle_status_line(needle: NeedleState | None) -> str:
    """The overlay's line for a tip not seen: whether the needle's shaft is seen (the tip out of
    plane, or not found on it) or no needle is."""
    if needle is not None and needle.shaft_visible:
        return "needle: shaft seen, tip not visible"
    return "needle: tip not visible"


def describe(guidance: GuidanceResult | None, needle: NeedleState | None) -> list[str]:
    """The overlay's text lines: the needle's state when its tip is not seen, and with guidance
    the distances in the result's units, time on target and spread."""
    if guidance is None:
        # No guidance ran (or it failed): say only what the needle stage saw, if it ran.
        return [needle_status_line(needle)] if needle is not None and not needle.visible else []
    u = guidance.units
    lines = []
    if needle is None or not needle.visible:
        lines.append(needle_status_line(needle))
    if guidance.tip_to_target is not None:
        lines.append(f"tip to target {guidance.tip_to_target:.1f} {u}")
    if guidance.tip_to_nerve is not None:
        lines.append(f"tip to nerve {max(0.0, guidance.tip_to_nerve):.1f} {u}")
    if guidance.time_on_target_s > 0:
        lines.append(f"on target {guidance.time_on_target_s:.1f} s")
    s = guidance.spread
    if s is not None and s.detected:
        area = f"{s.area_mm2:.1f} mm2" if s.area_mm2 is not None else f"{s.area_px} px2"
        around = " around the nerve" if s.surrounds_nerve else ""
        lines.append(f"injectate {area}{around}")
    return lines


@dataclass(slots=True)
class RunSummary:
    """How a run went: frames, drops, errors, timings and why it ended."""

    frames_read: int = 0
    frames_processed: int = 0
    frames_dropped: int = 0
    wall_s: float = 0.0
    ended: str = "end of source"
    source_failed: bool = False  # the source raised an error: the run holds fewer frames
    stage_failures: dict[str, int] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def fps(self) -> float:
        return self.frames_processed / self.wall_s if self.wall_s > 0 else math.nan


_END = object()


def _frames(source: Iterable[Frame], summary: RunSummary) -> Iterator[Frame]:
    """The source's frames; a source that fails mid-stream ends the run with its message."""
    iterator = iter(source)
    while True:
        try:
            frame = next(iterator)
        except StopIteration:
            return
        except UsguideError as e:
            summary.ended = f"source stopped: {e}"
            summary.source_failed = True
            return
        summary.frames_read += 1
        yield frame


def run_playback(
    pipeline: Pipeline,
    source: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    *,
    max_frames: int | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
    pipelined: bool = True,
) -> RunSummary:
    """Process every frame of ``source`` in order and hand each result to every sink.

    Parameters
    ----------
    pipelined : bool
        Read and segment the next frame on a second thread while this one goes through the
        needle, guidance, overlay and the sinks. Every frame is still processed, in order, with
        the same results; on two cores the throughput is higher. False runs everything on the
        calling thread.

    Sinks are closed at the end, also when the run stops on an error.
    """
    _check_max_frames(max_frames)
    pipeline.reset()  # a run is a sequence of its own: nothing carries over from the last one
    summary = RunSummary()
    start = time.perf_counter()
    stop = threading.Event()
    stopped_by: str | None = None  # why the loop ended early, if it did
    items: Iterator[tuple[FrameResult, bool]]
    if pipelined:
        items = _segmented_ahead(pipeline, source, summary, stop)
    else:
        items = (pipeline.segment(frame) for frame in _frames(source, summary))
    try:
        for result, restarted in items:
            _finish_and_sink(pipeline, result, restarted, sinks, summary, on_frame)
            stopped_by = _stop_reason(summary, sinks, max_frames)
            if stopped_by is not None:
                break
    finally:
        stop.set()
        close = getattr(items, "close", None)
        if close is not None:
            close()
        if stopped_by is not None:  # a reader still blocked in the source ends later
            summary.ended = stopped_by
        summary.wall_s = time.perf_counter() - start
        _finish(pipeline, sinks, summary)
    return summary


def _check_max_frames(max_frames: int | None) -> None:
    if max_frames is not None and max_frames < 1:
        raise ValueError(f"max_frames must be 1 or more, got {max_frames}")


def _stop_reason(summary: RunSummary, sinks: Sequence[Sink], max_frames: int | None) -> str | None:
    """Why a run stops before its next frame, or None: it goes on."""
    if max_frames is not None and summary.frames_processed >= max_frames:
        return f"stopped after {max_frames} frames"
    if any(getattr(s, "stopped", False) for s in sinks):
        return "window closed"
    return None


def _segmented_ahead(
    pipeline: Pipeline,
    source: Iterable[Frame],
    summary: RunSummary,
    stop: threading.Event,
    depth: int = 2,
) -> Iterator[tuple[FrameResult, bool]]:
    """Frames read and segmented on a worker thread, up to ``depth`` ahead, in order.

    An exception on the worker is raised here; stopping (``stop`` set, or the generator closed)
    ends the worker without waiting for the source's end.
    """
    handoff: queue.Queue[Any] = queue.Queue(maxsize=depth)

    def put(item: Any) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for frame in _frames(source, summary):
                if not put(pipeline.segment(frame, keep_labels=True)):
                    return
        except BaseException as e:  # noqa: BLE001 - handed to the consuming thread
            put(e)
        finally:
            put(_END)

    thread = threading.Thread(target=work, name="usguide-segment", daemon=True)
    thread.start()
    try:
        while True:
            item = handoff.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join(timeout=10.0)


def _finish_and_sink(
    pipeline: Pipeline,
    result: FrameResult,
    restarted: bool,
    sinks: Sequence[Sink],
    summary: RunSummary,
    on_frame: Callable[[FrameResult], None] | None,
) -> FrameResult:
    result = pipeline.finish(result, restarted)
    start = time.perf_counter()
    for sink in sinks:
        sink.write(result)
    ms = (time.perf_counter() - start) * 1e3
    result.stage_ms["sinks"] = ms
    pipeline.timings.add("sinks", ms)
    summary.frames_processed += 1
    if on_frame is not None:
        on_frame(result)
    return result


def _finish(pipeline: Pipeline, sinks: Sequence[Sink], summary: RunSummary) -> None:
    errors = []
    for sink in sinks:
        try:
            sink.close()
        except Exception as e:  # noqa: BLE001 - close every sink, then report
            errors.append(e)
    summary.stage_failures = dict(pipeline.timings.failures)
    summary.timings = pipeline.timings.summary()
    if errors:
        raise errors[0]


def run_live(
    pipeline: Pipeline,
    source: Iterable[Frame],
    sinks: Sequence[Sink] = (),
    *,
    pace_s: float | None = None,
    max_frames: int | None = None,
    on_frame: Callable[[FrameResult], None] | None = None,
) -> RunSummary:
    """Live mode: a capture thread reads ``source``; the processing loop always takes the
    newest frame, and frames it never got to are counted as dropped.

    Parameters
    ----------
    pace_s : float, optional
        Deliver a recorded source in real time, one frame per ``pace_s`` seconds (its frame
        time), as a scanner would; None reads as fast as the source gives (a live device).

    The ``latency`` timing is from a frame's capture to the end of its sinks.
    """
    _check_max_frames(max_frames)
    pipeline.reset()  # a run is a sequence of its own: nothing carries over from the last one
    summary = RunSummary()
    mailbox: queue.Queue[Any] = queue.Queue(maxsize=1)
    stop = threading.Event()
    lock = threading.Lock()
    dropped = 0
    stopped_by: str | None = None  # why the loop ended early, if it did

    def capture() -> None:
        nonlocal dropped
        next_at = time.perf_counter()
        try:
            for frame in _frames(source, summary):
                if stop.is_set():
                    return
                if pace_s is not None:
                    next_at += pace_s
                    delay = next_at - time.perf_counter()
                    if delay > 0:
                        time.sleep(delay)
                item = (frame, time.perf_counter())
                with lock:  # newest wins: replace what the processing loop has not taken
                    try:
                        mailbox.get_nowait()
                        dropped += 1
                    except queue.Empty:
                        pass
                    mailbox.put_nowait(item)
        except Exception as e:  # noqa: BLE001 - report it and end the run cleanly
            summary.ended = f"source stopped: {type(e).__name__}: {e}"
            summary.source_failed = True
        finally:
            with lock:
                # The loop may take the waiting frame at any moment (it does not lock): take
                # it first, then post the end, with that frame when there was one.
                try:
                    last = mailbox.get_nowait()
                except queue.Empty:
                    last = None
                mailbox.put_nowait(_END if last is None or last is _END else (*last, _END))

    thread = threading.Thread(target=capture, name="usguide-capture", daemon=True)
    start = time.perf_counter()
    thread.start()
    try:
        while True:
            item = mailbox.get()
            if item is _END:
                break
            frame, captured_at = item[0], item[1]
            _finish_and_sink(pipeline, *pipeline.segment(frame), sinks, summary, on_frame)
            pipeline.timings.add("latency", (time.perf_counter() - captured_at) * 1e3)
            if len(item) == 3:  # the last frame carried the end
                break
            stopped_by = _stop_reason(summary, sinks, max_frames)
            if stopped_by is not None:
                break
    finally:
        stop.set()
        thread.join(timeout=5.0)
        if stopped_by is not None:  # a capture still blocked in the source ends later
            summary.ended = stopped_by
        summary.wall_s = time.perf_counter() - start
        summary.frames_dropped = dropped
        _finish(pipeline, sinks, summary)
    return summary
