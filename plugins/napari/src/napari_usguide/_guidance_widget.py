"""The guidance dock widget: play a recorded scan through the pipeline inside napari.

The pipeline runs in a child process (:class:`~napari_usguide._engine.GuidanceProcess`), driven
from a napari ``thread_worker``; the GUI thread only shows results. Two ways of
showing them, because napari's canvas is the bottleneck (measured under Xvfb with software
OpenGL, 640 x 480: one RGB layer ~41 updates/s, an image plus a labels layer ~21):

- **playing**: the pipeline's own blended overlay (``FrameResult.overlay``) as ONE RGB layer,
  its data replaced in place; every other usguide layer is hidden. The GUI never falls behind:
  each update shows the newest result and counts the ones it never showed (skipped).
- **paused** (or stepping): separate, editable layers: the frame, labels for nerve, vessel,
  fascia and needle in the fixed usguide colours, the needle shaft (shapes) and tip (points),
  the targets (points: moving, adding or deleting one moves, adds or deletes it in the
  pipeline), and the distances and warnings as the viewer's text overlay.

All layers are created once, when a scan is opened, and updated in place afterwards.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtCore import QEvent, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from napari_usguide._engine import DEMO, MODES, GuidanceProcess, Published
from napari_usguide._paths import path_row
from napari_usguide._reader import (
    conform,
    layers_have_units,
    private_worker,
    redact,
    resolve_source,
)

if TYPE_CHECKING:
    import napari

PREFIX = "usguide "
LAYER_NAMES = {
    "frame": PREFIX + "frame",
    "overlay": PREFIX + "overlay",
    "labels": PREFIX + "labels",
    "shaft": PREFIX + "needle shaft",
    "tip": PREFIX + "needle tip",
    "targets": PREFIX + "targets",
}
SPEEDS = {"real time": True, "every frame (as fast as it goes)": False}
_STATS_EVERY_S = 0.25  # the numbers under the buttons change 4 times a second: readable


def _rgba(rgb: tuple[int, int, int], alpha: float = 1.0) -> tuple[float, float, float, float]:
    return (rgb[0] / 255, rgb[1] / 255, rgb[2] / 255, alpha)


def _hex(rgb: tuple[int, int, int]) -> str:
    """``#rrggbb``: the one colour form every napari layer takes without ambiguity."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def class_colormap() -> Any:
    """The fixed usguide class colours as a napari label colormap (background transparent)."""
    from napari.utils.colormaps import DirectLabelColormap

    from usguide.labels import CLASS_COLOURS

    colours: dict[int | None, Any] = {None: (0, 0, 0, 0), 0: (0, 0, 0, 0)}
    for index, rgb in enumerate(CLASS_COLOURS[1:], start=1):
        colours[index] = _rgba(rgb)
    return DirectLabelColormap(color_dict=colours)


class PlaybackError(Exception):
    """An error while playing, re-raised as one that superqt's generator worker reports: it
    takes a RuntimeError for its own deletion and ends without a signal."""


def _play(engine: GuidanceProcess, realtime: bool) -> Iterator[Published]:
    """The play worker's body: ``engine.play`` with every error reported."""
    try:
        yield from engine.play(realtime=realtime)
    except RuntimeError as error:
        raise PlaybackError(f"{type(error).__name__}: {error}") from error


@dataclass(slots=True)
class _Held:
    """What a widget owns outside Qt (the engine and its worker), reachable by the cleanup that
    runs once the widget's C++ object is gone."""

    engine: GuidanceProcess | None = None
    worker: Any = None


def _release(held: _Held, *_: Any) -> None:
    """Stop the worker and end the pipeline child; touches no widget (they may be deleted)."""
    worker, engine = held.worker, held.engine
    held.worker = held.engine = None
    if worker is not None:
        with contextlib.suppress(RuntimeError):  # its signals' C++ object may be gone too
            worker.quit()
    if engine is not None:
        engine.close()  # waits for the frame in flight, then the child exits


def _alive(widget: QWidget) -> bool:
    """False once Qt has deleted the widget (a slot can still be called on its wrapper)."""
    try:
        widget.objectName()
    except RuntimeError:
        return False
    return True


class GuidanceWidget(QWidget):
    """Open a scan, choose the model and options, and play, pause or step the pipeline.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari when the widget is opened from the Plugins menu.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        # The engine and the worker (the play loop or a one-off step/open, one at a time).
        self._held = _Held()
        # Closing the viewer deletes this widget without a closeEvent: the child must end then.
        self.destroyed.connect(functools.partial(_release, self._held))
        self._playing = False
        self._error: str | None = None  # the current worker's error, kept on screen
        self._pending_seek: int | None = None  # a slider move made while busy
        self._placement: dict[str, Any] = {}  # the layers' scale (and units)
        self._docked = False  # has had a parent (a dock)
        self._closing = False  # taken out of its dock: opens in flight are dropped
        self._shown: Published | None = None  # the result on screen
        self._updating_targets = False  # our own writes to the targets layer are not edits
        self._target_ids: list[int] = []  # parallel to the targets layer's points
        self._removing: list[int] = []
        self.layers: dict[str, Any] = {}
        self._overlay_buffer: np.ndarray | None = None
        # Display statistics.
        self.displayed = 0
        self.skipped = 0
        self._shown_at: collections.deque[float] = collections.deque(maxlen=61)
        self._latency_ms: collections.deque[float] = collections.deque(maxlen=60)
        self._stats_at = 0.0
        self._build()
        self._prefill_source()

    @property
    def engine(self) -> GuidanceProcess | None:
        return self._held.engine

    @engine.setter
    def engine(self, engine: GuidanceProcess | None) -> None:
        self._held.engine = engine

    @property
    def _worker(self) -> Any:
        return self._held.worker

    @_worker.setter
    def _worker(self, worker: Any) -> None:
        self._held.worker = worker

    # -- the form ------------------------------------------------------------------------------
    def _build(self) -> None:
        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("demo (or a DICOM cine, video, image folder)")
        source_row = path_row(self, self.source_edit, folder=False, caption="Open a scan")

        self.model_edit = QLineEdit()
        self.model_edit.setPlaceholderText("the shipped usguide-seg model")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems(MODES)
        self.speed_combo = QComboBox()
        self.speed_combo.addItems(list(SPEEDS))

        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(self.open_scan)
        self.play_button = QPushButton("Play")
        self.play_button.setCheckable(True)
        self.play_button.toggled.connect(self._play_toggled)
        self.step_button = QPushButton("Step")
        self.step_button.clicked.connect(self.step)
        buttons = QHBoxLayout()
        for b in (self.open_button, self.play_button, self.step_button):
            buttons.addWidget(b)

        self.slider = QSlider(Qt.Horizontal)
        self.slider.setMinimum(0)
        self.slider.setMaximum(0)
        self.slider.sliderReleased.connect(self._seek_released)
        # Keys, a click on the groove, the wheel: seek at once; a drag seeks on release.
        self.slider.valueChanged.connect(self._slider_moved)
        self.position_label = QLabel("no scan")

        self.stats_label = QLabel("")
        self.lines_label = QLabel("")
        self.warnings_label = QLabel("")
        self.warnings_label.setStyleSheet("color: #ff5050")
        for label in (self.stats_label, self.lines_label, self.warnings_label):
            label.setWordWrap(True)

        form = QFormLayout()
        form.addRow("source", source_row)
        form.addRow("model", self.model_edit)
        form.addRow("targets", self.mode_combo)
        form.addRow("speed", self.speed_combo)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addLayout(buttons)
        layout.addWidget(self.slider)
        layout.addWidget(self.position_label)
        layout.addWidget(self.stats_label)
        layout.addWidget(self.lines_label)
        layout.addWidget(self.warnings_label)
        notice = QLabel("Not a medical device: never guide a needle in a patient with it.")
        notice.setWordWrap(True)
        layout.addWidget(notice)
        layout.addStretch(1)
        self._set_enabled()

    def _prefill_source(self) -> None:
        """A scan opened with this plugin's reader is the natural source."""
        layer = self.viewer.layers.selection.active
        meta = getattr(layer, "metadata", {}).get("usguide") if layer is not None else None
        if meta and meta.get("source"):
            self.source_edit.setText(str(meta["source"]))

    def _set_enabled(self) -> None:
        busy = self._worker is not None and not self._playing
        ready = self.engine is not None and not busy
        self.open_button.setEnabled(not busy and not self._playing)
        self.play_button.setEnabled(ready)
        self.step_button.setEnabled(ready and not self._playing)
        self.slider.setEnabled(ready and not self._playing)

    # -- open ----------------------------------------------------------------------------------
    def open_scan(self) -> None:
        """Open the chosen scan and model in a worker thread, then show its first frame."""
        if self._worker is not None:
            return
        spec = self.source_edit.text().strip() or DEMO
        model = self.model_edit.text().strip() or None
        mode = self.mode_combo.currentText()
        self.position_label.setText(f"opening {spec} …")

        def opened(engine: GuidanceProcess) -> None:
            if not _alive(self) or self._closing:
                engine.close()  # the widget went while the scan opened
                return
            self._replace_engine(engine)
            self._start_one_off(engine.seek, 0)

        worker = private_worker(self._open_and_warm, spec, model, mode)
        worker.returned.connect(opened)
        self._run(worker)

    @staticmethod
    def _open_and_warm(spec: str, model: str | None, mode: str) -> GuidanceProcess:
        # The pipeline runs in its own process: its Python never waits for napari's. A DICOM's
        # pseudonym (the field shows no path) opens the file it stands for.
        return GuidanceProcess.open(resolve_source(spec), model=model, mode=mode)

    def _replace_engine(self, engine: GuidanceProcess) -> None:
        if self.engine is not None:
            self.engine.close()
        self.engine = engine
        self._shown = None
        self.displayed = self.skipped = 0
        self._shown_at.clear()
        self._latency_ms.clear()
        self.slider.blockSignals(True)  # a shorter scan clamps the value: not a seek
        self.slider.setMaximum(engine.frame_count - 1)
        self.slider.blockSignals(False)
        self._make_layers(engine)

    # -- workers -------------------------------------------------------------------------------
    def _run(self, worker: Any) -> None:
        # Workers are made by private_worker: an error is reported here (and, redacted, by
        # napari's notifications), never re-raised into the event loop.
        self._worker = worker
        self._error = None
        worker.errored.connect(self._errored)
        # Only the current worker's end counts: an open's "finished" comes after its
        # "returned" has already started the next worker.
        worker.finished.connect(lambda: self._worker_finished(worker))
        self._set_enabled()
        worker.start()

    def _worker_finished(self, worker: Any) -> None:
        if worker is not self._worker:
            return
        self._worker = None
        if not _alive(self):
            return  # the viewer closed: _release ends the child
        was_playing, self._playing = self._playing, False
        _freeze_layer_list(self.viewer, False)
        if self.play_button.isChecked():
            self.play_button.blockSignals(True)
            self.play_button.setChecked(False)
            self.play_button.blockSignals(False)
        self.play_button.setText("Play")
        engine = self.engine
        if was_playing and engine is not None:
            newest = engine.newest()
            if newest is not None:
                self._show_paused(newest)
        if engine is not None and engine.closed:
            self.engine = None  # its child ended: nothing more plays until a scan is opened
        if self._error is not None:
            self.position_label.setText(self._error)  # the redraw above wrote over it
        elif self._pending_seek is not None and engine is not None and not engine.closed:
            self._start_one_off(engine.seek, self._pending_seek)
        self._pending_seek = None
        self._set_enabled()

    def _errored(self, error: BaseException) -> None:
        if not _alive(self):
            return
        self._error = f"error: {redact(str(error))}"  # a source's error names its file
        self.position_label.setText(self._error)

    def _start_one_off(self, fn: Any, *args: Any) -> None:
        worker = private_worker(fn, *args)
        worker.returned.connect(self._one_off_done)
        self._run(worker)

    def _one_off_done(self, published: Published | None) -> None:
        if published is not None and _alive(self):
            self._show_paused(published)

    def step(self) -> None:
        """Process the next frame and show it with editable layers."""
        if self.engine is None or self._worker is not None:
            return
        if self.engine.at_end:
            self.position_label.setText("end of scan")
            return
        self._start_one_off(self.engine.step)

    def _seek_released(self) -> None:
        self._seek(self.slider.value())

    def _slider_moved(self, value: int) -> None:
        if not self.slider.isSliderDown():  # while dragging, the release seeks
            self._seek(value)

    def _seek(self, index: int) -> None:
        if self.engine is None or self._playing:
            return
        if self._worker is not None:
            self._pending_seek = index  # sought when the work in hand is done
            return
        if self._shown is not None and self._shown.index == index:
            return
        self._start_one_off(self.engine.seek, index)

    def play(self) -> None:
        """Start playing from the next frame."""
        self.play_button.setChecked(True)

    def pause(self) -> None:
        """Stop after the frame being processed; its result is shown with editable layers."""
        self.play_button.setChecked(False)

    def _play_toggled(self, checked: bool) -> None:
        if checked:
            self._start_play()
        elif self._playing and self._worker is not None:
            self._worker.quit()

    def _start_play(self) -> None:
        engine = self.engine
        if engine is None or self._worker is not None:
            self.play_button.blockSignals(True)
            self.play_button.setChecked(False)
            self.play_button.blockSignals(False)
            return
        if engine.at_end:
            engine.restart()
        realtime = SPEEDS[self.speed_combo.currentText()]
        worker = private_worker(_play, engine, realtime)
        # Each yield only says "there is something new": the handler takes the newest result,
        # so a queue of stale signals after a busy moment costs nothing.
        worker.yielded.connect(self._show_newest)
        self._playing = True
        self.play_button.setText("Pause")
        self._show_playing_layers()
        _freeze_layer_list(self.viewer, True)  # after the visibility changes are painted
        self._run(worker)

    # -- layers --------------------------------------------------------------------------------
    def _make_layers(self, engine: GuidanceProcess) -> None:
        """Create (or reuse) the usguide layers for this scan's frame size and scale."""
        rows, cols = engine.shape
        spacing = engine.spacing_mm
        scale = (float(spacing[0]), float(spacing[1])) if spacing else (1.0, 1.0)
        first = engine.read_pixels(0)
        viewer = self.viewer
        existing = {layer.name: layer for layer in viewer.layers}

        placement: dict[str, Any] = {"scale": scale}
        if layers_have_units():  # napari >= 0.6: the scale bar reads mm
            placement["units"] = ("mm", "mm") if spacing else ("pixel", "pixel")
        self._placement = placement
        # Every kept layer takes this scan's scale and units before a layer is added or removed
        # (a frame turning grey <-> colour): napari draws then, and a mix of the last scan's
        # units and this one's made it warn about inconsistent units.
        conform([existing[n] for n in LAYER_NAMES.values() if n in existing], placement)

        def reuse(key: str, make: Any, *, rgb: bool | None = None) -> Any:
            layer = existing.get(LAYER_NAMES[key])
            if layer is not None and rgb is not None and getattr(layer, "rgb", rgb) != rgb:
                viewer.layers.remove(layer)  # grey <-> colour cannot change in place
                layer = None
            if layer is None:
                layer = make(placement)
            self.layers[key] = layer
            return layer

        grey = np.zeros((rows, cols), np.uint8)
        colour = first.ndim == 3
        reuse(
            "frame", lambda kw: viewer.add_layer(_frame_layer(np.zeros_like(first), kw)), rgb=colour
        )
        reuse(
            "labels",
            lambda kw: viewer.add_labels(
                grey.copy(),
                name=LAYER_NAMES["labels"],
                colormap=class_colormap(),
                opacity=0.45,
                **kw,
            ),
        )
        reuse(
            "shaft",
            lambda kw: viewer.add_shapes(
                name=LAYER_NAMES["shaft"],
                shape_type="line",
                edge_color=_hex(_needle_colour()),
                edge_width=3,
                **kw,
            ),
        )
        reuse(
            "tip",
            lambda kw: viewer.add_points(
                np.zeros((0, 2)),
                name=LAYER_NAMES["tip"],
                face_color=_hex(_needle_colour()),
                size=8,
                symbol="disc",
                **kw,
            ),
        )
        targets = reuse(
            "targets",
            lambda kw: viewer.add_points(
                np.zeros((0, 2)),
                name=LAYER_NAMES["targets"],
                face_color="transparent",
                border_color=_hex(_active_target_colour()),
                border_width=0.25,
                symbol="cross",
                size=14,
                **kw,
            ),
        )
        if not getattr(targets, "_usguide_connected", False):
            targets.events.data.connect(self._targets_edited)
            targets._usguide_connected = True
        # The overlay is on top; while playing it is the only usguide layer shown.
        reuse(
            "overlay",
            lambda kw: viewer.add_image(
                np.zeros((rows, cols, 3), np.uint8),
                name=LAYER_NAMES["overlay"],
                rgb=True,
                contrast_limits=(0, 255),
                visible=False,
                **kw,
            ),
            rgb=True,
        )
        scale_bar = _canvas_overlay(viewer, "scale_bar")
        scale_bar.visible = True
        if spacing and "units" not in placement:
            scale_bar.unit = "mm"  # napari < 0.6 has no layer units
        text = _canvas_overlay(viewer, "text")
        text.visible = True
        text.color = "white"
        text.position = "top_left"
        viewer.reset_view()
        viewer.layers.selection.active = targets

    def _show_playing_layers(self) -> None:
        self.layers["overlay"].visible = True
        for key in ("frame", "labels", "shaft", "tip", "targets"):
            self.layers[key].visible = False
        _canvas_overlay(self.viewer, "text").visible = False  # the overlay draws its own text
        # From here on the overlay layer's data is this buffer, updated in place.
        overlay = self.layers["overlay"]
        if self._shown is not None and self._shown.overlay is not None:
            overlay.data = self._shown.overlay.copy()
        self._overlay_buffer = overlay.data

    def _show_newest(self, *_: Any) -> None:
        """While playing: the newest result's overlay, in place, in the one RGB layer."""
        engine = self.engine
        if engine is None or not self._playing or not _alive(self):
            return
        published = engine.newest()
        if published is None or (self._shown is not None and published.seq <= self._shown.seq):
            return  # already on screen: a stale signal
        if published.overlay is not None:
            layer, buffer = self.layers["overlay"], self._overlay_buffer
            if (
                buffer is not None
                and layer.data is buffer
                and buffer.shape == published.overlay.shape
            ):
                # In place: no new extent or dims to work out and no thumbnail per frame. It
                # measured within noise of assigning layer.data (both ~40 updates/s).
                np.copyto(buffer, published.overlay)
                _refresh_pixels(layer)
            else:
                layer.data = self._overlay_buffer = published.overlay.copy()
        self._count_shown(published)

    def _show_paused(self, published: Published) -> None:
        """The result in separate, editable layers."""
        layers = self.layers
        self._set_frame(published.pixels)
        labels = published.labels
        if labels is None:
            labels = np.zeros(published.pixels.shape[:2], np.uint8)
        layers["labels"].data = labels
        needle = published.needle
        tip = needle.tip_xy if needle is not None and needle.visible else None
        if tip is not None and needle is not None and needle.entry_xy is not None:
            (ex, ey), (tx, ty) = needle.entry_xy, tip
            layers["shaft"].data = [np.array([[ey, ex], [ty, tx]])]
            layers["shaft"].shape_type = "line"
        else:
            layers["shaft"].data = []
        layers["tip"].data = np.array([[tip[1], tip[0]]]) if tip is not None else np.zeros((0, 2))
        self._set_targets(published)
        text_overlay = _canvas_overlay(self.viewer, "text")
        text_overlay.text = "\n".join(published.lines + published.warnings)
        text_overlay.visible = True
        for key in ("frame", "labels", "shaft", "tip", "targets"):
            layers[key].visible = True
        layers["overlay"].visible = False
        self._count_shown(published)

    def _set_frame(self, pixels: np.ndarray) -> None:
        """The frame layer shows ``pixels``; a scan whose frames change between grey and colour
        gets a new layer in the old one's place (an image layer's rgb is fixed)."""
        layer = self.layers["frame"]
        if layer.rgb == (pixels.ndim == 3):
            layer.data = pixels
            return
        layers = self.viewer.layers
        active = layers.selection.active
        index = layers.index(layer)
        new = _frame_layer(pixels, self._placement)
        layers.remove(layer)
        layers.insert(index, new)
        self.layers["frame"] = new
        if active is not None and active is not layer:
            layers.selection.active = active

    def _set_targets(self, published: Published) -> None:
        targets = published.guidance.targets if published.guidance is not None else ()
        layer = self.layers["targets"]
        self._updating_targets = True
        try:
            layer.data = (
                np.array([[t.xy[1], t.xy[0]] for t in targets]) if targets else np.zeros((0, 2))
            )
        finally:
            self._updating_targets = False
        self._target_ids = [t.id for t in targets]

    def _targets_edited(self, event: Any) -> None:
        """A target moved, added or deleted in the viewer moves, adds or deletes it in the
        pipeline (from the next frame on)."""
        from napari.layers.base._base_constants import ActionType

        engine = self.engine
        if self._updating_targets or engine is None:
            return
        action = getattr(event, "action", None)
        indices = [int(i) for i in getattr(event, "data_indices", ())]
        data = self.layers["targets"].data
        if action == ActionType.ADDED:
            for i in indices:
                y, x = data[i]
                self._target_ids.append(engine.add_target((float(x), float(y))))
        elif action == ActionType.REMOVING:
            self._removing = [self._target_ids[i] for i in indices if i < len(self._target_ids)]
        elif action == ActionType.REMOVED:
            for target_id in self._removing:
                engine.delete_target(target_id)
                self._target_ids.remove(target_id)
            self._removing = []
        elif action == ActionType.CHANGED:
            for i in indices:
                if i >= len(self._target_ids):
                    continue
                y, x = data[i]
                self._target_ids[i] = engine.move_target(self._target_ids[i], (float(x), float(y)))

    # -- statistics ----------------------------------------------------------------------------
    def _count_shown(self, published: Published) -> None:
        now = time.perf_counter()
        if self._shown is not None and published.seq > self._shown.seq + 1 and self._playing:
            self.skipped += published.seq - self._shown.seq - 1
        self._shown = published
        self.displayed += 1
        self._shown_at.append(now)
        self._latency_ms.append((now - published.read_at) * 1e3)
        if not self._playing or now - self._stats_at >= _STATS_EVERY_S:
            # Widgets repaint in software too: text and slider change a few times a second.
            self._stats_at = now
            self._update_labels(published)

    @property
    def display_fps(self) -> float:
        """Frames shown per second over the last second or so."""
        t = self._shown_at
        if len(t) < 2 or t[-1] <= t[0]:
            return 0.0
        return (len(t) - 1) / (t[-1] - t[0])

    @property
    def latency_ms(self) -> float:
        """Median time from reading a frame to showing it, recent frames."""
        return float(np.median(self._latency_ms)) if self._latency_ms else float("nan")

    def _update_labels(self, published: Published) -> None:
        engine = self.engine
        assert engine is not None
        if self.slider.value() != published.index and not self.slider.isSliderDown():
            self.slider.blockSignals(True)
            self.slider.setValue(published.index)
            self.slider.blockSignals(False)
        total = engine.frame_count
        units = "mm" if engine.spacing_mm else "px (uncalibrated)"
        self.position_label.setText(f"frame {published.index + 1} / {total} · distances in {units}")
        pipeline_ms = float(np.median(engine.process_ms)) if engine.process_ms else float("nan")
        stats = (
            f"display {self.display_fps:.1f} fps · latency {self.latency_ms:.0f} ms · "
            f"pipeline {pipeline_ms:.0f} ms/frame · skipped {self.skipped}"
        )
        if engine.source_skipped:
            stats += f" · left out to keep time {engine.source_skipped}"
        self.stats_label.setText(stats)
        self.lines_label.setText("\n".join(published.lines))
        errors = [f"{stage} failed: {e}" for stage, e in published.errors.items()]
        self.warnings_label.setText("\n".join(published.warnings + errors))

    # -- closing -------------------------------------------------------------------------------
    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the worker (waiting for it) and close the scan."""
        from qtpy.QtWidgets import QApplication

        worker = self._worker
        if worker is not None:
            worker.quit()
            deadline = time.perf_counter() + timeout_s
            while self._worker is not None and time.perf_counter() < deadline:
                QApplication.processEvents()
                time.sleep(0.005)
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        self._set_enabled()

    def closeEvent(self, event: Any) -> None:
        self.stop()
        super().closeEvent(event)

    def event(self, event: QEvent) -> bool:
        # napari's remove_dock_widget (the dock's close button) takes the widget out of its
        # dock with setParent(None) and never closes it: the scan ends here.
        if event.type() == QEvent.ParentChange and self.parent() is None and self._docked:
            self._closing = True
            self.stop()
        elif event.type() == QEvent.ParentChange and self.parent() is not None:
            self._docked, self._closing = True, False
        return super().event(event)


def _frame_layer(pixels: np.ndarray, placement: dict[str, Any]) -> Any:
    """The frame's image layer: grey or colour as ``pixels`` are, at the scan's scale."""
    from napari.layers import Image

    colour = pixels.ndim == 3
    return Image(
        pixels,
        name=LAYER_NAMES["frame"],
        rgb=colour,
        contrast_limits=(0, 255),
        colormap="gray",
        **placement,
    )


def _canvas_overlay(viewer: napari.viewer.Viewer, name: str) -> Any:
    """The viewer's text or scale-bar overlay (``viewer.canvas.overlays`` since napari 0.9)."""
    canvas = getattr(viewer, "canvas", None)
    overlays = getattr(canvas, "overlays", None)
    if overlays is not None and name in overlays:
        return overlays[name]
    return getattr(viewer, f"{name}_overlay" if name == "text" else name)


def _freeze_layer_list(viewer: napari.viewer.Viewer, frozen: bool) -> None:
    """Stop (or restart) repainting napari's layer list. While playing, nothing in it changes,
    yet each frame's layer refresh repaints every row's icons in software: about a fifth of the
    GUI thread's time. napari has no public switch for this; without the private widget, skip.
    """
    qt_viewer = getattr(viewer.window, "_qt_viewer", None)
    layer_list = getattr(qt_viewer, "layers", None)
    if layer_list is None or not hasattr(layer_list, "setUpdatesEnabled"):
        return
    with contextlib.suppress(RuntimeError):  # the viewer's window is being deleted
        if frozen:
            layer_list.viewport().repaint()  # show the layers' new visibility before freezing
        layer_list.setUpdatesEnabled(not frozen)


def _refresh_pixels(layer: Any) -> None:
    """Redraw a layer whose data array changed in place, skipping what a new array needs."""
    try:
        layer.refresh(thumbnail=False, extent=False, highlight=False)
    except TypeError:  # napari < 0.6: refresh takes no options
        layer.refresh()


def _needle_colour() -> tuple[int, int, int]:
    from usguide.overlay import NEEDLE_COLOUR

    return NEEDLE_COLOUR


def _active_target_colour() -> tuple[int, int, int]:
    from usguide.overlay import ACTIVE_TARGET_COLOUR

    return ACTIVE_TARGET_COLOUR
