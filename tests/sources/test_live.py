"""Live capture: newest-frame delivery, counted drops, failing devices, clean shutdown."""

from __future__ import annotations

import logging
import sys
import threading
import time
import types
from pathlib import Path

import cv2
import numpy as np
import pytest

from usguide.errors import DeviceError
from usguide.sources import open_source
from usguide.sources.live import CaptureStats, LiveSource

H, W = 48, 64


def encode(seq: int) -> np.ndarray:
    """A BGR frame carrying ``seq`` in its pixel values (B low byte, G, R high byte)."""
    image = np.empty((H, W, 3), np.uint8)
    image[..., 0] = seq & 0xFF
    image[..., 1] = (seq >> 8) & 0xFF
    image[..., 2] = (seq >> 16) & 0xFF
    return image


def decode(rgb: np.ndarray) -> int:
    """The sequence number of :func:`encode`, read back from RGB pixels."""
    r, g, b = (int(v) for v in rgb[H // 2, W // 2])
    assert np.all(rgb == rgb[H // 2, W // 2])  # every pixel agrees: not a torn frame
    return (r << 16) | (g << 8) | b


class FakeDevice:
    """The cv2.VideoCapture duck type: a device that produces numbered frames.

    Parameters
    ----------
    delay_s : float
        Time each read takes (the device's frame interval).
    frames : int, optional
        Frames it delivers before every read fails (unplugged).
    opened : bool
        What isOpened() says.
    report_size : bool
        Whether get() reports the frame size (some devices say 0).
    gate : threading.Event, optional
        When given, every read blocks until it is set (a hung device).
    """

    def __init__(
        self,
        delay_s: float = 0.001,
        frames: int | None = None,
        opened: bool = True,
        report_size: bool = True,
        gate: threading.Event | None = None,
    ) -> None:
        self.gate = gate
        self.delay_s = delay_s
        self.frames = frames
        self.opened = opened
        self.report_size = report_size
        self.seq = 0
        self.releases = 0
        self.reads_after_release = 0

    def isOpened(self) -> bool:  # the cv2.VideoCapture name
        return self.opened

    def read(self) -> tuple[bool, np.ndarray | None]:
        if self.releases:
            self.reads_after_release += 1
            return False, None
        if self.gate is not None:
            self.gate.wait(timeout=5.0)
        time.sleep(self.delay_s)
        if self.frames is not None and self.seq >= self.frames:
            return False, None
        image = encode(self.seq)
        self.seq += 1
        return True, image

    def get(self, prop: int) -> float:
        if prop == cv2.CAP_PROP_FPS:
            return 1000.0
        if prop == cv2.CAP_PROP_FRAME_WIDTH:
            return float(W) if self.report_size else 0.0
        if prop == cv2.CAP_PROP_FRAME_HEIGHT:
            return float(H) if self.report_size else 0.0
        if prop == cv2.CAP_PROP_FOURCC:
            return float(cv2.VideoWriter_fourcc(*"YUYV"))
        return 0.0

    def release(self) -> None:
        self.releases += 1


def live(device: FakeDevice, **kwargs) -> LiveSource:
    kwargs.setdefault("detect_region", False)
    return LiveSource(0, capture_factory=lambda _: device, **kwargs)


def test_slow_consumer_gets_recent_frames_and_drops_are_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    device = FakeDevice(delay_s=0.001)
    src = live(device, buffer_size=2)
    assert src.frame_count is None
    assert src.shape == (H, W)
    assert src.frame_time_s == pytest.approx(0.001)
    assert src.encoding == "YUYV"
    assert src.captured_frames == 0  # capture starts with the first frame asked for
    delivered: list[int] = []
    before: list[int] = []
    it = iter(src)
    for _ in range(10):
        before.append(src.captured_frames)
        frame = next(it)
        delivered.append(frame.index)
        assert decode(frame.pixels) == frame.index
        assert frame.source == "device:0"
        assert frame.pixels.shape == (H, W, 3)
        stats = src.stats()
        assert stats.captured == stats.delivered + stats.dropped + stats.buffered
        time.sleep(0.02)
    assert np.all(np.diff(delivered) > 0)
    assert np.any(np.diff(delivered) > 1)
    # Newest-frame semantics: after a wait, the frame handed over is one of the last
    # buffer_size captured by the time it was asked for.
    for index, captured_before in zip(delivered[1:], before[1:], strict=True):
        assert index >= captured_before - 2
    with caplog.at_level(logging.INFO, logger="usguide"):
        src.close()
    assert not src.capturing
    assert src._thread is not None and not src._thread.is_alive()
    assert device.releases == 1
    stats = src.stats()
    assert isinstance(stats, CaptureStats)
    assert stats.delivered == 10
    assert stats.dropped == src.dropped_frames > 0
    assert stats.captured == src.captured_frames == device.seq
    # Every capture is accounted for exactly once: delivered, dropped, or still in the buffer.
    buffered = [index for index, _, _ in src._buffer]
    assert len(buffered) == stats.buffered <= 2
    dropped = set(range(stats.captured)) - set(delivered) - set(buffered)
    assert len(dropped) == stats.dropped
    assert f"device:0: dropped {stats.dropped} of {stats.captured} frames" in caplog.text
    # Frozen after close: the thread is gone, nothing is read any more.
    time.sleep(0.01)
    assert src.captured_frames == stats.captured
    assert device.reads_after_release == 0


def test_buffer_of_one_gives_the_newest_frame() -> None:
    device = FakeDevice(delay_s=0.001)
    with live(device, buffer_size=1) as src:
        it = iter(src)
        next(it)
        for _ in range(5):
            time.sleep(0.02)
            captured_before = src.captured_frames
            frame = next(it)
            assert frame.index >= captured_before - 1
            assert decode(frame.pixels) == frame.index


def test_fast_consumer_gets_every_frame_once_with_timestamps() -> None:
    device = FakeDevice(delay_s=0.005, frames=30)
    with live(device, buffer_size=30, timeout_s=0.5) as src:  # room for all: nothing dropped
        frames = []
        with pytest.raises(DeviceError, match="device:0: the device stopped delivering"):
            for frame in src:
                frames.append(frame)
    assert [f.index for f in frames] == list(range(30))
    assert [decode(f.pixels) for f in frames] == list(range(30))
    stamps = [f.timestamp_s for f in frames]
    assert stamps[0] == 0.0
    assert np.all(np.diff(stamps) > 0)
    assert stamps[-1] == pytest.approx(29 * 0.005, rel=0.5, abs=0.05)
    assert src.dropped_frames == 0


def test_device_that_stops_delivering_raises_promptly() -> None:
    device = FakeDevice(delay_s=0.0, frames=3)
    with live(device, buffer_size=8) as src:
        start = time.monotonic()
        with pytest.raises(DeviceError, match="device:0") as excinfo:
            list(src)
        assert time.monotonic() - start < 2.0
        assert "stopped delivering" in str(excinfo.value)
    assert not src.capturing
    assert device.releases == 1


def test_device_that_hangs_times_out() -> None:
    gate = threading.Event()
    device = FakeDevice(gate=gate)  # every read blocks until the gate opens
    src = live(device, timeout_s=0.1)
    start = time.monotonic()
    with pytest.raises(DeviceError, match=r"device:0: no frame from the device for 0\.1 s"):
        next(iter(src))
    assert 0.09 < time.monotonic() - start < 1.0
    assert src.capturing  # still inside the blocked read
    gate.set()
    src.close()  # waits for the read in progress, then the thread ends
    assert not src.capturing
    assert device.releases == 1


def test_device_that_cannot_open() -> None:
    device = FakeDevice(opened=False)
    with pytest.raises(DeviceError, match="device:3: cannot open capture device"):
        LiveSource(3, capture_factory=lambda _: device)
    assert device.releases == 1


def test_device_whose_driver_raises() -> None:
    def broken(_: object) -> FakeDevice:
        raise RuntimeError("driver missing")

    with pytest.raises(DeviceError, match=r"device:0: cannot open capture device \(driver missing"):
        LiveSource(0, capture_factory=broken)


@pytest.mark.parametrize("spec", [99, "/dev/video_nonexistent"])
def test_real_device_that_cannot_open(spec: int | str) -> None:
    name = f"device:{spec}" if isinstance(spec, int) else spec
    with pytest.raises(DeviceError, match=f"{name}: cannot open capture device"):
        LiveSource(spec)
    with pytest.raises(DeviceError, match=name):
        open_source(spec)


def test_close_before_capture_and_twice() -> None:
    device = FakeDevice()
    src = live(device)
    src.close()
    src.close()
    assert device.releases == 1
    assert src._thread is None
    assert list(src) == []  # nothing is captured after close


def test_close_while_iterating_ends_cleanly() -> None:
    device = FakeDevice(delay_s=0.002)
    src = live(device)
    got = []

    def consume() -> None:
        got.extend(f.index for f in src)

    consumer = threading.Thread(target=consume)
    consumer.start()
    time.sleep(0.05)
    src.close()
    consumer.join(timeout=2)
    assert not consumer.is_alive()  # the blocked iteration woke up and ended
    assert got
    assert not src.capturing


def test_shape_and_region_from_the_first_frame(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[int] = []

    def find_imaging_region(pixels: np.ndarray) -> tuple[int, int, int, int]:
        seen.append(decode(pixels))
        return (4, 2, 59, 45)

    stub = types.ModuleType("usguide.imaging_region")
    stub.find_imaging_region = find_imaging_region  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "usguide.imaging_region", stub)
    device = FakeDevice(delay_s=0.002, report_size=False)
    with LiveSource(0, capture_factory=lambda _: device, spacing_mm=0.2) as src:
        assert src.shape == (H, W)  # the device does not say; the first frame does
        frame = next(iter(src))
    assert seen == [0]  # detected on the first captured frame
    assert frame.region.origin == "detected"
    assert frame.region.bbox == (4, 2, 59, 45)
    assert frame.spacing_mm == (0.2, 0.2)


def test_user_region_and_options() -> None:
    with live(FakeDevice(), region=(0, 0, 31, 23), spacing_mm=(0.1, 0.2)) as src:
        frame = next(iter(src))
        assert src.info().details["buffer_size"] == 2
    assert frame.region.origin == "user"
    assert frame.spacing_mm == (0.1, 0.2)
    with pytest.raises(ValueError, match="buffer_size"):
        live(FakeDevice(), buffer_size=0)
    with pytest.raises(ValueError, match="timeout_s"):
        live(FakeDevice(), timeout_s=0)


def write_video(path: Path, n: int) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (W * 4, H * 4))
    assert writer.isOpened()
    for i in range(n):
        writer.write(np.full((H * 4, W * 4, 3), 4 * i, np.uint8))
    writer.release()
    return path


def test_video_file_as_device(tmp_path: Path) -> None:
    path = write_video(tmp_path / "clip.avi", n=60)
    with LiveSource(str(path), buffer_size=2, detect_region=False) as src:
        assert src.source == str(path)
        assert src.shape == (H * 4, W * 4)
        assert src.frame_time_s == pytest.approx(0.04)
        assert src.encoding == "MJPG"
        frames = []
        for frame in src:  # ends at the end of the file, without an error
            frames.append(frame)
            time.sleep(0.01)
        stats = src.stats()
    assert stats.captured == 60
    assert stats.buffered == 0
    assert stats.delivered == len(frames)
    assert stats.dropped == 60 - len(frames) > 0
    indices = [f.index for f in frames]
    assert np.all(np.diff(indices) > 0)
    assert indices[-1] == 59  # the newest frame is never the one dropped
    for f in frames:  # the pixels are the frame the index names (grey level 4 x index)
        assert abs(int(f.pixels[H, W, 0]) - 4 * f.index) <= 3
