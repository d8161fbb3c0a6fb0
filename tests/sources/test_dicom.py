"""DICOM reading on real scanner files: decoding, colour, timing, calibration and bad input."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import apply_color_lut, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from usguide.errors import (
    CalibrationWarning,
    CorruptSourceError,
    NoPixelDataError,
    SourceNotFoundError,
    UnsupportedFormatError,
    UsguideError,
)
from usguide.sources import open_source
from usguide.sources.dicom import DicomSource, frame_times_from_header, regions_from_header

CINE = "color3d_jpeg_baseline.dcm"


def reference_pixels(path: Path, index: int = 0) -> np.ndarray:
    """pydicom's own decode, palette applied, as uint8: what usguide must reproduce."""
    ds = pydicom.dcmread(path)
    arr = pixel_array(path, index=index)
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
        if arr.dtype != np.uint8:
            arr = arr >> 8 if arr.max() > 255 else arr
    return arr.astype(np.uint8)


def test_sonosite_cine_frames_timing_and_calibration(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / CINE) as src:
        assert src.frame_count == 120
        assert src.shape == (480, 640)
        assert src.frame_time_s == pytest.approx(0.0333, abs=1e-4)
        assert src.frame_rate_hz == pytest.approx(30.0, abs=0.01)
        assert src.spacing_mm == pytest.approx((0.5105, 0.5105), abs=1e-4)
        assert src.imaging_region.bbox == (84, 31, 595, 414)
        frames = list(src)
    assert [f.index for f in frames] == list(range(120))
    assert frames[0].pixels.shape == (480, 640, 3)
    assert frames[0].pixels.dtype == np.uint8
    assert frames[10].timestamp_s == pytest.approx(10 * 0.033333, abs=1e-6)
    assert frames[119].timestamp_s == pytest.approx(119 * 0.033333, abs=1e-6)
    assert frames[5].spacing_mm == pytest.approx((0.5105, 0.5105), abs=1e-4)
    # Consecutive frames of a cine differ: we did not return one frame 120 times.
    assert not np.array_equal(frames[0].pixels, frames[60].pixels)


def test_jpeg_baseline_uses_fast_decoder_and_matches_pydicom(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / CINE) as src:
        assert src.decoder_name == "opencv"
        for index in (0, 37, 119):
            ours = src.read(index).pixels.astype(int)
            ref = reference_pixels(dicom_dir / CINE, index).astype(int)
            # Two JPEG decoders differ only by IDCT rounding.
            assert np.abs(ours - ref).mean() < 0.5
            assert np.abs(ours - ref).max() <= 16


def test_fast_decoder_disagreement_falls_back_to_pydicom(
    dicom_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If OpenCV ever decodes a file differently (an odd colour encoding), pydicom decodes it."""
    original = DicomSource._decode_opencv

    def tinted(self: DicomSource, index: int) -> np.ndarray:
        out = original(self, index).copy()
        out[..., 0] //= 2  # wrong colours
        return out

    monkeypatch.setattr(DicomSource, "_decode_opencv", tinted)
    with DicomSource(dicom_dir / CINE) as src:
        assert src.decoder_name == "pydicom:pylibjpeg"
        ref = reference_pixels(dicom_dir / CINE, 3)
        assert np.array_equal(src.read(3).pixels, ref)


def test_random_access_equals_sequential(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / CINE) as src:
        seq = [f.pixels for _, f in zip(range(6), src, strict=False)]
        assert np.array_equal(src.read(5).pixels, seq[5])
        assert np.array_equal(src.read(-120).pixels, seq[0])
        with pytest.raises(IndexError):
            src.read(120)


def test_decoding_is_lazy(dicom_dir: Path) -> None:
    """Frames are read on demand: the file handle stays open and nothing is cached per frame."""
    import tracemalloc

    with DicomSource(dicom_dir / CINE) as src:
        tracemalloc.start()
        for _frame in src:
            pass
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    # 120 decoded RGB frames would be 110 MB; a handful of frames is all that may be alive.
    assert peak < 10 * 640 * 480 * 3


def test_region_outside_image_is_invalid_with_warning(dicom_dir: Path) -> None:
    with pytest.warns(CalibrationWarning, match="outside the 320 x 240 image"):
        src = DicomSource(dicom_dir / "examples_ybr_color.dcm", detect_region=False)
    with src:
        assert src.spacing_mm is None
        header = src.regions[0]
        assert header.valid is False and header.spacing_mm is None
        assert header.bbox == (84, 31, 595, 414)
        frame = src.read(0)
        assert frame.spacing_mm is None
        assert frame.region.valid and frame.region.inside(240, 320)
        assert frame.pixels.shape == (240, 320, 3)
        assert src.frame_count == 30


def test_aloka_two_side_by_side_regions(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / "gdcm-US-ALOKA-16.dcm") as src:
        valid = [r for r in src.regions if r.valid]
        assert len(valid) == 2
        assert valid[0].bbox == (32, 24, 335, 415)
        assert valid[1].bbox == (336, 24, 639, 415)
        for r in valid:
            assert r.spacing_mm == pytest.approx((0.3827, 0.3827), abs=1e-4)
        frame = src.read(0)
        assert len(frame.regions) == 2
        assert frame.pixels.shape == (480, 640, 3)
        assert "16-bit" in src.colour
        assert np.array_equal(frame.pixels, reference_pixels(dicom_dir / "gdcm-US-ALOKA-16.dcm"))


@pytest.mark.parametrize(
    ("name", "shape", "decoder"),
    [
        ("JPGLosslessP14SV1_1s_1f_8b.dcm", (768, 1024), "opencv"),
        ("US1_J2KR.dcm", (480, 640, 3), "pydicom:pylibjpeg"),
        ("US1_J2KI.dcm", (480, 640, 3), "pydicom:pylibjpeg"),
        ("US1_UNCR.dcm", (480, 640, 3), "native"),
        ("OBXXXX1A.dcm", (600, 800, 3), "native"),
        ("OBXXXX1A_rle_2frame.dcm", (600, 800, 3), "pydicom:pylibjpeg"),
    ],
)
def test_encodings_decode_to_the_right_pixels(
    dicom_dir: Path, name: str, shape: tuple[int, ...], decoder: str
) -> None:
    with DicomSource(dicom_dir / name) as src:
        assert src.decoder_name == decoder
        frames = list(src)
        assert len(frames) == src.frame_count
        for f in frames:
            assert f.pixels.shape == shape and f.pixels.dtype == np.uint8
        assert np.array_equal(frames[0].pixels, reference_pixels(dicom_dir / name))
        assert frames[0].pixels.std() > 5  # an image, not a blank


def test_lossless_and_uncompressed_ge_files_agree(dicom_dir: Path) -> None:
    """The same GE image stored uncompressed and JPEG 2000 lossless decodes identically."""
    with DicomSource(dicom_dir / "US1_UNCR.dcm") as a, DicomSource(dicom_dir / "US1_J2KR.dcm") as b:
        assert np.array_equal(a.read(0).pixels, b.read(0).pixels)


def test_palette_rle_and_uncompressed_agree(dicom_dir: Path) -> None:
    with (
        DicomSource(dicom_dir / "OBXXXX1A.dcm") as plain,
        DicomSource(dicom_dir / "OBXXXX1A_rle_2frame.dcm") as rle,
    ):
        assert np.array_equal(plain.read(0).pixels, rle.read(0).pixels)
        # Philips writes MaxX1 = 800 for an 800-column image: clipped, spacing kept.
        region = plain.imaging_region
        assert region.bbox == (120, 60, 799, 518)
        assert region.spacing_mm == pytest.approx((0.2623, 0.2623), abs=1e-4)


def test_no_regions_means_no_spacing(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / "US1_UNCR.dcm", detect_region=False) as src:
        assert src.spacing_mm is None
        assert src.read(0).spacing_mm is None
        assert src.frame_time_s is None


def test_user_spacing_and_region_override(dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / CINE, spacing_mm=0.2) as src:
        assert src.spacing_mm == (0.2, 0.2)
        assert src.read(0).spacing_mm == (0.2, 0.2)
    with DicomSource(dicom_dir / CINE, spacing_mm=(0.1, 0.3), region=(10, 20, 300, 400)) as src:
        frame = src.read(3)
        assert frame.region.bbox == (10, 20, 300, 400)
        assert frame.region.origin == "user"
        assert frame.spacing_mm == (0.1, 0.3)
    with pytest.raises(ValueError, match="positive"):
        DicomSource(dicom_dir / CINE, spacing_mm=-1)
    with (
        pytest.raises(ValueError, match="outside"),
        DicomSource(dicom_dir / CINE, region=(0, 0, 640, 480)) as src,
    ):
        _ = src.regions


def test_units_other_than_cm_give_no_spacing(dicom_dir: Path) -> None:
    ds = pydicom.dcmread(dicom_dir / CINE, stop_before_pixels=True)
    ds.SequenceOfUltrasoundRegions[0].PhysicalUnitsXDirection = 4  # seconds
    with pytest.warns(CalibrationWarning, match="not centimetres"):
        regions = regions_from_header(ds, 480, 640, "test")
    assert regions[0].spacing_mm is None and not regions[0].valid
    ds.SequenceOfUltrasoundRegions[0].PhysicalUnitsXDirection = 3
    ds.SequenceOfUltrasoundRegions[0].PhysicalDeltaY = 0.1  # anisotropic: rows 1 mm
    (region,) = regions_from_header(ds, 480, 640, "test")
    assert region.spacing_mm == pytest.approx((1.0, 0.5105), abs=1e-4)


def test_timing_priority() -> None:
    ds = Dataset()
    ds.FrameIncrementPointer = 0x00181065
    ds.FrameTimeVector = [0, 40, 40, 50]
    ds.FrameTime = 33.3
    nominal, stamps = frame_times_from_header(ds, 4)
    assert stamps == pytest.approx([0.0, 0.04, 0.08, 0.13])
    assert nominal == pytest.approx(0.04333, abs=1e-4)
    ds = Dataset()
    ds.CineRate = 25
    ds.RecommendedDisplayFrameRate = 10
    assert frame_times_from_header(ds, 3)[0] == pytest.approx(0.04)
    ds = Dataset()
    ds.RecommendedDisplayFrameRate = 10
    assert frame_times_from_header(ds, 3)[1] == pytest.approx([0.0, 0.1, 0.2])
    ds.RecommendedDisplayFrameRate = 0  # nonsense is unknown, never a guess
    assert frame_times_from_header(ds, 3) == (None, None)


def test_identifiers_never_reach_info(dicom_dir: Path) -> None:
    for path in sorted(dicom_dir.glob("*.dcm")):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            with open_source(path) as src:
                text = repr(src.info().to_dict())
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName"):
            value = str(ds.get(keyword, "") or "")
            if len(value) > 2:
                assert value not in text, f"{keyword} of {path.name} leaked into info"


# -- bad input ---------------------------------------------------------------------------------


def _write_sr(path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.88.11"  # Basic Text SR
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "SR"
    ds.PatientName = "Doe^Jane"
    ds.save_as(path, enforce_file_format=True)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="missing.dcm"):
        DicomSource(tmp_path / "missing.dcm")


def test_structured_report_has_no_pixel_data(tmp_path: Path) -> None:
    path = tmp_path / "report.dcm"
    _write_sr(path)
    with pytest.raises(NoPixelDataError, match="report.dcm: no pixel data") as info:
        open_source(path)
    assert "Doe" not in str(info.value)


@pytest.mark.parametrize("fraction", [0.5, 0.9, 0.999])
def test_truncated_cine(dicom_dir: Path, tmp_path: Path, fraction: float) -> None:
    data = (dicom_dir / CINE).read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(CorruptSourceError, match="cut.dcm: truncated"):
        DicomSource(path)


def test_truncated_uncompressed(dicom_dir: Path, tmp_path: Path) -> None:
    data = (dicom_dir / "US1_UNCR.dcm").read_bytes()
    path = tmp_path / "cut.dcm"
    path.write_bytes(data[:-1000])
    with pytest.raises(CorruptSourceError, match="truncated"):
        DicomSource(path)


def test_corrupt_jpeg_frame(dicom_dir: Path, tmp_path: Path) -> None:
    """JPEG bytes overwritten with noise: a clear error, not garbage pixels."""
    src = dicom_dir / "examples_ybr_color.dcm"
    data = bytearray(src.read_bytes())
    with DicomSource(src, detect_region=False) as good:
        assert good._frame_spans is not None
        ((offset, length),) = good._frame_spans[0]
    rng = np.random.default_rng(0)
    data[offset : offset + length] = rng.integers(0, 256, length, dtype=np.uint8).tobytes()
    path = tmp_path / "noise.dcm"
    path.write_bytes(bytes(data))
    with pytest.raises(CorruptSourceError, match="noise.dcm"):
        DicomSource(path)


def test_not_dicom(tmp_path: Path) -> None:
    path = tmp_path / "random.dcm"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CorruptSourceError, match="random.dcm: not a valid DICOM"):
        DicomSource(path)


def test_unsupported_transfer_syntax(dicom_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "h264.dcm"
    shutil.copy(dicom_dir / "examples_ybr_color.dcm", path)
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"  # MPEG-4 AVC/H.264
    ds.save_as(path)
    with pytest.raises(UnsupportedFormatError, match="h264.dcm: transfer syntax MPEG-4"):
        DicomSource(path)


def test_every_error_is_a_usguide_error() -> None:
    for cls in (
        SourceNotFoundError,
        NoPixelDataError,
        CorruptSourceError,
        UnsupportedFormatError,
    ):
        assert issubclass(cls, UsguideError)
