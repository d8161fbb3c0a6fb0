"""The Frame and Region types."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.frame import Frame, Region
from usguide.sources.base import parse_spacing


def test_region_geometry() -> None:
    r = Region((10, 20, 109, 69), (0.2, 0.3), True, "dicom")
    assert (r.width, r.height) == (100, 50)
    image = np.zeros((100, 200), np.uint8)
    assert image[r.slices].shape == (50, 100)
    assert r.inside(100, 200) and not r.inside(60, 200)
    assert r.to_dict()["bbox"] == [10, 20, 109, 69]
    assert r.to_dict()["spacing_mm"] == [0.2, 0.3]
    assert Region.whole(480, 640).bbox == (0, 0, 639, 479)


@pytest.mark.parametrize(
    "pixels",
    [np.zeros((4, 4), np.float32), np.zeros((4, 4, 4), np.uint8), np.zeros(4, np.uint8)],
)
def test_frame_rejects_wrong_pixels(pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="uint8"):
        Frame(pixels, 0, None, None, Region.whole(4, 4), "test")


def test_parse_spacing_accepts_numpy_scalars() -> None:
    assert parse_spacing(np.float32(0.25)) == (0.25, 0.25)
    assert parse_spacing(np.int64(1)) == (1.0, 1.0)
    assert parse_spacing(np.float64(0.5)) == (0.5, 0.5)
    assert parse_spacing(np.array(0.5)) == (0.5, 0.5)  # 0-d array: one number
    assert parse_spacing((np.float32(0.25), np.int64(2))) == (0.25, 2.0)
    for bad in (np.float32(0), np.int64(-1), np.float64("nan"), np.float32("inf")):
        with pytest.raises(ValueError, match="positive"):
            parse_spacing(bad)  # type: ignore[arg-type]


def test_parse_spacing() -> None:
    assert parse_spacing(0.5) == (0.5, 0.5)
    assert parse_spacing((0.1, 0.2)) == (0.1, 0.2)
    assert parse_spacing(None) is None
    for bad in (0, -1, float("nan"), (1, 2, 3), float("inf")):
        with pytest.raises(ValueError):
            parse_spacing(bad)  # type: ignore[arg-type]
