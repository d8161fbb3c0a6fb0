"""DICOM SEG of one annotated frame, with highdicom.

A SEG must reference the image it segments, pixel for pixel. The exported image is the frame
cropped to its imaging region, so the source file cannot be that image; and copying the source's
header would carry the patient's identity. So each frame gets a new single-frame *Ultrasound
Image* built from nothing but the cropped pixels (fresh UIDs, empty patient module, a fixed
pseudonymous patient ID, the mm calibration as an ultrasound region), and a binary SEG of it with
one segment per class present. Single frames only: highdicom refuses multi-frame ultrasound that
carries no FrameOfReferenceUID, which most cines lack.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from usguide._version import __version__
from usguide.labels import CLASS_NAMES, FASCIA, NEEDLE, NERVE, VESSEL

__all__ = ["PSEUDONYM", "read_dicom_seg", "ultrasound_image", "write_dicom_seg"]

PSEUDONYM = "usguide-anonymous"
_US_IMAGE = "1.2.840.10008.5.1.4.1.1.6.1"  # Ultrasound Image Storage


def _segment_codes() -> dict[int, tuple[Any, Any]]:
    """(category, type) codes per class, from pydicom's SNOMED CT table (not typed by hand)."""
    from pydicom.sr.codedict import codes

    tissue = codes.SCT.Tissue
    return {
        NERVE: (tissue, codes.SCT.Nerve),
        VESSEL: (tissue, codes.SCT.BloodVessel),
        FASCIA: (tissue, codes.SCT.FascialLayer),
        NEEDLE: (codes.SCT.PhysicalObject, codes.SCT.Needle),
    }


def ultrasound_image(
    pixels: np.ndarray, spacing_mm: tuple[float, float] | None, study_uid: str
) -> Any:
    """A de-identified single-frame Ultrasound Image dataset of ``pixels``.

    Parameters
    ----------
    pixels : numpy.ndarray
        ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB.
    spacing_mm : (float, float) or None
        mm per pixel ``(row, col)``, written as one ultrasound region in cm; None writes none.
    study_uid : str
        StudyInstanceUID (one per export and source).

    Returns
    -------
    pydicom.Dataset
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = _US_IMAGE
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "US"
    # Type 2 attributes present and empty: nothing of the source's identity travels.
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "StudyID",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        setattr(ds, keyword, "")
    ds.PatientID = PSEUDONYM
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "usguide export: new image from cropped pixels, no header copied"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Manufacturer = "usguide"
    ds.SoftwareVersions = __version__
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if pixels.ndim == 3:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    if spacing_mm is not None:
        region = Dataset()
        region.RegionSpatialFormat = 1
        region.RegionDataType = 1
        region.RegionFlags = 0
        region.RegionLocationMinX0 = 0
        region.RegionLocationMinY0 = 0
        region.RegionLocationMaxX1 = ds.Columns - 1
        region.RegionLocationMaxY1 = ds.Rows - 1
        region.PhysicalUnitsXDirection = 3  # cm
        region.PhysicalUnitsYDirection = 3
        region.PhysicalDeltaX = float(spacing_mm[1]) / 10.0
        region.PhysicalDeltaY = float(spacing_mm[0]) / 10.0
        ds.SequenceOfUltrasoundRegions = [region]
    return ds


def write_dicom_seg(
    pixels: np.ndarray,
    labels: np.ndarray,
    image_path: str | os.PathLike[str],
    seg_path: str | os.PathLike[str],
    *,
    spacing_mm: tuple[float, float] | None = None,
    study_uid: str | None = None,
    annotator_kind: str = "MANUAL",
) -> bool:
    """Write the de-identified image and its DICOM SEG.

    Parameters
    ----------
    pixels : numpy.ndarray
        The exported (cropped) image, ``(H, W)`` or ``(H, W, 3)`` uint8.
    labels : numpy.ndarray
        ``(H, W)`` uint8 class indices.
    image_path, seg_path : path
        Where the image and the SEG go.
    spacing_mm : (float, float) or None
        mm per pixel ``(row, col)``.
    study_uid : str, optional
        StudyInstanceUID shared by the frames of one source; a new one when None.
    annotator_kind : {"MANUAL", "SEMIAUTOMATIC", "AUTOMATIC"}
        The segment algorithm type.

    Returns
    -------
    bool
        False (and nothing written) when ``labels`` hold no class: a SEG needs a segment.
    """
    import highdicom as hd
    from pydicom.uid import generate_uid

    present = [int(c) for c in np.unique(labels) if 0 < c < len(CLASS_NAMES)]
    if not present:
        return False
    image = ultrasound_image(pixels, spacing_mm, study_uid or generate_uid())
    codes = _segment_codes()
    algorithm = hd.seg.SegmentAlgorithmTypeValues[annotator_kind]
    descriptions = []
    for number, c in enumerate(present, start=1):
        category, kind = codes[c]
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=number,
                segment_label=CLASS_NAMES[c],
                segmented_property_category=category,
                segmented_property_type=kind,
                algorithm_type=algorithm,
                algorithm_identification=(
                    None
                    if annotator_kind == "MANUAL"
                    else hd.AlgorithmIdentificationSequence(
                        name="usguide", version=__version__, family=codes_family()
                    )
                ),
            )
        )
    # (segments, H, W) binary planes, in segment-number order.
    planes = np.stack([(labels == c) for c in present]).astype(np.uint8)
    seg = hd.seg.Segmentation(
        source_images=[image],
        pixel_array=np.moveaxis(planes, 0, -1)[None],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="usguide",
        manufacturer_model_name="usguide",
        software_versions=__version__,
        device_serial_number="none",
    )
    image.save_as(Path(image_path), enforce_file_format=True)
    seg.save_as(Path(seg_path))
    return True


def codes_family() -> Any:
    """The algorithm family code of a model-made segment (artificial intelligence)."""
    from pydicom.sr.codedict import codes

    return codes.DCM.ArtificialIntelligence


def read_dicom_seg(path: str | os.PathLike[str]) -> np.ndarray:
    """The ``(H, W)`` uint8 label map of a SEG written by :func:`write_dicom_seg`."""
    import highdicom as hd

    seg = hd.seg.segread(Path(path))
    name_to_class = {name: c for c, name in enumerate(CLASS_NAMES)}
    planes = np.asarray(seg.pixel_array)
    if planes.ndim == 2:
        planes = planes[None]
    labels = np.zeros(planes.shape[-2:], np.uint8)
    for plane, number in zip(planes, seg.get_segment_numbers(), strict=True):
        label = seg.get_segment_description(number).segment_label
        labels[plane > 0] = name_to_class[label]
    return labels
