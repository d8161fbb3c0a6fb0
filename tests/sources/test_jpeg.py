"""usguide.sources.jpeg: libjpeg's damage warnings caught around cv2.imdecode."""

from __future__ import annotations

import os
import select
import signal
import threading
import types

import cv2
import numpy as np
import pytest

from usguide.sources import jpeg
from usguide.sources.jpeg import imdecode_checked


def _jpegs() -> tuple[np.ndarray, np.ndarray]:
    """A whole JPEG and the same one cut short in its scan (libjpeg warns, decodes on)."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (96, 128), dtype=np.uint8), (5, 5), 0)
    whole = cv2.imencode(".jpg", image)[1].tobytes()
    mid = (whole.index(b"\xff\xda") + len(whole)) // 2
    cut = whole[:mid] + jpeg.JPEG_EOI
    return np.frombuffer(whole, np.uint8), np.frombuffer(cut, np.uint8)


def _wait(fd: int) -> None:
    if select.select([fd], [], [], 10.0)[0]:
        os.read(fd, 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_process_decodes_with_its_own_capture(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A process forked after a decode (multiprocessing's workers on Linux) must not share the
    parent's capture file: a child's damage warning was read by the parent, whose whole image
    was called damaged, and the child's damaged image passed."""
    whole, cut = _jpegs()
    assert imdecode_checked(whole, cv2.IMREAD_GRAYSCALE)[1] == ""  # the capture file exists
    to_parent, child_done = os.pipe()
    to_child, parent_done = os.pipe()
    real = cv2.imdecode

    pid = os.fork()
    if pid == 0:  # the child: decode the cut image while the parent is mid-decode
        code = 1
        try:

            def child_decode(buf: np.ndarray, flag: int) -> np.ndarray | None:
                out = real(buf, flag)  # libjpeg prints its warning here
                os.write(child_done, b"x")
                _wait(to_child)
                return out

            jpeg.cv2 = types.SimpleNamespace(imdecode=child_decode)  # type: ignore[assignment]
            code = 0 if imdecode_checked(cut, cv2.IMREAD_GRAYSCALE)[1] else 3
        finally:
            os._exit(code)

    def parent_decode(buf: np.ndarray, flag: int) -> np.ndarray | None:
        out = real(buf, flag)
        _wait(to_parent)  # the child's libjpeg has warned meanwhile
        return out

    monkeypatch.setattr(jpeg, "cv2", types.SimpleNamespace(imdecode=parent_decode))
    try:
        damage = imdecode_checked(whole, cv2.IMREAD_GRAYSCALE)[1]
    finally:
        os.write(parent_done, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (to_parent, child_done, to_child, parent_done):
            os.close(fd)
    assert damage == ""  # the whole image is whole
    assert os.waitstatus_to_exitcode(status) == 0  # the child saw its own damage


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore:.*fork:DeprecationWarning")  # Python 3.12: fork with threads
def test_a_process_forked_during_another_threads_decode_can_decode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A fork while another thread decoded copied the held capture lock into the child, whose
    first decode then waited for ever (and its fd 2 could still point at the capture file)."""
    whole, cut = _jpegs()
    real = cv2.imdecode
    decoding = threading.Event()

    def slow_decode(buf: np.ndarray, flag: int) -> np.ndarray | None:
        decoding.set()
        threading.Event().wait(0.3)
        return real(buf, flag)

    monkeypatch.setattr(jpeg, "cv2", types.SimpleNamespace(imdecode=slow_decode))
    thread = threading.Thread(target=imdecode_checked, args=(whole, cv2.IMREAD_GRAYSCALE))
    thread.start()
    assert decoding.wait(10.0)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.alarm(5)  # a hang ends the child rather than the test run
            jpeg.cv2 = cv2
            code = 0 if imdecode_checked(cut, cv2.IMREAD_GRAYSCALE)[1] else 3
        finally:
            os._exit(code)
    thread.join()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


def test_other_formats_are_decoded_without_the_capture() -> None:
    """Only libjpeg prints damage warnings: a PNG neither waits for another thread's capture
    nor moves fd 2."""
    image = np.arange(48 * 64, dtype=np.uint16).reshape(48, 64).astype(np.uint8)
    png = cv2.imencode(".png", image)[1]
    result: list[tuple[np.ndarray | None, str]] = []
    with jpeg._STDERR_LOCK:  # another thread's JPEG decode under way
        worker = threading.Thread(target=lambda: result.append(imdecode_checked(png, 0)))
        worker.start()
        worker.join(5.0)
        assert not worker.is_alive()
    out, damage = result[0]
    assert out is not None and np.array_equal(out, image) and damage == ""
