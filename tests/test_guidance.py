"""Guidance: perineural and mesotherapy targets, distances, warnings, tissue following."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from usguide.frame import Frame, Region
from usguide.guidance import (
    Guidance,
    GuidanceConfig,
    find_skin_line,
    plan_perineural_targets,
)
from usguide.labels import FASCIA, NERVE, VESSEL
from usguide.needle import NeedleState

DATA = Path(__file__).parent / "data" / "usgra-seg"
MM = 0.1


def make_frame(
    pixels: np.ndarray, index: int = 0, spacing: float | tuple[float, float] | None = MM
) -> Frame:
    h, w = pixels.shape[:2]
    sp = (spacing, spacing) if isinstance(spacing, float) else spacing
    return Frame(pixels, index, index * 0.05, sp, Region((0, 0, w - 1, h - 1), sp), "test")


def needle_at(tip: tuple[float, float] | None, entry=(0.0, 0.0), index: int = 0) -> NeedleState:
    if tip is None:
        return NeedleState(index, False, None, None, None, None, None, None, False, 0.0, "x")
    length = math.dist(tip, entry)
    return NeedleState(
        index, True, tip, (tip[0] * MM, tip[1] * MM), 30.0, length * MM, length, "left",
        True, 0.9, "tracking", entry,
    )  # fmt: skip


def disc_labels(shape=(300, 400)) -> np.ndarray:
    labels = np.zeros(shape, np.uint8)
    cv2.circle(labels, (200, 150), 30, NERVE, -1)  # nerve: radius 3 mm at 0.1 mm/px
    cv2.circle(labels, (120, 230), 25, VESSEL, -1)
    return labels


def test_perineural_targets_lie_outside_the_nerve_clear_of_vessels() -> None:
    mask = np.array(Image.open(DATA / "masks" / "0212.png"))
    targets = plan_perineural_targets(mask, (MM, MM), offset_mm=1.5, count=2)
    assert 1 <= len(targets) <= 2
    nerve_distance = cv2.distanceTransform((mask != NERVE).astype(np.uint8), cv2.DIST_L2, 5)
    vessel_distance = cv2.distanceTransform((mask != VESSEL).astype(np.uint8), cv2.DIST_L2, 5)
    for x, y in targets:
        assert nerve_distance[round(y), round(x)] * MM == pytest.approx(1.5, abs=0.25)
        assert vessel_distance[round(y), round(x)] * MM >= 2.0
    if len(targets) == 2:
        assert math.dist(*targets) * MM >= 3.0


def test_perineural_path_from_the_insertion_side_avoids_the_vessel() -> None:
    labels = disc_labels()
    # Vessel sits lower left: a target on the nerve's left, reached from the left corner,
    # must not route the path through it.
    for side in ("left", "right"):
        targets = plan_perineural_targets(labels, (MM, MM), sides=(side,), count=2)
        assert targets
        entry = (0.0, 0.0) if side == "left" else (399.0, 0.0)
        for x, y in targets:
            n = 400
            xs = np.linspace(entry[0], x, n).round().astype(int)
            ys = np.linspace(entry[1], y, n).round().astype(int)
            assert not (labels[ys, xs] == VESSEL).any()
            assert not (labels[ys, xs] == NERVE).any()


def test_fascial_plane_targets_rank_first() -> None:
    labels = disc_labels()
    cv2.line(labels, (0, 110), (399, 110), FASCIA, 3)  # a plane along the nerve's upper side
    targets = plan_perineural_targets(labels, (MM, MM), count=1)
    distance = cv2.distanceTransform((labels != FASCIA).astype(np.uint8), cv2.DIST_L2, 5)
    x, y = targets[0]
    assert distance[round(y), round(x)] * MM <= 1.0


def test_no_nerve_gives_no_target() -> None:
    labels = np.zeros((200, 200), np.uint8)
    assert plan_perineural_targets(labels, (MM, MM)) == []
    labels[100:102, 100:102] = NERVE  # a speck is noise, not a nerve
    assert plan_perineural_targets(labels, (MM, MM)) == []


def test_distances_and_warnings_in_mm() -> None:
    labels = disc_labels()
    grey = np.full(labels.shape, 90, np.uint8)
    g = Guidance(GuidanceConfig(mode="manual"))
    g.add_target((160.0, 150.0))
    # Tip 1 mm left of the nerve's edge (edge at x=170).
    r = g(make_frame(grey), labels, needle_at((160.0, 150.0)))
    assert r.units == "mm"
    assert r.tip_to_nerve == pytest.approx(1.0, abs=0.1)
    assert r.tip_to_target == pytest.approx(0.0, abs=1e-6)
    assert not {w.code for w in r.warnings} & {"intraneural", "calibration_unknown"}
    # Tip inside the nerve: negative distance and the intraneural warning.
    r = g(make_frame(grey, 1), labels, needle_at((200.0, 150.0), index=1))
    assert r.tip_to_nerve is not None and r.tip_to_nerve < -2.5
    assert "intraneural" in {w.code for w in r.warnings}
    # Tip 1 mm from the vessel's edge: inside the 2 mm margin.
    r = g(make_frame(grey, 2), labels, needle_at((120.0, 195.0), index=2))
    assert r.tip_to_vessel == pytest.approx(1.0, abs=0.1)
    assert "vessel_near" in {w.code for w in r.warnings}


def test_projected_path_crossing_a_vessel_warns() -> None:
    labels = disc_labels()
    grey = np.full(labels.shape, 90, np.uint8)
    g = Guidance(GuidanceConfig(mode="manual"))
    # Shaft from the top left heading straight at the vessel centre (120, 230).
    entry, tip = (0.0, 50.0), (60.0, 140.0)
    r = g(make_frame(grey), labels, needle_at(tip, entry))
    assert r.path is not None and r.path_crosses_vessel is True
    assert "path_vessel" in {w.code for w in r.warnings}
    # Heading right above the vessel, towards the nerve's top: no vessel on the path.
    r = g(make_frame(grey, 1), labels, needle_at((100.0, 60.0), (0.0, 0.0), 1))
    assert r.path_crosses_vessel is False


def test_uncalibrated_frames_give_px_and_say_so() -> None:
    labels = disc_labels()
    grey = np.full(labels.shape, 90, np.uint8)
    g = Guidance(GuidanceConfig(mode="manual"))
    r = g(make_frame(grey, spacing=None), labels, needle_at((160.0, 150.0)))
    assert r.units == "px"
    assert r.tip_to_nerve == pytest.approx(10.0, abs=1.0)
    assert "calibration_unknown" in {w.code for w in r.warnings}
    assert r.to_dict()["units"] == "px"


def test_time_on_target_and_tip_lost_while_advancing() -> None:
    labels = disc_labels()
    grey = np.full(labels.shape, 90, np.uint8)
    g = Guidance(GuidanceConfig(mode="manual"))
    g.add_target((150.0, 120.0))
    # Advance 0.5 mm per frame for 8 frames, ending on the target; dwell; then vanish.
    times = []
    for i in range(8):
        tip = (110.0 + 5 * i, 80.0 + 5 * i)
        r = g(make_frame(grey, i), labels, needle_at(tip, index=i))
        times.append(r.time_on_target_s)
    assert times[-1] == 0.0 or times[-1] < 0.11
    for i in range(8, 20):  # a 0.6 s pause on the target
        r = g(make_frame(grey, i), labels, needle_at((150.0, 120.0), index=i))
    assert r.time_on_target_s == pytest.approx(0.6, abs=0.051)
    r = g(make_frame(grey, 20), labels, needle_at(None, index=20))
    assert "tip_lost_advancing" not in {w.code for w in r.warnings}  # it had stopped
    g.reset()
    for i in range(6):
        g(make_frame(grey, i), labels, needle_at((110.0 + 5 * i, 80.0 + 5 * i), index=i))
    r = g(make_frame(grey, 6), labels, needle_at(None, index=6))
    assert "tip_lost_advancing" in {w.code for w in r.warnings}


def test_user_targets_add_move_delete() -> None:
    g = Guidance(GuidanceConfig(mode="manual"), targets=((10.0, 20.0),))
    a = g.targets[0].id
    b = g.add_target((30.0, 40.0))
    g.move_target(a, (15.0, 25.0))
    assert {t.id: t.xy for t in g.targets} == {a: (15.0, 25.0), b: (30.0, 40.0)}
    g.delete_target(b)
    assert [t.id for t in g.targets] == [a]
    with pytest.raises(KeyError):
        g.delete_target(b)


def test_targets_follow_the_tissue_without_jumping() -> None:
    image = cv2.imread(str(DATA / "images" / "0212.png"), cv2.IMREAD_GRAYSCALE)
    g = Guidance(GuidanceConfig(mode="manual", max_target_step_mm=0.5))
    target = g.add_target((300.0, 150.0))
    shifts = [0, 2, 4, 6, 8, 30]  # px per frame, cumulative; the last is a 2.2 mm jump
    positions = []
    for i, s in enumerate(shifts):
        moved = np.roll(image, s, axis=1)
        g(make_frame(moved, i), None, None)
        positions.append(next(t.xy for t in g.targets if t.id == target))
    for i in range(1, 5):
        assert positions[i][0] - 300.0 == pytest.approx(shifts[i], abs=0.5)
        assert positions[i][1] == pytest.approx(150.0, abs=0.5)
    # One frame moves a target at most max_target_step_mm.
    assert positions[5][0] - positions[4][0] <= 0.5 / MM + 1e-6


def test_automatic_targets_are_stable_on_a_still_scan() -> None:
    mask = np.array(Image.open(DATA / "masks" / "0212.png"))
    image = cv2.imread(str(DATA / "images" / "0212.png"), cv2.IMREAD_GRAYSCALE)
    g = Guidance()
    first = None
    for i in range(10):
        r = g(make_frame(image, i), mask, None)
        assert r.targets and all(t.kind == "perineural" for t in r.targets)
        first = first or {t.id: t.xy for t in r.targets}
    last = {t.id: t.xy for t in r.targets}
    assert set(last) == set(first)
    assert max(math.dist(first[k], last[k]) for k in last) < 1.0


def test_mesotherapy_points_at_depth_below_the_skin_line() -> None:
    rng = np.random.default_rng(0)
    h, w = 300, 400
    grey = rng.normal(60, 8, (h, w)).clip(0, 255).astype(np.uint8)
    skin = (20 + 0.02 * np.arange(w)).round().astype(int)
    for x in range(w):
        grey[: skin[x], x] = 5  # gel stand-off: dark
        grey[skin[x] : skin[x] + 4, x] = 200
    coeffs = find_skin_line(grey)
    assert coeffs is not None
    assert np.abs(np.polyval(coeffs, np.arange(w)) - skin).max() < 1.5
    g = Guidance(GuidanceConfig(mode="mesotherapy", meso_depth_mm=3.0, meso_count=5))
    r = g(make_frame(grey), None, None)
    assert len(r.targets) == 5 and all(t.kind == "mesotherapy" for t in r.targets)
    xs = sorted(t.xy[0] for t in r.targets)
    assert np.allclose(np.diff(xs), 5.0 / MM)
    for t in r.targets:
        depth = (t.xy[1] - skin[round(t.xy[0])]) * MM
        assert depth == pytest.approx(3.0, abs=0.2)


def test_config_is_checked() -> None:
    with pytest.raises(ValueError, match="mode"):
        GuidanceConfig(mode="nerve")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="target_offset_mm"):
        GuidanceConfig(target_offset_mm=0)


def test_tip_on_an_outline_pixel_is_inside() -> None:
    labels = np.zeros((300, 400), np.uint8)
    labels[140:161, 170:231] = NERVE
    labels[200:221, 100:141] = VESSEL
    labels[20, 20] = NERVE  # one pixel: all outline
    labels[250:300, 300:400] = NERVE  # cut by the image's edge
    grey = np.full(labels.shape, 90, np.uint8)
    for spacing in (MM, None):
        g = Guidance(GuidanceConfig(mode="manual"))
        for i, tip in enumerate([(170.0, 150.0), (20.0, 20.0), (399.0, 299.0)]):
            r = g(make_frame(grey, i, spacing), labels, needle_at(tip, index=i))
            assert r.tip_to_nerve is not None and r.tip_to_nerve < 0
            assert "intraneural" in {w.code for w in r.warnings}
        r = g(make_frame(grey, 3, spacing), labels, needle_at((100.0, 210.0), index=3))
        assert r.tip_to_vessel is not None and r.tip_to_vessel < 0
        assert ("vessel_near", "tip inside a vessel") in {(w.code, w.message) for w in r.warnings}


def test_vessel_near_warns_on_uncalibrated_frames_in_px() -> None:
    labels = disc_labels()  # vessel: radius 25 px around (120, 230), top edge at y=205
    grey = np.full(labels.shape, 90, np.uint8)
    g = Guidance(GuidanceConfig(mode="manual", vessel_margin_mm=2.0, nominal_spacing_mm=0.1))
    # 2 px above the vessel: within the 2 mm margin at the nominal 0.1 mm/px (20 px).
    r = g(make_frame(grey, 0, None), labels, needle_at((120.0, 203.0), (0.0, 203.0)))
    assert r.units == "px" and r.tip_to_vessel == pytest.approx(2.0)
    near = [w.message for w in r.warnings if w.code == "vessel_near"]
    assert near == ["tip 2.0 px from a vessel"]
    # 25 px above: beyond the margin, no warning.
    r = g(make_frame(grey, 1, None), labels, needle_at((120.0, 180.0), (0.0, 180.0), 1))
    assert "vessel_near" not in {w.code for w in r.warnings}


def test_target_step_cap_is_physical_with_anisotropic_spacing() -> None:
    image = cv2.imread(str(DATA / "images" / "0212.png"), cv2.IMREAD_GRAYSCALE)
    spacing = (0.2, 0.1)  # (row, col): a row is twice as tall as a column is wide
    for axis in (0, 1):
        g = Guidance(GuidanceConfig(mode="manual", max_target_step_mm=0.5))
        target = g.add_target((300.0, 150.0))
        positions = []
        for i, shift in enumerate((0, 30)):  # a 30 px jump of the probe
            g(make_frame(np.roll(image, shift, axis=axis), i, spacing), None, None)
            positions.append(next(t.xy for t in g.targets if t.id == target))
        dx, dy = np.subtract(positions[1], positions[0])
        moved_mm = math.hypot(dx * spacing[1], dy * spacing[0])
        assert moved_mm == pytest.approx(0.5, abs=1e-6)


def test_perineural_offset_is_physical_with_anisotropic_spacing() -> None:
    row_mm, col_mm = 0.2, 0.1
    labels = np.zeros((300, 600), np.uint8)
    cv2.ellipse(labels, (300, 150), (30, 15), 0, 0, 360, NERVE, -1)  # a 3 mm radius circle
    ys, xs = np.nonzero(labels == NERVE)
    for sides in (("left",), ("right",), ("left", "right")):
        targets = plan_perineural_targets(labels, (row_mm, col_mm), offset_mm=1.5, sides=sides)
        assert targets
        for x, y in targets:
            to_nerve_mm = np.hypot((xs - x) * col_mm, (ys - y) * row_mm).min()
            assert to_nerve_mm == pytest.approx(1.5, abs=0.25)
        if len(targets) == 2:
            assert math.hypot(*np.subtract(*targets) * (col_mm, row_mm)) >= 3.0


def _injection_scene(i: int, pocket_as_vessel: bool) -> tuple[np.ndarray, np.ndarray]:
    """A small artery right of the target, labelled from the start; from frame 2 an anechoic
    pocket grows at the target (200, 150) up to the artery, labelled vessel by the model (a
    little inside its edge) when asked."""
    pixels = np.full((300, 400), 120, np.uint8)
    labels = np.zeros((300, 400), np.uint8)
    if i >= 2:
        radius = 10 + 6 * (i - 2)
        cv2.circle(pixels, (200, 150), radius, 5, -1)
        if pocket_as_vessel:
            cv2.circle(labels, (200, 150), radius - 8, VESSEL, -1)
    cv2.circle(pixels, (244, 150), 8, 5, -1)
    cv2.circle(labels, (244, 150), 8, VESSEL, -1)  # x 236..252
    return pixels, labels


def test_vessel_beside_the_injectate_pocket_still_warns() -> None:
    for pocket_as_vessel in (False, True):
        g = Guidance(GuidanceConfig(mode="manual"))
        g.add_target((200.0, 150.0))
        for i in range(8):
            pixels, labels = _injection_scene(i, pocket_as_vessel)
            tip = (200.0, 150.0) if i < 7 else (222.0, 150.0)  # last: 1.4 mm from the artery
            r = g(make_frame(pixels, i), labels, needle_at(tip, index=i))
            if 3 <= i < 7:
                assert r.spread is not None and r.spread.detected
                # The pocket labelled vessel is injectate: the tip in it is not in a vessel.
                assert r.tip_to_vessel is not None and r.tip_to_vessel > 2.0
        assert r.tip_to_vessel == pytest.approx(1.4, abs=0.1)
        assert "vessel_near" in {w.code for w in r.warnings}


@pytest.mark.parametrize("size", [(1, 1), (1, 400), (400, 1), (2, 2), (3, 3), (5, 5), (8, 3)])
def test_tiny_imaging_regions_give_no_error(size: tuple[int, int]) -> None:
    w, h = size
    pixels = np.full((480, 640), 100, np.uint8)
    labels = np.zeros((480, 640), np.uint8)
    labels[10 : 10 + h, 10 : 10 + w] = NERVE
    region = Region((10, 10, 10 + w - 1, 10 + h - 1), (MM, MM), True, "user")
    g = Guidance(targets=((10.0, 10.0),))
    for i in range(2):
        r = g(Frame(pixels, i, 0.05 * i, (MM, MM), region, "test"), labels, None)
        assert [t.kind for t in r.targets] == ["user"]
    # The planner alone, on a label map that small, at a fine spacing too.
    assert plan_perineural_targets(labels[10 : 10 + h, 10 : 10 + w], (MM, MM)) == []
    assert plan_perineural_targets(np.full((9, 9), NERVE, np.uint8), (0.01, 0.01)) == []


def test_the_overlay_says_whether_the_shaft_is_seen_when_the_tip_is_not() -> None:
    from usguide.pipeline import describe, needle_status_line

    unseen = needle_at(None)
    shaft_only = replace(unseen, shaft_visible=True)  # out of plane, or followed on its line
    assert needle_status_line(unseen) == "needle: tip not visible"
    assert needle_status_line(None) == "needle: tip not visible"
    assert needle_status_line(shaft_only) == "needle: shaft seen, tip not visible"
    # Without guidance (not run, or failed) the overlay says only what the needle stage saw.
    assert describe(None, shaft_only) == ["needle: shaft seen, tip not visible"]
    assert describe(None, None) == []
