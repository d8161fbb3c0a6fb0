"""open_source picks the reader by content and name."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from usguide.sources import is_device, is_dicom_file, open_source
from usguide.sources.dicom import DicomSource
from usguide.sources.images import ImageSource


def test_dicom_without_extension_is_found_by_content(dicom_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "IM000001"  # scanners often write DICOM files with no suffix
    shutil.copy(dicom_dir / "US1_UNCR.dcm", path)
    assert is_dicom_file(path)
    with open_source(path, detect_region=False) as src:
        assert isinstance(src, DicomSource)
        assert src.frame_count == 1


def test_folder_and_image_file(tmp_path: Path) -> None:
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((8, 8), np.uint8))
    with open_source(tmp_path, detect_region=False) as src:
        assert isinstance(src, ImageSource)
    with open_source(tmp_path / "a.png", detect_region=False) as src:
        assert isinstance(src, ImageSource) and src.frame_count == 1


def test_device_specs() -> None:
    assert is_device(0) and is_device("2") and is_device("/dev/video0")
    assert not is_device("scan.dcm") and not is_device("12.mp4")


def test_a_folder_named_by_digits_is_a_folder_not_a_device(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("20240101").mkdir()
    cv2.imwrite("20240101/a.png", np.zeros((8, 8), np.uint8))
    assert not is_device("20240101") and is_device("20240102")
    with open_source("20240101", detect_region=False) as src:
        assert isinstance(src, ImageSource) and src.frame_count == 1
