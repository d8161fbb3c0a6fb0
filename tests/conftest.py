"""Shared fixtures: the bundled test data, and the shared data mirror when it is present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TEST_DATA = Path(__file__).resolve().parent / "data"
REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    """``$USGUIDE_DATA`` or ``../shared/data`` beside the repository, when it exists."""
    env = os.environ.get("USGUIDE_DATA")
    path = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    return path if path.is_dir() else None


def damaged_jpeg(data: bytes, how: str) -> bytes:
    """JPEG ``data`` damaged half-way through its entropy-coded scan, as a broken transfer or
    storage leaves it: "cut" (the rest lost, the end-of-image marker still there), "flipped"
    (32 bytes inverted) or "cut, no end marker"."""
    mid = (data.index(b"\xff\xda") + len(data)) // 2  # after the start-of-scan header
    if how == "cut":
        return data[:mid] + b"\xff\xd9"
    if how == "flipped":
        return data[:mid] + bytes(b ^ 0xFF for b in data[mid : mid + 32]) + data[mid + 32 :]
    if how == "cut, no end marker":
        return data[:mid]
    raise AssertionError(how)


@pytest.fixture(scope="session")
def test_data() -> Path:
    return TEST_DATA


@pytest.fixture(scope="session")
def dicom_dir() -> Path:
    return TEST_DATA / "dicom"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared data mirror absent (set USGUIDE_DATA or place ../shared/data)")
    return path
