"""Annotation: pre-annotate frames with the model, edit them with napari's label tools, mark
needle tips, propagate labels to the next frames, undo, and export a de-identified dataset.

The widget is thin: frames, labels, undo, propagation and the export live in
:class:`usguide.annotation.AnnotationSet`. napari's labels layer is what the annotator paints
on; the widget copies a frame from the layer into the set before each operation (so a brush
edit becomes an undoable step) and copies the set's labels back after it. Model runs,
propagation and the export happen in napari ``thread_worker``s.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QCheckBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from napari_usguide._paths import path_row
from napari_usguide._reader import (
    conform,
    layers_have_units,
    placement_over,
    private_worker,
    pseudonym_in,
    redact,
    redacting_warnings,
    resolve_source,
)
from usguide.errors import UsguideError

if TYPE_CHECKING:
    import napari

    from usguide.annotation import AnnotationSet
    from usguide.frame import Frame

LABELS_LAYER = "usguide annotation labels"
TIPS_LAYER = "usguide needle tips"
DATASET_LAYER = "usguide dataset images"


def _class_colormap() -> Any:
    from napari_usguide._guidance_widget import class_colormap

    return class_colormap()


class AnnotationWidget(QWidget):
    """Annotate the frames of a scan and export them as a dataset.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self.aset: AnnotationSet | None = None
        self.scan_layer: Any = None
        self.labels_layer: Any = None
        self.tips_layer: Any = None
        self._source: Any = None  # usguide source of the scan, when it has one
        self._keys: dict[int, str] = {}  # layer frame -> key in the set
        self._worker: Any = None
        self._segment: Callable[[Frame], np.ndarray] | None = None
        self.model: str | None = None  # None: the shipped model

        self.annotator_edit = QLineEdit()
        self.count_spin = QSpinBox()
        self.count_spin.setRange(1, 100)
        self.count_spin.setValue(5)
        self.folder_edit = QLineEdit()
        self.folder_edit.setPlaceholderText("dataset folder")
        self.dicom_check = QCheckBox("DICOM SEG too")
        self.start_button = QPushButton("Annotate the selected scan")
        self.start_button.clicked.connect(lambda: self.start())
        self.pre_button = QPushButton("Pre-annotate frame")
        self.pre_button.clicked.connect(self.pre_annotate)
        self.propagate_button = QPushButton("Propagate to next")
        self.propagate_button.clicked.connect(self.propagate)
        self.undo_button = QPushButton("Undo")
        self.undo_button.clicked.connect(self.undo)
        self.export_button = QPushButton("Export dataset")
        self.export_button.clicked.connect(lambda: self.export())
        self.open_button = QPushButton("Open dataset")
        self.open_button.clicked.connect(lambda: self.open_dataset())
        self.status = QLabel("Select a scan layer, then press Annotate.")
        self.status.setWordWrap(True)

        form = QFormLayout()
        form.addRow("annotator", self.annotator_edit)
        form.addRow("frames", self.count_spin)
        form.addRow(
            "dataset", path_row(self, self.folder_edit, folder=True, caption="Dataset folder")
        )
        edit_row = QHBoxLayout()
        for b in (self.pre_button, self.propagate_button, self.undo_button):
            edit_row.addWidget(b)
        file_row = QHBoxLayout()
        for b in (self.export_button, self.open_button):
            file_row.addWidget(b)
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.start_button)
        layout.addLayout(edit_row)
        layout.addWidget(self.dicom_check)
        layout.addLayout(file_row)
        layout.addWidget(self.status)
        layout.addStretch(1)
        self._set_enabled()

    # -- state ---------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def _set_enabled(self) -> None:
        ready = self.aset is not None and not self.busy
        for b in (self.pre_button, self.propagate_button, self.undo_button, self.export_button):
            b.setEnabled(ready)
        self.start_button.setEnabled(not self.busy)
        self.open_button.setEnabled(not self.busy)

    def _stacked(self) -> bool:
        """Whether the scan layer is a stack of frames (its first axis is time)."""
        return self.scan_layer is not None and self.scan_layer.ndim == 3

    def _frame_count(self) -> int:
        return int(self.scan_layer.data.shape[0]) if self._stacked() else 1

    def current_frame(self) -> int:
        return int(self.viewer.dims.current_step[0]) if self._stacked() else 0

    # -- starting ------------------------------------------------------------------------------
    def start(self, layer: Any = None) -> None:
        """Annotate ``layer`` (default: the selected image layer)."""
        from napari.layers import Image

        from usguide.annotation import AnnotationSet

        layer = layer or self.viewer.layers.selection.active
        if not isinstance(layer, Image):
            images = [x for x in self.viewer.layers if isinstance(x, Image)]
            layer = images[-1] if images else None
        if layer is None:
            self.status.setText("No image layer to annotate.")
            return
        # The scan's source: from the reader's metadata, or a DICOM layer's name (its
        # pseudonym) when the metadata is gone, as in a layer saved and opened again.
        meta = layer.metadata.get("usguide") or {}
        spec = str(meta.get("source") or "") or pseudonym_in(layer.name)
        source = None
        if spec:
            from napari_usguide._engine import open_scan

            try:
                with redacting_warnings():  # its warnings name the file
                    source = open_scan(resolve_source(spec))
            except (UsguideError, OSError, ValueError) as error:
                # Said in the status line, never raised in the slot, and with a DICOM's
                # pseudonym for its path. Not annotated from the pixels alone: they lack the
                # imaging region and the identifiers an export checks (a pseudonym from another
                # session says to open the scan again). The annotation in hand stays.
                self.status.setText(f"error: {redact(str(error))}")
                return
        self._close_source()
        self._source = source
        self.aset = AnnotationSet(self.annotator_edit.text())
        self._attach(layer)
        self.status.setText(f"Annotating {layer.name}.")

    def _attach(self, layer: Any) -> None:
        """Labels and tips layers over ``layer``, at its scale (so their data are pixels)."""
        self.scan_layer = layer
        self._keys = {}
        shape = layer.data.shape[: layer.ndim]  # an RGB layer's ndim leaves out the channels
        # The scan's scale and units: the scale bar keeps reading mm.
        placement = placement_over(layer, len(shape))
        # The last scan's layers take this one's units before they go: napari draws at each
        # removal, and warned when they and this scan's layer disagreed.
        old = [self.viewer.layers[n] for n in (LABELS_LAYER, TIPS_LAYER) if n in self.viewer.layers]
        conform(old, placement)
        for name in (LABELS_LAYER, TIPS_LAYER):
            if name in self.viewer.layers:
                self.viewer.layers.remove(name)
        self.labels_layer = self.viewer.add_labels(
            np.zeros(tuple(shape), np.uint8),
            name=LABELS_LAYER,
            colormap=_class_colormap(),
            opacity=0.5,
            **placement,
        )
        self.tips_layer = self.viewer.add_points(
            np.zeros((0, len(shape))),
            ndim=len(shape),
            name=TIPS_LAYER,
            face_color="#28ff78",
            size=6,
            **placement,
        )
        self._set_enabled()

    def _close_source(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def _read_frame(self, t: int) -> Frame:
        """Frame ``t`` with its region, calibration and source (for de-identification)."""
        from usguide.frame import Frame, Region

        if self._source is not None:
            return self._source.read(t)
        layer = self.scan_layer
        data = layer.data[t] if self._stacked() else layer.data
        pixels = np.ascontiguousarray(np.asarray(data), dtype=np.uint8)
        h, w = pixels.shape[:2]
        # The file the layer came from, when napari knows it: a DICOM's identifiers are then
        # read and kept out of the export (its name is reduced to a safe label either way).
        path = getattr(getattr(layer, "source", None), "path", None)
        return Frame(pixels, t, None, None, Region.whole(h, w), str(path or layer.name))

    def _ensure(self, t: int) -> str:
        assert self.aset is not None
        if t not in self._keys:
            self._keys[t] = self.aset.add_frame(self._read_frame(t))
        return self._keys[t]

    # -- layer <-> set -------------------------------------------------------------------------
    def _layer_labels(self, t: int) -> np.ndarray:
        data = self.labels_layer.data
        return np.asarray(data[t] if self._stacked() else data)

    def _tip(self, t: int) -> tuple[float, float] | None:
        points = np.asarray(self.tips_layer.data)
        if self._stacked():
            points = points[np.round(points[:, 0]).astype(int) == t] if len(points) else points
        if not len(points):
            return None
        y, x = points[-1][-2:]
        return float(x), float(y)

    def _sync(self, t: int) -> str | None:
        """Copy frame ``t``'s labels and tip from the layers into the set; None, said in the
        status line, when the set refuses them (a label number painted that is no class)."""
        assert self.aset is not None
        self.aset.annotator = self.annotator_edit.text()
        key = self._ensure(t)
        try:
            self.aset.annotate(key, self._layer_labels(t), self._tip(t), action="edit")
        except ValueError as e:
            self.status.setText(f"Frame {t} not taken: {e}. Paint with 1 nerve to 4 needle.")
            return None
        return key

    def _show(self) -> None:
        """Copy the set's labels and tips back into the labels and tips layers."""
        assert self.aset is not None
        data = self.labels_layer.data
        stacked = self._stacked()
        for t, key in self._keys.items():
            if stacked:
                data[t] = self.aset[key].labels
            else:
                data[...] = self.aset[key].labels
        self.labels_layer.refresh()
        if self.tips_layer is None:
            return
        # Tips of frames the set holds come from the set (undo may have changed them); tips
        # on frames it does not hold yet stay as drawn.
        points = np.asarray(self.tips_layer.data, float).reshape(-1, 3 if stacked else 2)
        held = set(self._keys) if stacked else {0}
        keep = [p for p in points if stacked and int(np.rint(p[0])) not in held]
        for t, key in self._keys.items():
            tip = self.aset[key].tip_xy
            if tip is not None:
                keep.append(np.array([t, tip[1], tip[0]] if stacked else [tip[1], tip[0]]))
        self.tips_layer.data = np.array(keep, float).reshape(-1, 3 if stacked else 2)

    def _run(self, fn: Callable[[], Any], done: Callable[[Any], None], what: str) -> None:
        self.status.setText(what + " …")
        # An error is shown in the status line, not raised again.
        worker = private_worker(fn)
        worker.returned.connect(done)
        # A source's error names its file: a DICOM's path is said as its pseudonym.
        worker.errored.connect(lambda e: self.status.setText(f"error: {redact(str(e))}"))
        worker.finished.connect(self._finished)
        self._worker = worker
        self._set_enabled()
        worker.start()

    def _finished(self) -> None:
        self._worker = None
        self._set_enabled()

    # -- actions -------------------------------------------------------------------------------
    def segmenter(self) -> Callable[[Frame], np.ndarray]:
        """The model (loaded once, on first use, inside a worker)."""
        if self._segment is None:
            from usguide.segment import Segmenter

            self._segment = Segmenter(self.model)
        return self._segment

    def pre_annotate(self) -> None:
        """Label the current frame with the model (undoable)."""
        if self.aset is None or self.busy:
            return
        aset, t = self.aset, self.current_frame()
        key = self._sync(t)
        if key is None:
            return

        def work() -> list[str]:
            return aset.pre_annotate([key], self.segmenter())

        def done(changed: list[str]) -> None:
            self._show()
            self.status.setText(f"Frame {t} pre-annotated; edit it with the label tools.")

        self._run(work, done, f"Pre-annotating frame {t}")

    def propagate(self) -> None:
        """Carry the current frame's labels to the next N frames by optical flow (undoable)."""
        if self.aset is None or self.busy:
            return
        aset, t = self.aset, self.current_frame()
        key = self._sync(t)
        if key is None:
            return
        last = min(self._frame_count() - 1, t + self.count_spin.value())
        targets = [self._ensure(k) for k in range(t + 1, last + 1)]

        def work() -> list[str]:
            return aset.propagate(key, targets)

        def done(changed: list[str]) -> None:
            self._show()
            self.status.setText(f"Labels propagated to frames {t + 1}-{last}; check each.")

        if targets:
            self._run(work, done, "Propagating")
        else:
            self.status.setText("No following frame.")

    def undo(self) -> None:
        """Undo the last change (a paint edit made since the last action counts as one)."""
        if self.aset is None or self.busy:
            return
        if self._sync(self.current_frame()) is None:
            return
        what = self.aset.undo()
        self._show()
        self.status.setText(f"Undone: {what}." if what else "Nothing to undo.")

    def _sync_all(self) -> bool:
        """Every frame with labels or a tip (or already in the set) into the set; False when
        one was refused (the status line says which)."""
        data = self.labels_layer.data
        if self._stacked():
            painted = set(np.flatnonzero(np.asarray(data).reshape(len(data), -1).any(axis=1)))
            tips = np.asarray(self.tips_layer.data)
            painted |= {int(np.rint(v)) for v in tips[:, 0]} if len(tips) else set()
        else:
            painted = {0}
        return all(self._sync(int(t)) is not None for t in sorted(painted | set(self._keys)))

    def export(self, folder: str | None = None) -> None:
        """Export the annotated frames to ``folder`` (default: the dataset field)."""
        if self.aset is None or self.busy:
            return
        path = folder or self.folder_edit.text().strip()
        if not path:
            self.status.setText("Choose a dataset folder first.")
            return
        self.folder_edit.setText(path)
        if not self._sync_all():
            return
        aset, dicom = self.aset, self.dicom_check.isChecked()

        def work() -> Path:
            return aset.export(path, dicom_seg=dicom)

        def done(out: Path) -> None:
            self.status.setText(f"Exported {len(aset)} frame(s) to {out}.")

        self._run(work, done, "Exporting")

    def open_dataset(self, folder: str | None = None) -> None:
        """Re-open an exported dataset for more annotation (frames of one size)."""
        from usguide.annotation import AnnotationSet
        from usguide.errors import UsguideError

        path = folder or self.folder_edit.text().strip()
        if not path or self.busy:
            return
        try:
            aset = AnnotationSet.load(path, annotator=self.annotator_edit.text())
        except (OSError, ValueError, KeyError, UsguideError) as error:
            self.status.setText(f"error: {error}")
            return
        frames = list(aset)
        if not frames or len({f.image.shape for f in frames}) != 1:
            self.status.setText("Only datasets whose frames share one size open here.")
            return
        self._close_source()
        self.folder_edit.setText(path)
        spacing = frames[0].spacing_mm
        placement: dict[str, Any] = {"scale": (1.0, *(spacing or (1.0, 1.0)))}
        if layers_have_units():
            placement["units"] = ("pixel", "mm", "mm") if spacing else ("pixel",) * 3
        # The layers kept from the last scan or dataset take this one's units before any layer
        # is removed or added (napari draws then, and warned about the mix).
        names = (DATASET_LAYER, LABELS_LAYER, TIPS_LAYER)
        conform([self.viewer.layers[n] for n in names if n in self.viewer.layers], placement)
        if DATASET_LAYER in self.viewer.layers:
            self.viewer.layers.remove(DATASET_LAYER)
        layer = self.viewer.add_image(
            np.stack([f.image for f in frames]),
            name=DATASET_LAYER,
            rgb=frames[0].image.ndim == 3,
            **placement,
        )
        self.aset = aset
        self._attach(layer)
        self._keys = {t: f.key for t, f in enumerate(frames)}
        tips = [(t, f.tip_xy[1], f.tip_xy[0]) for t, f in enumerate(frames) if f.tip_xy]
        if tips:
            self.tips_layer.data = np.array(tips, float)
        self._show()
        self.status.setText(f"Opened {len(frames)} frame(s) from {path}.")
