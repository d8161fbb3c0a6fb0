"""The guidance widget's engine: a recorded scan, the pipeline, and the newest result.

No Qt and no napari here. :class:`GuidanceEngine` runs the pipeline on a scan in this process;
:class:`GuidanceProcess` runs a :class:`GuidanceEngine` in a child process and offers the same
calls. The widget uses the child process: the pipeline's Python then never competes with
napari's drawing for one interpreter lock, which on two cores is the difference between about
26 and 30-plus frames shown per second (``benchmarks/napari_display.py``).

The widget runs ``play`` in a napari ``thread_worker`` and reads ``newest`` on the GUI thread.
Everything the GUI reads is a copy (the pipeline reuses its overlay buffer for the next frame),
so the two threads never share a buffer that is being written.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import secrets
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Listener
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from usguide.guidance import GuidanceResult
    from usguide.needle import NeedleState
    from usguide.pipeline import Pipeline
    from usguide.sources.base import SeekableSource

DEMO = "demo"  # the source spec that opens usguide.demo.DemoScan
MODES = ("perineural", "mesotherapy", "manual")


class PipelineProcessError(ChildProcessError):
    """The pipeline's child process ended, failed to start, or the scan is closed.

    Not a RuntimeError on purpose: superqt's generator worker takes any RuntimeError for its own
    deletion and ends without a signal, which left the widget "playing" forever.
    """


@dataclass(slots=True)
class Published:
    """One processed frame, owned by whoever reads it (copies of the pipeline's buffers).

    Attributes
    ----------
    seq : int
        Increases by one for every frame the engine processes; gaps in what the GUI shows are
        frames it skipped.
    index : int
        The frame's index in the source.
    pixels : ndarray
        ``(H, W)`` or ``(H, W, 3)`` uint8, the frame.
    overlay : ndarray or None
        ``(H, W, 3)`` uint8 RGB, the pipeline's blended overlay.
    labels : ndarray or None
        ``(H, W)`` uint8 class indices.
    needle, guidance
        The stages' results (immutable), or None where a stage failed.
    stage_ms : dict of str to float
    errors : dict of str to str
    read_at : float
        ``time.perf_counter()`` when the frame's reading began: latency is measured from here.
        The clock is the system's monotonic clock, the same in a child process.
    done_at : float
        When the pipeline finished with it.
    """

    seq: int
    index: int
    pixels: np.ndarray
    overlay: np.ndarray | None
    labels: np.ndarray | None
    needle: NeedleState | None
    guidance: GuidanceResult | None
    stage_ms: dict[str, float] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    read_at: float = 0.0
    done_at: float = 0.0

    @property
    def lines(self) -> list[str]:
        """Distances and state as text (the overlay's lines)."""
        from usguide.pipeline import describe

        return describe(self.guidance, self.needle)

    @property
    def warnings(self) -> list[str]:
        if self.guidance is None:
            return []
        return [w.message for w in self.guidance.warnings]


def open_scan(spec: str | os.PathLike[str]) -> SeekableSource:
    """The demo scan for ``"demo"`` (or an empty spec), else a recorded file or image folder."""
    from usguide.sources import is_device, open_source
    from usguide.sources.base import SeekableSource

    text = str(spec).strip()
    if text in ("", DEMO):
        from usguide.demo import DemoScan

        return DemoScan()
    if is_device(text):
        raise ValueError(f"{text}: live devices are not played in napari yet (use usguide run)")
    source = open_source(text)
    if not isinstance(source, SeekableSource):  # pragma: no cover - every file source seeks
        source.close()
        raise ValueError(f"{text}: not a recorded scan")
    return source


@dataclass(frozen=True, slots=True)
class ScanInfo:
    """What the parent needs to know of the scan a child process plays."""

    frame_count: int
    frame_time_s: float | None
    spacing_mm: tuple[float, float] | None
    shape: tuple[int, int]


class _Playback:
    """What both engines share: the scan's facts, frame bookkeeping, the newest result,
    stepping and playing.

    A subclass provides :meth:`process`, which calls :meth:`_published`.
    """

    def __init__(self, info: ScanInfo) -> None:
        self.info = info
        self.next_index = 0
        self.source_skipped = 0  # frames real-time playback left out to keep time
        self.process_ms: collections.deque[float] = collections.deque(maxlen=60)  # stages, ms
        self._newest: Published | None = None
        self._newest_lock = threading.Lock()

    def process(self, index: int) -> Published:  # pragma: no cover - abstract
        raise NotImplementedError

    def _published(self, published: Published) -> Published:
        self.next_index = published.index + 1
        # The stages' own time: the wall time from read_at also holds the read-ahead's wait.
        self.process_ms.append(sum(published.stage_ms.values()))
        with self._newest_lock:
            self._newest = published
        return published

    @property
    def frame_count(self) -> int:
        return self.info.frame_count

    @property
    def frame_time_s(self) -> float | None:
        return self.info.frame_time_s

    @property
    def spacing_mm(self) -> tuple[float, float] | None:
        return self.info.spacing_mm

    @property
    def shape(self) -> tuple[int, int]:
        """``(rows, columns)`` of the scan's frames."""
        return self.info.shape

    @property
    def at_end(self) -> bool:
        return self.next_index >= self.frame_count

    def newest(self) -> Published | None:
        """The most recent result; the GUI shows this one and counts the ones it never saw."""
        with self._newest_lock:
            return self._newest

    def step(self) -> Published | None:
        """Process the next frame; None at the end of the scan."""
        if self.at_end:
            return None
        return self.process(self.next_index)

    def play(
        self, *, realtime: bool = True, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[Published]:
        """Process frames from :attr:`next_index` on, yielding each result, until the end.

        Parameters
        ----------
        realtime : bool
            Keep the scan's own time: wait for a frame's time, and leave out frames the
            pipeline is too slow for (counted in :attr:`source_skipped`). False processes every
            frame as fast as the pipeline goes.
        should_stop : callable
            Polled between frames and while waiting.
        """
        frame_time = self.frame_time_s or 0.05
        start, first = time.perf_counter(), self.next_index
        index = first
        while index < self.frame_count and not should_stop():
            if realtime:
                due = first + int((time.perf_counter() - start) / frame_time)
                if due > index:
                    self.source_skipped += min(due, self.frame_count) - index
                    index = due
                    if index >= self.frame_count:
                        self.next_index = self.frame_count
                        break
            published = self.process(index)
            index += 1
            if realtime:
                wake = start + (index - first) * frame_time
                while not should_stop() and (delay := wake - time.perf_counter()) > 0:
                    time.sleep(min(delay, 0.01))
            yield published


class GuidanceEngine(_Playback):
    """A recorded scan and the pipeline that runs on it, frame by frame.

    Parameters
    ----------
    source : SeekableSource
        The scan; the engine closes it in :meth:`close`.
    pipeline : Pipeline
    segment_ahead : bool
        Segment the next frame on the reader thread while this one finishes (needs a machine
        with cores to spare).
    """

    def __init__(
        self, source: SeekableSource, pipeline: Pipeline, *, segment_ahead: bool = False
    ) -> None:
        super().__init__(
            ScanInfo(source.frame_count, source.frame_time_s, source.spacing_mm, source.shape)
        )
        self.source = source
        self.pipeline = pipeline
        # Held while a frame is processed and while targets are edited: the GUI edits targets
        # only when paused, so it waits at most one frame's processing.
        self.lock = threading.RLock()
        self._seq = 0
        # One frame read (and segmented, see _split) ahead on its own thread: decoding, or
        # rendering the demo, overlaps the pipeline. Never two at once: direct work waits for
        # the pending one.
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="usguide-read")
        self._pending: tuple[int, Future[tuple[float, Any]]] | None = None
        # segment_ahead: segment the next frame on the reader thread (Pipeline.segment) while
        # this one finishes (Pipeline.finish). Off by default: on 2 cores, with napari drawing
        # in software on the GUI thread, it measured no faster (within noise of reading ahead
        # alone), and it holds one more frame in flight.
        self._split = segment_ahead
        self._closed = False

    @property
    def closed(self) -> bool:
        """True once closed (as :attr:`GuidanceProcess.closed`: the widget drives either)."""
        return self._closed

    @classmethod
    def open(
        cls,
        spec: str | os.PathLike[str],
        *,
        model: str | os.PathLike[str] | None = None,
        mode: str = "perineural",
        threads: int | None = None,
    ) -> GuidanceEngine:
        """Open a scan (``"demo"`` for the demo scan) and build the pipeline for it.

        ``threads`` are the inference threads (None: the pipeline's default); the GUI and the
        canvas need CPU too, so fewer can mean faster playback on a small machine."""
        from usguide.demo import DemoScan
        from usguide.guidance import GuidanceConfig
        from usguide.pipeline import Pipeline

        source = open_scan(spec)
        try:
            # No frame time (image folders, most DICOMs): the config's default. Read from an
            # instance: on a slots dataclass the class attribute is a member descriptor.
            frame_time = source.frame_time_s or GuidanceConfig().frame_time_s
            config = GuidanceConfig(mode=mode, frame_time_s=frame_time)  # type: ignore[arg-type]
            options = {} if threads is None else {"threads": threads}
            pipeline = Pipeline(model or None, guidance=config, **options)
            if isinstance(source, DemoScan):
                # Its frames are rendered, not decoded: render them all now, so that playing
                # leaves the CPU to the pipeline and the canvas.
                source.prerender()
        except BaseException:
            source.close()
            raise
        return cls(source, pipeline)

    # -- what it plays -------------------------------------------------------------------------
    def read_pixels(self, index: int) -> np.ndarray:
        """Frame ``index``'s pixels, without processing it."""
        return self.source.read(index).pixels

    # -- frames --------------------------------------------------------------------------------
    def _first_half(self, index: int) -> tuple[float, Any]:
        """Read frame ``index`` and, with ``segment_ahead``, segment it too: the part that can
        run ahead, in frame order."""
        read_at = time.perf_counter()
        frame = self.source.read(index)
        if self._split:
            return read_at, self.pipeline.segment(frame, keep_labels=True)
        return read_at, frame

    def _discard_pending(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending[1].cancel()
            # Let work in progress finish before anything else reads or segments; an unwanted
            # frame's error is of no use.
            with contextlib.suppress(Exception):
                pending[1].result()

    def _take(self, index: int) -> tuple[float, Any]:
        """The first half of frame ``index`` (prefetched when it was the one expected), and the
        next frame's first half started on the reader thread."""
        pending = self._pending
        if pending is not None and pending[0] == index:
            self._pending = None
            first = pending[1].result()
        else:
            self._discard_pending()
            first = self._first_half(index)
        if index + 1 < self.frame_count:
            self._pending = (index + 1, self._reader.submit(self._first_half, index + 1))
        return first

    def process(self, index: int) -> Published:
        """Read frame ``index``, run the pipeline on it and publish the result."""
        read_at, first = self._take(index)
        with self.lock:
            split = self._split
            result = self.pipeline.finish(*first) if split else self.pipeline.process(first)
            overlay = None if result.overlay is None else result.overlay.copy()
            labels = None if result.labels is None else result.labels.copy()
            self._seq += 1
            published = Published(
                seq=self._seq,
                index=index,
                pixels=result.frame.pixels,
                overlay=overlay,
                labels=labels,
                needle=result.needle,
                guidance=result.guidance,
                stage_ms=dict(result.stage_ms),
                errors=dict(result.errors),
                read_at=read_at,
                done_at=time.perf_counter(),
            )
            return self._published(published)

    def seek(self, index: int) -> Published:
        """Jump to frame ``index``: the trackers restart (user targets stay) and it is processed."""
        index = min(max(0, index), self.frame_count - 1)
        self._discard_pending()  # its segmentation belongs to the old sequence
        with self.lock:
            self.pipeline.reset()
        return self.process(index)

    # -- targets (frame pixels, x y) -----------------------------------------------------------
    def add_target(self, xy: tuple[float, float]) -> int:
        with self.lock:
            return self.pipeline.guidance.add_target(xy)

    def move_target(self, target_id: int, xy: tuple[float, float]) -> int:
        """Move a target; one the pipeline has dropped meanwhile is added again (new id)."""
        with self.lock:
            try:
                self.pipeline.guidance.move_target(target_id, xy)
            except KeyError:
                return self.pipeline.guidance.add_target(xy)
            return target_id

    def delete_target(self, target_id: int) -> None:
        with self.lock, contextlib.suppress(KeyError):  # already gone (re-planned away)
            self.pipeline.guidance.delete_target(target_id)

    def targets(self) -> tuple[Any, ...]:
        with self.lock:
            return self.pipeline.guidance.targets

    def restart(self) -> None:
        """Back to the first frame with fresh trackers (user targets stay)."""
        self._discard_pending()
        with self.lock:
            self.pipeline.reset()
            self.next_index = 0

    def close(self) -> None:
        self._closed = True
        self._discard_pending()
        self._reader.shutdown(wait=True)
        self.source.close()


# The calls a GuidanceProcess forwards to its child's GuidanceEngine.
_REMOTE_CALLS = frozenset(
    {"process", "seek", "restart", "read_pixels"}
    | {"add_target", "move_target", "delete_target", "targets"}
)


def _portable(error: BaseException) -> BaseException:
    """The error itself when it survives pickling, else a PipelineProcessError that names it."""
    import pickle

    try:
        pickle.loads(pickle.dumps(error))
    except Exception:  # noqa: BLE001 - any error may fail to pickle, in any way
        return PipelineProcessError(f"{type(error).__name__}: {error}")
    return error


def _serve(conn: Any, spec: str, model: str | None, mode: str, threads: int | None) -> None:
    """The child process: open the scan and the pipeline, then answer calls until told to close
    or until the parent is gone."""
    try:
        engine = GuidanceEngine.open(spec, model=model, mode=mode, threads=threads)
    except Exception as error:  # noqa: BLE001 - every error goes to the parent, which raises it
        conn.send(("error", _portable(error)))
        conn.close()
        return
    try:
        conn.send(("ok", engine.info))
        while True:
            try:
                name, args = conn.recv()
            except (EOFError, OSError):
                break  # the parent has gone
            if name == "close":
                break
            try:
                if name not in _REMOTE_CALLS:
                    raise AttributeError(f"GuidanceProcess has no remote call {name!r}")
                reply = ("ok", getattr(engine, name)(*args))
            except Exception as error:  # noqa: BLE001 - raised in the parent
                reply = ("error", _portable(error))
            conn.send(reply)
    finally:
        engine.close()
        conn.close()


class GuidanceProcess(_Playback):
    """A :class:`GuidanceEngine` in a child process, with the same calls.

    The scan is opened and the pipeline runs in the child; each processed frame comes back as
    a :class:`Published` (about 1.6 MB for a 640 x 512 frame, overlay and labels). Calls are
    serialised: a target edited during playback waits for the frame being processed.

    Use :meth:`open`; :meth:`close` ends the child (it also ends when this process does).
    """

    def __init__(self, process: subprocess.Popen[bytes], conn: Any, info: ScanInfo) -> None:
        super().__init__(info)
        self._process = process
        self._conn = conn
        self._call_lock = threading.Lock()
        self._closed = False

    @classmethod
    def open(
        cls,
        spec: str | os.PathLike[str],
        *,
        model: str | os.PathLike[str] | None = None,
        mode: str = "perineural",
        threads: int | None = None,
        timeout_s: float = 300.0,
    ) -> GuidanceProcess:
        """Start the child, open the scan (``"demo"`` for the demo scan) and build the pipeline
        there; errors opening it are raised here."""
        # A fresh interpreter (not multiprocessing's spawn, which re-runs the parent's main
        # script: a user's unguarded napari script would open a second viewer). It connects
        # back with a one-time key, given on its stdin rather than its command line.
        authkey = secrets.token_bytes(32)
        with Listener(authkey=authkey) as listener:
            child = subprocess.Popen(
                [sys.executable, "-c", "from napari_usguide._engine import _child; _child()"],
                stdin=subprocess.PIPE,
            )
            assert child.stdin is not None
            request = {
                "address": listener.address,
                "authkey": authkey.hex(),
                "spec": str(spec),
                "model": None if model is None else str(model),
                "mode": mode,
                "threads": threads,
            }
            child.stdin.write(json.dumps(request).encode() + b"\n")
            child.stdin.close()
            conn = _accept(listener, authkey, child, timeout_s)
        try:
            deadline = time.perf_counter() + timeout_s
            while not conn.poll(0.1):
                if time.perf_counter() > deadline:
                    raise TimeoutError(f"opening {spec} took more than {timeout_s:.0f} s")
            status, value = conn.recv()
        except EOFError:
            _end(child, conn)
            raise PipelineProcessError(
                f"the pipeline process ended while opening {spec} (exit code {child.returncode})"
            ) from None
        except BaseException:
            _end(child, conn)
            raise
        if status == "error":
            _end(child, conn)
            raise value
        return cls(child, conn, value)

    @property
    def closed(self) -> bool:
        """True once closed, or once the child has ended: every call then raises."""
        return self._closed

    def _call(self, name: str, *args: Any) -> Any:
        with self._call_lock:
            if self._closed:
                raise PipelineProcessError("the scan is closed")
            try:
                self._conn.send((name, args))
                status, value = self._conn.recv()
            except (EOFError, OSError) as error:
                # The child is gone: reap it (no zombie) and refuse further calls.
                self._closed = True
                _end(self._process, self._conn)
                raise PipelineProcessError(
                    f"the pipeline process ended (exit code {self._process.returncode})"
                ) from error
        if status == "error":
            raise value
        return value

    # -- what it plays -------------------------------------------------------------------------
    def read_pixels(self, index: int) -> np.ndarray:
        return self._call("read_pixels", index)

    # -- frames --------------------------------------------------------------------------------
    def process(self, index: int) -> Published:
        return self._published(self._call("process", index))

    def seek(self, index: int) -> Published:
        return self._published(self._call("seek", index))

    def restart(self) -> None:
        self._call("restart")
        self.next_index = 0

    # -- targets (frame pixels, x y) -----------------------------------------------------------
    def add_target(self, xy: tuple[float, float]) -> int:
        return self._call("add_target", xy)

    def move_target(self, target_id: int, xy: tuple[float, float]) -> int:
        return self._call("move_target", target_id, xy)

    def delete_target(self, target_id: int) -> None:
        self._call("delete_target", target_id)

    def targets(self) -> tuple[Any, ...]:
        return self._call("targets")

    def close(self) -> None:
        with self._call_lock:
            if self._closed:
                return
            self._closed = True
            with contextlib.suppress(OSError):
                self._conn.send(("close", ()))
            _end(self._process, self._conn)


def _end(process: subprocess.Popen[bytes], conn: Any, timeout_s: float = 5.0) -> None:
    """Wait for the child to finish its close; stop it if it does not."""
    conn.close()  # the child reads EOF: it closes the scan and exits
    try:
        process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout_s)


def _accept(
    listener: Listener, authkey: bytes, child: subprocess.Popen[bytes], timeout_s: float
) -> Any:
    """The child's connection; an error if it exits or takes too long before connecting."""
    accepted: list[Any] = []
    failed: list[BaseException] = []

    def accept() -> None:
        try:
            accepted.append(listener.accept())
        except (OSError, EOFError, AuthenticationError) as error:  # a failed handshake
            failed.append(error)

    thread = threading.Thread(target=accept, name="usguide-accept", daemon=True)
    thread.start()
    deadline = time.perf_counter() + timeout_s
    while thread.is_alive():
        thread.join(0.05)
        if thread.is_alive() and (child.poll() is not None or time.perf_counter() > deadline):
            # accept() cannot be interrupted: connect to it ourselves, then drop that connection.
            with contextlib.suppress(OSError):
                Client(listener.address, authkey=authkey).close()
            thread.join()
            for conn in accepted:
                conn.close()
            child.kill()
            child.wait()
            raise PipelineProcessError(
                f"the pipeline process did not start (exit code {child.returncode})"
            )
    if failed:
        child.kill()
        child.wait()
        raise PipelineProcessError("the pipeline process did not connect") from failed[0]
    return accepted[0]


def _child() -> None:
    """The child process's entry point: read the request on stdin, connect, serve."""
    request = json.loads(sys.stdin.readline())
    conn = Client(request["address"], authkey=bytes.fromhex(request["authkey"]))
    _serve(conn, request["spec"], request["model"], request["mode"], request["threads"])
