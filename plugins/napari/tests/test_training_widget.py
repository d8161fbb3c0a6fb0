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


def test_target_layer_takes_the_current_scans_scale_and_units(make_napari_viewer: Any) -> None:
    from conftest import add_mm_scan
    from napari_usguide._reader import layers_have_units
    from napari_usguide._sample_data import demo_scan

    viewer = make_napari_viewer()
    first = add_mm_scan(viewer, need_units=False)
    widget = TrainingWidget(viewer)
    widget.place_target()  # made at the first scan's 0.262 mm per pixel
    viewer.layers.remove(first)
    data, kwargs, _ = demo_scan()[0]
    demo = viewer.add_image(data, **kwargs)  # the next recording, 0.08 mm per pixel
    viewer.layers.selection.active = demo
    widget.place_target()
    target = viewer.layers[TARGET_LAYER]
    assert tuple(target.scale) == pytest.approx(tuple(demo.scale[-2:]))
    # A click on demo pixel (x 320, y 256), as napari's add mode places it, scores there.
    target.add(target.world_to_data(demo.data_to_world([0, 256.0, 320.0])[-2:]))
    assert widget.target_xy() == pytest.approx((320.0, 256.0))
    if layers_have_units():
        assert tuple(str(u) for u in target.units) == tuple(str(u) for u in demo.units[-2:])


def test_a_session_folder_that_cannot_be_written_keeps_the_score(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    from usguide.demo import DemoScan, DemoScript

    script = DemoScript(needle_from=3, arrive=30, inject_from=40, frames=36)
    monkeypatch.setattr("napari_usguide._engine.open_scan", lambda spec: DemoScan(script=script))
    viewer = make_napari_viewer()
    data, kwargs, _ = scan_layer(DemoScan(script=script), name="demo")
    viewer.add_image(data, **kwargs)
    widget = TrainingWidget(viewer)
    blocker = tmp_path / "session"
    blocker.write_text("a file, not a folder")
    widget.session_edit.setText(str(blocker))
    viewer.dims.set_current_step(0, 1)
    widget.place_target()
    viewer.layers[TARGET_LAYER].add([200.0, 300.0])
    widget.score_attempt()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert "not saved" in widget.status.text()
    assert widget.last_score is not None and "final tip to target" in widget.result_label.text()


def test_target_layer_follows_the_scan_opened_next_without_mixing_units(
    make_napari_viewer: Any, unit_warnings: list[str]
) -> None:
    """The target layer took the scan's units only when "Place target" was pressed: after the
    scan was closed and one without a mm scale opened, napari warned about inconsistent units."""
    from conftest import TEST_DATA, add_mm_scan
    from napari_usguide._reader import read_scan

    viewer = make_napari_viewer()
    first = add_mm_scan(viewer)
    widget = TrainingWidget(viewer)
    widget.place_target()
    viewer.layers[TARGET_LAYER].add([120.0, 200.0])
    viewer.layers.remove(first)
    data, kwargs, _ = read_scan(str(TEST_DATA / "dicom" / "US1_UNCR.dcm"))[0]
    viewer.add_image(data, **kwargs)  # opened by the user, not through the widget
    target = viewer.layers[TARGET_LAYER]
    assert tuple(str(u) for u in target.units) == ("pixel", "pixel")
    assert tuple(target.scale) == pytest.approx((1.0, 1.0))
    assert widget.target_xy() == pytest.approx((200.0, 120.0))  # the trainee's point is kept
    assert unit_warnings == []


def test_a_recording_whose_pseudonym_no_longer_resolves_says_to_open_it_again(
    make_napari_viewer: Any, qtbot: Any, monkeypatch: Any
) -> None:
    """A session summary records a DICOM's pseudonym; typed in a later session it failed as
    "no such file" instead of saying what to do."""
    from napari_usguide import _reader

    monkeypatch.setattr(_reader, "_PRIVATE_SOURCES", {})  # another napari session
    viewer = make_napari_viewer()
    widget = TrainingWidget(viewer)
    widget.source_edit.setText("source-0123456789")
    widget.place_target()
    viewer.layers[TARGET_LAYER].add([200.0, 300.0])
    widget.score_attempt()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert "source-0123456789" in widget.status.text()
    assert "opened again" in widget.status.text()
