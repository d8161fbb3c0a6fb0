"""OpenCV's JPEG decoding with libjpeg's damage warnings caught (libjpeg decodes around damage
and only prints a warning, so a damaged image would pass for a whole one)."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import threading

import cv2
import numpy as np

# libjpeg's warnings that mean the pixels are not all there (jerror.h: HIT_MARKER,
# EXTRANEOUS_DATA, HUFF_BAD_CODE, ARITH_BAD_CODE, MUST_RESYNC, JPEG_EOF); libjpeg decodes on and
# fills the rest in. A bad ICC marker leaves the pixels intact; other warnings (an unknown JFIF
# revision) are harmless and pass on to stderr as before.
_JPEG_DAMAGE = re.compile(rb"Corrupt JPEG data: (?!bad ICC marker)|Premature end of JPEG file")
JPEG_SOI = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
_STDERR_LOCK = threading.Lock()  # fd 2 is the whole process's: one capture at a time
_stderr_sink = -1  # descriptor of the file that takes fd 2's output during a decode


def _after_fork_in_child() -> None:
    """A forked child (multiprocessing's workers on Linux) shares the parent's capture file and
    its offset: it takes its own, or each would read the other's warnings. The lock is held
    across the fork, so fd 2 is never forked while pointing at the capture file."""
    global _stderr_sink
    if _stderr_sink >= 0:
        os.close(_stderr_sink)
        _stderr_sink = -1
    _STDERR_LOCK.release()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(
        before=_STDERR_LOCK.acquire,
        after_in_parent=_STDERR_LOCK.release,
        after_in_child=_after_fork_in_child,
    )


def imdecode_checked(buf: np.ndarray, flag: int) -> tuple[np.ndarray | None, str]:
    """``cv2.imdecode``, and libjpeg's warning that the data is damaged ('' when none; always
    for data that is not a JPEG).

    OpenCV leaves warnings to libjpeg, which prints them with ``fprintf(stderr)``; so file
    descriptor 2 points at a file for the length of the decode: a few system calls, no second
    decode. Anything else written to fd 2 meanwhile (another thread, a harmless libjpeg warning)
    is passed on to the real stderr. libjpeg prints only a decode's first warning, so damage
    after a harmless warning goes unseen; a damaged scan that still decodes cleanly (a flipped
    bit that keeps the Huffman codes valid) cannot be told from a good one by any decoder.
    """
    global _stderr_sink
    if bytes(buf[:2]) != JPEG_SOI:  # PNG, TIFF, BMP ...: no libjpeg, nothing to catch
        return cv2.imdecode(buf, flag), ""
    with _STDERR_LOCK:
        if _stderr_sink < 0:
            # A bare descriptor, kept for the process (a file object would warn at exit).
            with tempfile.TemporaryFile() as f:
                _stderr_sink = os.dup(f.fileno())
        sink = _stderr_sink
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: capture anyway, and close fd 2 again after
            saved = -1
        os.dup2(sink, 2)
        try:
            out = cv2.imdecode(buf, flag)
        finally:
            if saved >= 0:
                os.dup2(saved, 2)
                os.close(saved)
            else:
                os.close(2)
        size = os.lseek(sink, 0, os.SEEK_CUR)
        if not size:
            return out, ""
        os.lseek(sink, 0, os.SEEK_SET)
        lines = os.read(sink, size).splitlines(keepends=True)
        os.lseek(sink, 0, os.SEEK_SET)
        os.ftruncate(sink, 0)
    damage = next((line for line in lines if _JPEG_DAMAGE.match(line)), b"")
    rest = b"".join(line for line in lines if not _JPEG_DAMAGE.match(line))
    if rest and saved >= 0:
        with contextlib.suppress(OSError):  # a closed or full stderr must not fail the decode
            os.write(2, rest)
    return out, damage.decode("ascii", "replace").strip()
