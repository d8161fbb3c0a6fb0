"""usguide segment and usguide evaluate: file naming, label PNGs, overlays, JSON, bad input."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from usguide.cli import app
from usguide.segment import DEFAULT_MODEL
from usguide.sources.images import read_mask

pytestmark = pytest.mark.skipif(not DEFAULT_MODEL.exists(), reason="shipped model missing")
runner = CliRunner()
SAMPLES = Path(__file__).resolve().parent / "data" / "usgra-seg"


def test_segment_images_cine_and_folder(tmp_path: Path, dicom_dir: Path) -> None:
    images = tmp_path / "imgs"
    images.mkdir()
    for name in ("0002.png", "0050.png"):
        shutil.copy(SAMPLES / "images" / name, images / name)
    cine = tmp_path / "cine.dcm"
    shutil.copy(dicom_dir / "examples_ybr_color.dcm", cine)  # 30 frames of 320 x 240
    single = dicom_dir / "US1_UNCR.dcm"
    out = tmp_path / "labels"
    result = runner.invoke(
        app, ["segment", str(images), str(cine), str(single), "--out", str(out), "--overlay"]
    )
    assert result.exit_code == 0, result.output
    names = sorted(p.name for p in out.glob("*.png"))
    expected = ["0002.png", "0050.png", "US1_UNCR.png"] + [f"cine_{i:05d}.png" for i in range(30)]
    assert names == sorted(expected)
    for name, shape in (
        ("0002.png", (512, 512)),
        ("0050.png", (512, 534)),
        ("cine_00007.png", (240, 320)),
    ):
        labels = cv2.imread(str(out / name), cv2.IMREAD_UNCHANGED)
        assert labels.dtype == np.uint8 and labels.shape == shape
        assert labels.max() <= 4
    overlay = cv2.imread(str(out / "overlays" / "0050.png"))
    assert overlay.shape == (512, 534, 3)


def test_evaluate_writes_json(tmp_path: Path) -> None:
    report = tmp_path / "new" / "eval.json"  # the folder is made
    result = runner.invoke(
        app,
        [
            "evaluate",
            "--images",
            str(SAMPLES / "images"),
            "--masks",
            str(SAMPLES / "masks"),
            "--classes",
            "nerve,vessel",
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["images"] == 6
    assert set(data["classes"]) == {"nerve", "vessel"}
    for name in ("nerve", "vessel"):
        c = data["classes"][name]
        assert 0.0 <= c["ci95"][0] <= c["dice"] <= c["ci95"][1] <= 1.0
    assert "| nerve |" in result.stdout


def test_segment_bad_model_is_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00" * 100)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "usguide.cli",
            "segment",
            str(SAMPLES / "images"),
            "--out",
            str(tmp_path / "o"),
            "--model",
            str(bad),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "broken.onnx" in lines[0] and "Traceback" not in result.stderr


def test_two_inputs_with_one_name_are_refused_before_any_work(tmp_path: Path) -> None:
    """The second x.png would silently replace the first's labels."""
    for folder in ("d1", "d2"):
        (tmp_path / folder).mkdir()
        shutil.copy(SAMPLES / "images" / "0002.png", tmp_path / folder / "x.png")
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["segment", str(tmp_path / "d1"), str(tmp_path / "d2"), "--out", str(out)]
    )
    assert result.exit_code == 2
    assert "would both be written" in result.output and "separate --out" in result.output
    assert not out.exists()


def test_a_tiff_cine_gives_one_label_map_per_page(tmp_path: Path) -> None:
    image = cv2.imread(str(SAMPLES / "images" / "0002.png"), cv2.IMREAD_GRAYSCALE)
    assert cv2.imwritemulti(str(tmp_path / "cine.tif"), [image, image[::-1], image])
    out = tmp_path / "out"
    result = runner.invoke(app, ["segment", str(tmp_path / "cine.tif"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.glob("*.png")) == [f"cine_{i:05d}.png" for i in range(3)]
    first, flipped = (cv2.imread(str(out / f"cine_{i:05d}.png"), 0) for i in (0, 1))
    assert first.shape == image.shape and not np.array_equal(first, flipped)


def test_labels_never_replace_an_input(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(SAMPLES / "images" / "0002.png", folder / "0002.png")
    before = (folder / "0002.png").read_bytes()
    result = runner.invoke(app, ["segment", str(folder), "--out", str(folder)])
    assert result.exit_code == 2 and "is an input" in result.output
    assert (folder / "0002.png").read_bytes() == before


def test_an_output_path_that_is_a_file_is_one_line(tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = subprocess.run(
        [sys.executable, "-m", "usguide.cli", "segment", str(SAMPLES / "images" / "0002.png"),
         "--out", str(taken)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "taken" in lines[0] and "Traceback" not in result.stderr


def test_evaluate_a_binary_mask_scores_its_class_only(tmp_path: Path) -> None:
    """A 0/255 nerve mask says nothing about vessels: they are not scored (they had been, as
    'absent' with a false-positive rate)."""
    masks = tmp_path / "masks"
    masks.mkdir()
    for path in sorted((SAMPLES / "masks").glob("*.png"))[:3]:
        binary = np.where(read_mask(path) == 1, 255, 0).astype(np.uint8)
        assert cv2.imwrite(str(masks / path.name), binary)
    report = tmp_path / "eval.json"
    result = runner.invoke(
        app,
        ["evaluate", "--images", str(SAMPLES / "images"), "--masks", str(masks),
         "--binary-class", "nerve", "--json", str(report)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert set(json.loads(report.read_text())["classes"]) == {"nerve"}


def test_a_corrupt_image_midway_keeps_the_label_maps_before_it(tmp_path: Path) -> None:
    folder = tmp_path / "scans"
    folder.mkdir()
    shutil.copy(SAMPLES / "images" / "0002.png", folder / "a.png")
    shutil.copy(SAMPLES / "images" / "0050.png", folder / "b.png")
    (folder / "c.png").write_bytes(b"not a png")
    out = tmp_path / "labels"
    result = runner.invoke(app, ["segment", str(folder), "--out", str(out)])
    assert result.exit_code == 2
    assert "c.png" in result.output and "cannot be decoded" in result.output
    # The user is told what was written before the failure, and it is there.
    assert "the 2 label maps written before it are in" in " ".join(result.output.split())
    assert sorted(p.name for p in out.glob("*.png")) == ["a.png", "b.png"]
