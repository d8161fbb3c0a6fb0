"""DICOM reading on real scanner files: decoding, colour, timing, calibration and bad input."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import apply_color_lut, convert_color_space, pixel_array
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid

from tests.conftest import damaged_jpeg
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


def _region_item(x0: int, y0: int, x1: int, y1: int) -> Dataset:
    item = Dataset()
    item.RegionSpatialFormat = 1
    item.RegionDataType = 1
    item.RegionLocationMinX0, item.RegionLocationMinY0 = x0, y0
    item.RegionLocationMaxX1, item.RegionLocationMaxY1 = x1, y1
    item.PhysicalUnitsXDirection = item.PhysicalUnitsYDirection = 3
    item.PhysicalDeltaX, item.PhysicalDeltaY = 0.01, 0.02
    return item


@pytest.mark.parametrize(
    ("bbox", "valid", "kept"),
    [
        ((0, 0, 320, 239), True, (0, 0, 319, 239)),  # exclusive end on x only: clipped
        ((0, 0, 319, 240), True, (0, 0, 319, 239)),  # exclusive end on y only: clipped
        ((0, 0, 320, 240), True, (0, 0, 319, 239)),  # both
        ((0, 0, 320, 479), False, (0, 0, 319, 479)),  # x one past, y far out: rejected
        ((0, 0, 639, 240), False, (0, 0, 639, 239)),  # y one past, x far out: rejected
    ],
)
def test_region_clip_is_per_axis(
    bbox: tuple[int, int, int, int], valid: bool, kept: tuple[int, int, int, int]
) -> None:
    """Only the axis whose end is one past its own edge is clipped; the other is still checked."""
    ds = Dataset()
    ds.SequenceOfUltrasoundRegions = [_region_item(*bbox)]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (region,) = regions_from_header(ds, 240, 320, "r.dcm")
    assert region.valid is valid and region.bbox == kept
    if valid:
        assert region.spacing_mm == pytest.approx((0.2, 0.1))
        assert not caught
    else:
        assert region.spacing_mm is None
        assert any("r.dcm" in str(w.message) and "outside" in str(w.message) for w in caught)


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


def _new_dataset(sop_class: str, modality: str) -> Dataset:
    """An empty explicit-VR little-endian dataset of ``sop_class``, with its file meta."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    return ds


def _write_sr(path: Path) -> None:
    ds = _new_dataset("1.2.840.10008.5.1.4.1.1.88.11", "SR")  # Basic Text SR
    ds.PatientName = "Doe^Jane"
    ds.save_as(path, enforce_file_format=True)


def _write_image(
    path: Path,
    pixels: bytes,
    *,
    rows: int,
    columns: int,
    samples: int = 1,
    bits: int = 8,
    stored: int | None = None,
    photometric: str = "MONOCHROME2",
    signed: bool = False,
    **extra: object,
) -> Path:
    """A small uncompressed US image; ``extra`` sets further header attributes."""
    ds = _new_dataset("1.2.840.10008.5.1.4.1.1.3.1", "US")  # US Multi-frame Image
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = stored or bits
    ds.HighBit = (stored or bits) - 1
    ds.PixelRepresentation = int(signed)
    if samples == 3:
        ds.PlanarConfiguration = 0
    for keyword, value in extra.items():
        setattr(ds, keyword, value)
    ds.PixelData = pixels
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    ds.save_as(path, enforce_file_format=True)
    return path


def test_uncompressed_ybr_full_422_decodes_to_rgb(tmp_path: Path) -> None:
    """Uncompressed YBR_FULL_422 stores 2 bytes a pixel (Y Y Cb Cr per pair), not 3."""
    rows, columns, n = 32, 48, 3
    data = np.random.default_rng(2).integers(0, 256, rows * columns * 2 * n, dtype=np.uint8)
    path = _write_image(
        tmp_path / "ybr422.dcm",
        data.tobytes(),
        rows=rows,
        columns=columns,
        samples=3,
        photometric="YBR_FULL_422",
        NumberOfFrames=n,
    )
    with DicomSource(path) as src:
        assert src.decoder_name == "native"
        for index in range(n):
            ybr = pixel_array(path, index=index, raw=True)  # pydicom: upsampled, still YBR
            expected = convert_color_space(ybr, "YBR_FULL", "RGB")
            assert np.array_equal(expected, pixel_array(path, index=index))
            pixels = src.read(index).pixels
            assert pixels.shape == (rows, columns, 3)
            assert np.array_equal(pixels, expected)


def test_deep_grey_ignores_bits_above_bits_stored(tmp_path: Path) -> None:
    """12-bit values with the unused high bits set (overlays) must not come out white."""
    grey = np.linspace(0, 4095, 256).astype(np.uint16).reshape(16, 16)
    path = _write_image(
        tmp_path / "g12.dcm", (grey | 0xF000).tobytes(), rows=16, columns=16, bits=16, stored=12
    )
    with DicomSource(path) as src:
        pixels = src.read(0).pixels
    assert np.array_equal(pixels, (grey >> 4).astype(np.uint8))
    assert np.array_equal(pixels, (pixel_array(path) >> 4).astype(np.uint8))
    assert pixels.min() == 0 and pixels.max() == 255


@pytest.mark.parametrize(("bits", "stored"), [(16, 12), (16, 16), (8, 8)])
def test_signed_grey_maps_stored_range_monotonically(
    tmp_path: Path, bits: int, stored: int
) -> None:
    """PixelRepresentation 1: most negative is black, zero mid-grey, most positive white."""
    low, high = -(1 << (stored - 1)), (1 << (stored - 1)) - 1
    ramp = np.linspace(low, high, 256).round().astype(np.int16 if bits == 16 else np.int8)
    raw = ramp.reshape(16, 16)
    if stored < bits:
        raw = raw.view(np.uint16) & np.uint16((1 << stored) - 1)  # no sign bits above HighBit
    path = _write_image(
        tmp_path / "signed.dcm",
        raw.tobytes(),
        rows=16,
        columns=16,
        bits=bits,
        stored=stored,
        signed=True,
    )
    with DicomSource(path) as src:
        pixels = src.read(0).pixels.ravel()
        # pydicom's decoder (compressed files) must give the same grey as the native path.
        assert np.array_equal(src._to_uint8(src._decode_pydicom(0)).ravel(), pixels)
    assert pixels[0] == 0 and pixels[-1] == 255
    assert pixels[np.argmin(np.abs(ramp.astype(int)))] in (127, 128)
    assert np.all(np.diff(pixels.astype(int)) >= 0)


def _header_file(tmp_path: Path, name: str, old: bytes = b"", new: bytes = b"") -> Path:
    """A 4-frame 8x8 cine timed by FrameTimeVector, with ``old`` bytes patched to ``new``."""
    path = _write_image(
        tmp_path / name,
        bytes(8 * 8 * 4),
        rows=8,
        columns=8,
        NumberOfFrames=4,
        FrameIncrementPointer=0x00181065,
        FrameTimeVector=["0", "40", "40", "40"],
        FrameTime="50",
    )
    if old:
        data = path.read_bytes()
        assert len(old) == len(new) and data.count(old) == 1
        path.write_bytes(data.replace(old, new))
    return path


def test_non_numeric_frame_time_vector_falls_back_with_warning(tmp_path: Path) -> None:
    with DicomSource(_header_file(tmp_path, "good.dcm")) as src:
        assert src.frame_time_s == pytest.approx(0.04)
    path = _header_file(tmp_path, "ftv.dcm", b"0\\40\\40\\40", b"0\\ab\\40\\40")
    with pytest.warns(CalibrationWarning, match="ftv.dcm: FrameTimeVector is not numeric"):
        src = DicomSource(path)
    with src:
        assert src.frame_time_s == pytest.approx(0.05)  # FrameTime, the next source
        assert src.read(3).timestamp_s == pytest.approx(0.15)


@pytest.mark.parametrize("value", [b"ab", b"-4", b"0 ", b"2.5 "])
def test_bad_number_of_frames_is_a_corrupt_source(tmp_path: Path, value: bytes) -> None:
    tag = b"\x28\x00\x08\x00IS"  # (0028,0008) NumberOfFrames, explicit VR
    length = len(value).to_bytes(2, "little")
    path = _write_image(tmp_path / "nof.dcm", bytes(8 * 8 * 4), rows=8, columns=8)
    ds = pydicom.dcmread(path)
    ds.NumberOfFrames = 4
    ds.save_as(path)
    data = path.read_bytes()
    good = tag + b"\x02\x004 "
    assert data.count(good) == 1
    path.write_bytes(data.replace(good, tag + length + value))
    with pytest.raises(CorruptSourceError, match="nof.dcm: invalid NumberOfFrames"):
        DicomSource(path)


@pytest.mark.parametrize("keyword", ["Rows", "Columns"])
def test_zero_rows_or_columns_is_a_corrupt_source(tmp_path: Path, keyword: str) -> None:
    size = {"rows": 8, "columns": 8, keyword.lower(): 0}
    path = _write_image(tmp_path / "empty.dcm", b"", **size)  # type: ignore[arg-type]
    with pytest.raises(CorruptSourceError, match=f"empty.dcm: invalid {keyword}"):
        DicomSource(path)


def _cut_points(path: Path) -> dict[str, int]:
    """Offsets inside the header of ``path``: in the file meta, in a tag, in a value."""
    with path.open("rb") as f:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
    rows = ds.get_item("Rows").value_tell  # explicit VR, 2-byte length: tag starts 8 before
    return {"file meta": 140, "mid tag": rows - 8 + 3, "mid value": rows + 1}


@pytest.mark.parametrize("where", ["file meta", "mid tag", "mid value"])
def test_file_cut_inside_header_is_truncated(dicom_dir: Path, tmp_path: Path, where: str) -> None:
    """pydicom stops quietly at the end of a cut header; that is a truncated file, not one
    without pixel data."""
    source = dicom_dir / "US1_UNCR.dcm"
    cut = _cut_points(source)[where]
    path = tmp_path / "cut.dcm"
    path.write_bytes(source.read_bytes()[:cut])
    with pytest.raises(CorruptSourceError, match="cut.dcm: truncated"):
        DicomSource(path)


def test_file_cut_inside_offset_table_is_truncated(dicom_dir: Path, tmp_path: Path) -> None:
    with DicomSource(dicom_dir / CINE) as src:
        pixel_offset = src._pixel_offset
    path = tmp_path / "cut.dcm"
    path.write_bytes((dicom_dir / CINE).read_bytes()[: pixel_offset + 6])
    with pytest.raises(CorruptSourceError, match="cut.dcm: truncated"):
        DicomSource(path)


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


def _jpeg_frames(n: int, *, colour: bool) -> list[bytes]:
    """``n`` JPEG baseline frames of a 48 x 64 speckled pattern, each different."""
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:48, 0:64]
    frames = []
    for i in range(n):
        base = 128 + 60 * np.sin(xx / 7 + i) * np.cos(yy / 11) + rng.normal(0, 20, xx.shape)
        grey = np.clip(base, 0, 255).astype(np.uint8)
        image = np.dstack([grey, np.roll(grey, 5, axis=1), 255 - grey]) if colour else grey
        ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])
        assert ok
        frames.append(encoded.tobytes())
    return frames


def _write_jpeg_cine(path: Path, frames: list[bytes], *, colour: bool) -> Path:
    """A US multi-frame JPEG baseline DICOM holding ``frames``, one fragment each."""
    ds = _new_dataset("1.2.840.10008.5.1.4.1.1.3.1", "US")
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.Rows, ds.Columns = 48, 64
    ds.SamplesPerPixel = 3 if colour else 1
    ds.PhotometricInterpretation = "YBR_FULL_422" if colour else "MONOCHROME2"
    if colour:
        ds.PlanarConfiguration = 0
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.NumberOfFrames = len(frames)
    ds.PixelData = encapsulate(frames)
    ds["PixelData"].VR = "OB"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.mark.parametrize("colour", [False, True], ids=["grey", "colour"])
@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_damaged_jpeg_frame_is_a_corrupt_source(
    tmp_path: Path, capfd: pytest.CaptureFixture[str], how: str, colour: bool
) -> None:
    """libjpeg decodes around a damaged scan and only prints a warning; the frame must raise
    an error naming the file and frame, not come out as a concealed grey or smeared image."""
    frames = _jpeg_frames(4, colour=colour)
    good = _write_jpeg_cine(tmp_path / "good.dcm", frames, colour=colour)
    frames[2] = damaged_jpeg(frames[2], how)
    path = _write_jpeg_cine(tmp_path / "cine.dcm", frames, colour=colour)
    with DicomSource(good) as whole, DicomSource(path) as src:
        assert src.decoder_name == "opencv"
        for index in (0, 1, 3):  # the intact frames read as they do in the intact file
            assert np.array_equal(src.read(index).pixels, whole.read(index).pixels)
        with pytest.raises(CorruptSourceError, match=r"cine\.dcm: frame 2: JPEG data is damaged"):
            src.read(2)
        delivered = []
        with pytest.raises(CorruptSourceError, match="frame 2"):
            for frame in src:
                delivered.append(frame.index)
        assert delivered == [0, 1]
    # The warning became the error: libjpeg's own line does not reach the terminal.
    assert "Corrupt JPEG" not in capfd.readouterr().err


@pytest.mark.parametrize("how", ["cut", "flipped", "cut, no end marker"])
def test_damaged_first_jpeg_frame_fails_at_open(tmp_path: Path, how: str) -> None:
    """Frame 0 is also the test of OpenCV against pydicom; damage there must not send the file
    to pydicom's decoder, which decodes the same damage without a word."""
    frames = _jpeg_frames(3, colour=True)
    frames[0] = damaged_jpeg(frames[0], how)
    path = _write_jpeg_cine(tmp_path / "first.dcm", frames, colour=True)
    with pytest.raises(CorruptSourceError, match=r"first\.dcm: frame 0: JPEG data is"):
        DicomSource(path)


def test_harmless_jpeg_warning_is_not_damage(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """Only libjpeg's corrupt-data warnings mean damage; others (an unknown JFIF revision)
    decode as before and still reach stderr, as does anything else printed meanwhile."""
    frames = _jpeg_frames(2, colour=False)
    jfif = frames[1].index(b"JFIF\x00") + 5
    frames[1] = frames[1][:jfif] + b"\x03\x07" + frames[1][jfif + 2 :]  # JFIF version 3.07
    path = _write_jpeg_cine(tmp_path / "jfif.dcm", frames, colour=False)
    with DicomSource(path) as src:
        src.read(1)
    assert "unknown JFIF revision number 3.07" in capfd.readouterr().err


def test_real_jpeg_cines_have_no_damaged_frame(shared_data: Path) -> None:
    """Every frame of the real JPEG files decodes with the fast decoder and no damage found."""
    paths = sorted((shared_data / "dicom-us").glob("*.dcm"))
    checked = 0
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", CalibrationWarning)
            src = DicomSource(path)
        with src:
            if src.decoder_name != "opencv":
                continue
            assert sum(1 for _ in src) == src.frame_count
            checked += 1
    assert checked >= 3  # two JPEG baseline cines and one JPEG lossless frame


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
