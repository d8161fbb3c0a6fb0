"""The training widget: a target placed before the needle, the demo approach scored through the
pipeline in a worker, and the session summary written."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_usguide._reader import scan_layer
from napari_usguide._training_widget import TARGET_LAYER, TrainingWidget

WAIT_MS = 120_000


def test_target_score_and_session_summary(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from usguide.demo import DemoScan, DemoScript

    script = DemoScript(needle_from=3, arrive=30, inject_from=40, frames=36)
    short = DemoScan(script=script)
    # The widget opens "demo" by name; make it this short demo.
    monkeypatch.setattr("napari_usguide._engine.open_scan", lambda spec: DemoScan(script=script))
    viewer = make_napari_viewer()
    data, kwargs, _ = scan_layer(short, name="demo")
    kwargs["metadata"]["usguide"]["source"] = "demo"
    viewer.add_image(data, **kwargs)

    widget = TrainingWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Training")
    assert widget.source_edit.text() == "demo"
    widget.trainee_edit.setText("Dr Trainee")
    widget.session_edit.setText(str(tmp_path / "session"))

    widget.score_attempt()
    assert "Place a target" in widget.status.text()  # nothing scored without a target

    viewer.dims.set_current_step(0, 1)  # before the needle appears
    widget.place_target()
    layer = viewer.layers[TARGET_LAYER]
    assert layer.mode == "add"
    x, y = short.tip_truth(30)  # where the demo's needle stops, 1.5 mm beside the nerve
    layer.add([y, x])
    assert widget.target_frame == 1 and widget.target_xy() == pytest.approx((x, y))

    widget.score_attempt()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    score = widget.last_score
    assert score is not None and score.units == "mm" and score.reached_target
    assert score.target_before_needle and score.final_tip_to_target < 1.0
    assert "time to target" in widget.result_label.text()
    with open(tmp_path / "session" / "session.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and rows[0]["trainee"] == "Dr Trainee"
    assert rows[0]["reached_target"] == "True" and rows[0]["source"] == "demo"
    attempts = json.loads((tmp_path / "session" / "session.json").read_text())["attempts"]
    assert attempts[0]["redirections"] == score.redirections
    assert np.isclose(attempts[0]["target_x"], x)
