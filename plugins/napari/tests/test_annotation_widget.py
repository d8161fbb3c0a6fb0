"""The annotation widget: pre-annotate, paint, propagate, undo and export from the viewer; the
exported dataset re-opens with the labels as edited, and carries no patient identifier."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("napari")
pytest.importorskip("pytestqt")

from napari_usguide._annotation_widget import LABELS_LAYER, TIPS_LAYER, AnnotationWidget
from napari_usguide._reader import read_scan

from usguide.annotation import AnnotationSet
from usguide.labels import NERVE, VESSEL

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))
from tests.annotation.conftest import REGION, SECRETS, write_identified_dicom

WAIT_MS = 60_000


def _scan(viewer: Any, tmp_path: Path) -> Any:
    """A DICOM with identifiers and burned-in text, opened with the plugin's reader."""
    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=4)
    data, kwargs, _ = read_scan(str(path))[0]
    return viewer.add_image(data, **kwargs)


def _fake_model(frame: Any) -> np.ndarray:
    """Nerve over the imaging region's top-left quarter (the real model is slow to load)."""
    labels = np.zeros(frame.pixels.shape[:2], np.uint8)
    x0, y0, x1, y1 = frame.region.bbox
    labels[y0 : (y0 + y1) // 2, x0 : (x0 + x1) // 2] = NERVE
    return labels


def test_annotate_propagate_undo_export_and_reopen(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    scan = _scan(viewer, tmp_path)
    widget = AnnotationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Annotation")
    widget.annotator_edit.setText("R. Searcher")
    widget._segment = _fake_model
    widget.start(scan)
    labels_layer = viewer.layers[LABELS_LAYER]
    assert labels_layer.data.shape == (4, 150, 184)
    assert tuple(labels_layer.scale) == tuple(scan.scale)

    viewer.dims.set_current_step(0, 0)
    widget.pre_annotate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    x0, y0, x1, y1 = REGION
    assert (labels_layer.data[0][y0 + 1, x0 + 1]) == NERVE
    assert labels_layer.data[0][0, 0] == 0  # outside the imaging region

    # The annotator paints a vessel and marks the tip, then propagates to the next 2 frames.
    labels_layer.data[0][y0 + 60 : y0 + 80, x0 + 100 : x0 + 120] = VESSEL
    viewer.layers[TIPS_LAYER].add([0, y0 + 30.0, x0 + 40.0])
    widget.count_spin.setValue(2)
    widget.propagate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    # Frames of this scan are different speckle: labels land somewhere, never blended.
    assert set(np.unique(labels_layer.data[1])) <= {0, NERVE, VESSEL}
    assert labels_layer.data[1].any() and labels_layer.data[2].any()
    assert not labels_layer.data[3].any()

    widget.undo()  # the propagation
    assert not labels_layer.data[1].any() and not labels_layer.data[2].any()
    assert (labels_layer.data[0] == VESSEL).any()
    # A moved tip is an undoable edit too: undo puts the point back in the tips layer.
    tips = viewer.layers[TIPS_LAYER]
    tips.data = np.array([[0, y0 + 50.0, x0 + 70.0]])
    widget.undo()
    np.testing.assert_allclose(np.asarray(tips.data), [[0, y0 + 30.0, x0 + 40.0]])
    assert (labels_layer.data[0] == VESSEL).any()

    edited = np.asarray(labels_layer.data[0]).copy()
    out = tmp_path / "dataset"
    widget.export(str(out))
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert "Exported" in widget.status.text()
    again = AnnotationSet.load(out)
    assert len(again) == 3  # frames 0-2 were touched
    first = sorted(again, key=lambda f: f.frame_index)[0]
    np.testing.assert_array_equal(first.labels, edited[y0 : y1 + 1, x0 : x1 + 1])
    assert first.tip_xy == (40.0, 30.0) and first.annotator == "R. Searcher"
    for path in out.rglob("*"):
        if path.is_file():
            data = path.read_bytes().lower()
            assert not any(s.lower().encode() in data for s in SECRETS), path.name

    # Re-open the export in a fresh widget, edit, and export again over it.
    widget2 = AnnotationWidget(viewer)
    widget2.open_dataset(str(out))
    layer2 = viewer.layers[LABELS_LAYER]
    np.testing.assert_array_equal(layer2.data[0], first.labels)
    layer2.data[0][:5, :5] = VESSEL
    widget2.export(str(out))
    qtbot.waitUntil(lambda: not widget2.busy, timeout=WAIT_MS)
    reopened = sorted(AnnotationSet.load(out), key=lambda f: f.frame_index)[0]
    assert (reopened.labels[:5, :5] == VESSEL).all() and reopened.tip_xy == (40.0, 30.0)


def test_a_label_number_that_is_no_class_is_refused_in_the_status_line(
    make_napari_viewer: Any, tmp_path: Path
) -> None:
    """napari lets the annotator paint any label number; the set refuses 5 and above, and the
    widget says so instead of raising in the Qt slot."""
    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    viewer.window.add_dock_widget(widget, name="Annotation")
    widget.start(_scan(viewer, tmp_path))
    x0, y0, _, _ = REGION
    viewer.layers[LABELS_LAYER].data[0][y0 : y0 + 10, x0 : x0 + 10] = 7
    out = tmp_path / "dataset"
    widget.export(str(out))
    assert not widget.busy and "not taken" in widget.status.text()
    assert not out.exists()
    viewer.dims.set_current_step(0, 0)
    widget.undo()
    assert "not taken" in widget.status.text()


def test_real_model_pre_annotates_a_plain_image_layer(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path
) -> None:
    import cv2

    from usguide.demo import DEMO_IMAGE

    image = cv2.imread(str(DEMO_IMAGE), cv2.IMREAD_GRAYSCALE)
    viewer = make_napari_viewer()
    layer = viewer.add_image(np.stack([image, image]), name="my scan")  # no usguide metadata
    widget = AnnotationWidget(viewer)
    widget.start()
    assert widget.scan_layer is layer
    widget.pre_annotate()
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    labels = viewer.layers[LABELS_LAYER].data
    assert (labels[0] == NERVE).sum() > 500  # the shipped model finds the demo's nerve
    assert not labels[1].any()
    widget.undo()
    assert not labels[0].any()
    widget.export(str(tmp_path / "ds"))
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert [f.key for f in AnnotationSet.load(tmp_path / "ds")] == ["my-scan_00000"]


def test_layers_over_the_scan_keep_its_mm_units(make_napari_viewer: Any) -> None:
    from conftest import add_mm_scan

    viewer = make_napari_viewer()
    scan = add_mm_scan(viewer)
    widget = AnnotationWidget(viewer)
    widget.start(scan)
    for name in (LABELS_LAYER, TIPS_LAYER):
        assert tuple(str(u) for u in viewer.layers[name].units[-2:]) == ("millimeter",) * 2
    assert str(viewer.layers.units[-1]) == "millimeter"  # the scale bar still reads mm


def test_export_and_open_errors_are_shown_in_the_status_line(
    make_napari_viewer: Any, qtbot: Any, tmp_path: Path
) -> None:
    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    widget.start(_scan(viewer, tmp_path))
    x0, y0, _, _ = REGION
    viewer.layers[LABELS_LAYER].data[0][y0 : y0 + 10, x0 : x0 + 10] = NERVE
    blocker = tmp_path / "a file"
    blocker.write_text("not a folder")
    widget.export(str(blocker / "dataset"))  # an error in the worker: shown, not raised
    qtbot.waitUntil(lambda: not widget.busy, timeout=WAIT_MS)
    assert widget.status.text().startswith("error:")
    widget.status.setText("")
    widget.open_dataset(str(tmp_path / "missing"))  # raised in the slot before
    assert widget.status.text().startswith("error:") and "missing" in widget.status.text()


def _dataset(folder: Path, spacing_mm: tuple[float, float] | None) -> Path:
    """A one-frame dataset exported from a plain frame, with or without a mm scale."""
    from usguide.frame import Frame, Region

    aset = AnnotationSet("R. Searcher")
    pixels = np.full((48, 64), 90, np.uint8)
    frame = Frame(pixels, 0, None, spacing_mm, Region.whole(48, 64), f"{folder.name}.png")
    labels = np.zeros((48, 64), np.uint8)
    labels[10:20, 10:20] = NERVE
    aset.add_frame(frame, labels)
    return aset.export(folder)


def _units(layer: Any) -> tuple[str, ...]:
    return tuple(str(u) for u in layer.units[-2:])


def test_annotating_a_scan_of_other_units_mixes_none(
    make_napari_viewer: Any, tmp_path: Path, unit_warnings: list[str]
) -> None:
    """The labels and tips kept from the last scan were removed one by one after (or before)
    the next scan's layer came: napari drew the mix at once and warned about inconsistent
    units."""
    from conftest import TEST_DATA
    from napari_usguide._reader import layers_have_units

    if not layers_have_units():
        pytest.skip("napari < 0.6 has no layer units")
    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    # Datasets: the widget opens the scan layer itself.
    widget.open_dataset(str(_dataset(tmp_path / "mm", (0.2, 0.2))))
    widget.open_dataset(str(_dataset(tmp_path / "px", None)))
    assert "Opened 1 frame" in widget.status.text()
    for name in (LABELS_LAYER, TIPS_LAYER):
        assert _units(viewer.layers[name]) == ("pixel", "pixel"), name
    widget.open_dataset(str(_dataset(tmp_path / "mm2", (0.2, 0.2))))
    for name in (LABELS_LAYER, TIPS_LAYER):
        assert _units(viewer.layers[name]) == ("millimeter",) * 2, name
        assert tuple(viewer.layers[name].scale[-2:]) == pytest.approx((0.2, 0.2)), name
    assert unit_warnings == []

    # Scans opened by the user: the first closed, another (in pixels) opened and annotated.
    viewer.layers.remove(widget.scan_layer)
    data, kwargs, _ = read_scan(str(TEST_DATA / "dicom" / "US1_UNCR.dcm"))[0]
    scan = viewer.add_image(data, **kwargs)
    unit_warnings.clear()  # the last annotation's layers beside the new scan: napari's to say
    widget.start(scan)
    for name in (LABELS_LAYER, TIPS_LAYER):
        assert _units(viewer.layers[name]) == ("pixel", "pixel"), name
    assert unit_warnings == []


def _secret_free(text: str, tmp_path: Path) -> bool:
    return str(tmp_path) not in text and not any(s.lower() in text.lower() for s in SECRETS)


def test_a_scan_whose_pseudonym_no_longer_resolves_is_refused_plainly(
    make_napari_viewer: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A DICOM layer from an earlier session (its pseudonym unknown here), or whose file has
    moved, raised in the Qt slot (a traceback naming the path). Annotating its pixels alone
    would skip the identifier checks and the crop to the imaging region: the scan must be
    opened again, and the status line says so."""
    from napari_usguide import _reader

    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    scan = _scan(viewer, tmp_path)
    path = Path(_reader._PRIVATE_SOURCES[scan.metadata["usguide"]["source"]])
    path.rename(tmp_path / "moved.dcm")
    widget.start(scan)
    assert "opened again" in widget.status.text() and _secret_free(widget.status.text(), tmp_path)
    assert widget.aset is None and LABELS_LAYER not in viewer.layers

    monkeypatch.setattr(_reader, "_PRIVATE_SOURCES", {})  # another napari session
    widget.start(scan)
    assert "opened again" in widget.status.text() and _secret_free(widget.status.text(), tmp_path)
    # Looked up by its name when its metadata is gone (a layer saved and opened again).
    bare = viewer.add_image(np.asarray(scan.data), name=scan.name)
    widget.start(bare)
    assert "opened again" in widget.status.text() and widget.aset is None


def test_a_scan_that_is_open_again_is_annotated_from_its_file(
    make_napari_viewer: Any, tmp_path: Path
) -> None:
    """A layer named by a pseudonym this session knows, without the metadata, reads its frames
    from the file: the imaging region and the identifiers to check come with them."""
    viewer = make_napari_viewer()
    widget = AnnotationWidget(viewer)
    scan = _scan(viewer, tmp_path)
    bare = viewer.add_image(np.asarray(scan.data), name=scan.name)
    widget.start(bare)
    assert widget.aset is not None and widget._source is not None
    assert widget._read_frame(0).region.bbox == REGION
