"""COCO run-length encoding, and the de-identification helpers."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.annotation.coco import labels_from_coco, rle_decode, rle_encode, to_coco
from usguide.annotation.deid import check_name, check_text, dicom_identifiers, safe_label


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed: int) -> None:
    mask = np.random.default_rng(seed).random((7 + seed, 5)) > 0.5
    mask[0, 0] = bool(seed % 2)  # starting on either value
    rle = rle_encode(mask)
    assert sum(rle["counts"]) == mask.size
    np.testing.assert_array_equal(rle_decode(rle), mask)


def test_rle_matches_coco_convention() -> None:
    # Column-major runs starting with background: [[0, 1], [1, 1]] -> F order 0,1,1,1.
    assert rle_encode(np.array([[0, 1], [1, 1]], bool))["counts"] == [1, 3]
    assert rle_encode(np.array([[1, 1]], bool))["counts"] == [0, 2]


def test_coco_file_round_trip_and_tip() -> None:
    labels = np.zeros((20, 30), np.uint8)
    labels[2:5, 3:9] = 1
    labels[10:15, 20:25] = 4
    coco = to_coco([("images/a.png", labels, (4.0, 5.5), {"frame_index": 3})])
    np.testing.assert_array_equal(labels_from_coco(coco, 1), labels)
    nerve = next(a for a in coco["annotations"] if a["category_id"] == 1)
    assert nerve["bbox"] == [3.0, 2.0, 6.0, 3.0] and nerve["area"] == 18
    assert coco["images"][0]["frame_index"] == 3
    assert {c["name"] for c in coco["categories"]} >= {"nerve", "vessel", "needle_tip"}


def test_identifiers_from_a_header() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "Lee^Ann"
    ds.PatientID = "X12345"
    ds.PatientBirthDate = "19800102"
    ds.OtherPatientIDs = ["AB-777", "CD-888"]
    ids = dicom_identifiers(ds)
    for value in ("LEE^ANN", "LEE", "ANN", "LEE ANN", "X12345", "19800102", "1980-01-02", "CD-888"):
        assert value in ids
    assert ids["X12345"] == "PatientID"
    # Whole tokens only: a short name part does not match inside words.
    assert check_text("usguide annotations", ids) is None
    assert check_text("ann_scan.dcm", ids) == "PatientName"
    assert check_text("born 1980-01-02", ids) == "PatientBirthDate"


def test_safe_label() -> None:
    ids = {"DOE": "PatientName"}
    assert safe_label("/data/Jane Doe/scan 01.dcm") == "scan-01"
    assert safe_label("/data/x/doe_scan.dcm", ids).startswith("source-")
    assert safe_label("/data/x/doe_scan.dcm", ids) == safe_label("/data/x/doe_scan.dcm", ids)
    assert safe_label("device:0") == "device-0"
    assert safe_label("").startswith("source-")


def test_a_dicom_source_is_always_a_pseudonym() -> None:
    # Scanner names carry UIDs, dates and IDs glued to letters that no search recognises.
    for name in ("/d/1.2.826.0.1.3680043.2.1143.77.dcm", "/d/20190124_scan.dcm", "/d/pt204.dcm"):
        label = safe_label(name, {"204": "PatientID"}, dicom=True)
        assert label.startswith("source-") and label == safe_label(name, dicom=True)
    assert safe_label("/d/CitizenJan.dcm", dicom=True).startswith("source-")
    assert safe_label("/d/clip 01.mp4") == "clip-01"  # other sources keep their stem


def test_instance_uids_are_identifiers() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.3.4.5", "1.2.3.4.6"
    ds.SOPInstanceUID, ds.FrameOfReferenceUID = "1.2.3.4.7", "1.2.3.4.8"
    ids = dicom_identifiers(ds)
    assert set(ids.values()) >= {
        "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"
    }  # fmt: skip
    assert check_text("scan-1.2.3.4.7", ids) == "SOPInstanceUID"


def test_json_is_searched_in_its_string_values_only(tmp_path) -> None:
    import json

    from usguide.annotation.deid import DeidentificationError, check_files

    ids = {"204": "PatientID", "NAME": "PatientName"}
    labels = np.zeros((210, 300), np.uint8)
    labels[:, 10:214] = 1  # 204 px wide: a bbox, an area and RLE runs of 204 and 210 * 204
    coco = to_coco([("images/a.png", labels, None, {"frame_index": 204})])
    assert isinstance(coco["annotations"][0]["segmentation"]["counts"], list)  # ints, no string
    assert 204.0 in coco["annotations"][0]["bbox"]
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(coco))  # keys hold "name", numbers 204
    check_files([path], ids)
    path.write_text(json.dumps({"frames": [{"annotator": "pt 204"}]}))
    with pytest.raises(DeidentificationError, match="PatientID"):
        check_files([path], ids)
    csv = tmp_path / "splits.csv"  # other text files are still searched whole
    csv.write_text("key,frame\na,204\n")
    with pytest.raises(DeidentificationError, match="PatientID"):
        check_files([csv], ids)


def test_a_typed_name_may_share_one_part_of_a_name_in_the_header(tmp_path) -> None:
    import json

    from pydicom.dataset import Dataset

    from usguide.annotation.deid import DeidentificationError, check_files

    ds = Dataset()
    ds.PatientName = "Smith^Anna^Maria"
    ds.OperatorsName = "Lund^Karl"
    ds.PatientID = "X12345"
    ids = dicom_identifiers(ds)
    # Someone else who shares a given or family name with a person of the header.
    for name in ("Anna Berg", "Berg, Anna", "Dr Karl Berg", "Anna Lund", "Annabel Smithson"):
        assert check_name(name, ids) is None, name
    assert check_text("Anna Berg", ids) == "PatientName"  # anywhere else it is a hit
    refused = {
        "Anna": "PatientName",  # a part alone, or with an initial or a title only
        "A. Smith": "PatientName",
        "Dr. Smith": "PatientName",
        "Mrs Smith": "PatientName",
        "Prof. Anna": "PatientName",
        "Anna Smith": "PatientName",  # two parts of one name, in any order
        "Smith Anna": "PatientName",
        "Anna Maria Berg": "PatientName",
        "SMITH^ANNA^MARIA": "PatientName",
        "Karl Lund": "OperatorsName",
        "Anna Berg X12345": "PatientID",
    }
    for name, keyword in refused.items():
        assert check_name(name, ids) == keyword, name
    # In a written file: the annotator field is read as a name, every other value as before.
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({"frames": [{"annotator": "Anna Berg", "source": "clip"}]}))
    check_files([path], ids)
    path.write_text(json.dumps({"frames": [{"annotator": "Anna Berg", "source": "anna-clip"}]}))
    with pytest.raises(DeidentificationError, match="PatientName"):
        check_files([path], ids)
    path.write_text(json.dumps({"frames": [{"annotator": "Anna Smith", "source": "clip"}]}))
    with pytest.raises(DeidentificationError, match="annotator") as info:
        check_files([path], ids)
    assert "PatientName" in info.value.reason and "smith" not in info.value.reason.lower()


@pytest.mark.parametrize(
    ("header", "typed"),
    [
        ("Smith^Anna Maria", "Anna Smith"),  # a given name of a component of several words
        ("Smith-Jones^Anna", "Anna Smith"),  # a word of a hyphenated family name
        ("Smith-Jones^Anna", "Jones, Anna"),
        ("Wu^Li", "Li Wu"),  # parts too short to search alone, in another order
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "山田太郎"),  # an ideographic group
        ("Yamada^Tarou=山田^太郎=やまだ^たろう", "太郎 山田"),
        ("Müller^Anna", "Anna Mu\u0308ller"),  # decomposed Unicode (NFD)
        ("Müller^Anna", "Mu\u0308ller"),
        ("Smith^Anna", "ＳＭＩＴＨ ＡＮＮＡ"),  # full-width letters
        ("Smith^Anna", "Mister Smith"),  # a part with a title only
        ("Smith^Anna", "Madame Smith"),
        ("Smith^Anna", "Smith PhD"),
    ],
)
def test_a_typed_name_never_passes_a_header_name_in_another_form(header, typed) -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = header
    assert check_name(typed, dicom_identifiers(ds)) == "PatientName"


def test_a_typed_name_sharing_one_word_of_a_longer_component_still_passes() -> None:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.PatientName = "Smith-Jones^Anna Maria^^Mrs"
    ids = dicom_identifiers(ds)
    for name in ("Anna Berg", "Mrs Anna Berg", "Karl Jones", "Maria de Souza"):
        assert check_name(name, ids) is None, name
