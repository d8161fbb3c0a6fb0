"""Needle detection and tracking on small rendered sequences with exact ground truth.

Needles are rendered onto a real nerve-block frame bundled with the tests; every frame goes
through the shipped segmentation model, then the needle stage, as in ``usguide track``.
"""

from __future__ import annotations

import math
from dataclasses import replace

import cv2
import numpy as np
import pytest

from usguide.data.augment import sector_mask, sector_view
from usguide.data.needle_render import NeedlePose, needle_sequence, render_needle
from usguide.frame import Frame, Region
from usguide.imaging_region import find_imaging_region
from usguide.labels import NEEDLE
from usguide.needle import (
    NeedleConfig,
    NeedleDetection,
    NeedleStage,
    NeedleTracker,
    detection_confidence,
    detection_features,
)
from usguide.segment import Segmenter

SPACING_MM = 0.1  # nominal, as in the benchmark; the frames carry no calibration


@pytest.fixture(scope="module")
def segmenter() -> Segmenter:
    return Segmenter()


@pytest.fixture(scope="module")
def scan(test_data) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0050.png"), cv2.IMREAD_GRAYSCALE)
    box = find_imaging_region(image) or (0, 0, image.shape[1] - 1, image.shape[0] - 1)
    return image, box


def frame_of(image: np.ndarray, i: int, box, spacing=None) -> Frame:
    return Frame(image, i, i / 20.0, spacing, Region(box, spacing, True, "detected"), "test")


def track(segmenter, images, box, stage=None, spacing=None):
    stage = stage or NeedleStage()
    segmenter.reset()
    return [
        stage(f, segmenter(f))
        for f in (frame_of(im, i, box, spacing) for i, im in enumerate(images))
    ]


def tip_error_mm(state, truth_xy) -> float:
    return math.hypot(state.tip_xy[0] - truth_xy[0], state.tip_xy[1] - truth_xy[1]) * SPACING_MM


def straight_advance(
    image,
    box,
    n=30,
    angle=25.0,
    from_left=True,
    width=8.0,
    visibility=None,
    start_px=60.0,
    radius_mm=None,
):
    """A needle entering at the upper edge of the region and advancing 0.3 mm a frame; bent in
    plane along a circle of ``radius_mm`` (negative bows it up) when given."""
    x0, y0, x1, y1 = box
    entry = (x0 - 0.5, y0 + 0.25 * (y1 - y0)) if from_left else (x1 + 0.5, y0 + 0.25 * (y1 - y0))
    sign = 1.0 if from_left else -1.0
    d = (sign * math.cos(math.radians(angle)), math.sin(math.radians(angle)))
    rng = np.random.default_rng(1)
    frames, truths = [], []
    for i in range(n):
        length = start_px + 3.0 * i
        tip = (entry[0] + length * d[0], entry[1] + length * d[1])
        vis = visibility(i) if visibility else None
        # The sagitta of the arc over the chord, in pixels.
        bend = (length * SPACING_MM) ** 2 / (8.0 * radius_mm) / SPACING_MM if radius_mm else 0.0
        pose = NeedlePose(entry, tip, width, vis, bend)
        drawn = render_needle(image, pose, rng=rng, region=box)
        frames.append(drawn.image)
        truths.append(drawn)
    return frames, truths


def test_straight_advance_tip_and_angle(segmenter, scan):
    image, box = scan
    frames, truths = straight_advance(image, box)
    states = track(segmenter, frames, box)
    # Seen from the second frame on (a new track is confirmed on two frames).
    visible = [s.visible for s in states]
    assert sum(visible[2:]) >= 0.9 * len(visible[2:])
    errors = [tip_error_mm(s, t.tip_xy) for s, t in zip(states, truths, strict=True) if s.visible]
    assert np.median(errors) <= 0.5
    assert np.percentile(errors, 90) <= 1.0
    # Known limit: where the tip meets a bright fascia band in line with the shaft, the model
    # may label the band as needle too and the tip overshoots by up to ~2 mm for a frame or two.
    assert max(errors) <= 2.5
    angles = [
        abs(s.angle_deg - t.angle_deg) for s, t in zip(states, truths, strict=True) if s.visible
    ]
    assert np.median(angles) <= 2.0
    assert all(s.side == "left" for s in states if s.visible)
    lengths = [s.inserted_length_px for s in states if s.visible]
    assert lengths[-1] > lengths[0] + 40  # it advanced ~80 px
    assert all(s.tip_mm is None and s.inserted_length_mm is None for s in states)


def test_steep_needle_from_the_right(segmenter, scan):
    image, box = scan
    frames, truths = straight_advance(image, box, angle=55.0, from_left=False)
    states = track(segmenter, frames, box)
    seen = [(s, t) for s, t in zip(states, truths, strict=True) if s.visible]
    assert len(seen) >= 0.7 * len(states)
    assert np.median([tip_error_mm(s, t.tip_xy) for s, t in seen]) <= 0.5
    assert np.median([abs(s.angle_deg - t.angle_deg) for s, t in seen]) <= 2.0
    assert all(s.side == "right" for s, _ in seen)


@pytest.mark.parametrize("radius_mm", [120.0, -120.0])
def test_a_bent_needle_keeps_its_tip(segmenter, scan, radius_mm):
    # Thin needles bend in tissue: over 25-33 mm of shaft this one bows 0.7-1.1 mm from its
    # chord. A straight axis through it misses the tip by millimetres, short of it along the
    # shaft and beside it.
    image, box = scan
    frames, truths = straight_advance(
        image, box, n=26, angle=20.0, width=6.0, start_px=250.0, radius_mm=radius_mm
    )
    states = track(segmenter, frames, box)
    visible = [s.visible for s in states[2:]]
    assert sum(visible) >= 0.9 * len(visible)
    errors = [tip_error_mm(s, t.tip_xy) for s, t in zip(states, truths, strict=True) if s.visible]
    assert np.median(errors) <= 0.3
    assert np.percentile(errors, 90) <= 0.6
    # The angle reported is the chord's, entry to tip, as for a straight needle.
    angles = [abs(s.angle_deg - 20.0) for s in states if s.visible]
    assert np.median(angles) <= 1.5


def test_leaves_the_plane_and_comes_back(segmenter, scan):
    image, box = scan
    gone = range(12, 22)

    def visibility(i):
        return np.zeros(2) if i in gone else None

    frames, truths = straight_advance(image, box, n=34, visibility=visibility)
    config = NeedleConfig(hold_s=0.1)  # two frames at 20 frames per second
    states = track(segmenter, frames, box, NeedleStage(config))
    assert states[11].visible
    # Not visible once the hold time has passed, and never a stale tip.
    assert not any(s.visible for s in states[gone.start + 3 : gone.stop])
    assert all(s.tip_xy is None for s in states if not s.visible)
    # Picked up again within three frames of its return, at the right place.
    back = [i for i in range(gone.stop, len(states)) if states[i].visible]
    assert back and back[0] <= gone.stop + 3
    assert tip_error_mm(states[back[0]], truths[back[0]].tip_xy) <= 1.0


def test_no_needle_is_never_visible(segmenter, scan):
    image, box = scan
    rng = np.random.default_rng(3)
    frames = [im for im, _ in needle_sequence(image, 40, rng, region=box, phases=[("absent", 40)])]
    states = track(segmenter, frames, box)
    assert not any(s.visible for s in states)
    assert not any(s.shaft_visible for s in states)  # no needle present either
    assert all(s.tip_xy is None and s.confidence == 0.0 for s in states)


def test_calibrated_frames_report_mm(segmenter, scan):
    image, box = scan
    frames, truths = straight_advance(image, box, n=8)
    spacing = (0.2, 0.1)  # anisotropic on purpose: rows are 0.2 mm
    states = track(segmenter, frames, box, spacing=spacing)
    s = states[-1]
    assert s.visible and s.tip_mm is not None
    assert s.tip_mm[0] == pytest.approx((s.tip_xy[0] - box[0]) * 0.1)
    assert s.tip_mm[1] == pytest.approx((s.tip_xy[1] - box[1]) * 0.2)
    # The angle is measured in mm: rows twice as long make the shaft steeper than in pixels.
    pixel_angle = truths[-1].angle_deg
    expected = math.degrees(math.atan(2 * math.tan(math.radians(pixel_angle))))
    assert s.angle_deg == pytest.approx(expected, abs=2.0)
    assert s.inserted_length_mm is not None and s.inserted_length_mm > 0


def detection(
    x: float,
    y: float,
    confidence: float = 0.9,
    in_plane: bool = True,
    shaft_confidence: float | None = None,
    angle: float = 30.0,
) -> NeedleDetection:
    return NeedleDetection(
        tip_xy=(x, y),
        entry_xy=(0.0, 0.0),
        angle_deg=angle,
        side="left",
        visible_length_px=50.0,
        contrast=100.0,
        end_ratio=1.0,
        model_support=1.0,
        model_width_mm=0.8,
        wander_px=0.5,
        entry_gap_px=0.0,
        surface_share=0.0,
        tip_in_plane=in_plane,
        confidence=confidence,
        shaft_confidence=confidence if shaft_confidence is None else shaft_confidence,
    )


def test_needle_present_is_told_apart_from_tip_visible():
    # A confident shaft whose end fades out of plane: the needle is there, its tip is not seen.
    # A weak detection is neither.
    tracker = NeedleTracker(NeedleConfig(confirm_frames=1))
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    # Its tip confidence is low (no tip), its shaft confidence high: the shaft decides.
    faded = tracker.update(
        detection(100.0, 100.0, confidence=0.1, in_plane=False, shaft_confidence=0.9),
        frame_of(blank, 0, box),
    )
    assert faded.shaft_visible and not faded.visible and faded.tip_xy is None
    weak = tracker.update(detection(100.0, 100.0, confidence=0.2), frame_of(blank, 1, box))
    assert not weak.shaft_visible and not weak.visible
    seen = tracker.update(detection(100.0, 100.0), frame_of(blank, 2, box))
    assert seen.shaft_visible and seen.visible
    coasting = tracker.update(None, frame_of(blank, 3, box))
    assert coasting.visible and coasting.shaft_visible


def test_one_false_detection_causes_no_jump():
    tracker = NeedleTracker(NeedleConfig(confirm_frames=2))
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    tips = [(100.0 + 2 * i, 100.0 + i) for i in range(10)]
    states = [tracker.update(detection(*t), frame_of(blank, i, box)) for i, t in enumerate(tips)]
    assert states[0].status == "acquiring" and not states[0].visible
    assert states[-1].visible and math.dist(states[-1].tip_xy, tips[-1]) < 2.0
    jump = tracker.update(detection(400.0, 300.0), frame_of(blank, 10, box))
    assert jump.visible and math.dist(jump.tip_xy, (120.0, 110.0)) < 3.0
    after = tracker.update(detection(122.0, 111.0), frame_of(blank, 11, box))
    assert after.status == "tracking" and math.dist(after.tip_xy, (122.0, 111.0)) < 2.0


def test_agreeing_outliers_move_the_track():
    config = NeedleConfig(confirm_frames=1, reinit_frames=3)
    tracker = NeedleTracker(config)
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    for i in range(5):
        tracker.update(detection(100.0, 100.0), frame_of(blank, i, box))
    for i in range(5, 8):
        state = tracker.update(detection(400.0, 300.0), frame_of(blank, i, box))
    assert math.dist(state.tip_xy, (400.0, 300.0)) < 2.0


def test_a_line_at_another_angle_ending_near_the_tip_does_not_turn_the_track():
    # A bright structure at 40 degrees whose end lies 1 mm from a 20-degree needle's tip: it
    # was taken as the needle, and the reported angle swung by 10-20 degrees.
    tracker = NeedleTracker(NeedleConfig(confirm_frames=1, reinit_frames=3))
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    for i in range(5):
        tracker.update(detection(100.0 + i, 100.0, angle=20.0), frame_of(blank, i, box))
    other = tracker.update(detection(106.0, 108.0, angle=40.0), frame_of(blank, 5, box))
    assert abs(other.angle_deg - 20.0) < 1.0 and other.status == "coasting"
    assert tracker.update(detection(106.0, 100.0, angle=20.5), frame_of(blank, 6, box)).visible
    # The same structure on several frames in a row is the needle now.
    for i in range(7, 10):
        state = tracker.update(detection(106.0, 108.0, angle=40.0), frame_of(blank, i, box))
    assert abs(state.angle_deg - 40.0) < 1.0


def test_hold_then_not_visible():
    tracker = NeedleTracker(NeedleConfig(confirm_frames=1, hold_s=0.1))
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    tracker.update(detection(100.0, 100.0), frame_of(blank, 0, box))
    coast = [tracker.update(None, frame_of(blank, i, box)) for i in range(1, 5)]
    assert [s.visible for s in coast] == [True, True, False, False]
    assert coast[0].status == "coasting" and coast[0].confidence < 0.9
    assert coast[2].status == "not visible" and coast[2].tip_xy is None


def test_a_stale_tip_is_never_shown_when_time_repeats_or_goes_back():
    """Timestamps that repeat (a stuck clock) or go back (a seek, another scan through the
    same stage) must not keep an unseen tip visible, nor lift its confidence above 1."""
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)

    def at(i: int, t: float) -> Frame:
        return replace(frame_of(blank, i, box), timestamp_s=t)

    tracker = NeedleTracker(NeedleConfig(confirm_frames=1, hold_s=0.1))
    tracker.update(detection(100.0, 100.0), at(0, 5.0))
    stuck = [tracker.update(None, at(i, 5.0)) for i in range(1, 6)]
    assert not stuck[-1].visible  # each repeated time still counts a frame's time
    tracker.update(detection(100.0, 100.0), at(6, 10.0))
    back = tracker.update(None, at(7, 0.0))  # 10 s back: not this track
    assert not back.visible and back.tip_xy is None and 0.0 <= back.confidence <= 1.0
    assert all(0.0 <= s.confidence <= 1.0 for s in stuck)


def test_a_thin_strip_at_a_fine_spacing_gives_no_error():
    """The search's downscaling must leave a strip 18 px high (0.01 mm/px) some rows."""
    stage = NeedleStage()
    strip = Frame(np.full((18, 640), 90, np.uint8), 0, 0.0, (0.01, 0.01),
                  Region((0, 0, 639, 17), (0.01, 0.01)), "test")  # fmt: skip
    labels = np.zeros((18, 640), np.uint8)
    labels[8:10, 100:400] = NEEDLE
    assert not stage(strip, labels).visible


def test_frames_without_a_needle_or_image_give_no_detection(segmenter):
    stage = NeedleStage()
    black = np.zeros((480, 640), np.uint8)
    frame = frame_of(black, 0, (0, 0, 639, 479))
    assert stage.detector(frame, segmenter(frame)) is None
    assert stage.detector(frame_of(np.zeros((8, 8), np.uint8), 0, (0, 0, 7, 7)), None) is None


def test_shaft_fading_out_of_plane_is_reported_present(segmenter, scan):
    # The far part of the shaft fades out of the beam's plane: the needle is in the image though
    # its tip is not, and the needle-present answer must say so.
    image, box = scan
    fade = np.array([1.0, 1.0, 1.0, 0.85, 0.6, 0.35, 0.1, 0.0])
    frames, truths = straight_advance(image, box, n=12, visibility=lambda i: fade)
    assert not any(t.tip_visible for t in truths)
    states = track(segmenter, frames, box)
    assert sum(s.shaft_visible for s in states) >= 0.8 * len(states)


@pytest.mark.parametrize("start_px", [0.0, 120.0, 200.0])
def test_entry_gap_measures_where_the_shaft_begins(segmenter, scan, start_px):
    # A needle drawn from the region's edge has no gap; a bright line that begins deep in the
    # tissue (as fascia does) has one as long as the undrawn part of its axis.
    image, box = scan
    x0, y0, _, y1 = box
    d = (math.cos(math.radians(25.0)), math.sin(math.radians(25.0)))
    edge = (x0 - 0.5, y0 + 0.25 * (y1 - y0))
    start = (edge[0] + start_px * d[0], edge[1] + start_px * d[1])
    tip = (edge[0] + (start_px + 150.0) * d[0], edge[1] + (start_px + 150.0) * d[1])
    pose = NeedlePose(start, tip, 8.0, None)
    drawn = render_needle(image, pose, rng=np.random.default_rng(1), region=box)
    frame = frame_of(drawn.image, 0, box)
    found = NeedleStage().detector(frame, segmenter(frame))
    assert found is not None
    assert abs(found.entry_gap_px - start_px) * SPACING_MM < 1.5


def needle_with_labels(image, box, angle_deg, entry_depth, length_px, seed):
    """A needle entering the region's left edge at ``entry_depth`` (fraction of its height):
    the rendered frame, labels marking exactly its pixels as needle, and ``along(t)``, the
    point ``t`` px along the shaft from the entry (the tip is ``along(length_px)``)."""
    x0, y0, _, y1 = box
    d = (math.cos(math.radians(angle_deg)), math.sin(math.radians(angle_deg)))
    entry = (x0 - 0.5, y0 + entry_depth * (y1 - y0))

    def along(t: float) -> tuple[float, float]:
        return entry[0] + t * d[0], entry[1] + t * d[1]

    drawn = render_needle(
        image,
        NeedlePose(entry, along(length_px), 8.0, None),
        rng=np.random.default_rng(seed),
        region=box,
    )
    labels = np.zeros(image.shape, np.uint8)
    labels[drawn.mask] = 4
    return drawn, labels, along


def test_a_longer_false_line_in_the_labels_does_not_hide_the_needle(scan):
    # The model may mark needle on a bright line beside the needle with more pixels than the
    # needle itself: the detector must still report the needle, not the line or nothing.
    image, box = scan
    x0, y0, x1, y1 = box
    drawn, labels, along = needle_with_labels(image, box, 30.0, 0.15, 150.0, seed=1)
    tip = along(150.0)
    frame = frame_of(drawn.image, 0, box)
    # A label-only line, longer than the shaft, deep and at another angle, with nothing bright
    # under it in the image.
    a = (x0 + 20, int(y0 + 0.75 * (y1 - y0)))
    b = (x1 - 20, int(y0 + 0.75 * (y1 - y0)) - 50)
    cv2.line(labels, a, b, 4, thickness=5)
    assert (labels == 4).sum() > 1.5 * drawn.mask.sum()
    found = NeedleStage().detector(frame, labels)
    assert found is not None
    assert tip_error_mm(found, tip) < 1.0
    assert found.shaft_confidence >= NeedleConfig().min_confidence


def test_a_dimming_shaft_stays_reported_on_its_line_for_a_moment():
    # Hysteresis: a confident shaft vouches, for shaft_hold_s, for weaker detections on its line;
    # not for one at another angle, nor for one after that time, nor for a very weak one.
    config = NeedleConfig(confirm_frames=5, shaft_hold_s=0.25, shaft_keep_fraction=0.5)
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)

    def shaft(confidence: float, angle: float = 30.0) -> NeedleDetection:
        found = detection(100.0, 100.0, confidence=0.1, in_plane=False)
        return replace(found, shaft_confidence=confidence, angle_deg=angle)

    tracker = NeedleTracker(config)
    assert tracker.update(shaft(0.9), frame_of(blank, 0, box)).shaft_visible
    assert tracker.update(shaft(0.45), frame_of(blank, 1, box)).shaft_visible
    assert tracker.update(shaft(0.45), frame_of(blank, 2, box)).shaft_visible  # vouched on
    assert not tracker.update(shaft(0.45, angle=45.0), frame_of(blank, 3, box)).shaft_visible
    assert not tracker.update(shaft(0.2), frame_of(blank, 4, box)).shaft_visible
    assert not tracker.update(shaft(0.45), frame_of(blank, 9, box)).shaft_visible  # 0.35 s on

    fresh = NeedleTracker(config)
    assert not fresh.update(shaft(0.45), frame_of(blank, 0, box)).shaft_visible


def test_a_shaft_the_model_stops_marking_is_followed_on_its_line_but_not_its_tip(scan):
    # The model marks the needle, then nothing while the needle advances (a shallow shaft among
    # bright fascicles): the stage measures the image along the reported shaft's line, and still
    # reports the needle, never its tip; once the needle is gone it reports nothing.
    image, box = scan
    stage = NeedleStage()
    states = []
    for i in range(16):
        if i < 12:
            drawn, labels, _ = needle_with_labels(image, box, 25.0, 0.2, 140.0 + 4.0 * i, seed=i)
            pixels = drawn.image
            if i >= 4:
                labels[:] = 0  # the model sees no needle
        else:
            pixels, labels = image, np.zeros(image.shape, np.uint8)
        states.append(stage(frame_of(pixels, i, box), labels))
    assert all(s.visible for s in states[1:4])  # tracked while the model marks it
    assert all(s.shaft_visible for s in states[4:12])
    # The tip coasts for hold_s (0.1 s, two frames), then is no longer shown.
    assert not any(s.visible for s in states[6:12])
    assert not any(s.shaft_visible or s.visible for s in states[13:])


def test_a_followed_shaft_counts_only_on_the_line_of_a_recent_one():
    config = NeedleConfig(confirm_frames=5, shaft_hold_s=0.25)
    box = (0, 0, 639, 479)
    blank = np.zeros((480, 640), np.uint8)
    reported = detection(100.0, 100.0, shaft_confidence=0.9, angle=30.0)
    weak = replace(reported, confidence=0.0, shaft_confidence=0.01)

    tracker = NeedleTracker(config)
    assert not tracker.update(None, frame_of(blank, 0, box), followed=weak).shaft_visible
    assert tracker.update(reported, frame_of(blank, 1, box)).shaft_visible
    assert tracker.shaft_to_follow() == reported
    assert tracker.update(None, frame_of(blank, 2, box), followed=weak).shaft_visible
    turned = replace(weak, angle_deg=40.0)
    assert not tracker.update(None, frame_of(blank, 3, box), followed=turned).shaft_visible
    away = replace(weak, tip_xy=(160.0, 100.0))  # 6 mm from the last end
    assert not tracker.update(None, frame_of(blank, 4, box), followed=away).shaft_visible
    assert tracker.shaft_to_follow() is not None  # reported at frame 2, 0.1 s ago
    # 0.3 s after the shaft was last reported: nothing to follow any more.
    tracker.update(None, frame_of(blank, 8, box))
    assert tracker.shaft_to_follow() is None
    assert not tracker.update(None, frame_of(blank, 9, box), followed=weak).shaft_visible


def test_model_pixels_far_along_the_shaft_line_do_not_carry_the_tip_there(scan):
    # A fleck the model marks as needle far beyond the tip, on the shaft's line, over a bright
    # band longer than the shaft: one line through both, and the tip went to the band's end.
    image, box = scan
    drawn, labels, along = needle_with_labels(image, box, 20.0, 0.1, 100.0, seed=2)
    tip = along(100.0)
    picture = drawn.image.copy()

    def px(t: float) -> tuple[int, int]:
        return round(along(t)[0]), round(along(t)[1])

    cv2.line(picture, px(200.0), px(380.0), (230, 230, 230), thickness=6)
    cv2.line(labels, px(350.0), px(375.0), 4, thickness=5)
    found = NeedleStage().detector(frame_of(picture, 0, box), labels)
    assert found is not None
    assert tip_error_mm(found, tip) < 1.0


def test_a_shaft_running_on_past_the_model_s_needle_hides_the_tip(scan):
    # On a long shaft over bright tissue the model may stop marking needle millimetres short of
    # the tip. The shaft, as bright, runs on in the image: the tip is not where the model's
    # pixels end, and may lie anywhere along the rest, so no tip is reported (the needle is).
    image, box = scan
    drawn, labels, along = needle_with_labels(image, box, 20.0, 0.2, 320.0, seed=4)
    whole = NeedleStage().detector(frame_of(drawn.image, 0, box), labels)
    assert whole is not None and whole.confidence >= 0.7
    assert tip_error_mm(whole, along(320.0)) < 0.5
    x_cut = along(220.0)[0]  # the model's needle ends 10 mm before the tip
    labels[:, math.ceil(x_cut) :] = 0
    short = NeedleStage().detector(frame_of(drawn.image, 0, box), labels)
    assert short is not None and short.shaft_confidence >= 0.7
    assert short.confidence == 0.0
    stage = NeedleStage()
    states = [stage(frame_of(drawn.image, i, box), labels) for i in range(4)]
    assert all(s.shaft_visible and not s.visible and s.tip_xy is None for s in states)


def test_bright_tissue_just_beyond_a_true_tip_keeps_the_tip(scan):
    # A nerve or fascia in line just beyond the tip (the moment that matters most): the shaft's
    # profile falls at the tip before the tissue begins, so the tip is known and reported.
    image, box = scan
    drawn, labels, along = needle_with_labels(image, box, 20.0, 0.2, 200.0, seed=4)
    picture = drawn.image.copy()

    def px(t: float) -> tuple[int, int]:
        return round(along(t)[0]), round(along(t)[1])

    cv2.line(picture, px(210.0), px(300.0), (215, 215, 215), thickness=6)
    found = NeedleStage().detector(frame_of(picture, 0, box), labels)
    assert found is not None and found.confidence >= 0.7
    assert tip_error_mm(found, along(200.0)) < 0.5


def test_visible_length_ends_at_the_tip(scan):
    # A bright line the model marks as needle only near the region's edge (a real lung video's
    # skin line at a fan's corner): the tip stays near the model's pixels, and the visible
    # length, which weighs in the confidence, must not take in the bright line beyond it (it
    # did: 18 mm reported for a 4 mm shaft).
    image, box = scan
    x0, y0, _, y1 = box
    d = (math.cos(math.radians(35.0)), math.sin(math.radians(35.0)))
    entry = (x0 - 0.5, y0 + 0.1 * (y1 - y0))

    def px(t: float) -> tuple[int, int]:
        return round(entry[0] + t * d[0]), round(entry[1] + t * d[1])

    picture = image.copy()
    cv2.line(picture, px(0.0), px(180.0), 235, thickness=4)
    labels = np.zeros(image.shape, np.uint8)
    cv2.line(labels, px(0.0), px(30.0), 4, thickness=4)
    found = NeedleStage().detector(frame_of(picture, 0, box), labels)
    assert found is not None
    shaft_px = math.dist(found.entry_xy, found.tip_xy)
    assert shaft_px < 60.0  # the tip stays near the model's pixels
    assert found.visible_length_px <= shaft_px + 2.0


def test_extreme_features_give_a_confidence_not_an_overflow():
    # An end ratio over a near-zero shaft level can be huge either way; the confidence must
    # saturate at 0 or 1 rather than raise (it did: math.exp overflowed mid-scan).
    weights = NeedleConfig().confidence_weights
    low = detection_features(0.5, 0.8, 50.0, 5.0, -1e6, 0.1, 1.0, 0.0)
    high = detection_features(0.5, 0.8, 50.0, 5.0, 1.0, -1e6, 1.0, 0.0)
    assert detection_confidence(weights, low) == 0.0
    assert detection_confidence(weights, high) == 1.0
    usual = detection_features(0.9, 0.8, 60.0, 8.0, 1.0, 0.05, 0.0, 0.0)
    assert 0.0 < detection_confidence(weights, usual) < 1.0


@pytest.mark.parametrize("name", ["confidence_weights", "shaft_confidence_weights"])
def test_confidence_weights_of_the_wrong_length_are_refused(name):
    # Weights fitted before a feature was added would fail mid-scan, in a numpy error.
    with pytest.raises(ValueError, match=f"{name}: expected 9 weights"):
        NeedleConfig(**{name: (0.0,) * 8})


def test_shaft_cut_by_the_top_edge_keeps_its_angle():
    # A thick shallow needle entering through the region's top edge: near the entry the edge cuts
    # off the upper part of each cross-section. The centroid of what is left lay below the
    # shaft's centre and tilted the fitted axis by about a degree.
    image = np.full((480, 640), 70, np.uint8)
    box = (0, 0, 639, 479)
    d = (math.cos(math.radians(15.0)), math.sin(math.radians(15.0)))
    errors = []
    for seed in range(5):
        entry = (300.0 + 7 * seed, -0.5)
        tip = (entry[0] + 100.0 * d[0], entry[1] + 100.0 * d[1])
        drawn = render_needle(
            image, NeedlePose(entry, tip, 12.0, None), rng=np.random.default_rng(seed), region=box
        )
        labels = np.zeros(image.shape, np.uint8)
        labels[drawn.mask] = 4
        found = NeedleStage().detector(frame_of(drawn.image, 0, box), labels)
        assert found is not None
        errors.append(abs(found.angle_deg - drawn.angle_deg))
    assert np.mean(errors) <= 0.5


def thick_shaft_angle_errors(angle, length_px, box, entry_of, scene) -> list[float]:
    """Angle errors of the detector on six 18 G (12 px) shafts on speckle-like noise, labelled
    exactly, after ``scene(image, entry)`` has drawn the surroundings."""
    d = (math.cos(math.radians(angle)), math.sin(math.radians(angle)))
    errors = []
    for seed in range(6):
        rng = np.random.default_rng(seed)
        image = np.clip(70 + rng.normal(0, 12, (480, 640)), 0, 255).astype(np.uint8)
        entry = entry_of(seed)
        scene(image, entry)
        tip = (entry[0] + length_px * d[0], entry[1] + length_px * d[1])
        drawn = render_needle(image, NeedlePose(entry, tip, 12.0, None), rng=rng, region=box)
        labels = np.zeros(image.shape, np.uint8)
        labels[drawn.mask] = 4
        found = NeedleStage().detector(frame_of(drawn.image, 0, box), labels)
        assert found is not None
        errors.append(abs(found.angle_deg - drawn.angle_deg))
    return errors


@pytest.mark.parametrize("gap_px", [1, 2])
def test_bright_tissue_beside_a_thick_shaft_does_not_tilt_it(gap_px):
    # A bright line (fascia, say) alongside the first half of an 18 G shaft, just below it.
    # Within the band where the shaft's centre is sought, the centroid of everything bright
    # was pulled toward it and tilted the axis by 1-3.6 degrees; the shaft's own cross-section
    # is not.
    d = (math.cos(math.radians(30.0)), math.sin(math.radians(30.0)))
    normal = (-d[1], d[0])

    def with_line(image: np.ndarray, entry: tuple[float, float]) -> None:
        off = 6.0 + gap_px + 2.0  # half the shaft, the gap, half the line
        start = (entry[0] + off * normal[0], entry[1] + off * normal[1])
        end = (start[0] + 50.0 * d[0], start[1] + 50.0 * d[1])
        cv2.line(image, (round(start[0]), round(start[1])), (round(end[0]), round(end[1])), 200, 4)

    errors = thick_shaft_angle_errors(
        30.0, 90.0, (0, 0, 639, 479), lambda seed: (-0.5, 100.0 + 5 * seed), with_line
    )
    assert np.mean(errors) <= 0.5


def test_a_short_thick_shaft_keeps_its_angle():
    # 3 mm of an 18 G needle just through the top edge: 30 px long and 12 px wide. The RANSAC
    # line with the most inliers in a thin strip is its diagonal, and the axis was fitted to
    # that strip alone (errors of 1-14 degrees); all of the shaft's width now counts.
    def black_above(image: np.ndarray, entry: tuple[float, float]) -> None:
        image[:20] = 0

    errors = thick_shaft_angle_errors(
        30.0, 30.0, (0, 20, 639, 479), lambda seed: (200.0 + 9 * seed, 19.5), black_above
    )
    assert max(errors) <= 2.0


def sector_of(image: np.ndarray, box) -> np.ndarray:
    """Where a curvilinear probe's fan inside ``box`` images, ``(H, W)`` bool."""
    x0, y0, x1, y1 = box
    imaged = np.zeros(image.shape[:2], bool)
    imaged[y0 : y1 + 1, x0 : x1 + 1] = sector_mask(y1 - y0 + 1, x1 - x0 + 1)
    return imaged


def test_the_side_of_a_sector_image_is_not_a_needle(scan):
    # The model labels stretches of a sector's straight sides needle. There the image ends: a
    # step (tissue on one side, black on the other), not a ridge, and never a needle.
    image, box = scan
    y0, y1 = box[1], box[3]
    imaged = sector_of(image, box)
    frame = frame_of(image * imaged, 0, box)
    # Labels 3 px inside the fan's right side, from just below its top corner to mid-depth.
    labels = np.zeros(image.shape, np.uint8)
    ends = []
    for depth in (0.02, 0.45):
        row = y0 + round(depth * (y1 - y0))
        ends.append((int(np.flatnonzero(imaged[row])[-1]) - 3, row))
    cv2.line(labels, ends[0], ends[1], 4, thickness=5)
    found = NeedleStage().detector(frame, labels)
    assert found is None or found.shaft_confidence < NeedleConfig().min_confidence


@pytest.mark.parametrize("from_col, to_col", [(160, 260), (165, 230), (380, 300)])
def test_a_convex_probes_skin_arc_is_not_a_needle(scan, from_col, to_col):
    # Under a convex probe the skin line follows the fan's near arc, and toward the fan's top
    # corners the model may label a stretch of it needle (a real lung video: 30 frames). It is a
    # bright ridge over black, so it passed as a confident shaft (0.95-0.98). The whole of it
    # lies at the surface, where no needle in tissue runs.
    image, box = scan
    x0, y0 = box[:2]
    grey, _, imaged = sector_view(image, np.zeros_like(image), box)
    pixels = grey * imaged
    first_echo = np.argmax(pixels[y0:] > 10, axis=0)
    columns = np.arange(min(from_col, to_col), max(from_col, to_col))
    assert first_echo[columns].max() < 40  # the stretch lies on the arc, near a corner
    labels = np.zeros_like(image)
    arc = np.stack([x0 + columns, y0 + first_echo[columns] + 3], axis=1).astype(np.int32)
    cv2.polylines(labels, [arc], False, NEEDLE, thickness=5)
    found = NeedleStage().detector(frame_of(pixels, 0, box), labels)
    assert found is None or found.shaft_confidence < NeedleConfig().min_confidence
    assert found is None or found.surface_share > 0.9


def test_a_needle_through_the_side_of_a_sector_is_found(segmenter, scan):
    # The needle enters the image through the fan's straight side; outside the fan it is unseen.
    image, box = scan
    imaged = sector_of(image, box)
    frames, truths = straight_advance(image, box, n=40, angle=25.0)
    states = track(segmenter, [frame * imaged for frame in frames], box)
    # Shaft inside the fan, mm (the needle is 8 px wide at the nominal spacing).
    inside_mm = [float((t.mask & imaged).sum()) / 8.0 * SPACING_MM for t in truths]
    assert inside_mm[0] == 0.0 and inside_mm[-1] > 8.0
    assert not any(s.shaft_visible for s, mm in zip(states, inside_mm, strict=True) if mm == 0.0)
    seen = [(s, t, mm) for s, t, mm in zip(states, truths, inside_mm, strict=True) if mm >= 4.0]
    assert all(s.visible for s, _, _ in seen)
    assert np.median([tip_error_mm(s, t.tip_xy) for s, t, _ in seen]) <= 0.5
    assert all(s.side == "left" for s, _, _ in seen)
    # Known limit: a few mm of shaft over this tissue fix its angle poorly (17.6 deg for 25 at
    # 4 mm inside); it settles as more of the shaft comes into the fan.
    late = [abs(s.angle_deg - t.angle_deg) for s, t, mm in seen if mm >= 8.0]
    assert len(late) >= 5 and np.median(late) <= 2.0
