"""The usguide command line: its contract (keys, exit codes) on real files and bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from typer.testing import CliRunner

from usguide import __version__
from usguide.cli import app

runner = CliRunner()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """The real entry point in a fresh interpreter, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "usguide.cli", *args], capture_output=True, text=True, timeout=120
    )


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.stdout


def test_help_keeps_toml_table_names() -> None:
    """Option help shows TOML tables as written: ``[guidance]`` is not taken for markup."""
    result = runner.invoke(app, ["run", "--help"])
    assert result.exit_code == 0, result.output
    assert "[guidance]" in result.stdout
    assert "[[targets]]" in result.stdout


def test_info_json_contract_on_sonosite_cine(dicom_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(dicom_dir / "color3d_jpeg_baseline.dcm"), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["frames"] == 120
    assert (data["rows"], data["columns"]) == (480, 640)
    assert data["frame_time_s"] == pytest.approx(0.0333, abs=1e-4)
    assert data["spacing_mm"] == pytest.approx([0.5105, 0.5105], abs=1e-4)
    assert data["regions"][0]["bbox"] == [84, 31, 595, 414]
    assert data["regions"][0]["valid"] is True
    assert data["regions"][0]["spacing_mm"] == pytest.approx([0.5105, 0.5105], abs=1e-4)
    assert "JPEG Baseline" in data["encoding"]


def test_info_json_invalid_calibration(dicom_dir: Path) -> None:
    result = run("info", str(dicom_dir / "examples_ybr_color.dcm"), "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["spacing_mm"] is None
    assert data["regions"][0] == {
        "bbox": [84, 31, 595, 414],
        "spacing_mm": None,
        "valid": False,
        "origin": "dicom",
        "note": "rectangle lies outside the 320 x 240 image",
    }
    assert "warning" in result.stderr and "outside" in result.stderr


def test_info_json_two_regions(dicom_dir: Path) -> None:
    result = runner.invoke(app, ["info", str(dicom_dir / "gdcm-US-ALOKA-16.dcm"), "--json"])
    data = json.loads(result.stdout)
    valid = [r for r in data["regions"] if r["valid"]]
    assert [r["bbox"] for r in valid] == [[32, 24, 335, 415], [336, 24, 639, 415]]
    assert all(r["spacing_mm"] == pytest.approx([0.3827] * 2, abs=1e-4) for r in valid)


def test_info_overrides(dicom_dir: Path) -> None:
    result = runner.invoke(
        app,
        [
            "info",
            str(dicom_dir / "color3d_jpeg_baseline.dcm"),
            "--json",
            "--spacing-mm",
            "0.1,0.2",
            "--region",
            "0,0,99,49",
        ],
    )
    data = json.loads(result.stdout)
    assert data["spacing_mm"] == [0.1, 0.2]
    assert data["regions"] == [
        {
            "bbox": [0, 0, 99, 49],
            "spacing_mm": [0.1, 0.2],
            "valid": True,
            "origin": "user",
            "note": "",
        }
    ]


def test_info_human_readable_has_no_identifiers(dicom_dir: Path) -> None:
    path = dicom_dir / "JPGLosslessP14SV1_1s_1f_8b.dcm"
    result = run("info", str(path), "--check")
    assert result.returncode == 0, result.stderr
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    assert str(ds.PatientName) and str(ds.PatientName) not in result.stdout + result.stderr
    assert "0.2548" in result.stdout  # mm spacing shown
    assert "1 frames, all readable" in result.stdout


def _bad_inputs(tmp_path: Path, dicom_dir: Path) -> dict[str, tuple[str, str]]:
    """name -> (argument, expected words in the error line)."""
    cases: dict[str, tuple[str, str]] = {}
    cases["missing"] = (str(tmp_path / "nope.dcm"), "no such file")
    sr = tmp_path / "report.dcm"
    from tests.sources.test_dicom import _write_sr

    _write_sr(sr)
    cases["structured report"] = (str(sr), "no pixel data")
    cut = tmp_path / "cut.dcm"
    data = (dicom_dir / "color3d_jpeg_baseline.dcm").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    cases["truncated"] = (str(cut), "truncated")
    h264 = tmp_path / "h264.dcm"
    shutil.copy(dicom_dir / "examples_ybr_color.dcm", h264)
    ds = pydicom.dcmread(h264)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.save_as(h264)
    cases["unsupported transfer syntax"] = (str(h264), "cannot be decoded")
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 5000, np.uint8).tobytes())
    cases["corrupt video"] = (str(junk), "junk.mp4")
    empty = tmp_path / "empty.avi"
    empty.write_bytes(b"")
    cases["empty video"] = (str(empty), "empty.avi")
    cases["device"] = ("/dev/video_usguide_test_missing", "cannot open")
    return cases


def test_bad_input_gives_one_line_and_exit_2(tmp_path: Path, dicom_dir: Path) -> None:
    for name, (arg, words) in _bad_inputs(tmp_path, dicom_dir).items():
        result = run("info", arg)
        assert result.returncode == 2, (name, result.stderr)
        assert "Traceback" not in result.stderr, name
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1, (name, result.stderr)
        assert lines[0].startswith("error: "), name
        assert Path(arg).name in lines[0], name
        assert words in lines[0], (name, lines[0])


def test_bad_option_values() -> None:
    result = runner.invoke(app, ["info", "x.dcm", "--spacing-mm", "a,b"])
    assert result.exit_code == 2
    result = runner.invoke(app, ["info", "x.dcm", "--region", "1,2,3"])
    assert result.exit_code == 2
