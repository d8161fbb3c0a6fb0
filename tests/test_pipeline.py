"""The pipeline runner: stages, timings, sinks, live mode and bad input."""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest

from usguide.demo import DEMO_SPACING_MM, DemoScan
from usguide.errors import CorruptSourceError, UsguideError
from usguide.frame import Frame, FrameResult, Region
from usguide.pipeline import STAGES, Pipeline, run_live, run_playback
from usguide.sinks import JsonLinesLog, VideoSink


@pytest.fixture(scope="module")
def demo() -> DemoScan:
    return DemoScan()


@pytest.fixture(scope="module")
def pipeline() -> Pipeline:
    return Pipeline()


def frames_of(demo: DemoScan, indices: range) -> list[Frame]:
    return [demo.read(i) for i in indices]


def test_demo_scan_is_calibrated_and_deterministic(demo: DemoScan) -> None:
    a, b = demo.read(80), DemoScan().read(80)
    assert np.array_equal(a.pixels, b.pixels)
    assert a.spacing_mm == (DEMO_SPACING_MM, DEMO_SPACING_MM)
    assert "assumed" in a.region.note
    assert demo.tip_truth(10) is None and demo.tip_truth(80) is not None
    # Prerendered frames are the same frames, and a reader's copy cannot change them.
    kept = DemoScan()
    kept.prerender()
    first = kept.read(80)
    assert np.array_equal(first.pixels, a.pixels)
    first.pixels[:] = 0
    assert np.array_equal(kept.read(80).pixels, a.pixels)


def test_every_stage_runs_and_is_timed(demo: DemoScan, pipeline: Pipeline) -> None:
    pipeline.reset()
    results = [pipeline.process(f) for f in frames_of(demo, range(60, 100))]
    last = results[-1]
    assert last.labels is not None and last.labels.shape == last.frame.pixels.shape[:2]
    assert last.overlay is not None and last.overlay.shape == (*last.frame.pixels.shape[:2], 3)
    assert last.guidance is not None and last.guidance.units == "mm"
    assert last.guidance.targets, "the demo's nerve gets perineural targets"
    assert not last.errors
    assert set(STAGES) <= set(last.stage_ms)
    summary = pipeline.timings.summary()
    assert all(summary[s]["count"] >= 40 for s in STAGES)
    # The tracker finds the rendered needle's tip within 1 mm on most frames.
    errors = [
        math.dist(r.needle.tip_xy, demo.tip_truth(r.frame.index)) * DEMO_SPACING_MM
        for r in results
        if r.needle is not None and r.needle.visible
    ]
    assert len(errors) >= 30
    assert float(np.median(errors)) < 1.0


def test_a_failing_stage_hides_its_output_and_the_run_goes_on(
    demo: DemoScan, pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline.reset()
    calls = {"n": 0}
    real = pipeline.guidance.__class__.__call__

    def flaky(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] % 2:
            raise RuntimeError("boom")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(pipeline.guidance.__class__, "__call__", flaky)
    results = [pipeline.process(f) for f in frames_of(demo, range(60, 66))]
    failed = [r for r in results if "guidance" in r.errors]
    assert len(failed) == 3
    assert all(r.guidance is None and r.overlay is not None for r in failed)
    assert all("RuntimeError: boom" in r.errors["guidance"] for r in failed)
    assert all(r.guidance is not None for r in results if "guidance" not in r.errors)


def test_playback_log_and_video(tmp_path: Path, demo: DemoScan, pipeline: Pipeline) -> None:
    pipeline.reset()
    log, video = tmp_path / "results.jsonl", tmp_path / "overlay.mp4"
    frames = frames_of(demo, range(90, 110))
    summary = run_playback(pipeline, frames, [VideoSink(video, fps=20), JsonLinesLog(log)])
    assert summary.frames_processed == 20 and summary.ended == "end of source"
    lines = log.read_text().splitlines()
    assert len(lines) == 20
    records = [json.loads(line) for line in lines]
    assert [r["frame"] for r in records] == list(range(90, 110))
    for key in ("tip", "targets", "distances", "warnings", "stage_ms", "units", "spread"):
        assert key in records[0]
    assert records[-1]["tip"]["visible"] is True
    assert records[-1]["tip"]["shaft_visible"] is True  # a tip seen is a needle seen
    assert set(STAGES) <= set(records[0]["stage_ms"])
    capture = cv2.VideoCapture(str(video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 20
    ok, picture = capture.read()
    capture.release()
    assert ok and picture.shape[:2] == frames[0].pixels.shape[:2]
    assert not (tmp_path / "overlay.partial.mp4").exists()


def test_log_is_valid_json_lines_after_every_frame(tmp_path: Path, pipeline: Pipeline) -> None:
    """Flushed per frame: reading it mid-run gives whole lines only."""
    log = JsonLinesLog(tmp_path / "log.jsonl")
    seen = []

    def check(_: object) -> None:
        text = (tmp_path / "log.jsonl").read_text()
        assert text.endswith("\n")
        seen.append(len([json.loads(line) for line in text.splitlines()]))

    frames = frames_of(DemoScan(), range(3))
    pipeline.reset()
    run_playback(pipeline, frames, [log], on_frame=check)
    assert seen == [1, 2, 3]


def _ends_midstream(frames: list[Frame]) -> Iterator[Frame]:
    yield from frames
    raise CorruptSourceError("scan.dcm", "frame 3 is truncated")


def test_source_ending_mid_stream_ends_cleanly(tmp_path: Path, pipeline: Pipeline) -> None:
    pipeline.reset()
    log = tmp_path / "log.jsonl"
    frames = frames_of(DemoScan(), range(3))
    summary = run_playback(pipeline, _ends_midstream(frames), [JsonLinesLog(log)])
    assert summary.frames_processed == 3
    assert "frame 3 is truncated" in summary.ended
    assert len(log.read_text().splitlines()) == 3


def test_size_changes_and_blank_frames_keep_the_run_going(pipeline: Pipeline) -> None:
    pipeline.reset()
    big = DemoScan().read(80)
    small_pixels = cv2.resize(big.pixels, (320, 256))
    small = Frame(small_pixels, 81, 4.05, big.spacing_mm, big.region, "test")  # stale region
    blank = Frame(np.zeros((480, 640), np.uint8), 82, 4.1, None, Region.whole(480, 640), "test")
    rgb = Frame(np.zeros((480, 640, 3), np.uint8), 83, 4.15, None, Region.whole(480, 640), "t")
    results = [pipeline.process(f) for f in (big, small, blank, rgb)]
    assert all(not r.errors for r in results)
    assert results[1].frame.region.bbox == (0, 0, 319, 255)
    assert results[1].frame.spacing_mm is None  # the old calibration no longer applies
    assert results[1].guidance is not None and results[1].guidance.units == "px"
    for r in results[2:]:
        assert r.labels is not None and not r.labels.any()
        assert r.needle is not None and not r.needle.visible
        assert r.overlay is not None


def test_calibration_belongs_to_the_frame_size_it_came_with() -> None:
    """A source attaches its region to every frame: a frame of another size carrying the same
    region and spacing is not measured in mm, even where the old region still fits."""
    pipeline = Pipeline(overlay=False)
    demo = DemoScan().read(80)
    header = replace(demo.region, origin="dicom")  # as a DICOM cine's region comes
    small = replace(demo, region=header, regions=(header,))
    h, w = small.pixels.shape[:2]
    big_pixels = cv2.resize(small.pixels, (2 * w, 2 * h))  # the same scan at twice the size
    stale = Frame(big_pixels, 81, 4.05, small.spacing_mm, small.region, "test")
    own = Region.whole(2 * h, 2 * w, (small.spacing_mm[0] / 2, small.spacing_mm[1] / 2))
    fresh = Frame(big_pixels, 82, 4.1, own.spacing_mm, own, "test")
    back = replace(small, index=83)
    results = [pipeline.process(f) for f in (small, stale, fresh, back)]
    assert all(not r.errors for r in results)
    units = [r.guidance.units for r in results if r.guidance is not None]
    assert units == ["mm", "px", "mm", "mm"]
    assert results[1].frame.spacing_mm is None and results[1].frame.region_spacing_mm is None
    assert results[1].frame.region.bbox == (0, 0, 2 * w - 1, 2 * h - 1)
    assert results[2].frame.region == own  # the frame's own calibration for its size is kept
    assert results[3].frame.region == small.region
    # A region the user gave is theirs to vouch for, at any size it fits.
    user = replace(demo.region, origin="user")
    given = Frame(big_pixels, 84, 4.2, small.spacing_mm, user, "test")
    result = pipeline.process(given)
    assert result.frame.region == user and result.frame.spacing_mm == small.spacing_mm


def test_live_mode_takes_the_newest_frame_and_counts_drops(pipeline: Pipeline) -> None:
    pipeline.reset()
    frames = frames_of(DemoScan(), range(40))
    # Delivered every 2 ms: faster than the pipeline, so frames must be dropped.
    summary = run_live(pipeline, frames, [], pace_s=0.002)
    assert summary.frames_read == 40
    assert summary.frames_dropped > 0
    assert summary.frames_processed + summary.frames_dropped == 40
    assert summary.timings["latency"]["count"] == summary.frames_processed
    processed_in_order = []
    run_live(pipeline, frames[:5], [], pace_s=0.2, on_frame=lambda r: processed_in_order.append(r))
    assert [r.frame.index for r in processed_in_order] == [0, 1, 2, 3, 4]


def test_live_mode_keeps_the_last_frame_when_the_source_ends_first(pipeline: Pipeline) -> None:
    """The source ends while its last frame still waits for the processing loop: that frame
    is processed, never replaced by the end of the run (a recording's last frame was lost)."""
    frames = frames_of(DemoScan(), range(4))
    first_taken, source_done = threading.Event(), threading.Event()

    def source() -> Iterator[Frame]:
        yield frames[0]
        assert first_taken.wait(5.0)  # the rest only once the loop holds the first
        yield from frames[1:]
        source_done.set()

    def capture_ended() -> bool:
        return not any(t.name == "usguide-capture" for t in threading.enumerate())

    def wait_for_the_end(r: FrameResult) -> None:
        # Hold the loop on its first frame until the capture thread has posted the end: the
        # frames after it pile up in the mailbox, the newest one with the end.
        if r.frame.index == 0:
            first_taken.set()
            assert source_done.wait(5.0)
            for _ in range(500):
                if capture_ended():
                    break
                time.sleep(0.01)
            assert capture_ended()

    seen: list[int] = []
    summary = run_live(
        pipeline,
        source(),
        [],
        on_frame=lambda r: (wait_for_the_end(r), seen.append(r.frame.index)),
    )
    assert seen == [0, 3]  # the first and the newest; 1 and 2 were replaced while waiting
    assert summary.frames_read == 4 and summary.frames_dropped == 2
    assert summary.ended == "end of source"


def _record(result_log: list[tuple[object, ...]]) -> Callable[[FrameResult], None]:
    def keep(r: FrameResult) -> None:
        needle = r.needle.tip_xy if r.needle is not None else None
        targets = [t.xy for t in r.guidance.targets] if r.guidance is not None else None
        assert r.labels is not None and r.overlay is not None
        result_log.append((r.frame.index, r.labels.copy(), needle, targets, r.overlay.sum()))

    return keep


def test_pipelined_playback_gives_the_serial_results() -> None:
    """Segmenting ahead on a second thread changes neither the results nor their order, also
    across a change of frame size (the trackers restart on the right frame)."""
    demo = DemoScan()
    frames = frames_of(demo, range(70, 100))
    small = Frame(
        cv2.resize(frames[10].pixels, (320, 256)), 80, 4.0, None, Region.whole(256, 320), "t"
    )
    frames[10:11] = [small]
    runs = []
    for pipelined in (False, True):
        seen: list[tuple[object, ...]] = []
        summary = run_playback(Pipeline(), frames, [], on_frame=_record(seen), pipelined=pipelined)
        assert summary.frames_processed == len(frames) and summary.ended == "end of source"
        runs.append(seen)
    serial, ahead = runs
    assert [s[0] for s in ahead] == [f.index for f in frames]
    for a, b in zip(serial, ahead, strict=True):
        assert np.array_equal(a[1], b[1])
        assert a[2:] == b[2:]


def test_pipelined_playback_stops_early_and_reports_worker_errors() -> None:
    frames = frames_of(DemoScan(), range(20))
    pipeline = Pipeline()
    summary = run_playback(pipeline, frames, [], max_frames=5)
    assert summary.frames_processed == 5 and summary.ended == "stopped after 5 frames"
    for run in (run_playback, run_live):  # 0 had still processed a frame
        with pytest.raises(ValueError, match="max_frames must be 1 or more"):
            run(pipeline, frames, [], max_frames=0)

    def stalls() -> Iterator[Frame]:
        yield from frames[:5]
        raise CorruptSourceError("device:0", "no frame from the device for 1 s")

    # The limit reached, the reader's error on the next frame is not why the run ended.
    assert run_playback(pipeline, stalls(), [], max_frames=5).ended == "stopped after 5 frames"

    def broken() -> Iterator[Frame]:
        yield from frames[:2]
        raise RuntimeError("grabber unplugged")

    with pytest.raises(RuntimeError, match="grabber unplugged"):
        run_playback(pipeline, broken(), [])


def test_a_video_writer_that_cannot_open_reports_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OpenCV without an mp4 encoder: the error says so, not that NAME.partial.mp4 is missing."""

    class NoEncoder:
        def __init__(self, *args: object) -> None:
            pass

        def isOpened(self) -> bool:
            return False

        def release(self) -> None:
            pass

    monkeypatch.setattr("usguide.sinks.video.cv2.VideoWriter", NoEncoder)
    frames = [
        Frame(np.zeros((64, 64), np.uint8), i, None, None, Region.whole(64, 64), "x")
        for i in range(2)
    ]
    video = tmp_path / "o.mp4"
    with pytest.raises(UsguideError, match="cannot open an mp4 writer"):
        run_playback(Pipeline(overlay=False), frames, [VideoSink(video)], pipelined=False)
    assert not video.exists()
