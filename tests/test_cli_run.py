"""usguide run and usguide demo: outputs, the log's keys, and clear errors on bad input."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from usguide.cli import app
from usguide.segment import DEFAULT_MODEL

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
runner = CliRunner()


def test_run_writes_video_and_log(tmp_path: Path, test_data: Path) -> None:
    cine = test_data / "dicom" / "color3d_jpeg_baseline.dcm"
    video, log = tmp_path / "out" / "overlay.mp4", tmp_path / "out" / "results.jsonl"
    result = runner.invoke(
        app,
        ["run", str(cine), "--out", str(video), "--log", str(log), "--max-frames", "12",
         "--no-window", "--target", "100,120"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(records) == 12
    assert records[0]["units"] == "mm" and records[0]["spacing_mm"] is not None
    assert any(t["kind"] == "user" and t["x"] == 100.0 for t in records[0]["targets"])
    capture = cv2.VideoCapture(str(video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
    capture.release()


def test_uncalibrated_input_says_px(tmp_path: Path, test_data: Path) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0212.png"))
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), image)
    log = tmp_path / "log.jsonl"
    result = runner.invoke(app, ["run", str(folder), "--log", str(log), "--no-window"])
    assert result.exit_code == 0, result.output
    assert "distances are in px" in result.output
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert all(r["units"] == "px" and r["spacing_mm"] is None for r in records)
    assert all("calibration_unknown" in {w["code"] for w in r["warnings"]} for r in records)


def test_a_source_failing_midway_keeps_its_frames_and_exits_1(
    tmp_path: Path, test_data: Path
) -> None:
    folder = tmp_path / "frames"
    folder.mkdir()
    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0212.png"))
    for i in range(3):
        cv2.imwrite(str(folder / f"f{i}.png"), image)
    (folder / "f3.png").write_bytes(b"not a png")
    video, log = tmp_path / "overlay.mp4", tmp_path / "log.jsonl"
    result = runner.invoke(
        app, ["run", str(folder), "--out", str(video), "--log", str(log), "--no-window"]
    )
    # A script must not take an incomplete run for a whole one; what was done is kept.
    assert result.exit_code == 1, result.output
    assert "f3.png" in result.output and "source stopped" in result.output
    assert [json.loads(line)["frame"] for line in log.read_text().splitlines()] == [0, 1, 2]
    capture = cv2.VideoCapture(str(video))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    capture.release()


def test_run_live_counts_drops(tmp_path: Path, test_data: Path) -> None:
    cine = test_data / "dicom" / "OBXXXX1A_rle_2frame.dcm"
    log = tmp_path / "live.jsonl"
    result = runner.invoke(app, ["run", str(cine), "--live", "--log", str(log), "--no-window"])
    assert result.exit_code == 0, result.output
    assert "dropped" in result.output
    assert 1 <= len(log.read_text().splitlines()) <= 2


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ("[guidance]\nmode = 'nerve'\n", "mode must be"),
        ("[guidance]\ncolour = 1\n", "unknown [guidance] keys ['colour']"),
        ("[[targets]]\nx = 1\n", "target 1 needs numbers x and y"),
        ("not toml ===", "not valid TOML"),
    ],
)
def test_bad_config_is_one_clear_line(
    tmp_path: Path, test_data: Path, config: str, message: str
) -> None:
    path = tmp_path / "guidance.toml"
    path.write_text(config)
    cine = test_data / "dicom" / "OBXXXX1A_rle_2frame.dcm"
    result = runner.invoke(app, ["run", str(cine), "--config", str(path), "--no-window"])
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output


def test_run_missing_input(tmp_path: Path) -> None:
    result = runner.invoke(app, ["run", str(tmp_path / "nope.dcm"), "--no-window"])
    assert result.exit_code == 2
    assert "nope.dcm" in result.output


def test_demo_writes_its_folder(tmp_path: Path) -> None:
    folder = tmp_path / "demo"
    result = runner.invoke(app, ["demo", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    assert "0.08 mm/px assumed" in result.output and "CC BY 4.0" in result.output
    about = (folder / "ABOUT.txt").read_text()  # the adapted image's attribution travels along
    assert "USGRA-Seg" in about and "CC BY 4.0" in about and "0.08 mm per pixel" in about
    records = [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]
    assert len(records) == 170
    assert (folder / "overlay.mp4").stat().st_size > 10_000
    # The story of the demo: no needle, then a tracked tip reaching a target, then injectate.
    assert not records[0]["tip"]["visible"]
    assert sum(r["tip"]["visible"] for r in records) >= 100
    assert any(r["time_on_target_s"] > 0 for r in records)
    assert any(r["spread"] and r["spread"]["detected"] for r in records[-20:])
