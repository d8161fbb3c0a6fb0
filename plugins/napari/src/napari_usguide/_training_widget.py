"""Training mode: the trainee places a target before the needle appears, then the recorded
approach is scored (:mod:`usguide.approach_score`) and added to the session summary.

The widget is thin: scoring, units and the summary files are the core's. The recording is
played through the pipeline (segmentation and needle tracking) in a napari ``thread_worker``,
so the viewer stays responsive.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from qtpy.QtWidgets import (
    QFormLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from napari_usguide._paths import path_row
from napari_usguide._reader import conform, placement_over, private_worker, redact

if TYPE_CHECKING:
    import napari

    from usguide.approach_score import ApproachScore

TARGET_LAYER = "usguide trainee target"
DEFAULT_SESSION = Path.home() / "usguide-training"


class TrainingWidget(QWidget):
    """Place a target, score the recorded approach, keep the session summary.

    Parameters
    ----------
    napari_viewer : napari.viewer.Viewer
        Injected by napari.

    Notes
    -----
    The target is the last point of the ``usguide trainee target`` layer, in the scan's pixels.
    The frame shown when it was placed is recorded: a target placed once the needle is already
    visible is flagged in the score.
    """

    def __init__(self, napari_viewer: napari.viewer.Viewer) -> None:
        super().__init__()
        self.viewer = napari_viewer
        self._worker: Any = None
        self.target_frame: int | None = None
        self.last_score: ApproachScore | None = None
        self.last_row: dict[str, Any] | None = None
        self.model: str | None = None  # None: the shipped model

        self.source_edit = QLineEdit()
        self.source_edit.setPlaceholderText("demo (or a DICOM cine, video, image folder)")
        self.trainee_edit = QLineEdit()
        self.session_edit = QLineEdit(str(DEFAULT_SESSION))
        self.place_button = QPushButton("Place target")
        self.place_button.clicked.connect(self.place_target)
        self.score_button = QPushButton("Score attempt")
        self.score_button.clicked.connect(self.score_attempt)
        self.status = QLabel("Go to a frame before the needle appears and place the target.")
        self.status.setWordWrap(True)
        self.result_label = QLabel("")
        self.result_label.setWordWrap(True)

        form = QFormLayout()
        form.addRow(
            "recording", path_row(self, self.source_edit, folder=False, caption="Open a recording")
        )
        form.addRow("trainee", self.trainee_edit)
        form.addRow(
            "session folder",
            path_row(self, self.session_edit, folder=True, caption="Session summary folder"),
        )
        layout = QVBoxLayout(self)
        layout.addLayout(form)
        layout.addWidget(self.place_button)
        layout.addWidget(self.score_button)
        layout.addWidget(self.status)
        layout.addWidget(self.result_label)
        notice = QLabel("Training on recorded scans only. Not a medical device.")
        notice.setWordWrap(True)
        layout.addWidget(notice)
        layout.addStretch(1)
        self._prefill_source()
        # The target follows the scan as soon as one is opened or closed, not only at "Place
        # target": left in the last scan's units beside the next one, napari warned.
        self.viewer.layers.events.inserted.connect(self._follow_scan)
        self.viewer.layers.events.removed.connect(self._follow_scan)

    # -- the scan and the target -----------------------------------------------------------------
    def _scan_layer(self) -> Any:
        """The image layer opened by this plugin's reader (it carries ``metadata["usguide"]``)."""
        active = self.viewer.layers.selection.active
        layers = [active, *self.viewer.layers] if active is not None else list(self.viewer.layers)
        for layer in layers:
            if getattr(layer, "metadata", {}).get("usguide"):
                return layer
        return None

    def _prefill_source(self) -> None:
        layer = self._scan_layer()
        if layer is not None and layer.metadata["usguide"].get("source"):
            self.source_edit.setText(str(layer.metadata["usguide"]["source"]))

    def _current_frame(self) -> int:
        """The frame on screen: the first slider of a stack, 0 for a single image."""
        layer = self._scan_layer()
        if self.viewer.dims.ndim >= 3 and (layer is None or layer.ndim >= 3):
            return int(self.viewer.dims.current_step[0])
        return 0

    def target_layer(self) -> Any:
        """The points layer that holds the target (made once), at the current scan's scale and
        units: its data are that scan's pixels, whichever scan came first."""
        placement = placement_over(self._scan_layer(), 2)
        if TARGET_LAYER in self.viewer.layers:
            layer = self.viewer.layers[TARGET_LAYER]
            conform([layer], placement)
            return layer
        layer = self.viewer.add_points(
            np.zeros((0, 2)),
            ndim=2,
            name=TARGET_LAYER,
            symbol="cross",
            size=12,
            face_color="#ff40ff",
            **placement,
        )
        layer.events.data.connect(self._target_moved)
        return layer

    def _follow_scan(self, event: Any = None) -> None:
        """A scan layer opened or closed: the target layer (if any) takes the scan's scale and
        units; its points, in scan pixels, stay."""
        if TARGET_LAYER in self.viewer.layers:
            conform([self.viewer.layers[TARGET_LAYER]], placement_over(self._scan_layer(), 2))

    def place_target(self) -> None:
        """Select the target layer in add mode; the next click places the target."""
        layer = self.target_layer()
        self.viewer.layers.selection.active = layer
        layer.mode = "add"
        self.status.setText("Click the target on the image.")

    def _target_moved(self, event: Any = None) -> None:
        self.target_frame = self._current_frame()
        self.status.setText(f"Target placed on frame {self.target_frame}.")

    def target_xy(self) -> tuple[float, float] | None:
        """The target in scan pixels ``(x, y)``: the last point of the target layer."""
        if TARGET_LAYER not in self.viewer.layers:
            return None
        data = np.asarray(self.viewer.layers[TARGET_LAYER].data)
        if not len(data):
            return None
        y, x = data[-1][-2:]
        return float(x), float(y)

    # -- scoring -------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._worker is not None

    def score_attempt(self) -> None:
        """Score the recording against the target in a worker, then add it to the session."""
        target = self.target_xy()
        if target is None:
            self.status.setText("Place a target first.")
            return
        if self._worker is not None:
            return
        spec = self.source_edit.text().strip() or "demo"
        self.status.setText("Scoring the recorded approach …")
        self.score_button.setEnabled(False)
        # An error is shown in the status line (_failed), not raised again.
        worker = private_worker(_score, spec, target, self.target_frame, self.model)
        worker.returned.connect(lambda score: self._scored(score, spec))
        worker.errored.connect(self._failed)
        worker.finished.connect(self._finished)
        self._worker = worker
        worker.start()

    def _scored(self, score: ApproachScore, spec: str) -> None:
        from usguide.approach_score import SessionSummary

        # The score is shown whether or not the session files can be written.
        self.last_score = score
        self.result_label.setText("\n".join(score.lines()))
        folder = Path(self.session_edit.text().strip() or DEFAULT_SESSION)
        try:
            summary = SessionSummary(
                folder / "session.csv", folder / "session.json", trainee=self.trainee_edit.text()
            )
            self.last_row = summary.append(score, source=spec)
        except (OSError, ValueError) as error:
            self.last_row = None
            self.status.setText(f"Attempt scored but not saved: {error}")
            return
        self.status.setText(f"Attempt {self.last_row['attempt']} saved to {folder}.")

    def _failed(self, error: BaseException) -> None:
        self.status.setText(f"error: {redact(str(error))}")  # a source's error names its file

    def _finished(self) -> None:
        self._worker = None
        self.score_button.setEnabled(True)


def _score(
    spec: str, target: tuple[float, float], target_frame: int | None, model: str | None
) -> ApproachScore:
    """Worker body: open the recording, play it through the pipeline, score it."""
    from napari_usguide._engine import open_scan
    from napari_usguide._reader import resolve_source
    from usguide.approach_score import pipeline_analyser, score_recording

    source = open_scan(resolve_source(spec))  # the summary records spec: a DICOM's pseudonym
    try:
        return score_recording(
            source, target, target_frame=target_frame, analyse=pipeline_analyser(model)
        )
    finally:
        source.close()
