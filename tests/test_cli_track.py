"""usguide track: the CSV contract (columns, one row per frame, mm only when calibrated)."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from tests.test_needle import straight_advance
from usguide.cli import TRACK_COLUMNS, app
from usguide.imaging_region import find_imaging_region
from usguide.segment import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
runner = CliRunner()


@pytest.fixture(scope="module")
def needle_folder(tmp_path_factory, test_data) -> tuple[Path, list]:
    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0050.png"), cv2.IMREAD_GRAYSCALE)
    box = find_imaging_region(image)
    frames, truths = straight_advance(image, box, n=12)
    folder = tmp_path_factory.mktemp("needle")
    for i, frame in enumerate(frames):
        # Names sort naturally: frame 2 before frame 10.
        cv2.imwrite(str(folder / f"frame{i}.png"), frame)
    return folder, truths


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == TRACK_COLUMNS
        return list(reader)


def test_columns_rows_and_tips(tmp_path: Path, needle_folder) -> None:
    folder, truths = needle_folder
    out = tmp_path / "sub" / "tips.csv"
    result = runner.invoke(app, ["track", str(folder), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert TRACK_COLUMNS == (
        "frame", "visible", "tip_x", "tip_y", "tip_x_mm", "tip_y_mm", "angle_deg", "confidence",
    )  # fmt: skip
    rows = read_rows(out)
    assert [int(r["frame"]) for r in rows] == list(range(12))
    assert {r["visible"] for r in rows} <= {"0", "1"}
    seen = [r for r in rows if r["visible"] == "1"]
    assert len(seen) >= 9
    for r in seen:
        truth = truths[int(r["frame"])]
        assert abs(float(r["tip_x"]) - truth.tip_xy[0]) < 15  # 1.5 mm at the nominal 0.1 mm/px
        assert abs(float(r["tip_y"]) - truth.tip_xy[1]) < 15
        assert abs(float(r["angle_deg"]) - truth.angle_deg) < 3
        assert r["tip_x_mm"] == r["tip_y_mm"] == ""  # PNGs carry no calibration
    for r in rows:
        if r["visible"] == "0":
            assert r["tip_x"] == r["tip_y"] == r["angle_deg"] == ""
    assert not list(out.parent.glob("*.partial"))
    assert "uncalibrated" in result.output


def test_calibrated_mm_columns(tmp_path: Path, needle_folder, test_data) -> None:
    folder, _ = needle_folder
    out = tmp_path / "tips.csv"
    result = runner.invoke(app, ["track", str(folder), "--out", str(out), "--spacing-mm", "0.1"])
    assert result.exit_code == 0, result.output
    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0050.png"), cv2.IMREAD_GRAYSCALE)
    x0, y0 = find_imaging_region(image)[:2]
    seen = [r for r in read_rows(out) if r["visible"] == "1"]
    assert seen
    for r in seen:
        assert float(r["tip_x_mm"]) == pytest.approx((float(r["tip_x"]) - x0) * 0.1, abs=2e-3)
        assert float(r["tip_y_mm"]) == pytest.approx((float(r["tip_y"]) - y0) * 0.1, abs=2e-3)


def test_bad_input(tmp_path: Path, needle_folder) -> None:
    folder, _ = needle_folder
    missing = runner.invoke(
        app, ["track", str(tmp_path / "nope"), "--out", str(tmp_path / "t.csv")]
    )
    assert missing.exit_code == 2 and "nope" in missing.output
    hold = runner.invoke(
        app, ["track", str(folder), "--out", str(tmp_path / "t.csv"), "--hold", "-1"]
    )
    assert hold.exit_code == 2 and "--hold" in hold.output
    bad_model = tmp_path / "model.onnx"
    bad_model.write_bytes(b"not onnx")
    model = runner.invoke(
        app, ["track", str(folder), "--out", str(tmp_path / "t.csv"), "--model", str(bad_model)]
    )
    assert model.exit_code == 2 and "model.onnx" in model.output
    assert not (tmp_path / "t.csv").exists()
    # A folder as --out is refused before any frame is tracked, leaving nothing behind.
    folder_out = tmp_path / "tips"
    folder_out.mkdir()
    taken = runner.invoke(app, ["track", str(folder), "--out", str(folder_out)])
    assert taken.exit_code == 2 and "is a folder" in taken.output
    assert not (tmp_path / "tips.partial").exists()


def test_a_corrupt_frame_midway_keeps_the_rows_before_it(tmp_path: Path, needle_folder) -> None:
    folder, _ = needle_folder
    frames = tmp_path / "frames"
    frames.mkdir()
    for i in range(4):
        (frames / f"frame{i}.png").write_bytes((folder / f"frame{i}.png").read_bytes())
    (frames / "frame4.png").write_bytes(b"not a png")
    out = tmp_path / "tips.csv"
    result = runner.invoke(app, ["track", str(frames), "--out", str(out)])
    assert result.exit_code == 2
    assert "frame4.png" in result.output and "cannot be decoded" in result.output
    # No finished CSV, which would look complete; the frames tracked are kept and named.
    assert not out.exists()
    partial = tmp_path / "tips.csv.partial"
    assert "the rows of the 4 frames tracked before it are in" in " ".join(result.output.split())
    assert [int(r["frame"]) for r in read_rows(partial)] == [0, 1, 2, 3]
