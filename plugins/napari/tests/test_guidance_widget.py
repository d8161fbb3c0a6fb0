"""The guidance widget: the pipeline plays in a worker, the layers update in place, targets
edited in the viewer reach the pipeline, and a screenshot shows the overlays."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_usguide._guidance_widget import LAYER_NAMES, SPEEDS, GuidanceWidget

WAIT_MS = 120_000  # opening loads the ONNX model; CI machines are slow


def _open(viewer: Any, qtbot: Any, *, speed: str = "every frame (as fast as it goes)") -> Any:
    widget = GuidanceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Needle guidance")
    widget.speed_combo.setCurrentText(speed)
    widget.open_scan()  # the empty source field means the demo scan
    qtbot.waitUntil(lambda: widget._worker is None and widget._shown is not None, timeout=WAIT_MS)
    return widget


def _yellow(image: np.ndarray) -> int:
    """Pixels tinted with the nerve's yellow (255, 220, 0) over grey: red and green well
    above blue. Grey ultrasound has none."""
    r, g, b = (image[..., i].astype(int) for i in range(3))
    return int(np.count_nonzero((r - b > 60) & (g - b > 50)))


def test_widget_plays_the_demo_in_a_worker_and_updates_layers_in_place(
    make_napari_viewer: Any, qtbot: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)
    layers = {key: viewer.layers[name] for key, name in LAYER_NAMES.items()}
    assert layers["frame"].scale[-1] == pytest.approx(0.08)  # the demo's assumed mm scale
    assert widget._shown.index == 0
    overlay_layer = layers["overlay"]

    layer_list = viewer.window._qt_viewer.layers
    widget.play()
    assert widget._playing and layers["overlay"].visible and not layers["labels"].visible
    assert not layer_list.updatesEnabled()  # nothing in it changes while playing
    # The GUI thread stays free while the worker runs: results arrive while it plays.
    qtbot.waitUntil(lambda: widget.displayed >= 8, timeout=WAIT_MS)
    assert widget._worker is not None
    widget.pause()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert layer_list.updatesEnabled()  # paused: the layer list is live again

    engine = widget.engine
    shown = widget._shown
    assert shown.index == engine.next_index - 1 >= 7  # 8 shown: frames 0-7 at least
    assert viewer.layers[LAYER_NAMES["overlay"]] is overlay_layer  # never recreated
    assert len(viewer.layers) == len(LAYER_NAMES)
    # Paused: the separate layers hold the newest result.
    assert not layers["overlay"].visible and layers["labels"].visible
    np.testing.assert_array_equal(layers["labels"].data, shown.labels)
    assert 1 in np.unique(layers["labels"].data)  # the nerve is found
    np.testing.assert_array_equal(layers["frame"].data, shown.pixels)
    assert widget.skipped >= 0 and widget.display_fps > 0
    assert "fps" in widget.stats_label.text() and "latency" in widget.stats_label.text()

    # Step on: one more frame, shown in the editable layers.
    widget.step()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert widget._shown.index == shown.index + 1
    widget.stop()


def test_targets_edited_in_the_viewer_reach_the_pipeline(
    make_napari_viewer: Any, qtbot: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)
    engine = widget.engine
    targets = viewer.layers[LAYER_NAMES["targets"]]
    before = {t.id for t in engine.targets()}

    targets.add([[200.0, 300.0]])  # (row, col) in data pixels
    added = {t.id: t for t in engine.targets()}.keys() - before
    assert len(added) == 1
    (new_id,) = added
    assert {t.id: t.xy for t in engine.targets()}[new_id] == pytest.approx((300.0, 200.0))

    moved = targets.data.copy()
    moved[-1] = (220.0, 310.0)
    targets.data = moved
    assert {t.id: t.xy for t in engine.targets()}[new_id] == pytest.approx((310.0, 220.0))

    targets.selected_data = {len(targets.data) - 1}
    targets.remove_selected()
    assert new_id not in {t.id for t in engine.targets()}

    # A target placed in the viewer is in the next frame's guidance.
    targets.add([[150.0, 320.0]])
    widget.step()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    xy = [t.xy for t in widget._shown.guidance.targets if t.kind == "user"]
    assert any(abs(x - 320.0) < 3 and abs(y - 150.0) < 3 for x, y in xy)
    widget.stop()


def test_screenshot_shows_the_overlays(make_napari_viewer: Any, qtbot: Any) -> None:
    viewer = make_napari_viewer(show=True)  # a hidden viewer screenshots black
    widget = _open(viewer, qtbot, speed=next(iter(SPEEDS)))
    for _ in range(3):
        widget.step()
        qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    paused = viewer.screenshot(canvas_only=True, flash=False)
    assert _yellow(paused) > 200, "the nerve's colour is missing from the paused layers"

    widget.play()
    qtbot.waitUntil(lambda: widget.displayed >= 8, timeout=WAIT_MS)
    playing = viewer.screenshot(canvas_only=True, flash=False)
    widget.pause()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert _yellow(playing) > 200, "the nerve's colour is missing from the playing overlay"
    widget.stop()


def test_a_bad_source_is_reported_not_raised(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Any
) -> None:
    viewer = make_napari_viewer()
    widget = GuidanceWidget(viewer)
    widget.source_edit.setText(str(tmp_path / "missing.dcm"))
    widget.open_scan()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert widget.engine is None
    assert "error" in widget.position_label.text() and "missing.dcm" in widget.position_label.text()
    assert not widget.play_button.isEnabled()
    assert len(viewer.layers) == 0
