"""DICOM ultrasound cines and single frames, decoded lazily one frame at a time.

The header is parsed once; the file stays open and each frame is read from its own offset, so a
2000-frame cine never sits decoded in memory. Decoders:

- JPEG baseline and JPEG lossless: OpenCV's libjpeg-turbo on the frame's own bytes, 4 to 10 times
  faster here than pydicom's plugins. It is checked against pydicom's decoder on the first frame
  when the file opens (bit for bit for lossless); on disagreement (an unusual colour encoding, a
  bit depth OpenCV does not keep) the file falls back to pydicom. libjpeg decodes around damage
  in a frame's scan (cut short, bytes altered) and only prints a warning; that warning is caught
  (:func:`usguide.sources.jpeg.imdecode_checked`) and the frame raises
  :class:`CorruptSourceError` instead of delivering the grey or smeared blocks libjpeg fills in.
- Uncompressed 8/16-bit: read straight from the file, no decoder.
- Everything else (JPEG-LS, JPEG 2000, RLE, ...): pydicom with the plugin named explicitly
  (pylibjpeg: libjpeg, openjpeg, rle).

Calibration comes from SequenceOfUltrasoundRegions, timing from FrameIncrementPointer, FrameTime,
FrameTimeVector, CineRate and RecommendedDisplayFrameRate. Nothing here prints header values that
could identify a patient.
"""

from __future__ import annotations

import math
import os
import struct
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import cv2
import numpy as np

from usguide.errors import (
    CalibrationWarning,
    CorruptSourceError,
    NoPixelDataError,
    SourceNotFoundError,
    UnsupportedFormatError,
)
from usguide.frame import Region
from usguide.sources.base import BBox, SeekableSource
from usguide.sources.jpeg import JPEG_EOI, imdecode_checked

# DICOM tags named in FrameIncrementPointer.
_TAG_FRAME_TIME = 0x00181063
_TAG_FRAME_TIME_VECTOR = 0x00181065
_CM_UNITS = 3  # PhysicalUnitsX/YDirection code for centimetres
_SPATIAL_2D = 1  # RegionSpatialFormat
_DATA_TISSUE = 1  # RegionDataType
# Explicit-VR representations whose length field is 4 bytes (PS3.5 7.1.2), not 2.
_LONG_LENGTH_VRS = frozenset(
    {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
)

# Transfer syntaxes OpenCV decodes from a frame's bytes, and whether it must match pydicom exactly
# (lossless) or within IDCT rounding (lossy). OpenCV's OpenJPEG is no faster than pylibjpeg's.
_OPENCV_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": False,  # JPEG baseline (process 1)
    "1.2.840.10008.1.2.4.57": True,  # JPEG lossless (process 14)
    "1.2.840.10008.1.2.4.70": True,  # JPEG lossless, first-order prediction (SV1)
}
# Explicit plugin for pydicom: pylibjpeg's decoders are the fast choice; pydicom would otherwise
# try plugins in its own order.
_PLUGIN_PREFERENCE = ("pylibjpeg", "gdcm", "pillow")
Span = tuple[int, int]  # (file offset, length) of a run of a frame's bytes


class _DamagedJpegError(CorruptSourceError):
    """A frame whose JPEG data is damaged: no reason to try another decoder, which would fill
    the gaps in as well."""


def regions_from_header(ds: Any, rows: int, columns: int, source: str) -> tuple[Region, ...]:
    """The 2D tissue regions of SequenceOfUltrasoundRegions, as :class:`Region`.

    Only regions with RegionSpatialFormat 1 and RegionDataType 1 are imaging regions. Physical
    deltas in centimetres are converted to millimetres. A region whose rectangle falls outside the
    ``rows`` x ``columns`` image, whose units are not centimetres, or whose deltas are not positive
    keeps its rectangle but gets ``spacing_mm=None``; a :class:`CalibrationWarning` says why.
    A maximum coordinate exactly one past the edge (a common vendor habit of an exclusive end) is
    clipped, since it does not change the spacing.

    Returns
    -------
    tuple of Region
        Valid regions first, in header order, then invalid ones.
    """
    valid: list[Region] = []
    invalid: list[Region] = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or ():
        if item.get("RegionSpatialFormat") != _SPATIAL_2D:
            continue
        if item.get("RegionDataType") != _DATA_TISSUE:
            continue
        try:
            bbox = tuple(
                int(item[k].value)
                for k in (
                    "RegionLocationMinX0",
                    "RegionLocationMinY0",
                    "RegionLocationMaxX1",
                    "RegionLocationMaxY1",
                )
            )
        except (KeyError, TypeError, ValueError):
            warnings.warn(
                f"{source}: an ultrasound region lacks its rectangle; ignored",
                CalibrationWarning,
                stacklevel=3,
            )
            continue
        x0, y0, x1, y1 = bbox
        note = ""
        # Each axis on its own: an exclusive end on one axis must not hide a bad other one.
        if x1 == columns:
            x1 = columns - 1
            note = "region ends one pixel past the image edge; clipped"
        if y1 == rows:
            y1 = rows - 1
            note = "region ends one pixel past the image edge; clipped"
        bbox = (x0, y0, x1, y1)
        problem = _region_problem(item, bbox, rows, columns)
        if problem:
            warnings.warn(
                f"{source}: ultrasound region {list(bbox)} rejected: {problem}; spacing unknown",
                CalibrationWarning,
                stacklevel=3,
            )
            invalid.append(Region(bbox, None, False, "dicom", problem))  # type: ignore[arg-type]
            continue
        spacing = (10.0 * float(item.PhysicalDeltaY), 10.0 * float(item.PhysicalDeltaX))
        valid.append(Region(bbox, spacing, True, "dicom", note))  # type: ignore[arg-type]
    return tuple(valid + invalid)


def _region_problem(item: Any, bbox: tuple[int, ...], rows: int, columns: int) -> str:
    """Why a region's calibration cannot be trusted, or '' when it can."""
    x0, y0, x1, y1 = bbox
    if not (0 <= x0 <= x1 < columns and 0 <= y0 <= y1 < rows):
        return f"rectangle lies outside the {columns} x {rows} image"
    units = (item.get("PhysicalUnitsXDirection"), item.get("PhysicalUnitsYDirection"))
    if units != (_CM_UNITS, _CM_UNITS):
        return f"physical units {units} are not centimetres (3)"
    try:
        dx, dy = float(item.PhysicalDeltaX), float(item.PhysicalDeltaY)
    except (AttributeError, TypeError, ValueError):
        return "physical deltas missing"
    if not (math.isfinite(dx) and math.isfinite(dy) and dx > 0 and dy > 0):
        return f"physical deltas ({dx}, {dy}) are not positive"
    return ""


def frame_times_from_header(
    ds: Any, n_frames: int, source: str = "DICOM header"
) -> tuple[float | None, np.ndarray | None]:
    """Nominal frame time and per-frame timestamps, in seconds, from a DICOM header.

    Order of trust: the attribute FrameIncrementPointer names (FrameTime or FrameTimeVector),
    then FrameTime, CineRate and RecommendedDisplayFrameRate; else unknown. A FrameTimeVector
    that is not numbers is skipped with a :class:`CalibrationWarning` naming ``source``.

    Returns
    -------
    frame_time_s : float or None
        Nominal time between frames.
    timestamps_s : ndarray or None
        ``(n_frames,)`` float64 time of each frame from the first, or None when unknown.
    """
    pointer = ds.get("FrameIncrementPointer", None)
    pointers = [int(t) for t in (pointer if isinstance(pointer, Sequence) else [pointer]) if t]
    increments: np.ndarray | None = None
    if _TAG_FRAME_TIME_VECTOR in pointers and "FrameTimeVector" in ds:
        try:
            # pydicom converts DS values on access, so a bad number can raise here already.
            vector = ds.FrameTimeVector
            values = (
                vector if isinstance(vector, Sequence) and not isinstance(vector, str) else [vector]
            )
            increments = np.asarray([float(v) for v in values], dtype=np.float64) / 1000.0
        except (TypeError, ValueError, OverflowError):
            # The values themselves are never quoted: header text stays out of messages.
            warnings.warn(
                f"{source}: FrameTimeVector is not numeric; frame times taken from the next "
                "timing attribute",
                CalibrationWarning,
                stacklevel=2,
            )
    if increments is not None:
        usable = len(increments) == n_frames and np.all(np.isfinite(increments))
        if usable and np.all(increments[1:] > 0):
            # FrameTimeVector[0] is the increment before the first frame, 0 by definition.
            increments[0] = 0.0
            stamps = np.cumsum(increments)
            nominal = float(np.mean(increments[1:])) if n_frames > 1 else None
            return nominal, stamps
    candidates: list[float | None] = [
        _positive(ds.get("FrameTime", None), scale=1e-3),
        _positive(ds.get("CineRate", None), invert=True),
        _positive(ds.get("RecommendedDisplayFrameRate", None), invert=True),
    ]
    for frame_time in candidates:
        if frame_time is not None:
            return frame_time, np.arange(n_frames, dtype=np.float64) * frame_time
    return None, None


def _positive(value: Any, *, scale: float = 1.0, invert: bool = False) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(v) or v <= 0:
        return None
    return 1.0 / v if invert else v * scale


class DicomSource(SeekableSource):
    """Frames of a DICOM ultrasound file (US Image Storage or US Multi-frame Image Storage).

    Parameters
    ----------
    path : str or PathLike
        The DICOM file.
    spacing_mm : float or (float, float), optional
        Millimetres per pixel ``(row, col)`` that override the header's.
    region : (x0, y0, x1, y1), optional
        Imaging rectangle (inclusive pixels) that overrides the header's regions.
    detect_region : bool
        When the header has no valid region, find the imaging area in the first frame.

    Raises
    ------
    SourceNotFoundError, NoPixelDataError, CorruptSourceError, UnsupportedFormatError
    """

    kind = "dicom"

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        spacing_mm: float | Sequence[float] | None = None,
        region: BBox | None = None,
        detect_region: bool = True,
    ) -> None:
        super().__init__(
            str(path), spacing_mm=spacing_mm, region=region, detect_region=detect_region
        )
        import pydicom
        from pydicom.errors import BytesLengthException, InvalidDicomError

        p = Path(path)
        if not p.is_file():
            raise SourceNotFoundError(path, "no such file")
        self._lock = threading.Lock()  # one file handle: seek+read must not interleave
        self._fp: BinaryIO | None = p.open("rb")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # pydicom's header warnings may quote values
                ds = pydicom.dcmread(self._fp, stop_before_pixels=True)
            ts = ds.file_meta.get("TransferSyntaxUID", None)
            if ts == "1.2.840.10008.1.2.1.99":
                # The whole dataset is zlib-compressed: frames have no file offsets to read from.
                raise UnsupportedFormatError(
                    path, "Deflated Explicit VR Little Endian cannot be read frame by frame"
                )
            self._pixel_offset = self._find_pixel_data(ds)
        except InvalidDicomError as e:
            self.close()
            raise CorruptSourceError(
                path, "not a valid DICOM file (no 'DICM' marker after the 128-byte preamble)"
            ) from e
        except (EOFError, OSError, ValueError, KeyError, struct.error, BytesLengthException) as e:
            self.close()
            raise CorruptSourceError(path, f"truncated or corrupt DICOM header ({e})") from e
        except Exception:
            self.close()
            raise
        self._ds = ds
        try:
            with warnings.catch_warnings():
                # pydicom converts values on first access and its warnings quote them; ours
                # (calibration, timing) still pass.
                warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\.|$)")
                self._setup(ds)
        except Exception:
            self.close()
            raise

    # -- opening -----------------------------------------------------------------------------------
    def _find_pixel_data(self, ds: Any) -> int:
        """Offset of the Pixel Data value; the file is positioned at its tag after the header."""
        assert self._fp is not None
        tag_pos = self._fp.tell()
        head = self._fp.read(8)
        if len(head) < 8:
            if head or self._header_cut_short(ds):
                raise CorruptSourceError(
                    self.source, "truncated: the file ends inside its header, before any pixel data"
                )
            sop = getattr(ds.get("SOPClassUID", None), "name", "unknown SOP class")
            # A cut exactly between two elements cannot be told from a header-only file.
            hint = "; the header describes an image, so the file may be truncated"
            hint = hint if "Rows" in ds and "Columns" in ds else ""
            raise NoPixelDataError(self.source, f"no pixel data in this DICOM ({sop}){hint}")
        ts = ds.file_meta.get("TransferSyntaxUID", None)
        little = ts is None or ts.is_little_endian
        group, elem = struct.unpack("<HH" if little else ">HH", head[:4])
        if (group, elem) != (0x7FE0, 0x0010):
            kind = "float pixel data" if group == 0x7FE0 else f"element ({group:04X},{elem:04X})"
            raise UnsupportedFormatError(self.source, f"{kind} is not an ultrasound image")
        implicit = ts is not None and ts.is_implicit_VR
        return tag_pos + (8 if implicit else 12)

    def _header_cut_short(self, ds: Any) -> bool:
        """True when the file ends part-way through the header.

        pydicom stops quietly at the end of the file, keeping a short last value and skipping a
        partial tag, so a cut header looks like one that simply holds no pixel data. A complete
        header ends exactly where its last element does.
        """
        assert self._fp is not None
        size = os.fstat(self._fp.fileno()).st_size
        tags = list(ds.keys())
        if not tags:
            return True  # a file meta and not one whole element after it
        implicit, little = getattr(ds, "original_encoding", (None, None))
        implicit, little = bool(implicit), little is not False
        last = ds.get_item(tags[-1])  # raw where possible: no value conversion, nothing quoted
        tell = getattr(last, "value_tell", None)
        tell = getattr(last, "file_tell", None) if tell is None else tell
        if tell is None:
            return False
        length = getattr(last, "length", None)
        if length is None and not getattr(last, "is_undefined_length", False):
            # Converted while reading (Specific Character Set): its length is in the file.
            wide = implicit or str(last.VR) in _LONG_LENGTH_VRS
            self._fp.seek(tell - (4 if wide else 2))
            raw = self._fp.read(4 if wide else 2)
            if len(raw) != (4 if wide else 2):
                return True
            length = struct.unpack(("<" if little else ">") + ("I" if wide else "H"), raw)[0]
        if length is not None and length != 0xFFFFFFFF:
            return int(tell) + int(length) != size
        # An undefined-length sequence ends with its delimitation item (FFFE,E0DD), length 0.
        delimiter = struct.pack("<HHI" if little else ">HHI", 0xFFFE, 0xE0DD, 0)
        self._fp.seek(max(size - 8, 0))
        return self._fp.read(8) != delimiter

    def _setup(self, ds: Any) -> None:
        from pydicom.pixels import get_decoder
        from pydicom.pixels.utils import as_pixel_options

        ts = ds.file_meta.get("TransferSyntaxUID", None)
        if ts is None:
            raise UnsupportedFormatError(self.source, "no transfer syntax in the file meta")
        self._ts = ts
        try:
            decoder = get_decoder(ts)
        except NotImplementedError as e:
            raise UnsupportedFormatError(
                self.source, f"transfer syntax {ts.name} ({ts}) cannot be decoded"
            ) from e
        plugins = decoder.available_plugins if ts.is_compressed else ()
        if ts.is_compressed and not plugins:
            raise UnsupportedFormatError(
                self.source, f"no decoder installed for transfer syntax {ts.name} ({ts})"
            )
        self._decoder = decoder
        self._plugin = next((p for p in _PLUGIN_PREFERENCE if p in plugins), "")
        try:
            rows, columns = ds.Rows, ds.Columns
            self._samples = int(ds.SamplesPerPixel)
            self._bits_allocated = int(ds.BitsAllocated)
            self._bits_stored = int(ds.get("BitsStored", self._bits_allocated))
            self._photometric = str(ds.PhotometricInterpretation)
            self._signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
        except (AttributeError, TypeError, ValueError) as e:
            raise CorruptSourceError(self.source, f"image attributes missing ({e})") from e
        self._rows = self._count("Rows", rows)
        self._columns = self._count("Columns", columns)
        # An empty NumberOfFrames means one frame; a present but bad one is a corrupt header.
        n_frames = ds.get("NumberOfFrames", None)
        self._n_frames = (
            1 if n_frames is None or n_frames == "" else self._count("NumberOfFrames", n_frames)
        )
        opts = as_pixel_options(ds)
        opts.update(
            transfer_syntax_uid=ts,
            pixel_keyword="PixelData",
            number_of_frames=self._n_frames,
        )
        self._opts = opts
        self._palette = self._palette_table(ds) if self._photometric == "PALETTE COLOR" else None
        if self._palette is not None:
            self._palette_lut = self._palette.reshape(-1, 1, 3)
        self._frame_time, self._stamps = frame_times_from_header(ds, self._n_frames, self.source)
        self._frame_spans = self._index_frames()
        exact = _OPENCV_SYNTAXES.get(str(ts))
        self._opencv = (
            exact is not None
            and self._frame_spans is not None
            and self._opencv_matches_pydicom(exact=exact)
        )
        self._header_regions = regions_from_header(ds, self._rows, self._columns, self.source)
        # Decode the first frame now: a corrupt file fails at open, not mid-playback.
        self._first = self._read_pixels(0)[0]

    def _count(self, keyword: str, value: Any) -> int:
        """A header count (Rows, Columns, NumberOfFrames) as an int >= 1, else a typed error."""
        try:
            number = float(value)
        except (TypeError, ValueError, OverflowError):
            number = math.nan
        if not (math.isfinite(number) and number.is_integer() and number >= 1):
            # Only the keyword is named: header text is never quoted.
            raise CorruptSourceError(
                self.source, f"invalid {keyword}: must be a whole number of at least 1"
            )
        return int(number)

    def _index_frames(self) -> list[list[Span]] | None:
        """Where each frame's bytes lie in the file; checks the file is complete.

        For compressed data this is known when each frame is one fragment (the usual case) or
        the file holds a single frame; otherwise None, and pydicom finds the frames itself.
        """
        from pydicom import encaps

        assert self._fp is not None
        size = os.fstat(self._fp.fileno()).st_size
        if not self._ts.is_compressed:
            frame_len = self._rows * self._columns * self._samples * self._bits_allocated // 8
            if self._samples == 3 and self._photometric == "YBR_FULL_422":
                # Two luma samples share one Cb and one Cr: 2 samples per pixel, not 3.
                frame_len = frame_len // 3 * 2
            need = self._pixel_offset + frame_len * self._n_frames
            if need > size:
                raise CorruptSourceError(
                    self.source,
                    f"truncated: pixel data needs {need} bytes, the file has {size}",
                )
            start = self._pixel_offset
            return [[(start + i * frame_len, frame_len)] for i in range(self._n_frames)]
        self._fp.seek(self._pixel_offset)
        try:
            encaps.parse_basic_offsets(self._fp)
            n_fragments, offsets = encaps.parse_fragments(self._fp)
        except struct.error as e:  # the file ends inside the offset table or an item's header
            raise CorruptSourceError(
                self.source, "truncated: the file ends inside the compressed pixel data"
            ) from e
        except (ValueError, EOFError, OSError) as e:
            raise CorruptSourceError(self.source, f"corrupt compressed pixel data ({e})") from e
        items: list[Span] = []
        for off in offsets:
            self._fp.seek(off + 4)
            raw = self._fp.read(4)
            length = struct.unpack("<I", raw)[0] if len(raw) == 4 else -1
            if length < 0 or off + 8 + length > size:
                raise CorruptSourceError(
                    self.source, "truncated: a compressed frame runs past the end of the file"
                )
            items.append((off + 8, length))
        if not items:
            raise CorruptSourceError(self.source, "compressed pixel data holds no frame")
        if n_fragments < self._n_frames:
            raise CorruptSourceError(
                self.source,
                f"truncated: {n_fragments} compressed fragments for {self._n_frames} frames",
            )
        if n_fragments == self._n_frames:
            return [[item] for item in items]
        return [items] if self._n_frames == 1 else None

    def _palette_table(self, ds: Any) -> np.ndarray:
        """RGB uint8 table indexed by stored pixel value, ``(N, 3)``; N is 256 or 65536."""
        from pydicom.pixels import apply_color_lut

        n_index = 1 << min(self._bits_stored, 16)
        index = np.arange(n_index, dtype=np.uint16 if n_index > 256 else np.uint8)
        try:
            table = apply_color_lut(index, ds)
        except (ValueError, AttributeError, KeyError) as e:
            raise CorruptSourceError(self.source, f"invalid palette colour table ({e})") from e
        if table.dtype != np.uint8:
            # A 16-bit LUT whose entries all fit in 8 bits was written by a vendor that stored
            # 8-bit values in 16-bit words (PS3.3 C.7.6.3.1.5); scaling it down would darken it.
            table = table if table.max() <= 255 else table >> 8
        return np.ascontiguousarray(table.astype(np.uint8))

    def _opencv_matches_pydicom(self, *, exact: bool) -> bool:
        """True when OpenCV decodes frame 0 as pydicom does: identically when ``exact``, else
        within JPEG decoders' IDCT rounding."""
        try:
            fast = self._decode_opencv(0)
            reference = self._decode_pydicom(0)
        except _DamagedJpegError:
            raise  # pydicom's decoder would fill the damage in without a word
        except Exception:  # noqa: BLE001 - any failure means: keep the reference decoder
            return False
        if fast.shape != reference.shape or fast.dtype != reference.dtype:
            return False
        if exact:
            return bool(np.array_equal(fast, reference))
        diff = cv2.absdiff(fast, reference)
        return float(diff.mean()) < 1.0 and int(np.percentile(diff, 99.9)) <= 8

    # -- decoding ----------------------------------------------------------------------------------
    def _read_bytes(self, index: int) -> bytes:
        assert self._frame_spans is not None and self._fp is not None
        parts = []
        with self._lock:
            for offset, length in self._frame_spans[index]:
                self._fp.seek(offset)
                parts.append(self._fp.read(length))
        data = b"".join(parts) if len(parts) > 1 else parts[0]
        if len(data) != sum(length for _, length in self._frame_spans[index]):
            raise CorruptSourceError(self.source, f"frame {index} is truncated")
        return data

    def _decode_opencv(self, index: int) -> np.ndarray:
        data = self._read_bytes(index)
        buf = np.frombuffer(data, dtype=np.uint8)
        if self._samples == 3:
            flag = cv2.IMREAD_COLOR_RGB  # libjpeg-turbo writes RGB directly, no extra pass
        elif self._bits_stored <= 8:
            flag = cv2.IMREAD_GRAYSCALE
        else:
            flag = cv2.IMREAD_UNCHANGED
        out, damage = imdecode_checked(buf, flag)
        if damage:
            raise _DamagedJpegError(self.source, f"frame {index}: JPEG data is damaged ({damage})")
        if out is None:
            # Cut short before its end-of-image marker (a DICOM pad byte may follow it): OpenCV
            # gives up, but pydicom's decoder would return the part that is there.
            if not data[-8:].rstrip(b"\x00").endswith(JPEG_EOI):
                raise _DamagedJpegError(
                    self.source, f"frame {index}: JPEG data is cut short (no end-of-image marker)"
                )
            raise CorruptSourceError(self.source, f"frame {index}: JPEG data cannot be decoded")
        return out

    def _decode_native(self, index: int) -> np.ndarray:
        dtype = np.dtype(np.uint8 if self._bits_allocated == 8 else "<u2")
        if self._bits_allocated not in (8, 16) or not self._ts.is_little_endian:
            return self._decode_pydicom(index)
        if self._samples == 3:
            planar = int(self._opts.get("planar_configuration", 0))
            if planar == 0 and self._photometric == "YBR_FULL_422" and self._bits_allocated == 8:
                return self._decode_ybr422(index)
            if planar != 0 or self._photometric != "RGB":
                return self._decode_pydicom(index)
        shape: tuple[int, ...] = (self._rows, self._columns)
        if self._samples == 3:
            shape = (*shape, 3)
        arr = np.frombuffer(self._read_bytes(index), dtype=dtype).reshape(shape)
        return self._stored_values(arr)

    def _stored_values(self, arr: np.ndarray) -> np.ndarray:
        """Raw words to stored values: bits above BitsStored dropped (some vendors keep overlays
        there), and signed data sign-extended from its top stored bit, as pydicom returns it."""
        bits = arr.dtype.itemsize * 8
        if not (self._signed or 0 < self._bits_stored < bits):
            return arr
        # Shifting the top stored bit into the word's top bit clears the bits above it; an
        # arithmetic shift back then extends the sign, a logical one leaves zeros.
        shift = bits - min(max(self._bits_stored, 1), bits)
        word = np.left_shift(arr, shift, dtype=arr.dtype)
        if self._signed:
            word = word.view(np.int8 if bits == 8 else np.int16)
        return word >> shift

    def _decode_ybr422(self, index: int) -> np.ndarray:
        """Uncompressed 8-bit YBR_FULL_422 to RGB: each pair of pixels is stored Y Y Cb Cr."""
        from pydicom.pixels import convert_color_space

        if self._columns % 2:
            return self._decode_pydicom(index)  # no whole pairs: let pydicom handle the odd case
        raw = np.frombuffer(self._read_bytes(index), dtype=np.uint8)
        pairs = raw.reshape(self._rows, self._columns // 2, 4)
        ybr = np.empty((self._rows, self._columns, 3), dtype=np.uint8)
        ybr[..., 0] = pairs[..., :2].reshape(self._rows, self._columns)
        ybr[..., 1] = np.repeat(pairs[..., 2], 2, axis=1)
        ybr[..., 2] = np.repeat(pairs[..., 3], 2, axis=1)
        # pydicom's own conversion, so the colours match its decoder exactly.
        return convert_color_space(ybr, "YBR_FULL", "RGB")

    def _decode_pydicom(self, index: int) -> np.ndarray:
        assert self._fp is not None
        with self._lock:
            self._fp.seek(self._pixel_offset)
            try:
                arr, _ = self._decoder.as_array(
                    self._fp,
                    index=index,
                    validate=True,
                    decoding_plugin=self._plugin,
                    **self._opts,
                )
            except (ValueError, RuntimeError, EOFError, OSError) as e:
                raise CorruptSourceError(
                    self.source, f"frame {index} cannot be decoded ({e})"
                ) from e
        return arr

    def _to_uint8(self, arr: np.ndarray) -> np.ndarray:
        """Stored values to uint8: palette to RGB, deep grey scaled, MONOCHROME1 inverted."""
        if self._palette is not None:
            index = arr if arr.ndim == 2 else arr[..., 0]
            if index.dtype == np.uint8 and len(self._palette) == 256:
                # cv2.LUT maps each channel through its own column: 9x faster than indexing.
                return cv2.LUT(cv2.cvtColor(index, cv2.COLOR_GRAY2RGB), self._palette_lut)
            return np.take(self._palette, index, axis=0)
        if arr.dtype != np.uint8 or self._signed:
            shift = max(self._bits_stored - 8, 0)
            wide = np.asarray(arr, dtype=np.int32 if self._signed else np.uint32)
            if self._signed:
                # Stored range [-2^(b-1), 2^(b-1) - 1] onto [0, 2^b - 1]: most negative is black.
                wide = wide + (1 << (max(self._bits_stored, 1) - 1))
            arr = (wide >> shift).clip(0, 255).astype(np.uint8)
        if self._photometric == "MONOCHROME1":
            arr = 255 - arr
        return np.ascontiguousarray(arr)

    def _read_pixels(self, index: int) -> tuple[np.ndarray, float | None]:
        if self._opencv:
            pixels = self._to_uint8(self._decode_opencv(index))
        elif not self._ts.is_compressed and self._frame_spans is not None:
            pixels = self._to_uint8(self._decode_native(index))
        else:
            pixels = self._to_uint8(self._decode_pydicom(index))
        stamp = float(self._stamps[index]) if self._stamps is not None else None
        return pixels, stamp

    # -- what it holds -----------------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return self._n_frames

    @property
    def frame_time_s(self) -> float | None:
        return self._frame_time

    @property
    def shape(self) -> tuple[int, int]:
        return self._rows, self._columns

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return f"{self._ts.name} ({self._ts})"

    @property
    def colour(self) -> str:  # type: ignore[override]
        if self._palette is not None:
            lut_bits = 16 if self._bits_stored > 8 else 8
            return f"PALETTE COLOR ({lut_bits}-bit index)"
        return self._photometric

    @property
    def decoder_name(self) -> str:
        """The decoder that reads this file's frames."""
        if self._opencv:
            return "opencv"
        if not self._ts.is_compressed:
            return "native"
        return f"pydicom:{self._plugin}"

    def _native_regions(self) -> tuple[Region, ...]:
        return self._header_regions

    def _first_pixels(self) -> np.ndarray | None:
        return self._first

    def _info_details(self) -> dict[str, Any]:
        ds = self._ds
        sop = ds.get("SOPClassUID", None)
        return {
            "sop_class": getattr(sop, "name", None),
            "modality": ds.get("Modality", None),
            "manufacturer": ds.get("Manufacturer", None),
            "bits_stored": self._bits_stored,
            "decoder": self.decoder_name,
        }

    def close(self) -> None:
        fp, self._fp = getattr(self, "_fp", None), None
        if fp is not None:
            fp.close()
