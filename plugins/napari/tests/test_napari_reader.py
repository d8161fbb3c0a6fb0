"""The reader: DICOM cines, videos and image folders as layers with the mm scale; sample data."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TEST_DATA, shared_data_dir

pytest.importorskip("napari")

from napari_usguide._reader import napari_get_reader
from napari_usguide._sample_data import demo_scan

DICOM = TEST_DATA / "dicom"


def _read(path: Path) -> tuple[object, dict, str]:
    reader = napari_get_reader(str(path))
    assert reader is not None, path
    layers = reader(str(path))
    assert len(layers) == 1
    return layers[0]


def test_shared_sonosite_cine_has_its_mm_scale() -> None:
    root = shared_data_dir()
    path = root / "dicom-us" / "color3d_jpeg_baseline.dcm" if root else None
    if path is None or not path.exists():
        pytest.skip("shared SonoSite cine absent (../shared/data/dicom-us)")
    data, kwargs, kind = _read(path)
    assert kind == "image"
    assert data.shape == (120, 480, 640, 3)
    assert kwargs["rgb"] is True
    assert kwargs["scale"] == pytest.approx((1.0, 0.5105, 0.5105), abs=5e-5)
    meta = kwargs["metadata"]["usguide"]
    assert meta["units"] == "mm" and meta["frames"] == 120
    assert meta["frame_time_s"] == pytest.approx(1 / 30, rel=1e-3)
    # Lazy: a frame is decoded when asked for, and matches the source's own decoding.
    frame = np.asarray(data[7])
    from usguide.sources import open_source

    with open_source(path) as source:
        np.testing.assert_array_equal(frame, source.read(7).pixels)


def test_bundled_two_frame_dicom_has_its_mm_scale() -> None:
    data, kwargs, _ = _read(DICOM / "OBXXXX1A_rle_2frame.dcm")
    assert data.shape[:3] == (2, 600, 800)
    assert kwargs["scale"] == pytest.approx((1.0, 0.26229, 0.26229), abs=5e-5)
    assert "uncalibrated" not in kwargs["name"]
    assert np.asarray(data[1]).dtype == np.uint8


def test_single_frame_dicom_is_2d() -> None:
    data, kwargs, _ = _read(DICOM / "OBXXXX1A.dcm")
    assert data.shape[:2] == (600, 800)
    assert len(kwargs["scale"]) == 2


def test_uncalibrated_scan_stays_in_pixels_and_says_so() -> None:
    _, kwargs, _ = _read(DICOM / "US1_UNCR.dcm")
    assert kwargs["scale"] == (1.0, 1.0)
    assert "uncalibrated" in kwargs["name"]
    assert kwargs["metadata"]["usguide"]["spacing_mm"] is None
    assert "units" not in kwargs


def test_dicom_layer_shows_no_patient_identifier(tmp_path: Path) -> None:
    import sys

    from napari_usguide._reader import resolve_source

    sys.path.insert(0, str(TEST_DATA.parents[1]))
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    _, kwargs, _ = _read(path)
    shown = (kwargs["name"] + repr(kwargs["metadata"])).upper()
    assert [s for s in SECRETS if s.upper() in shown] == []
    assert kwargs["name"].startswith("source-")
    # The widgets reopen the scan from the pseudonym the metadata carries.
    assert resolve_source(kwargs["metadata"]["usguide"]["source"]) == str(path)
    assert resolve_source("demo") == "demo"


def test_image_folder_is_a_stack(tmp_path: Path) -> None:
    import shutil

    image = TEST_DATA / "usgra-seg" / "images" / "0002.png"
    for name in ("f1.png", "f2.png", "f10.png"):
        shutil.copy(image, tmp_path / name)
    data, kwargs, _ = _read(tmp_path)
    assert data.shape[0] == 3
    assert kwargs["scale"] == (1.0, 1.0, 1.0)  # PNGs carry no calibration
    assert "uncalibrated" in kwargs["name"]


@pytest.mark.parametrize("odd", ["smaller", "colour"])
def test_image_folder_of_mixed_sizes_or_colours_is_refused(tmp_path: Path, odd: str) -> None:
    import cv2

    grey = cv2.imread(str(TEST_DATA / "usgra-seg" / "images" / "0002.png"), cv2.IMREAD_GRAYSCALE)
    cv2.imwrite(str(tmp_path / "f1.png"), grey)
    other = grey[:200, :300] if odd == "smaller" else cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    cv2.imwrite(str(tmp_path / "f2.png"), other)
    reader = napari_get_reader(str(tmp_path))
    assert reader is not None
    with pytest.raises(ValueError, match="images differ"):
        reader(str(tmp_path))


def test_reader_declines_what_it_cannot_read(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a scan")
    assert napari_get_reader(str(tmp_path / "notes.txt")) is None
    assert napari_get_reader(str(tmp_path)) is None  # a folder without images
    assert napari_get_reader([str(DICOM / "OBXXXX1A.dcm")] * 2) is None


def test_demo_sample_is_a_lazy_cine_with_its_assumed_scale() -> None:
    from usguide.demo import DEMO_SPACING_MM, DemoScan

    (data, kwargs, kind), *_ = demo_scan()
    assert kind == "image"
    assert data.shape == (DemoScan().frame_count, 512, 640)
    assert kwargs["scale"][1:] == (DEMO_SPACING_MM, DEMO_SPACING_MM)
    assert "assumed" in kwargs["name"]
    assert kwargs["metadata"]["usguide"]["source"] == "demo"
    assert np.asarray(data[40]).std() > 10


def test_manifest_declares_reader_sample_and_widget() -> None:
    from npe2 import PluginManifest

    manifest = PluginManifest.from_distribution("napari-usguide")
    contributions = manifest.contributions
    assert any("*.dcm" in r.filename_patterns for r in contributions.readers or [])
    assert [s.key for s in contributions.sample_data or []] == ["demo_scan"]
    assert "napari-usguide.guidance_widget" in {w.command for w in contributions.widgets or []}
    import importlib

    for command in contributions.commands or []:  # every command's python name resolves
        module, _, attr = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attr))
    from npe2 import PluginManager

    pm = PluginManager()
    pm.register(manifest)
    readers = list(pm.iter_compatible_readers([str(DICOM / "color3d_jpeg_baseline.dcm")]))
    assert [r.plugin_name for r in readers] == ["napari-usguide"]


def test_a_pseudonym_from_another_session_says_to_open_the_scan_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pseudonym leads back to its file only in the session that made it: elsewhere (a layer
    kept in a saved project, one typed from a session summary) it was passed on as a file name
    and failed as "no such file"; a file moved since it was opened failed naming its path."""
    import sys

    from napari_usguide import _reader
    from napari_usguide._reader import ScanNotOpenError, redact, resolve_source

    sys.path.insert(0, str(TEST_DATA.parents[1]))
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    twin = tmp_path / "Elsewhere"  # a file of the same name in another folder, opened first
    twin.mkdir()
    _read(write_identified_dicom(twin / "DOELITTLE_scan.dcm", frames=2))
    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    _, kwargs, _ = _read(path)
    label = kwargs["metadata"]["usguide"]["source"]
    # Said about a path in this session's registry: its pseudonym instead, never the path.
    said = redact(f"{path}: frame 2 is truncated ({path.name}, '{path.resolve()}')")
    assert str(tmp_path) not in said and [s for s in SECRETS if s in said] == []
    assert said.startswith(f"{label}: frame 2")

    path.rename(tmp_path / "moved.dcm")  # moved after it was opened
    with pytest.raises(ScanNotOpenError, match="opened again") as moved:
        resolve_source(label)
    monkeypatch.setattr(_reader, "_PRIVATE_SOURCES", {})  # another napari session
    with pytest.raises(ScanNotOpenError, match="opened again") as other:
        resolve_source(f" {label} ")
    for error in (moved.value, other.value):
        assert str(error).startswith(f"{label}: ") and str(tmp_path) not in str(error)
    assert resolve_source("demo") == "demo"
    assert resolve_source(str(path)) == str(path)  # a path is left to the opener


def test_a_dicoms_warnings_name_its_pseudonym_not_its_path(tmp_path: Path) -> None:
    """usguide's warnings about a DICOM (a rejected ultrasound region, frame times) name its
    file, and napari shows Python warnings as notifications: opening the scan, with the reader
    or in the annotation widget, showed the path (the patient's name in its folder and file
    name) although the layer and every error line say the pseudonym."""
    import sys
    import warnings

    import pydicom
    from napari_usguide._engine import open_scan
    from napari_usguide._reader import redacting_warnings, resolve_source

    sys.path.insert(0, str(TEST_DATA.parents[1]))
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    ds = pydicom.dcmread(path)
    ds.SequenceOfUltrasoundRegions[0].RegionLocationMaxX1 = 5000  # past the image: rejected
    ds.save_as(path)

    def said(open_it: object) -> list[str]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            open_it()  # type: ignore[operator]
        # ResourceWarning (a layer's source closed by the garbage collector) is ignored unless
        # asked for: napari never shows it.
        return [str(w.message) for w in caught if not issubclass(w.category, ResourceWarning)]

    read = said(lambda: _read(path))
    label = _read(path)[1]["metadata"]["usguide"]["source"]

    def reopen() -> None:
        with redacting_warnings():
            open_scan(resolve_source(label)).close()

    for messages in (read, said(reopen)):
        assert any("rejected" in m for m in messages), messages
        for message in messages:
            assert str(tmp_path) not in message and "DOELITTLE" not in message, message
            assert not any(s.lower() in message.lower() for s in SECRETS), message
            if "rejected" in message:
                assert message.startswith(f"{label}: "), message


def test_a_dicoms_file_name_ending_a_sentence_is_redacted(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A message naming a DICOM by its file name alone, that name ending a sentence ("cannot
    read SMITH_JOHN.dcm."), kept the name: the full stop was taken for part of a longer
    name. Another file whose name merely starts the same is still left alone."""
    from napari_usguide import _reader
    from napari_usguide._reader import redact

    monkeypatch.setattr(
        _reader, "_PRIVATE_SOURCES", {"source-0123456789": "/d/Doe John/DOELITTLE_scan.dcm"}
    )
    assert redact("cannot read DOELITTLE_scan.dcm.") == "cannot read source-0123456789."
    assert redact("DOELITTLE_scan.dcm... gone") == "source-0123456789... gone"
    assert redact("DOELITTLE_scan.dcm.bak") == "DOELITTLE_scan.dcm.bak"


@pytest.mark.parametrize("cut", [0.3, 0.7])
def test_an_unreadable_dicoms_error_names_its_pseudonym_not_its_path(
    tmp_path: Path, cut: float
) -> None:
    """napari shows a reader's error as a notification: a DICOM cut short (in its header, or in
    its pixels) named its path, the patient's name in its folder and file name."""
    import sys

    from napari_usguide._reader import resolve_source

    from usguide.errors import UsguideError

    sys.path.insert(0, str(TEST_DATA.parents[1]))
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * cut)])
    reader = napari_get_reader(str(path))
    assert reader is not None
    with pytest.raises(UsguideError) as caught:
        reader(str(path))
    error = caught.value
    message = str(error)
    assert message.startswith("source-") and error.source == message.split(":")[0]
    assert str(tmp_path) not in message and "DOELITTLE" not in message, message
    assert not any(s.lower() in message.lower() for s in SECRETS), message
    assert error.__cause__ is None and error.__suppress_context__
    assert resolve_source(error.source) == str(path)  # the pseudonym still leads to the file


def test_a_workers_errors_and_warnings_reach_napari_redacted(tmp_path: Path, qtbot: Any) -> None:
    """napari shows every worker's errors and warnings as notifications: a scan's pipeline,
    scoring and annotation work run in workers, and their errors and warnings name the file."""
    import sys
    import warnings

    from napari.utils.notifications import notification_manager
    from napari_usguide._reader import private_worker

    from usguide.errors import CorruptSourceError

    sys.path.insert(0, str(TEST_DATA.parents[1]))
    from tests.annotation.conftest import write_identified_dicom

    folder = tmp_path / "Doelittle Janeway"
    folder.mkdir()
    path = write_identified_dicom(folder / "DOELITTLE_scan.dcm", frames=2)
    label = _read(path)[1]["metadata"]["usguide"]["source"]

    def fail() -> None:
        warnings.warn(f"{path}: frame 1 has no time stamp", UserWarning, stacklevel=1)
        raise CorruptSourceError(path, f"frame 1 of {path.name} is truncated")

    shown: list[str] = []
    notification_manager.notification_ready.connect(lambda n: shown.append(str(n.message)))
    worker = private_worker(fail)
    with qtbot.waitSignal(worker.finished, timeout=10_000):
        worker.start()
    qtbot.wait(50)  # the relayed signals are delivered on this thread's event loop
    assert any("no time stamp" in m for m in shown) and any("truncated" in m for m in shown)
    for message in shown:
        assert "DOELITTLE" not in message and str(tmp_path) not in message, message
    # The file's name alone may stand for another scan of that name opened earlier.
    assert any(m.startswith(f"{label}: frame 1 of source-") for m in shown), shown
