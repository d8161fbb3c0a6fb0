"""Training-mode approach score on a synthetic approach with known answers, and the session
summary files."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from usguide.approach_score import ApproachScorer, ScoreConfig, SessionSummary
from usguide.labels import NERVE, VESSEL

TARGET = (170.0, 100.0)
# First advance, a withdrawal of 2.2 mm, a re-advance at another angle to the target, then a
# small overshoot. Frames 0-4 show no needle.
PATH = [
    (40, 40), (60, 50), (80, 60), (100, 70),  # advance: depth 6.7 mm
    (90, 65), (80, 60),  # withdraw to 4.5 mm
    (100, 62), (120, 70), (140, 80), (160, 90), (169, 99),  # re-advance; on target at the last
    (171, 100), (172, 100),
]  # fmt: skip
FIRST_TIP_FRAME = 5
DT = 0.05


def scene() -> np.ndarray:
    labels = np.zeros((200, 300), np.uint8)
    cv2.circle(labels, (200, 100), 20, NERVE, -1)
    labels[150:171, 100:121] = VESSEL
    return labels


def run(scorer: ApproachScorer, spacing, path=PATH, labels=None, timestamps=True) -> None:
    labels = scene() if labels is None else labels
    tips = [None] * FIRST_TIP_FRAME + list(path)
    for i, tip in enumerate(tips):
        t = i * DT if timestamps else None
        scorer.update(i, t, tip, labels, spacing)


def test_calibrated_approach_scores_in_mm() -> None:
    scorer = ApproachScorer(TARGET, target_frame=0)
    run(scorer, (0.1, 0.1))
    s = scorer.result()
    assert s.units == "mm" and s.note == ""
    assert s.reached_target and s.frames_to_target == 10
    assert s.time_to_target_s == pytest.approx(10 * DT)
    assert s.redirections == 1
    assert s.final_tip_to_target == pytest.approx(0.2)
    # The tip came within 28 px of the nerve's centre (radius 20): 0.8 mm from its edge.
    assert s.closest_nerve == pytest.approx(0.8, abs=0.06)
    # Nearest vessel corner (120, 150) from (169, 99).
    assert s.closest_vessel == pytest.approx(0.1 * math.hypot(49, 51), abs=0.06)
    assert not s.entered_nerve and not s.entered_vessel
    assert s.target_before_needle is True
    assert s.needle_first_frame == FIRST_TIP_FRAME and s.last_tip_frame == 17
    assert s.frames == 18 and s.tip_frames == 13


def test_uncalibrated_approach_says_px() -> None:
    scorer = ApproachScorer(TARGET)
    run(scorer, None)
    s = scorer.result()
    assert s.units == "px" and "px" in s.note
    assert s.final_tip_to_target == pytest.approx(2.0)
    assert s.closest_nerve == pytest.approx(8.0, abs=0.6)
    assert s.redirections == 1 and s.reached_target and s.frames_to_target == 10
    assert s.target_before_needle is None


def test_one_uncalibrated_frame_makes_the_attempt_px() -> None:
    scorer = ApproachScorer(TARGET)
    labels = scene()
    for i, tip in enumerate(PATH):
        scorer.update(i, i * DT, tip, labels, None if i == 3 else (0.1, 0.1))
    s = scorer.result()
    assert s.units == "px" and "1 of 13" in s.note
    assert s.final_tip_to_target == pytest.approx(2.0)


def test_intraneural_tip_and_jitter() -> None:
    # Straight to the nerve's centre with 0.5 mm back-and-forth jitter: no redirection.
    path = []
    for k in range(20):
        x = 100 + 5 * k + (-5 if k % 2 else 0)
        path.append((float(x), 100.0))
    scorer = ApproachScorer((178.0, 100.0))
    run(scorer, (0.1, 0.1), path=path)
    s = scorer.result()
    assert s.redirections == 0
    assert s.entered_nerve and s.closest_nerve < 0
    assert s.closest_nerve == pytest.approx(-1.0, abs=0.1)  # deepest at 10 px inside


def test_target_placed_after_the_needle_and_no_times() -> None:
    scorer = ApproachScorer(TARGET, target_frame=8)
    run(scorer, (0.1, 0.1), timestamps=False)
    s = scorer.result()
    assert s.target_before_needle is False
    assert s.time_to_target_s is None and s.frames_to_target == 10
    assert "frames only" in s.note
    timed = ApproachScorer(TARGET, config=ScoreConfig(frame_time_s=0.1))
    run(timed, (0.1, 0.1), timestamps=False)
    assert timed.result().time_to_target_s == pytest.approx(1.0)


def test_never_seen_and_never_reached() -> None:
    scorer = ApproachScorer(TARGET)
    for i in range(5):
        scorer.update(i, i * DT, None, scene(), (0.1, 0.1))
    s = scorer.result()
    assert not s.reached_target and s.final_tip_to_target is None
    assert s.closest_nerve is None and s.redirections == 0 and "never seen" in s.note
    with pytest.raises(ValueError):
        ScoreConfig(withdraw_mm=0)


def test_session_summary_appends_rows_atomically(tmp_path: Path, monkeypatch) -> None:
    from tests.annotation.conftest import SECRETS, write_identified_dicom

    folder = tmp_path / "Doelittle"
    folder.mkdir()
    recording = write_identified_dicom(folder / "Janeway_DOELITTLE.dcm")
    summary = SessionSummary(tmp_path / "s.csv", tmp_path / "s.json", trainee="Dr Trainee")
    scorer = ApproachScorer(TARGET, target_frame=0)
    run(scorer, (0.1, 0.1))
    row = summary.append(scorer.result(), source=str(recording))
    assert row["attempt"] == 1 and row["source"].startswith("source-")
    uncal = ApproachScorer(TARGET)
    run(uncal, None)
    summary.append(uncal.result(), source="/videos/attempt2.mp4")
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["attempt"] for r in rows] == ["1", "2"]
    assert rows[0]["units"] == "mm" and rows[0]["redirections"] == "1"
    assert rows[0]["final_tip_to_target"] == "0.200" and rows[1]["units"] == "px"
    assert rows[1]["source"] == "attempt2" and rows[0]["trainee"] == "Dr Trainee"
    # A DICOM file named by a UID (no header value in its name) is still never named.
    by_uid = write_identified_dicom(tmp_path / "1.2.826.0.1.3680043.8.498.7.dcm")
    assert summary.append(uncal.result(), source=str(by_uid))["source"].startswith("source-")
    data = json.loads((tmp_path / "s.json").read_text())
    assert len(data["attempts"]) == 3 and data["attempts"][1]["time_to_target_s"] == 0.5
    for path in (tmp_path / "s.csv", tmp_path / "s.json"):
        text = path.read_text().lower()
        assert not any(secret.lower() in text for secret in SECRETS)

    # A crash while writing leaves both files as they were, and no partial file behind.
    before = {p.name: p.read_bytes() for p in tmp_path.glob("s.*")}

    def crash(fd: int) -> None:
        raise OSError("power cut (simulated)")

    monkeypatch.setattr("usguide.approach_score.os.fsync", crash)
    with pytest.raises(OSError, match="simulated"):
        summary.append(uncal.result())
    assert {p.name: p.read_bytes() for p in tmp_path.glob("s.*")} == before
    assert not list(tmp_path.glob(".s.*"))


def test_score_recording_feeds_every_frame() -> None:
    from usguide.approach_score import score_recording
    from usguide.frame import Frame, Region

    labels = scene()
    tips = [None] * FIRST_TIP_FRAME + PATH
    frames = [
        Frame(np.zeros((200, 300), np.uint8), i, i * DT, (0.1, 0.1), Region.whole(200, 300), "x")
        for i in range(len(tips))
    ]
    seen: list[int] = []
    s = score_recording(
        frames,
        TARGET,
        target_frame=0,
        analyse=lambda f: (tips[f.index], labels, (0.1, 0.1)),
        progress=seen.append,
    )
    assert seen == list(range(len(tips)))
    assert s.redirections == 1 and s.frames_to_target == 10 and s.units == "mm"


def _distance_to(mask: np.ndarray, xy: tuple[float, float] | None) -> float:
    """Pixels from ``xy`` to the nearest pixel of ``mask``."""
    assert xy is not None
    ys, xs = np.nonzero(mask)
    return float(np.hypot(xs - xy[0], ys - xy[1]).min())


def test_score_recording_with_the_pipeline_on_the_demo() -> None:
    from usguide.approach_score import score_recording
    from usguide.demo import DEMO_SPACING_MM, DemoScan, DemoScript

    scan = DemoScan(script=DemoScript(needle_from=3, arrive=30, inject_from=40, frames=36))
    target = scan.tip_truth(30)  # where the demo's needle stops, beside the nerve
    s = score_recording(scan, target, target_frame=0)
    assert s.units == "mm" and s.target_before_needle
    assert 3 <= s.needle_first_frame <= 8
    assert s.reached_target and s.final_tip_to_target < 1.0
    # Closest approach to the nerve the annotators drew, from the exact tips: the pipeline's
    # figure (its own nerve segmentation and tracked tip) agrees within a segmentation margin.
    truth = min(
        _distance_to(scan.labels_truth(i) == NERVE, scan.tip_truth(i)) * DEMO_SPACING_MM
        for i in range(scan.script.needle_from, scan.frame_count)
    )
    assert not s.entered_nerve and abs(s.closest_nerve - truth) < 0.6
    assert s.redirections == 0


def test_score_lines_carry_units() -> None:
    scorer = ApproachScorer(TARGET, target_frame=9)
    run(scorer, None)
    text = "\n".join(scorer.result().lines())
    assert "time to target: 0.5 s (10 frames)" in text
    assert "final tip to target: 2.0 px" in text and "redirections: 1" in text
    assert "after the needle appeared" in text and "distances in px" in text


def test_tip_on_the_outline_counts_as_entered() -> None:
    # Tips on the outermost labelled pixels: every pixel of a one-pixel nerve, a vessel's edge.
    labels = np.zeros((50, 50), np.uint8)
    labels[20, 20] = NERVE
    labels[30:40, 5:15] = VESSEL
    for spacing in ((0.1, 0.1), None):
        scorer = ApproachScorer((0.0, 0.0))
        scorer.update(0, 0.0, (20.0, 20.0), labels, spacing)
        scorer.update(1, DT, (5.0, 35.0), labels, spacing)
        s = scorer.result()
        assert s.entered_nerve and s.entered_vessel
        assert s.closest_nerve is not None and s.closest_nerve < 0
        assert s.closest_vessel is not None and s.closest_vessel < 0
