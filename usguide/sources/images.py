"""Still images (PNG, JPEG, TIFF, BMP): one file, a list of files, or a folder in natural order."""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np

from usguide.errors import (
    CorruptSourceError,
    EmptySourceError,
    SourceNotFoundError,
    UnsupportedFormatError,
)
from usguide.frame import Frame, Region
from usguide.sources.base import BBox, SeekableSource
from usguide.sources.jpeg import imdecode_checked

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
_TIFF_SUFFIXES = frozenset({".tif", ".tiff"})
_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[tuple[int, int | str], ...]:
    """Sort key that orders ``frame2`` before ``frame10`` (case-insensitive)."""
    return tuple(
        (0, int(part)) if part.isdigit() else (1, part.lower())
        for part in _DIGITS.split(name)
        if part
    )


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly inside ``folder``, naturally sorted; hidden files are skipped."""
    entries = [
        p
        for p in Path(folder).iterdir()
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    ]
    return sorted(entries, key=lambda p: natural_key(p.name))


def _warn_skipped(folder: Path, images: list[Path]) -> None:
    """Say which entries of a frame folder are not read: subfolders, DICOM files, videos..."""
    kept = set(images)
    skipped = sorted(
        (q.name + ("/" if q.is_dir() else "") for q in folder.iterdir()
         if q not in kept and not q.name.startswith(".")),
        key=natural_key,
    )  # fmt: skip
    if skipped:
        shown = ", ".join(skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        warnings.warn(
            f"{folder}: {len(skipped)} entries are not PNG, JPEG, TIFF or BMP images and are "
            f"not read ({shown}); give DICOM files and videos, and subfolders, by name",
            stacklevel=3,
        )


def page_count(path: str | os.PathLike[str]) -> int:
    """Pages in an image file: a TIFF may hold a cine, one frame per page; other types hold one.
    An unreadable file counts one (reading it then names the problem)."""
    if Path(path).suffix.lower() not in _TIFF_SUFFIXES:
        return 1
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return max(1, int(getattr(im, "n_frames", 1)))
    except (UnidentifiedImageError, OSError, ValueError):
        return 1


def decode_image_file(path: Path) -> np.ndarray:
    """The file's pixels as OpenCV decodes them (``IMREAD_UNCHANGED``: BGR order, any depth).

    Every image file usguide reads goes through here, so damaged JPEG data is refused everywhere.

    Raises
    ------
    CorruptSourceError
        The file cannot be decoded, or its JPEG data is damaged (libjpeg would fill the gaps
        in with grey or smeared blocks, which are not the scan).
    """
    data = np.fromfile(path, dtype=np.uint8)  # np.fromfile + imdecode: non-ASCII paths too
    image, damage = imdecode_checked(data, cv2.IMREAD_UNCHANGED) if data.size else (None, "")
    if damage:
        raise CorruptSourceError(path, f"JPEG data is damaged ({damage})")
    if image is None:
        raise CorruptSourceError(path, "image cannot be decoded (corrupt or not an image)")
    return image


def read_image(path: str | os.PathLike[str], page: int | None = None) -> np.ndarray:
    """Read an image file as uint8 ``(H, W)`` grey or ``(H, W, 3)`` RGB.

    16-bit images are scaled to 8 bits by the bits their values use (12-bit data stored in 16
    bits keeps its contrast), alpha is dropped, palette images become RGB.

    Parameters
    ----------
    page : int, optional
        The page of a multi-page TIFF (from 0). Without it, a file of several pages is refused
        rather than cut to its first (:class:`ImageSource` reads every page as a frame).

    Raises
    ------
    SourceNotFoundError, CorruptSourceError, UnsupportedFormatError
    """
    p = Path(path)
    if not p.is_file():
        raise SourceNotFoundError(path, "no such file")
    if page is None:  # the pages are counted only here: a sequence knows them already
        pages = page_count(p)
        if pages > 1:
            raise UnsupportedFormatError(
                path,
                f"a TIFF of {pages} pages: read it as a sequence (ImageSource), one frame a page",
            )
    if page:  # a later page of a TIFF cine: OpenCV reads it alone
        ok, mats = cv2.imreadmulti(str(p), start=page, count=1, flags=cv2.IMREAD_UNCHANGED)
        if not (ok and mats):
            raise CorruptSourceError(path, f"page {page} cannot be read (no such page, or corrupt)")
        image = mats[0]
    else:
        image = decode_image_file(p)
    if image.dtype == np.uint16:
        # A fixed >> 8 turns data of 12 bits or fewer nearly black.
        shift = max(0, int(image.max()).bit_length() - 8)
        image = (image >> shift).astype(np.uint8)
    elif image.dtype != np.uint8:
        raise UnsupportedFormatError(path, f"{image.dtype} images are not supported")
    if image.ndim == 3:
        if image.shape[2] == 1:
            return np.ascontiguousarray(image[:, :, 0])
        code = cv2.COLOR_BGRA2RGB if image.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(image, code)
    return image


class ImageSource(SeekableSource):
    """Frames from image files: a single file, a folder (natural order) or a list of paths.

    Every page of a multi-page TIFF is a frame, in page order. Images in one folder may differ
    in size; a frame whose size differs from the first image's gets its own imaging region
    (detected in its pixels, or the whole image).

    Parameters
    ----------
    path : str, PathLike or sequence of them
        An image file, a folder of images, or a list of image files in order.
    frame_time_s : float, optional
        Time between images when they form a sequence; timestamps are unknown (None) otherwise.
    spacing_mm, region, detect_region
        As for every source (see :class:`~usguide.sources.base.FrameSource`).
    """

    kind = "images"

    def __init__(
        self,
        path: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        *,
        frame_time_s: float | None = None,
        spacing_mm: float | Sequence[float] | None = None,
        region: BBox | None = None,
        detect_region: bool = True,
    ) -> None:
        if isinstance(path, (str, os.PathLike)):
            p = Path(path)
            if p.is_dir():
                files = list_images(p)
                if not files:
                    raise EmptySourceError(path, "folder holds no PNG, JPEG, TIFF or BMP image")
                _warn_skipped(p, files)
            elif p.is_file():
                if p.suffix.lower() not in IMAGE_SUFFIXES:
                    raise UnsupportedFormatError(path, f"'{p.suffix}' is not an image type")
                files = [p]
            else:
                raise SourceNotFoundError(path, "no such file or folder")
            name = str(path)
        else:
            files = [Path(f) for f in path]
            if not files:
                raise EmptySourceError("<image list>", "no image files given")
            missing = next((f for f in files if not f.is_file()), None)
            if missing is not None:
                raise SourceNotFoundError(missing, "no such file")
            name = str(files[0].parent)
        super().__init__(name, spacing_mm=spacing_mm, region=region, detect_region=detect_region)
        if frame_time_s is not None and not frame_time_s > 0:
            raise ValueError(f"frame_time_s must be positive, got {frame_time_s}")
        self.files: list[Path] = files
        # (file, page, pages in the file) of each frame.
        self._pages = [(f, k, n) for f in files for n in [page_count(f)] for k in range(n)]
        self._frame_time = frame_time_s
        first = read_image(files[0], page=0)
        self._first = first
        self._shape = (int(first.shape[0]), int(first.shape[1]))
        self.encoding = ", ".join(sorted({f.suffix.lower().lstrip(".") for f in files}))
        self.colour = "RGB" if first.ndim == 3 else "grey"  # of the first image

    @property
    def frame_count(self) -> int:
        return len(self._pages)

    def page_of(self, index: int) -> tuple[Path, int, int]:
        """The file frame ``index`` comes from, its page there, and how many pages it has."""
        return self._pages[index]

    @property
    def frame_time_s(self) -> float | None:
        return self._frame_time

    @property
    def shape(self) -> tuple[int, int]:
        return self._shape

    def _native_regions(self) -> tuple[Region, ...]:
        return ()

    def _first_pixels(self) -> np.ndarray | None:
        return self._first

    def _read_pixels(self, index: int) -> tuple[np.ndarray, float | None]:
        file, page, _ = self._pages[index]
        pixels = self._first if index == 0 else read_image(file, page=page)
        stamp = index * self._frame_time if self._frame_time is not None else None
        return pixels, stamp

    def make_frame(self, index: int, pixels: np.ndarray, timestamp_s: float | None) -> Frame:
        """As the base, but each frame names its own file, and an image gets its own region
        where the first image's does not fit it: another size, or, found in the pixels, a
        rectangle overlapping the first's by less than ``_SAME_REGION_IOU`` (images of one
        size from other scans; frames of one scan keep one region, so their labels are stable).
        """
        source = str(self._pages[index][0])
        if pixels.shape[:2] == self._shape:
            frame = replace(super().make_frame(index, pixels, timestamp_s), source=source)
            if index == 0 or frame.region.origin != "detected":
                return frame
            from usguide.imaging_region import box_iou, find_imaging_region

            bbox = find_imaging_region(pixels)
            if bbox is None or box_iou(bbox, frame.region.bbox) >= _SAME_REGION_IOU:
                return frame
            region = Region(bbox, self._user_spacing, True, "detected", "found in the pixels")
            return replace(frame, region=region, spacing_mm=region.spacing_mm, regions=(region,))
        rows, columns = pixels.shape[:2]
        if self._user_region is not None:
            region = Region(self._user_region, self._user_spacing, True, "user")  # type: ignore[arg-type]
            if not region.inside(rows, columns):
                raise ValueError(
                    f"{source}: region {list(region.bbox)} lies outside this "
                    f"{columns} x {rows} image"
                )
        else:
            region = Region.whole(rows, columns, self._user_spacing)
            if self._detect_region:
                from usguide.imaging_region import find_imaging_region

                bbox = find_imaging_region(pixels)
                if bbox is not None:
                    region = Region(
                        bbox, self._user_spacing, True, "detected", "found in the pixels"
                    )
        return Frame(
            pixels=pixels,
            index=index,
            timestamp_s=timestamp_s,
            spacing_mm=region.spacing_mm,
            region=region,
            source=source,
            regions=(region,),
        )


# Rectangles found in two images of one size that overlap at least this much (intersection
# over union) are one layout: the first image's is kept.
_SAME_REGION_IOU = 0.9


def read_mask(path: str | os.PathLike[str], *, binary_class: int | None = None) -> np.ndarray:
    """Read a label PNG as ``(H, W)`` uint8 class indices.

    Palette PNGs give their raw palette indices (not their display colours). With
    ``binary_class``, a 0/255 (or 0/1) mask becomes that class wherever it is set.

    Raises
    ------
    SourceNotFoundError, CorruptSourceError
        Missing file, unreadable file, or values that are not class indices.
    """
    from PIL import Image, UnidentifiedImageError

    from usguide.labels import N_CLASSES

    p = Path(path)
    if not p.is_file():
        raise SourceNotFoundError(path, "no such mask file")
    try:
        with Image.open(p) as im:
            if im.mode not in ("P", "L", "1", "I;16", "I"):
                im = im.convert("L")
            mask = np.array(im)
    except (UnidentifiedImageError, OSError) as e:
        raise CorruptSourceError(path, f"mask cannot be read ({e})") from e
    if mask.ndim != 2:
        raise CorruptSourceError(path, f"mask must be single-channel, got shape {mask.shape}")
    if binary_class is not None:
        return np.where(mask > 0, binary_class, 0).astype(np.uint8)
    top = int(mask.max()) if mask.size else 0
    if top >= N_CLASSES:
        raise CorruptSourceError(
            path,
            f"mask value {top} is not a class index 0-{N_CLASSES - 1} "
            "(for a 0/255 mask give --binary-class)",
        )
    return mask.astype(np.uint8)
