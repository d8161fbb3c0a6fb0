"""Fixtures of the annotation tests: a DICOM that carries identifiers and burned-in text."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

# Long, distinctive values, so a search of every written byte cannot hit them by chance.
PATIENT_NAME = "Doelittle^Janeway"
PATIENT_ID = "PID8675309"
BIRTH_DATE = "19710203"
INSTITUTION = "Saint Examplefield Hospital"
SECRETS = ("Doelittle", "Janeway", PATIENT_ID, BIRTH_DATE, "1971-02-03", "Examplefield")
REGION = (12, 40, 171, 139)  # x0, y0, x1, y1 inclusive
SPACING_MM = (0.1, 0.1)


def speckle(shape: tuple[int, int], seed: int = 0) -> np.ndarray:
    """Smooth random texture (optical flow needs structure), uint8 within [20, 200]."""
    rng = np.random.default_rng(seed)
    noise = rng.random(shape).astype(np.float32)
    smooth = cv2.GaussianBlur(noise, (0, 0), 2.0)
    smooth = (smooth - smooth.min()) / (smooth.max() - smooth.min())
    return (20 + 180 * smooth).astype(np.uint8)


def write_identified_dicom(path: Path, frames: int = 3) -> Path:
    """A multi-frame US DICOM with patient identifiers in its header and burned into its
    pixels above the imaging region, which SequenceOfUltrasoundRegions describes."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rows, cols = 150, 184
    pixels = np.zeros((frames, rows, cols), np.uint8)
    x0, y0, x1, y1 = REGION
    for k in range(frames):
        pixels[k, y0 : y1 + 1, x0 : x1 + 1] = speckle((y1 - y0 + 1, x1 - x0 + 1), seed=k)
        # Burned-in text in the black band above the region, as scanners print it.
        cv2.putText(pixels[k], "DOELITTLE JANEWAY", (2, 14), cv2.FONT_HERSHEY_PLAIN, 0.9, 255)
        cv2.putText(pixels[k], PATIENT_ID, (2, 32), cv2.FONT_HERSHEY_PLAIN, 0.9, 255)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"  # US Multi-frame Image Storage
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality = "US"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.InstitutionName = INSTITUTION
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.FrameTime = 50.0
    region = Dataset()
    region.RegionSpatialFormat = 1
    region.RegionDataType = 1
    region.RegionFlags = 0
    region.RegionLocationMinX0, region.RegionLocationMinY0 = x0, y0
    region.RegionLocationMaxX1, region.RegionLocationMaxY1 = x1, y1
    region.PhysicalUnitsXDirection = region.PhysicalUnitsYDirection = 3
    region.PhysicalDeltaX = region.PhysicalDeltaY = SPACING_MM[0] / 10.0
    ds.SequenceOfUltrasoundRegions = [region]
    ds.PixelData = pixels.tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def identified_dicom(tmp_path: Path) -> Path:
    # The file is named after the patient, as happens: its name must not travel either.
    folder = tmp_path / "Janeway Doelittle"
    folder.mkdir()
    return write_identified_dicom(folder / "DOELITTLE_JANEWAY_block.dcm")
