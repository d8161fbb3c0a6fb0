"""How fast the napari plugin shows frames: layer update rates and the guidance widget playing.

Run under a real X server (napari's canvas renders nothing offscreen), for example::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/napari_display.py \
        --screenshot docs/napari-guidance.png

Prints two tables:

1. **layer updates**: 640 x 480 frames pushed into napari layers by replacing ``layer.data``
   (what the widget does), as fast as the canvas takes them: updates per second and canvas
   draws per second for each way of showing a result;
2. **playing the demo scan** (and the SonoSite cine) in the guidance widget: frames shown per
   second, canvas draws per second, results skipped (the GUI always shows the newest), latency
   from reading a frame to showing it, and the pipeline's own time per frame. The widget runs the
   pipeline in a child process; the rows "pipeline on a thread" run it on a thread of napari's
   process instead, side by side, and their ratio is printed.
   ``replay`` feeds the widget's display path with results computed beforehand, which is the
   display's ceiling without the pipeline competing for the CPU.

``--screenshot`` saves the viewer (paused, editable layers) at a frame with needle, targets
and injectate, for the README.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from machine import machine_line

ROWS, COLS = 480, 640
WINDOW = (1400, 900)  # the canvas is drawn in software: its size matters, so it is fixed


def _app() -> Any:
    from qtpy.QtWidgets import QApplication

    return QApplication.instance()


def _pump(seconds: float = 0.0) -> None:
    app = _app()
    end = time.perf_counter() + seconds
    app.processEvents()
    while time.perf_counter() < end:
        app.processEvents()
        time.sleep(0.001)


class DrawCounter:
    """Counts the canvas's draw events: the frames the user actually saw."""

    def __init__(self, viewer: Any) -> None:
        self.count = 0
        canvas = viewer.window._qt_viewer.canvas  # private, but the only place draws are seen
        scene = getattr(canvas, "_scene_canvas", canvas)
        scene.events.draw.connect(self._drawn)

    def _drawn(self, _event: Any) -> None:
        self.count += 1


def _event_loop(callback: Callable[[], None], interval_ms: int) -> tuple[Any, Any]:
    """A Qt event loop and a timer calling ``callback`` every ``interval_ms`` inside it."""
    from qtpy.QtCore import QEventLoop, QTimer

    loop, timer = QEventLoop(), QTimer()
    timer.setInterval(interval_ms)
    timer.timeout.connect(callback)
    return loop, timer


def _viewer(width: int = WINDOW[0], height: int = WINDOW[1]) -> Any:
    import napari

    viewer = napari.Viewer(title="usguide")
    viewer.window._qt_window.resize(width, height)
    _pump(0.3)
    return viewer


def _demo_frames(n: int) -> list[np.ndarray]:
    """``n`` real-looking 640 x 480 grey frames: the demo scan, cropped."""
    from usguide.demo import DemoScan

    scan = DemoScan()
    return [scan.read(i * 3 % scan.frame_count).pixels[:ROWS, :COLS].copy() for i in range(n)]


def _rate(update: Callable[[int], None], draws: DrawCounter, seconds: float) -> tuple[float, float]:
    """Updates per second and draws per second of ``update(i)`` followed by one event pass."""
    update(0)
    _pump(0.2)
    start, drawn, i = time.perf_counter(), draws.count, 0
    while time.perf_counter() - start < seconds:
        i += 1
        update(i)
        _app().processEvents()
    wall = time.perf_counter() - start
    return i / wall, (draws.count - drawn) / wall


def layer_rates(seconds: float) -> list[tuple[str, float, float]]:
    """Updates/s and draws/s for each way the widget may show a 640 x 480 result."""
    from usguide.overlay import OverlayRenderer

    frames = _demo_frames(16)
    labels = [np.zeros((ROWS, COLS), np.uint8) for _ in frames]
    for k, lab in enumerate(labels):  # blobs of every class, moving
        for cls, (y, x) in enumerate(((200, 250), (320, 200), (120, 400), (260, 480)), start=1):
            lab[y - 30 + k : y + 30 + k, x - 40 : x + 40] = cls
    renderer = OverlayRenderer()
    overlays = [renderer.render(f, lab).copy() for f, lab in zip(frames, labels, strict=True)]
    rows = []

    def measure(name: str, setup: Callable[[Any], Callable[[int], None]]) -> None:
        viewer = _viewer()
        draws = DrawCounter(viewer)
        update = setup(viewer)
        rows.append((name, *_rate(update, draws, seconds)))
        viewer.close()
        _pump(0.2)

    def grey(viewer: Any) -> Callable[[int], None]:
        layer = viewer.add_image(frames[0], contrast_limits=(0, 255))

        def update(i: int) -> None:
            layer.data = frames[i % len(frames)]

        return update

    def rgb(viewer: Any) -> Callable[[int], None]:
        layer = viewer.add_image(overlays[0], rgb=True, contrast_limits=(0, 255))

        def update(i: int) -> None:
            layer.data = overlays[i % len(overlays)]

        return update

    def image_labels(viewer: Any) -> Callable[[int], None]:
        from napari_usguide._guidance_widget import class_colormap

        image = viewer.add_image(frames[0], contrast_limits=(0, 255))
        lab = viewer.add_labels(labels[0], colormap=class_colormap(), opacity=0.45)

        def update(i: int) -> None:
            image.data = frames[i % len(frames)]
            lab.data = labels[i % len(labels)]

        return update

    measure("one grey image layer", grey)
    measure("one RGB layer, layer.data = new array", rgb)

    def rgb_in_place(viewer: Any) -> Callable[[int], None]:
        from napari_usguide._guidance_widget import _refresh_pixels

        layer = viewer.add_image(overlays[0].copy(), rgb=True, contrast_limits=(0, 255))
        buffer = layer.data

        def update(i: int) -> None:
            np.copyto(buffer, overlays[i % len(overlays)])
            _refresh_pixels(layer)

        return update

    measure("one RGB layer, in place + refresh (widget)", rgb_in_place)
    measure("image + labels layers", image_labels)
    return rows


def _widget(viewer: Any, speed: str, source: str = "", *, in_process: bool = False) -> Any:
    """The guidance widget with a scan open. ``in_process`` runs the pipeline on a thread of
    this process (:class:`GuidanceEngine`) instead of the widget's child process, for comparison.
    """
    from napari_usguide._engine import GuidanceEngine
    from napari_usguide._guidance_widget import GuidanceWidget

    widget = GuidanceWidget(viewer)
    if in_process:
        widget._open_and_warm = lambda spec, model, mode: GuidanceEngine.open(
            spec, model=model, mode=mode
        )
    viewer.window.add_dock_widget(widget, name="Needle guidance")
    widget.speed_combo.setCurrentText(speed)
    widget.source_edit.setText(source)
    widget.open_scan()
    _wait(lambda: widget._worker is None and widget._shown is not None, 120)
    return widget


def _wait(done: Callable[[], bool], timeout_s: float) -> None:
    end = time.perf_counter() + timeout_s
    while not done():
        if time.perf_counter() > end:
            raise TimeoutError("the widget did not finish in time")
        _pump(0.002)


# The SonoSite cine shipped with the tests: 120 real 640 x 480 frames at 30 fps, calibrated.
CINE = Path(__file__).resolve().parents[1] / "tests/data/dicom/color3d_jpeg_baseline.dcm"
SCANS = {"demo": "", "cine": str(CINE)}


def play_rates(frames: int | None) -> list[dict[str, Any]]:
    """Play each scan through the widget at each speed, then a replay of the results."""
    from napari_usguide._guidance_widget import SPEEDS

    rows = []
    every = "every frame (as fast as it goes)"
    runs = [
        (scan, spec, speed, False)
        for (scan, spec), speed in itertools.product(SCANS.items(), SPEEDS)
    ]
    # The same on a thread of napari's own process, sharing its GIL (what the widget did before).
    runs += [(scan, spec, every, True) for scan, spec in SCANS.items()]
    for scan, spec, speed, in_process in runs:
        if spec and not Path(spec).exists():
            continue
        viewer = _viewer()
        draws = DrawCounter(viewer)
        widget = _widget(viewer, speed, spec, in_process=in_process)
        engine = widget.engine
        total = engine.frame_count - 1 if frames is None else min(frames, engine.frame_count - 1)
        shown_before, drawn = widget.displayed, draws.count
        wall, latencies = _play(widget, total)
        processed = engine.next_index - 1
        shown = widget.displayed - shown_before - 1  # the pause shows the last one again
        rows.append(
            {
                "mode": f"{scan}: play, {speed.split(' (')[0]}"
                + (", pipeline on a thread" if in_process else ""),
                "frames processed": processed,
                "shown": shown,
                "shown/s": shown / wall,
                "draws/s": (draws.count - drawn) / wall,
                "skipped": widget.skipped,
                "left out": engine.source_skipped,
                "latency ms": latencies,
                "pipeline ms": list(engine.process_ms),
            }
        )
        widget.stop()
        viewer.close()
        _pump(0.2)
    rows.append(_replay(frames))
    return rows


def _play(widget: Any, last: int) -> tuple[float, list[float]]:
    """Play until frame ``last`` inside Qt's own event loop, as in napari (polling with
    processEvents in a busy loop would hold the GIL and starve the pipeline's thread).
    Returns the wall time and the latency of every frame shown."""
    engine = widget.engine
    latencies: list[float] = []
    seen = widget.displayed

    def check() -> None:
        nonlocal seen
        new = widget.displayed - seen
        if new > 0:
            latencies.extend(list(widget._latency_ms)[-min(new, len(widget._latency_ms)) :])
            seen = widget.displayed
        if engine.next_index > last and widget._playing:
            widget.pause()
        if widget._worker is None:
            loop.quit()

    loop, timer = _event_loop(check, interval_ms=5)
    start = time.perf_counter()
    widget.play()
    timer.start()
    loop.exec_()
    timer.stop()
    return time.perf_counter() - start, latencies


def _replay(frames: int | None) -> dict[str, Any]:
    """The widget's playing display path alone, fed with results computed beforehand."""
    viewer = _viewer()
    draws = DrawCounter(viewer)
    widget = _widget(viewer, "every frame (as fast as it goes)")
    engine = widget.engine
    n = 60 if frames is None else min(frames, 60)
    results = [engine.process(i) for i in range(1, n + 1)]
    widget._playing = True
    widget._show_playing_layers()
    latencies = []
    start, drawn, shown = time.perf_counter(), draws.count, 0
    for k in range(3 * n):  # three passes over the results
        r = results[k % n]
        r.seq = k + 10_000  # fresh sequence numbers: each is new to the widget
        r.read_at = time.perf_counter()
        with engine._newest_lock:
            engine._newest = r
        widget._show_newest()
        _app().processEvents()
        latencies.append((time.perf_counter() - r.read_at) * 1e3)
        shown += 1
    wall = time.perf_counter() - start
    widget._playing = False
    row = {
        "mode": "demo: replay (display path only)",
        "frames processed": 0,
        "shown": shown,
        "shown/s": shown / wall,
        "draws/s": (draws.count - drawn) / wall,
        "skipped": 0,
        "left out": 0,
        "latency ms": latencies,
        "pipeline ms": [],
    }
    widget.stop()
    viewer.close()
    _pump(0.2)
    return row


def screenshot(path: Path, index: int = 104) -> None:
    """The viewer paused at frame ``index`` of the demo (needle at its target, injecting)."""
    import imageio.v3 as iio

    viewer = _viewer(1500, 900)
    widget = _widget(viewer, "every frame (as fast as it goes)")
    engine = widget.engine
    widget.play()  # played for real, so the widget's numbers are those of playback
    while widget._worker is not None:
        if engine.next_index >= index:
            widget.pause()
        _pump(0.002)
    _pump(0.5)
    image = viewer.screenshot(canvas_only=False, flash=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    iio.imwrite(path, image)
    print(f"wrote {path} ({image.shape[1]} x {image.shape[0]})")
    widget.stop()
    viewer.close()


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    a = np.asarray(values)
    return f"{np.median(a):.0f} / {np.percentile(a, 95):.0f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="per layer-update row")
    parser.add_argument("--frames", type=int, default=None, help="demo frames to play")
    parser.add_argument("--screenshot", type=Path, default=None, help="save a PNG here")
    args = parser.parse_args()
    if not os.environ.get("DISPLAY"):
        print("needs an X display: run it under xvfb-run", file=sys.stderr)
        return 2
    os.environ.setdefault("NAPARI_CONFIG", str(Path(tempfile.mkdtemp()) / "napari.yaml"))

    import napari
    from qtpy.QtGui import QOpenGLContext  # noqa: F401 - Qt is up before we ask GL

    _viewer().close()  # start Qt once
    gl = _gl_renderer()
    print(
        f"machine: {machine_line()}, "
        f"napari {napari.__version__}, OpenGL renderer: {gl}, "
        f"load average at start {os.getloadavg()[0]:.1f} (shared machine: compare rows, not runs)"
    )
    print()
    print(
        f"layer updates, {COLS} x {ROWS} frames, napari window {WINDOW[0]} x {WINDOW[1]} "
        f"({args.seconds:g} s each)"
    )
    print(f"{'display':44} {'updates/s':>10} {'draws/s':>9}")
    for name, updates, drawn in layer_rates(args.seconds):
        print(f"{name:44} {updates:10.1f} {drawn:9.1f}")
    print()
    print(
        "guidance widget: demo scan (640 x 512, 20 fps) and the SonoSite cine "
        "(tests/data, 640 x 480, 30 fps)"
    )
    header = (
        f"{'mode':48} {'processed':>9} {'shown':>6} {'shown/s':>8} {'draws/s':>8} "
        f"{'skipped':>8} {'left out':>8} {'latency ms med/p95':>19} {'pipeline ms med/p95':>20}"
    )
    print(header)
    results = play_rates(args.frames)
    for r in results:
        print(
            f"{r['mode']:48} {r['frames processed']:9d} {r['shown']:6d} {r['shown/s']:8.1f} "
            f"{r['draws/s']:8.1f} {r['skipped']:8d} {r['left out']:8d} "
            f"{_ms(r['latency ms']):>19} {_ms(r['pipeline ms']):>20}"
        )
    rates = {r["mode"]: r["shown/s"] for r in results}
    for scan in SCANS:
        child = rates.get(f"{scan}: play, every frame")
        thread = rates.get(f"{scan}: play, every frame, pipeline on a thread")
        if child and thread:
            ratio = child / thread
            print(f"{scan}, every frame: pipeline in a child process / on a thread = {ratio:.2f}x")
    print()
    print(
        "shown: results put on screen; skipped: results the GUI never showed because a newer "
        "one was ready; left out: frames real-time playback did not process to keep time."
    )
    if args.screenshot is not None:
        screenshot(args.screenshot)
    return 0


def _gl_renderer() -> str:
    try:
        from vispy.gloo import gl

        viewer = _viewer(200, 200)
        _pump(0.2)
        viewer.window._qt_viewer.canvas._scene_canvas.native.makeCurrent()
        name = gl.glGetParameter(gl.GL_RENDERER)
        viewer.close()
        return str(name)
    except Exception as e:  # noqa: BLE001 - only a label in the table's header
        return f"unknown ({type(e).__name__})"


if __name__ == "__main__":
    sys.exit(main())
