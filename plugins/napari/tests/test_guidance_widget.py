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


def _open(
    viewer: Any, qtbot: Any, *, speed: str = "every frame (as fast as it goes)", source: str = ""
) -> Any:
    widget = GuidanceWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Needle guidance")
    widget.speed_combo.setCurrentText(speed)
    widget.source_edit.setText(source)
    widget.open_scan()  # an empty source field means the demo scan
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


def _image_folder(folder: Any, *, rgb_from: int | None = None, corrupt: int | None = None) -> Any:
    """Six grey frames of the bundled test image; from ``rgb_from`` on in colour, and frame
    ``corrupt`` not an image at all."""
    import cv2
    from conftest import TEST_DATA

    grey = cv2.imread(str(TEST_DATA / "usgra-seg" / "images" / "0002.png"), cv2.IMREAD_GRAYSCALE)
    for i in range(6):
        path = folder / f"f{i}.png"
        if i == corrupt:
            path.write_bytes(b"not a png at all")
        elif rgb_from is not None and i >= rgb_from:
            colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
            colour[..., 0] //= 2  # tinted: a colour frame, not grey stored as RGB
            cv2.imwrite(str(path), colour)
        else:
            cv2.imwrite(str(path), grey)
    return folder


def test_closing_the_dock_or_the_viewer_ends_the_pipeline_process(
    make_napari_viewer: Any, qtbot: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)
    child = widget.engine._process
    viewer.window.remove_dock_widget(widget)  # the dock's close button, paused
    qtbot.waitUntil(lambda: child.poll() is not None, timeout=15_000)
    assert widget.engine is None

    # Closing the viewer while playing: no error from a deleted widget, and the child ends.
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)
    child = widget.engine._process
    widget.play()
    qtbot.waitUntil(lambda: widget.displayed >= 3, timeout=WAIT_MS)
    viewer.close()
    qtbot.waitUntil(lambda: child.poll() is not None, timeout=15_000)


def test_a_pipeline_process_that_dies_while_playing_is_reported(
    make_napari_viewer: Any, qtbot: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot, speed=next(iter(SPEEDS)))
    child = widget.engine._process
    widget.play()
    qtbot.waitUntil(lambda: widget.displayed >= 3, timeout=WAIT_MS)
    child.kill()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=15_000)
    assert "pipeline process ended" in widget.position_label.text()
    assert widget.play_button.text() == "Play" and not widget.play_button.isChecked()
    assert widget.open_button.isEnabled() and not widget.play_button.isEnabled()
    assert widget.engine is None and child.returncode is not None  # reaped, not a zombie


def test_an_error_while_playing_stays_on_screen(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot, source=str(_image_folder(tmp_path, corrupt=3)))
    widget.play()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    assert widget._shown.index == 2
    assert "error" in widget.position_label.text()
    assert "f3.png" in widget.position_label.text()
    widget.stop()


def test_keys_and_groove_clicks_on_the_slider_seek(make_napari_viewer: Any, qtbot: Any) -> None:
    from qtpy.QtWidgets import QAbstractSlider

    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)
    last = widget.engine.frame_count - 1
    widget.slider.triggerAction(QAbstractSlider.SliderToMaximum)  # the End key
    qtbot.waitUntil(lambda: widget._worker is None and widget._shown.index == last, timeout=WAIT_MS)
    widget.slider.triggerAction(QAbstractSlider.SliderPageStepSub)  # a click on the groove
    # A second move while the first seek runs is sought when it is done.
    widget.slider.triggerAction(QAbstractSlider.SliderPageStepSub)
    target = widget.slider.value()
    assert target == last - 2 * widget.slider.pageStep()
    qtbot.waitUntil(
        lambda: widget._worker is None and widget._shown.index == target, timeout=WAIT_MS
    )
    widget.stop()


def test_a_scan_turning_from_grey_to_colour_shows_colour_frames(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Any
) -> None:
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot, source=str(_image_folder(tmp_path, rgb_from=1)))
    assert not viewer.layers[LAYER_NAMES["frame"]].rgb
    widget.step()
    qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
    frame = viewer.layers[LAYER_NAMES["frame"]]
    assert widget._shown.pixels.ndim == 3
    assert frame.rgb and frame.ndim == 2 and viewer.dims.ndim == 2
    assert frame is widget.layers["frame"] and len(viewer.layers) == len(LAYER_NAMES)
    assert viewer.layers.index(frame) == 0  # under the labels and the needle, as before
    widget.stop()


def test_switching_between_mm_and_pixel_scans_keeps_every_layer_in_the_scans_units(
    make_napari_viewer: Any, qtbot: Any, unit_warnings: list[str]
) -> None:
    """Kept layers took the new scan's units one by one while the frame layer was recreated
    (grey <-> colour): napari drew the mix at once and warned about inconsistent units."""
    from conftest import TEST_DATA
    from napari_usguide._reader import layers_have_units

    from usguide.demo import DEMO_SPACING_MM

    uncalibrated = str(TEST_DATA / "dicom" / "US1_UNCR.dcm")  # colour, no mm scale
    viewer = make_napari_viewer()
    widget = _open(viewer, qtbot)  # the demo: grey, mm
    for source, mm in ((uncalibrated, None), ("demo", DEMO_SPACING_MM)):
        widget.source_edit.setText(source)
        widget.open_scan()
        qtbot.waitUntil(
            lambda: widget._worker is None and widget._shown is not None, timeout=WAIT_MS
        )
        assert widget.layers["frame"].rgb == (mm is None)  # the frame layer was recreated
        for name in LAYER_NAMES.values():
            layer = viewer.layers[name]
            assert tuple(layer.scale) == pytest.approx((mm or 1.0,) * 2), name
            if layers_have_units():
                unit = "millimeter" if mm else "pixel"
                assert tuple(str(u) for u in layer.units) == (unit, unit), name
        assert len(viewer.layers) == len(LAYER_NAMES)
    assert unit_warnings == []
    widget.stop()


def test_a_pseudonym_that_no_longer_resolves_says_to_open_the_scan_again(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Any, monkeypatch: Any
) -> None:
    """The source field holds a DICOM's pseudonym: from another session it failed as "no such
    file", and a file moved since it was opened failed naming its path (the patient's name)."""
    import sys
    from pathlib import Path

    from napari_usguide import _reader

    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    label = _reader.read_scan(str(path))[0][1]["metadata"]["usguide"]["source"]
    viewer = make_napari_viewer()
    widget = GuidanceWidget(viewer)
    path.rename(tmp_path / "moved.dcm")
    for registry in (_reader._PRIVATE_SOURCES, {}):  # moved; then another session
        monkeypatch.setattr(_reader, "_PRIVATE_SOURCES", registry)
        widget.source_edit.setText(label)
        widget.open_scan()
        qtbot.waitUntil(lambda: widget._worker is None, timeout=WAIT_MS)
        said = widget.position_label.text()
        assert label in said and "opened again" in said, said
        assert str(tmp_path) not in said and not any(s.lower() in said.lower() for s in SECRETS)
        assert widget.engine is None and len(viewer.layers) == 0
