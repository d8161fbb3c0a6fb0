"""AnnotationSet: export and re-import, de-identification, atomic saves, training loader, undo."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.annotation.conftest import REGION, SECRETS, SPACING_MM, speckle
from usguide.annotation import AnnotationDataset, AnnotationSet, DeidentificationError
from usguide.annotation import dataset as dataset_module
from usguide.annotation.coco import labels_from_coco
from usguide.annotation.dataset import MANIFEST
from usguide.frame import Frame
from usguide.labels import FASCIA, N_CLASSES, NEEDLE, NERVE, VESSEL
from usguide.sources import open_source


def blob_labels(shape: tuple[int, int], region: tuple[int, int, int, int]) -> np.ndarray:
    """Nerve, vessel, fascia and needle shapes inside ``region``."""
    labels = np.zeros(shape, np.uint8)
    x0, y0, _, _ = region
    labels[y0 + 10 : y0 + 30, x0 + 20 : x0 + 50] = NERVE
    labels[y0 + 50 : y0 + 70, x0 + 80 : x0 + 95] = VESSEL
    labels[y0 + 5 : y0 + 8, x0 : x0 + 150] = FASCIA
    labels[y0 + 40 : y0 + 42, x0 + 10 : x0 + 60] = NEEDLE
    return labels


def annotated_from_dicom(path: Path, annotator: str = "R. Searcher") -> AnnotationSet:
    aset = AnnotationSet(annotator)
    with open_source(path) as source:
        for frame in source:
            labels = blob_labels(frame.pixels.shape[:2], frame.region.bbox)
            aset.add_frame(frame, labels, tip_xy=(REGION[0] + 60.0, REGION[1] + 41.0))
    return aset


def all_bytes(folder: Path) -> list[tuple[Path, bytes]]:
    return [(p, p.read_bytes()) for p in sorted(folder.rglob("*")) if p.is_file()]


def test_export_then_load_gives_the_same_labels_cropped(tmp_path: Path, identified_dicom) -> None:
    aset = annotated_from_dicom(identified_dicom)
    out = aset.export(tmp_path / "ds", dicom_seg=True)
    again = AnnotationSet.load(out)
    assert len(again) == len(aset) == 3
    x0, y0, x1, y1 = REGION
    for f in aset:
        g = again[f.key]
        np.testing.assert_array_equal(g.labels, f.labels[y0 : y1 + 1, x0 : x1 + 1])
        np.testing.assert_array_equal(g.image, f.image[y0 : y1 + 1, x0 : x1 + 1])
        assert g.tip_xy == (60.0, 41.0)  # in the exported image's pixels
        assert g.spacing_mm == SPACING_MM
        assert g.region_in_source == REGION
        assert g.annotator == "R. Searcher"
    manifest = json.loads((out / MANIFEST).read_text())
    first = manifest["frames"][0]
    assert first["frame_index"] == 0 and first["timestamp_s"] == 0.0
    assert first["units"] == "mm" and first["spacing_mm"] == list(SPACING_MM)
    # COCO and DICOM SEG say the same as the label PNGs.
    coco = json.loads((out / "coco.json").read_text())
    for image in coco["images"]:
        key = Path(image["file_name"]).stem
        np.testing.assert_array_equal(labels_from_coco(coco, image["id"]), again[key].labels)
    tips = [a for a in coco["annotations"] if "keypoints" in a]
    assert tips and tips[0]["keypoints"] == [60.0, 41.0, 2]
    from usguide.annotation.dicom_seg import read_dicom_seg

    seg = read_dicom_seg(out / first["dicom"]["seg"])
    np.testing.assert_array_equal(seg, again[first["key"]].labels)


def test_export_is_deidentified(tmp_path: Path, identified_dicom) -> None:
    aset = annotated_from_dicom(identified_dicom)
    out = aset.export(tmp_path / "ds", dicom_seg=True)
    files = all_bytes(out)
    assert {p.suffix for p, _ in files} == {".png", ".json", ".dcm"}
    for path, data in files:
        for secret in SECRETS:
            assert secret.lower().encode() not in data.lower(), (path.name, secret)
        for secret in SECRETS:  # names of files and folders too
            assert secret.lower() not in str(path.relative_to(tmp_path)).lower()
    # Burned-in text lay above the region: the exported images are the region only, and hold
    # none of the text's white pixels.
    again = AnnotationSet.load(out)
    x0, y0, x1, y1 = REGION
    for f in again:
        assert f.image.shape == (y1 - y0 + 1, x1 - x0 + 1)
        assert f.image.max() < 255
    # The file was named after the patient: its label is a pseudonym.
    assert all(f.source.startswith("source-") for f in again)
    import pydicom

    for path, _ in files:
        if path.suffix == ".dcm":
            ds = pydicom.dcmread(path)
            assert str(ds.PatientName) == "" and ds.PatientID == "usguide-anonymous"
            assert ds.get("PatientBirthDate", "") == ""


def test_export_refuses_a_file_that_would_leak(
    tmp_path: Path, identified_dicom, monkeypatch
) -> None:
    aset = annotated_from_dicom(identified_dicom)
    aset.annotator = "x"
    first = next(iter(aset))
    first.annotator = "Janeway"  # a patient's name typed as the annotator
    with pytest.raises(DeidentificationError) as info:
        aset.export(tmp_path / "ds")
    assert "Janeway" not in str(info.value) and "PatientName" in str(info.value)
    assert not (tmp_path / "ds").exists()
    assert not list(tmp_path.glob(".ds.partial-*"))


def test_crash_mid_save_leaves_previous_dataset_intact(tmp_path: Path, monkeypatch) -> None:
    aset = AnnotationSet("a")
    shape = (60, 80)
    for i in range(4):
        aset.add_image(speckle(shape, i), source="clip.mp4", frame_index=i,
                       labels=blob_labels(shape, (0, 0, 79, 59)))  # fmt: skip
    out = aset.export(tmp_path / "ds")
    before = {p.relative_to(out): data for p, data in all_bytes(out)}

    for f in aset:
        f.labels[:] = VESSEL
    real = dataset_module._write_bytes
    calls = {"n": 0}

    def failing(path: Path, data: bytes) -> Path:
        calls["n"] += 1
        if calls["n"] == 5:
            raise OSError("disk full (simulated)")
        return real(path, data)

    monkeypatch.setattr(dataset_module, "_write_bytes", failing)
    with pytest.raises(OSError, match="simulated"):
        aset.export(out)
    after = {p.relative_to(out): data for p, data in all_bytes(out)}
    assert after == before
    assert not list(tmp_path.glob(".ds.*"))  # no partial folder left behind
    monkeypatch.setattr(dataset_module, "_write_bytes", real)
    aset.export(out)
    assert all((f.labels == VESSEL).all() for f in AnnotationSet.load(out))


def test_crash_between_the_renames_is_recovered(tmp_path: Path) -> None:
    aset = AnnotationSet("a")
    aset.add_image(speckle((40, 50)), source="a.png", frame_index=0,
                   labels=blob_labels((40, 50), (0, 0, 49, 39)))  # fmt: skip
    out = aset.export(tmp_path / "ds")
    # As if the process died after moving the old dataset aside, before the new one took its
    # place: the old one is still read, and the next export puts it back first.
    out.rename(tmp_path / ".ds.previous")
    assert len(AnnotationSet.load(tmp_path / "ds")) == 1
    assert len(AnnotationDataset(tmp_path / "ds")) == 1
    aset.export(tmp_path / "ds")
    assert (out / MANIFEST).exists() and not (tmp_path / ".ds.previous").exists()


def test_export_refuses_to_replace_a_folder_that_is_not_a_dataset(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.txt").write_text("precious")
    aset = AnnotationSet()
    aset.add_image(speckle((20, 20)), source="a", frame_index=0)
    with pytest.raises(FileExistsError):
        aset.export(tmp_path / "home")
    assert (tmp_path / "home" / "thesis.txt").read_text() == "precious"


def test_exported_dataset_loads_as_training_samples(tmp_path: Path, identified_dicom) -> None:
    from usguide.data.datasets import open_dataset, split

    out = annotated_from_dicom(identified_dicom).export(tmp_path / "ds")
    ds = open_dataset(str(out))
    assert isinstance(ds, AnnotationDataset) and len(ds) == 3
    sample = ds[0]
    assert sample.image.dtype == np.uint8 and sample.image.ndim == 2
    assert sample.mask.shape == sample.image.shape
    assert set(np.unique(sample.mask)) == {0, NERVE, VESSEL, FASCIA, NEEDLE}
    assert sample.labelled == (True,) * N_CLASSES
    # One recording is one group: its frames never straddle training and validation.
    train, val = split(ds, val_fraction=0.5)
    assert sorted(train + val) == [0, 1, 2] and (not val or not train)


def test_training_run_reads_an_exported_dataset(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    from usguide.training.train import TrainConfig, load_samples

    aset = AnnotationSet("a")
    shape = (64, 80)
    for source in ("one.mp4", "two.mp4", "three.mp4"):
        for i in range(2):
            aset.add_image(speckle(shape, i), source=source, frame_index=i,
                           labels=blob_labels(shape, (0, 0, 79, 63)))  # fmt: skip
    out = aset.export(tmp_path / "mine")
    config = TrainConfig(input_size=(32, 32), datasets=(str(out),), val_fraction=0.34)
    train, val = load_samples(config, log=lambda _: None)
    assert len(train) + len(val) == 6 and len(val) == 2
    assert {s.name.split("/")[0] for s in train} == {"mine"}


def test_pre_annotate_propagate_and_undo(tmp_path: Path) -> None:
    shape = (80, 100)
    base = speckle((120, 140), seed=3)
    aset = AnnotationSet("a")
    for i in range(3):  # the scene moves 2 px right per frame
        aset.add_image(base[20:100, 20 - 2 * i : 120 - 2 * i], source="cine.dcm", frame_index=i,
                       region=(5, 5, 94, 74))  # fmt: skip
    keys = aset.keys()

    def model(frame: Frame) -> np.ndarray:
        labels = np.full(frame.pixels.shape[:2], NERVE, np.uint8)
        return labels

    assert aset.pre_annotate(keys[:1], model) == keys[:1]
    first = aset[keys[0]].labels
    assert first[0, 0] == 0 and first[5, 5] == NERVE  # only the imaging region is labelled
    edited = np.zeros(shape, np.uint8)
    edited[30:50, 40:60] = VESSEL
    assert aset.set_labels(keys[0], edited)
    assert aset.propagate(keys[0], 2) == keys[1:]
    ys, xs = np.nonzero(aset[keys[2]].labels == VESSEL)
    assert abs(xs.mean() - 53.5) <= 1 and abs(ys.mean() - 39.5) <= 1
    assert aset.undo() == "propagate to 2 frame(s)"
    assert not aset[keys[2]].labels.any()
    assert aset.undo() == "edit"
    assert (aset[keys[0]].labels[5:75, 5:95] == NERVE).all()
    assert aset.redo() == "edit"
    np.testing.assert_array_equal(aset[keys[0]].labels, edited)


def test_tips_are_undone_with_the_labels_they_were_set_with() -> None:
    aset = AnnotationSet("a")
    key = aset.add_image(speckle((60, 80), seed=1), source="cine.dcm", frame_index=0)
    labels = np.zeros((60, 80), np.uint8)
    labels[10:20, 10:30] = NEEDLE
    assert aset.annotate(key, labels, (29.5, 14.0))
    assert aset.set_tip(key, (31.0, 15.0))
    assert not aset.set_tip(key, (31.0, 15.0))  # no change, no step
    assert aset.undo() == "tip"
    assert aset[key].tip_xy == (29.5, 14.0)
    assert aset.undo() == "edit"  # labels and tip were one step
    assert aset[key].tip_xy is None and not aset[key].labels.any()
    assert aset.redo() == "edit"
    assert aset[key].tip_xy == (29.5, 14.0) and (aset[key].labels == NEEDLE).sum() == 200
    assert aset.set_tip(key, None)
    assert aset[key].tip_xy is None
    assert aset.undo() == "tip" and aset[key].tip_xy == (29.5, 14.0)
