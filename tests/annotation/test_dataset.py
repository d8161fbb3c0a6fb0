"""AnnotationSet: export and re-import, de-identification, atomic saves, training loader, undo."""

from __future__ import annotations

import json
import shutil
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


def test_an_annotator_sharing_a_part_of_the_patients_name_can_export(
    tmp_path: Path, identified_dicom
) -> None:
    # The patient is Doelittle^Janeway; an annotator called Janeway Berg is someone else, whose
    # name was typed on purpose and is written as the annotator.
    aset = annotated_from_dicom(identified_dicom, annotator="Janeway Berg")
    out = aset.export(tmp_path / "ds")
    manifest = json.loads((out / MANIFEST).read_text())
    assert {e["annotator"] for e in manifest["frames"]} == {"Janeway Berg"}
    # The patient's name anywhere else still stops the export.
    next(iter(aset)).source = "janeway-scan"
    with pytest.raises(DeidentificationError, match="PatientName"):
        aset.export(tmp_path / "ds")
    assert len(AnnotationSet.load(out)) == 3  # the previous export is untouched


@pytest.mark.parametrize(
    ("annotator", "keyword"),
    [
        ("Janeway Doelittle", "PatientName"),  # the patient's full name, in any form
        ("DOELITTLE^JANEWAY", "PatientName"),
        ("doelittle, janeway", "PatientName"),
        ("J. Doelittle", "PatientName"),  # a name part with nothing but an initial
        ("Janeway", "PatientName"),  # a name part alone
        ("Janeway Berg PID8675309", "PatientID"),  # other identifiers as before
    ],
)
def test_an_annotator_that_names_the_patient_stops_the_export(
    tmp_path: Path, identified_dicom, annotator: str, keyword: str
) -> None:
    aset = annotated_from_dicom(identified_dicom, annotator=annotator)
    with pytest.raises(DeidentificationError) as info:
        aset.export(tmp_path / "ds")
    reason = info.value.reason
    assert "annotator" in reason and keyword in reason  # the field, never the value
    assert not any(secret.lower() in reason.lower() for secret in SECRETS)
    assert not (tmp_path / "ds").exists() and not list(tmp_path.glob(".ds.*"))


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


def test_a_dicom_source_is_labelled_by_pseudonym_whatever_its_name(tmp_path: Path) -> None:
    import pydicom

    from tests.annotation.conftest import write_identified_dicom

    first = write_identified_dicom(tmp_path / "first.dcm", frames=1)
    uids = pydicom.dcmread(first, stop_before_pixels=True)
    uid = uids.SOPInstanceUID
    # PACS names, dates and IDs glued to letters: no search of the header finds them.
    for stem in (uid, "20240117_scan", "ptPID8675309", "DoelittleJaneway"):
        path = first.rename(tmp_path / f"{stem}.dcm")
        aset = annotated_from_dicom(path)
        out = aset.export(tmp_path / "ds", dicom_seg=True)  # the SEG copies no source UID
        names = [str(p.relative_to(out)) for p, _ in all_bytes(out)]
        manifest = json.loads((out / MANIFEST).read_text())
        assert all(e["source"].startswith("source-") for e in manifest["frames"])
        coco = json.loads((out / "coco.json").read_text())
        for text in (*names, *(i["file_name"] for i in coco["images"])):
            assert stem.lower() not in text.lower() and "8675309" not in text
        for _, data in all_bytes(out):
            assert uid.encode() not in data and uids.StudyInstanceUID.encode() not in data
        first = path
    # Other sources keep their stem.
    aset = AnnotationSet()
    assert aset.add_image(speckle((20, 20)), source="/v/clip 01.mp4", frame_index=0) == (
        "clip-01_00000"
    )


def test_a_numeric_id_or_a_name_in_json_keys_does_not_stop_an_export(tmp_path: Path) -> None:
    import pydicom

    from tests.annotation.conftest import write_identified_dicom

    path = write_identified_dicom(tmp_path / "scan.dcm", frames=1)
    ds = pydicom.dcmread(path)
    ds.PatientID, ds.PatientName = "204", "Name^Doelittle"  # "name": a key of COCO and SEG
    ds.save_as(path)
    aset = AnnotationSet("a")
    with open_source(path) as source:
        key = aset.add_frame(next(iter(source)))
    labels = np.zeros_like(aset[key].labels)
    labels[REGION[1] + 5 : REGION[1] + 17, REGION[0] + 5 : REGION[0] + 22] = NERVE  # area 204
    aset.set_labels(key, labels)
    out = aset.export(tmp_path / "ds")
    coco = json.loads((out / "coco.json").read_text())
    assert coco["annotations"][0]["area"] == 204
    aset.annotator = "pt 204"  # a string value is still searched
    aset.set_labels(key, np.zeros_like(labels))
    with pytest.raises(DeidentificationError, match="PatientID"):
        aset.export(tmp_path / "ds")


def test_an_export_refuses_a_dataset_folder_holding_the_users_files(tmp_path: Path) -> None:
    from usguide.annotation import ForeignFilesError

    aset = AnnotationSet("a")
    for i in range(3):
        aset.add_image(speckle((40, 60), i), source="scan.png", frame_index=i)
    out = aset.export(tmp_path / "ds")
    (out / "splits.csv").write_text("key,split\n")
    (out / "reviews").mkdir()
    (out / "reviews" / "notes.txt").write_text("frame 2 checked\n")
    (out / "images" / "mine.png").write_bytes(b"not the export's")
    before = {p.relative_to(out): data for p, data in all_bytes(out)}
    with pytest.raises(ForeignFilesError, match=r"images/mine\.png, reviews, splits\.csv") as info:
        aset.export(out)
    assert isinstance(info.value, FileExistsError) and str(out) in str(info.value)
    assert {p.relative_to(out): data for p, data in all_bytes(out)} == before
    assert not list(tmp_path.glob(".ds.*"))
    (out / "splits.csv").unlink()
    (out / "images" / "mine.png").unlink()
    shutil.rmtree(out / "reviews")
    assert aset.export(out, keys=aset.keys()[:1]) == out  # its own files only: replaced
    assert len(AnnotationDataset(out)) == 1


def test_an_export_through_a_linked_folder_keeps_the_link(tmp_path: Path) -> None:
    aset = AnnotationSet("a")
    aset.add_image(speckle((30, 40)), source="scan.png", frame_index=0)
    real = aset.export(tmp_path / "real")
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    for n in (2, 3):  # again and again
        aset.add_image(speckle((30, 40), n), source="scan.png", frame_index=n)
        assert aset.export(link) == link
        assert link.is_symlink() and link.resolve() == real
        assert len(AnnotationDataset(real)) == len(aset)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_replacing_a_frame_forgets_its_undo_steps() -> None:
    aset = AnnotationSet("a")
    key = aset.add_image(np.zeros((100, 100), np.uint8), source="scan.dcm", frame_index=0)
    labels = np.zeros((100, 100), np.uint8)
    labels[60:90, 60:90] = NERVE
    aset.set_labels(key, labels)
    # A smaller frame under the same key: the step would not fit it.
    assert aset.add_image(np.zeros((50, 50), np.uint8), source="scan.dcm", frame_index=0) == key
    assert aset.undo() is None and not aset[key].labels.any()
    # Same size: the step would write the old frame's labels into the new one's.
    aset.set_labels(key, np.full((50, 50), VESSEL, np.uint8))
    aset.add_image(np.zeros((50, 50), np.uint8), source="scan.dcm", frame_index=0,
                   labels=np.full((50, 50), NERVE, np.uint8))  # fmt: skip
    assert aset.undo() is None and (aset[key].labels == NERVE).all()


def test_a_reopened_recording_gets_its_label_back(tmp_path: Path, identified_dicom) -> None:
    aset = AnnotationSet("a")
    with open_source(identified_dicom) as source:
        frames = list(source)
    first = aset.add_frame(frames[0], blob_labels(frames[0].pixels.shape[:2], REGION))
    out = aset.export(tmp_path / "ds")
    again = AnnotationSet.load(out, "b")
    keys = [again.add_frame(frame) for frame in frames]  # the whole recording, frame 0 again
    assert keys[0] == first and again.keys() == keys
    # Frame 0 is the source frame again, with the labels it had (added once more: the same).
    np.testing.assert_array_equal(again[first].labels, aset[first].labels)
    assert again.add_frame(frames[0]) == first
    np.testing.assert_array_equal(again[first].labels, aset[first].labels)
    assert again[first].annotator == "a"
    assert again.following(first, 5) == keys[1:]
    again.export(out)
    dataset = AnnotationDataset(out)
    assert len(dataset) == 3 and len(set(dataset.groups)) == 1


def test_labels_outside_the_classes_are_refused() -> None:
    aset = AnnotationSet("a")
    key = aset.add_image(np.zeros((20, 20), np.uint8), source="s", frame_index=0)
    for value, dtype in ((260, np.int32), (N_CLASSES, np.uint8), (-1, np.int16), (1, float)):
        labels = np.zeros((20, 20), dtype)
        labels[2:5, 2:5] = value
        with pytest.raises(ValueError, match=key):
            aset.set_labels(key, labels)
        with pytest.raises(ValueError, match="s_00001"):
            aset.add_image(np.zeros((20, 20), np.uint8), source="s", frame_index=1, labels=labels)
    assert not aset[key].labels.any() and not aset.history.can_undo and len(aset) == 1
    labels = np.zeros((20, 20), np.int64)
    labels[2:5, 2:5] = NEEDLE
    assert aset.set_labels(key, labels) and aset[key].labels.dtype == np.uint8


def without_source_keys(out: Path) -> None:
    """Rewrite an export's manifest as usguide wrote it before it kept source keys."""
    manifest = json.loads((out / MANIFEST).read_text())
    for entry in manifest["frames"]:
        del entry["source_key"]
    (out / MANIFEST).write_text(json.dumps(manifest))


def test_a_dataset_saved_without_source_keys_gives_a_recording_its_label_back(
    tmp_path: Path, identified_dicom
) -> None:
    aset = AnnotationSet("a")
    with open_source(identified_dicom) as source:
        frames = list(source)
    first = aset.add_frame(frames[0], blob_labels(frames[0].pixels.shape[:2], REGION))
    out = aset.export(tmp_path / "ds")
    without_source_keys(out)
    again = AnnotationSet.load(out, "b")
    # Frame 2 first (the dataset has none to compare it with), then the whole recording.
    last = again.add_frame(frames[2])
    keys = [again.add_frame(frame) for frame in frames]
    assert keys[0] == first and keys[2] == last and sorted(again.keys()) == keys
    np.testing.assert_array_equal(again[first].labels, aset[first].labels)
    assert again[first].annotator == "a"
    again.export(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert len({(e["source"], e["source_key"]) for e in manifest["frames"]}) == 1
    assert manifest["frames"][0]["source_key"]  # the manifest keeps the key from now on
    assert len(set(AnnotationDataset(out).groups)) == 1


def test_a_dicom_labelled_by_its_file_name_before_pseudonyms_gets_that_label_back(
    tmp_path: Path,
) -> None:
    from tests.annotation.conftest import write_identified_dicom

    path = write_identified_dicom(tmp_path / "scan01.dcm", frames=2)
    with open_source(path) as source:
        frames = list(source)
    # Versions that kept no source key labelled a DICOM file by its stem, as any other file.
    aset = AnnotationSet("a")
    old = aset.add_image(frames[0].pixels, source="scan01", frame_index=0, region=REGION,
                         labels=blob_labels(frames[0].pixels.shape[:2], REGION))  # fmt: skip
    out = aset.export(tmp_path / "ds")
    without_source_keys(out)
    again = AnnotationSet.load(out)
    assert [again.add_frame(frame) for frame in frames] == [old, "scan01_00001"]
    np.testing.assert_array_equal(again[old].labels, aset[old].labels)


def test_another_recording_of_the_same_name_never_replaces_a_reopened_frame(
    tmp_path: Path,
) -> None:
    shape = (40, 60)
    aset = AnnotationSet("a")
    for i in range(2):
        aset.add_image(speckle(shape, i), source="/a/clip.mp4", frame_index=i,
                       labels=blob_labels(shape, (0, 0, 59, 39)))  # fmt: skip
    out = aset.export(tmp_path / "ds")
    without_source_keys(out)

    def unchanged(reopened: AnnotationSet) -> None:
        for f in aset:
            np.testing.assert_array_equal(reopened[f.key].image, f.image)
            np.testing.assert_array_equal(reopened[f.key].labels, f.labels)

    # A frame the dataset holds shows that this file of the same name is another recording.
    again = AnnotationSet.load(out)
    assert again.add_image(speckle(shape, 7), source="/b/clip.mp4", frame_index=1) == (
        "clip-2_00001"
    )
    unchanged(again)
    # The recording itself, wherever it lies now, joins its frames.
    assert again.add_image(speckle(shape, 0), source="/c/clip.mp4", frame_index=0) == "clip_00000"
    # Taken by name (no frame to compare), then found to differ: refused, nothing replaced.
    again = AnnotationSet.load(out)
    assert again.add_image(speckle(shape, 8), source="/b/clip.mp4", frame_index=5) == "clip_00005"
    with pytest.raises(ValueError, match="clip_00001"):
        again.add_image(speckle(shape, 9), source="/b/clip.mp4", frame_index=1)
    unchanged(again)
    again.export(out)  # not known to be the recording: no source key is written for it
    manifest = json.loads((out / MANIFEST).read_text())
    assert len(manifest["frames"]) == 3 and not any(e["source_key"] for e in manifest["frames"])


def test_a_blank_frame_alike_in_two_recordings_does_not_prove_which_one_it_is(
    tmp_path: Path,
) -> None:
    shape = (40, 60)
    aset = AnnotationSet("a")
    # Recording /a: a black frame first (probe in the air), then an image.
    aset.add_image(np.zeros(shape, np.uint8), source="/a/clip.mp4", frame_index=0)
    aset.add_image(speckle(shape, 1), source="/a/clip.mp4", frame_index=1,
                   labels=blob_labels(shape, (0, 0, 59, 39)))  # fmt: skip
    out = aset.export(tmp_path / "ds")
    without_source_keys(out)
    # Another recording of that name also starts black: its black frame proves nothing, and its
    # frames are taken on trust only, never written with a source key under the old label.
    again = AnnotationSet.load(out)
    assert again.add_image(np.zeros(shape, np.uint8), source="/b/clip.mp4", frame_index=0) == (
        "clip_00000"
    )
    again.add_image(speckle(shape, 5), source="/b/clip.mp4", frame_index=5)
    again.export(out)
    manifest = json.loads((out / MANIFEST).read_text())
    assert not any(e["source_key"] for e in manifest["frames"])
    # So the recording itself, found again, still joins its old frames.
    again = AnnotationSet.load(out)
    assert again.add_image(speckle(shape, 1), source="/a/clip.mp4", frame_index=1) == "clip_00001"
