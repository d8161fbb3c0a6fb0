"""Image files and folders: natural order, grey and colour, mixed sizes, bad input."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.conftest import damaged_jpeg
from usguide.errors import (
    CorruptSourceError,
    EmptySourceError,
    SourceNotFoundError,
    UnsupportedFormatError,
)
from usguide.sources import open_source
from usguide.sources.images import ImageSource, natural_key, read_image


def _write(path: Path, value: int, shape: tuple[int, ...] = (60, 80)) -> np.ndarray:
    rng = np.random.default_rng(value)
    image = rng.integers(0, 256, shape, dtype=np.uint8)
    image[0, 0] = value  # tells the frames apart
    assert cv2.imwrite(str(path), image if image.ndim == 2 else image[..., ::-1])
    return image


def test_natural_order(tmp_path: Path) -> None:
    for i in (10, 2, 1, 33, 3):
        _write(tmp_path / f"frame{i}.png", i)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"")
    with ImageSource(tmp_path, detect_region=False) as src:
        assert src.frame_count == 5
        values = [int(f.pixels[0, 0]) for f in src]
        names = [Path(f.source).name for f in src]
    assert values == [1, 2, 3, 10, 33]
    assert names == ["frame1.png", "frame2.png", "frame3.png", "frame10.png", "frame33.png"]


def test_natural_key() -> None:
    names = ["img_10.png", "IMG_9.png", "img_1b.png", "img_1a.png"]
    assert sorted(names, key=natural_key) == ["img_1a.png", "img_1b.png", "IMG_9.png", "img_10.png"]


def test_formats_and_colour(tmp_path: Path) -> None:
    grey = _write(tmp_path / "a.png", 1)
    rgb = _write(tmp_path / "b.tif", 2, (60, 80, 3))
    assert np.array_equal(read_image(tmp_path / "a.png"), grey)
    assert np.array_equal(read_image(tmp_path / "b.tif"), rgb)  # RGB order, not BGR
    deep = (np.arange(60 * 80, dtype=np.uint16).reshape(60, 80) * 13) % 65535
    cv2.imwrite(str(tmp_path / "c.png"), deep)
    assert np.array_equal(read_image(tmp_path / "c.png"), (deep >> 8).astype(np.uint8))
    jpg = tmp_path / "d.jpg"
    cv2.imwrite(str(jpg), np.full((40, 50, 3), 128, np.uint8))
    assert read_image(jpg).shape == (40, 50, 3)


def test_mixed_sizes_get_their_own_region(tmp_path: Path) -> None:
    _write(tmp_path / "1.png", 1, (60, 80))
    _write(tmp_path / "2.png", 2, (100, 120))
    with ImageSource(tmp_path, detect_region=False, spacing_mm=0.1) as src:
        a, b = list(src)
    assert a.region.bbox == (0, 0, 79, 59)
    assert b.region.bbox == (0, 0, 119, 99)
    assert b.spacing_mm == (0.1, 0.1)


def test_timing_only_when_given(tmp_path: Path) -> None:
    for i in range(3):
        _write(tmp_path / f"{i}.png", i)
    with ImageSource(tmp_path, detect_region=False) as src:
        assert [f.timestamp_s for f in src] == [None, None, None]
        assert src.frame_time_s is None
    with ImageSource(tmp_path, detect_region=False, frame_time_s=0.05) as src:
        assert [f.timestamp_s for f in src] == pytest.approx([0.0, 0.05, 0.1])


def test_list_of_files_keeps_given_order(tmp_path: Path) -> None:
    paths = [tmp_path / f"{i}.png" for i in range(3)]
    for i, p in enumerate(paths):
        _write(p, i)
    with ImageSource(paths[::-1], detect_region=False) as src:
        assert [int(f.pixels[0, 0]) for f in src] == [2, 1, 0]
        assert int(src.read(2).pixels[0, 0]) == 0


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(SourceNotFoundError, match="nowhere"):
        ImageSource(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmptySourceError, match="empty: folder holds no"):
        open_source(empty)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    with pytest.raises(CorruptSourceError, match="broken.png"):
        ImageSource(broken)
    with pytest.raises(UnsupportedFormatError, match="unknown.xyz"):
        (tmp_path / "unknown.xyz").write_bytes(b"abc")
        open_source(tmp_path / "unknown.xyz")


def test_real_screen_capture_finds_imaging_area(test_data: Path) -> None:
    path = test_data / "screen-captures" / "rectus_img_55.png"
    with open_source(path) as src:
        frame = src.read(0)
    assert frame.pixels.shape == (864, 1152, 3)
    assert frame.region.origin == "detected"
    assert frame.spacing_mm is None
    # The imaging area is a large part of the screen but not all of it (UI around it).
    area = frame.region.width * frame.region.height
    assert 0.2 * 864 * 1152 < area < 0.95 * 864 * 1152


def test_sixteen_bit_images_keep_their_contrast(tmp_path: Path) -> None:
    """12-bit data in a 16-bit PNG is scaled by the bits it uses; a fixed >> 8 made it black."""
    ramp = np.tile(np.arange(0, 4096, 16, dtype=np.uint16), (4, 1))
    assert cv2.imwrite(str(tmp_path / "twelve.png"), ramp)
    image = read_image(tmp_path / "twelve.png")
    assert image.dtype == np.uint8
    assert np.array_equal(image, (ramp >> 4).astype(np.uint8))
    full = ramp * 16  # the whole 16-bit range: as before
    assert cv2.imwrite(str(tmp_path / "sixteen.png"), full)
    assert np.array_equal(read_image(tmp_path / "sixteen.png"), (full >> 8).astype(np.uint8))


def test_every_page_of_a_tiff_is_a_frame(tmp_path: Path) -> None:
    """A TIFF cine is read page by page; before, only its first page was read."""
    pages = [np.full((16, 16), 40 * i, np.uint8) for i in range(3)]
    assert cv2.imwritemulti(str(tmp_path / "cine.tif"), pages)
    assert cv2.imwrite(str(tmp_path / "b.png"), np.full((16, 16), 200, np.uint8))
    with ImageSource(tmp_path) as source:
        assert source.frame_count == 4
        assert [int(f.pixels[0, 0]) for f in source] == [200, 0, 40, 80]
        assert source.page_of(3) == (tmp_path / "cine.tif", 2, 3)
        assert int(source.read(2).pixels[0, 0]) == 40  # random access to a page
    with pytest.raises(UnsupportedFormatError, match="cine.tif: a TIFF of 3 pages"):
        read_image(tmp_path / "cine.tif")  # one image asked for: never silently page 0
    assert int(read_image(tmp_path / "cine.tif", page=2)[0, 0]) == 80


def test_a_folder_says_which_entries_it_does_not_read(tmp_path: Path) -> None:
    _write(tmp_path / "a.png", 1)
    (tmp_path / "scan.dcm").write_bytes(b"x")
    (tmp_path / "more").mkdir()
    (tmp_path / ".hidden").write_bytes(b"x")
    with pytest.warns(UserWarning, match=r"2 entries .* not read \(more/, scan.dcm\)"):
        source = ImageSource(tmp_path)
    assert source.frame_count == 1


def test_images_of_one_size_from_other_scans_get_their_own_region(tmp_path: Path) -> None:
    """A folder of independent images: the first image's imaging area is not imposed on an
    image whose own lies elsewhere (it cut off labelled anatomy); frames of one layout keep one
    region."""
    rng = np.random.default_rng(0)

    def scan(x0: int, x1: int) -> np.ndarray:
        image = np.zeros((240, 320), np.uint8)
        image[20:220, x0:x1] = rng.integers(40, 200, (200, x1 - x0), dtype=np.uint8)
        return image

    for name, (x0, x1) in {"a": (10, 200), "b": (120, 310), "c": (10, 200)}.items():
        assert cv2.imwrite(str(tmp_path / f"{name}.png"), scan(x0, x1))
    with ImageSource(tmp_path) as source:
        a, b, c = (f.region.bbox for f in source)
    assert a[0] < 20 and a[2] < 210 and b[0] > 110 and b[2] > 300
    assert c == a


@pytest.mark.parametrize("how", ["cut", "flipped"])
def test_a_damaged_jpeg_image_is_a_corrupt_source(tmp_path: Path, how: str) -> None:
    """libjpeg decodes around damage and only prints a warning: the grey or smeared blocks it
    fills in must not pass for a scan."""
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (120, 160), dtype=np.uint8), (5, 5), 0)
    whole = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    good, bad = tmp_path / "a_good.jpg", tmp_path / "b_bad.jpg"
    good.write_bytes(whole)
    bad.write_bytes(damaged_jpeg(whole, how))
    assert read_image(good).shape == image.shape
    with pytest.raises(CorruptSourceError, match="b_bad.jpg.*JPEG data is damaged"):
        read_image(bad)
    with ImageSource(tmp_path) as source:  # opens on the good image, fails at the bad one
        assert source.read(0).pixels.shape == image.shape
        with pytest.raises(CorruptSourceError, match="b_bad.jpg"):
            source.read(1)
