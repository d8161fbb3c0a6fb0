"""Injectate spread on rendered sequences with exact ground truth.

Anechoic pockets (``usguide.data.injectate_render``) grow on a real nerve-block frame bundled with
the tests (USGRA-Seg 0050, whose mask labels the nerve); the stage is armed on the first frame,
as the guidance stage does when the tip reaches its target.
"""

from __future__ import annotations

import math
import tracemalloc

import cv2
import numpy as np
import pytest

from usguide.data.datasets import UsgraSeg
from usguide.data.injectate_render import (
    RenderedInjectate,
    injectate_sequence,
    random_outline,
    render_injectate,
)
from usguide.data.needle_render import NeedlePose, render_needle
from usguide.frame import Frame, Region
from usguide.labels import NEEDLE, NERVE
from usguide.spread import InjectateSpread, SpreadConfig, SpreadState

SPACING = (0.1, 0.08)  # (row, col) mm per pixel, deliberately not square
BOX = (0, 72, 533, 405)  # the imaging region of 0050 (find_imaging_region)
BESIDE = (325.0, 195.0)  # in the muscle above-left of the nerve, ~4 mm from its edge


@pytest.fixture(scope="module")
def scan(test_data) -> tuple[np.ndarray, np.ndarray]:
    data = UsgraSeg(test_data)
    sample = data[data.stems.index("0050")]
    return sample.image, sample.mask


def frame_of(image, i, spacing=SPACING, box=BOX) -> Frame:
    region = Region(box, spacing, True, "frame")
    return Frame(image, i, i / 20.0, spacing, region, "test")


def run(frames, labels, tip, spacing=SPACING, config=None, arm=True):
    """States of a fresh stage over rendered frames, armed on the first one."""
    stage = InjectateSpread(config)
    states = []
    for i, r in enumerate(frames):
        frame = frame_of(r.image if hasattr(r, "image") else r, i, spacing)
        if arm and i == 0:
            stage.arm(frame, tip)
        states.append(
            stage(frame, labels if labels is not None else getattr(r, "labels", None), tip)
        )
    return stage, states


def ring_coverage(pocket: np.ndarray, nerve: np.ndarray, ring_mm: float = 1.0) -> float:
    """Truth: share of the 1 mm band outside the nerve that the true pocket covers."""
    r = round(ring_mm / math.sqrt(SPACING[0] * SPACING[1]))
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    ring = (cv2.dilate(nerve.astype(np.uint8), disc) > 0) & ~nerve
    return float((ring & pocket).sum() / ring.sum())


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


# -- rendering -------------------------------------------------------------------------------


def test_render_is_deterministic_and_dark_inside(scan):
    image, _ = scan
    a = render_injectate(image, BESIDE, (40, 28), rng=np.random.default_rng(3), region=BOX)
    b = render_injectate(image, BESIDE, (40, 28), rng=np.random.default_rng(3), region=BOX)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert a.mask.dtype == bool and a.mask.shape == image.shape
    # Near black inside, untouched far away, ellipse-sized area.
    assert np.median(a.image[a.mask]) < 15
    assert np.array_equal(a.image[:72], image[:72])
    assert a.area_px == pytest.approx(math.pi * 40 * 28, rel=0.15)
    # Posterior enhancement: the tissue just below is brighter than before.
    below = (slice(240, 262), slice(310, 340))
    assert a.image[below].mean() > image[below].mean()


def test_render_zero_radius_and_outline(scan):
    image, _ = scan
    r = render_injectate(image, BESIDE, (0, 0), rng=np.random.default_rng(0))
    assert np.array_equal(r.image, image) and not r.mask.any()
    outline = random_outline(np.random.default_rng(0), 0.1)
    assert outline.shape == (72,) and abs(outline.std() - 0.1) < 0.02


# -- detection -------------------------------------------------------------------------------


def test_growing_pocket_beside_the_nerve(scan):
    image, mask = scan
    rng = np.random.default_rng(0)
    seq = list(
        injectate_sequence(
            image, 30, rng, centre_xy=BESIDE, final_radii_px=(48, 34), start_frame=2,
            labels=mask, spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    stage, states = run(seq, None, BESIDE)
    px_mm2 = SPACING[0] * SPACING[1]
    min_px = SpreadConfig().min_area_mm2 / px_mm2
    first_true = next(i for i, r in enumerate(seq) if r.area_px >= min_px)
    first_seen = next(i for i, s in enumerate(states) if s.detected)
    assert first_seen - first_true <= 2  # confirm_frames = 2
    assert not any(s.detected for s in states[:first_true])
    last, truth = states[-1], seq[-1]
    assert last.armed and last.detected and last.growing and last.calibrated
    assert last.area_mm2 == pytest.approx(truth.area_px * px_mm2, rel=0.15)
    assert last.area_px == pytest.approx(truth.area_px, rel=0.15)
    for s, r in zip(states[first_seen:], seq[first_seen:], strict=True):
        assert s.area_px == pytest.approx(r.area_px, rel=0.15)
    # The overlay mask is the pocket, in frame pixels.
    assert stage.mask.shape == image.shape and stage.mask.dtype == bool
    assert iou(stage.mask, truth.mask) > 0.85
    x0, y0, x1, y1 = last.bbox
    assert stage.mask[y0 : y1 + 1, x0 : x1 + 1].sum() == stage.mask.sum()
    # Beside the nerve, touching it on one side: not around it.
    assert last.surrounds_nerve is False
    assert last.nerve_coverage == pytest.approx(
        ring_coverage(truth.mask, truth.labels == NERVE), abs=0.1
    )


def test_pocket_stops_growing(scan):
    image, mask = scan
    seq = list(
        injectate_sequence(
            image, 60, np.random.default_rng(1), centre_xy=BESIDE, final_radii_px=(40, 30),
            start_frame=2, grow_frames=15, labels=mask, spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    _, states = run(seq, None, BESIDE)
    assert any(s.growing for s in states[5:17])
    # One growth window (1 s = 20 frames) after the injection ended, it is no longer growing.
    assert all(s.detected and not s.growing for s in states[40:])


def _nerve_geometry(mask):
    """Centre, half-axes and angle of the nerve's rectangle, and a tip ~1.5 mm above it."""
    nerve = (mask == NERVE).astype(np.uint8)
    contours, _ = cv2.findContours(nerve, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    (cx, cy), (w, h), angle = cv2.minAreaRect(max(contours, key=cv2.contourArea))
    if w < h:
        w, h, angle = h, w, angle + 90.0
    a = math.radians(angle)
    up = (math.sin(a), -math.cos(a)) if math.cos(a) > 0 else (-math.sin(a), math.cos(a))
    d = 0.0
    while mask[round(cy + d * up[1]), round(cx + d * up[0])] == NERVE:
        d += 1.0  # walk up out of the nerve, then 1.5 mm on
    d += 15.0
    return (cx, cy), (0.5 * w, 0.5 * h), angle, (cx + d * up[0], cy + d * up[1])


def test_pocket_around_the_nerve(scan):
    image, mask = scan
    centre, (a, b), angle, tip = _nerve_geometry(mask)
    nerve = mask == NERVE
    distance = cv2.distanceTransform((~nerve).astype(np.uint8), cv2.DIST_L2, 5)
    assert 10 < distance[round(tip[1]), round(tip[0])] < 25  # the tip is just outside the nerve
    seq = list(
        injectate_sequence(
            image, 30, np.random.default_rng(2), centre_xy=centre,
            final_radii_px=(a + 35, b + 35), origin_xy=tip, angle_deg=angle, irregularity=0.06,
            start_frame=2, labels=mask, exclude=nerve, push=0.0, spacing_mm=SPACING,
            region=BOX,
        )
    )  # fmt: skip
    stage, states = run(seq, None, tip)
    last, truth = states[-1], seq[-1]
    true_cover = ring_coverage(truth.mask, nerve)
    assert true_cover > 0.85
    assert last.detected and last.surrounds_nerve is True
    assert last.nerve_coverage == pytest.approx(true_cover, abs=0.1)
    # The nerve floats in the pocket: it is not counted as fluid.
    assert not (stage.mask & nerve).sum() > 0.05 * nerve.sum()
    assert last.area_px == pytest.approx(truth.area_px, rel=0.15)
    # Early on, the fluid is on the tip's side only.
    assert states[8].detected and states[8].surrounds_nerve is False


def test_pocket_on_one_side_of_the_nerve(scan):
    image, mask = scan
    _, _, angle, tip = _nerve_geometry(mask)
    nerve = mask == NERVE
    seq = list(
        injectate_sequence(
            image, 30, np.random.default_rng(2), centre_xy=(tip[0] - 10, tip[1] - 12),
            final_radii_px=(75, 30), angle_deg=angle, start_frame=2, labels=mask,
            exclude=nerve, push=0.2, spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    stage, states = run(seq, None, tip)
    last, truth = states[-1], seq[-1]
    true_cover = ring_coverage(truth.mask, truth.labels == NERVE)
    assert 0.1 < true_cover < 0.3  # along the nerve's upper side, nowhere else
    assert last.detected and last.surrounds_nerve is False
    assert last.nerve_coverage == pytest.approx(true_cover, abs=0.05)
    assert iou(stage.mask, truth.mask) > 0.85


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("tip", [BESIDE, (300.0, 262.0), (150.0, 250.0), (430.0, 330.0)])
def test_no_injection_with_probe_motion_is_never_detected(scan, seed, tip):
    image, mask = scan
    seq = injectate_sequence(
        image, 40, np.random.default_rng(seed), centre_xy=tip, final_radii_px=(0, 0),
        labels=mask, shift_px=1.5, frame_noise=3.0, region=BOX,
    )  # fmt: skip
    stage, states = run(seq, None, tip)
    assert all(s.armed and not s.detected and s.area_px == 0 for s in states)
    assert all(s.surrounds_nerve is False and s.nerve_coverage == 0.0 for s in states)
    assert not stage.mask.any()


@pytest.mark.parametrize("shift", [(1, 0), (2, 1), (-2, -2)])
def test_still_frame_shifted_by_a_pixel_or_two(scan, shift):
    image, _ = scan
    rng = np.random.default_rng(5)
    frames = []
    for i in range(12):
        moved = np.roll(image, (shift[1] * (i > 0), shift[0] * (i > 0)), axis=(0, 1))
        noisy = moved + rng.normal(0, 3, image.shape)
        frames.append(np.clip(np.rint(noisy), 0, 255).astype(np.uint8))
    for tip in (BESIDE, (300.0, 262.0), (200.0, 330.0)):
        # Without motion compensation too: the min-filter alone absorbs 2 px.
        for config in (SpreadConfig(), SpreadConfig(track_motion=False)):
            _, states = run(frames, None, tip, config=config)
            assert not any(s.detected for s in states)


def with_needle(frames, tip, rng, angle_deg=25.0, width_px=10.0, travel_px=3.0):
    """Frames with a needle from the left ending at ``tip`` (moving +-``travel_px`` along its
    shaft), labelled class 4 as the segmentation model would."""
    a = math.radians(angle_deg)
    d = (math.cos(a), math.sin(a))
    out = []
    for i, r in enumerate(frames):
        shift = travel_px * math.sin(i / 4.0)
        t = (tip[0] + shift * d[0], tip[1] + shift * d[1])
        entry = (tip[0] - 250.0 * d[0], tip[1] - 250.0 * d[1])
        drawn = render_needle(r.image, NeedlePose(entry, t, width_px), rng=rng, region=BOX)
        labels = r.labels.copy()
        labels[drawn.mask] = NEEDLE
        out.append(RenderedInjectate(drawn.image, r.mask, labels, r.radii_px))
    return out


def test_needle_through_the_pocket(scan):
    image, mask = scan
    rng = np.random.default_rng(6)
    seq = injectate_sequence(
        image, 30, rng, centre_xy=BESIDE, final_radii_px=(48, 34), start_frame=2,
        labels=mask, spacing_mm=SPACING, region=BOX,
    )  # fmt: skip
    frames = with_needle(list(seq), BESIDE, rng)
    stage, states = run(frames, None, BESIDE)
    last, truth = states[-1], frames[-1]
    # The shaft and its reverberations cross the fluid; with the needle labelled they count.
    assert last.detected and last.growing
    assert last.area_px == pytest.approx(truth.area_px, rel=0.15)
    assert iou(stage.mask, truth.mask) > 0.8
    first_true = next(i for i, r in enumerate(frames) if r.area_px >= 2.0 / 0.008)
    assert next(i for i, s in enumerate(states) if s.detected) - first_true <= 5


def test_moving_needle_without_injection_is_never_detected(scan):
    image, mask = scan
    for seed, tip in enumerate((BESIDE, (386.0, 150.0), (250.0, 300.0))):
        rng = np.random.default_rng(seed)
        seq = injectate_sequence(
            image, 40, rng, centre_xy=tip, final_radii_px=(0, 0), labels=mask,
            shift_px=1.5, frame_noise=3.0, region=BOX,
        )  # fmt: skip
        _, states = run(with_needle(list(seq), tip, rng, travel_px=4.0), None, tip)
        assert not any(s.detected for s in states)


def test_not_armed_reports_nothing(scan):
    image, mask = scan
    seq = injectate_sequence(
        image, 12, np.random.default_rng(0), centre_xy=BESIDE, final_radii_px=(48, 34),
        labels=mask, spacing_mm=SPACING, region=BOX,
    )  # fmt: skip
    stage, states = run(seq, None, BESIDE, arm=False)
    for s in states:
        assert s == SpreadState(s.frame_index, False, False, None, 0, True, False, None, None)
    assert not stage.armed and stage.anchor_xy is None


def test_uncalibrated_frame_gives_pixels_only(scan):
    image, mask = scan
    seq = list(
        injectate_sequence(
            image, 20, np.random.default_rng(0), centre_xy=BESIDE, final_radii_px=(48, 34),
            labels=mask, region=BOX,
        )
    )  # fmt: skip
    _, states = run(seq, None, BESIDE, spacing=None)
    last = states[-1]
    assert last.detected and not last.calibrated and last.area_mm2 is None
    assert last.area_px == pytest.approx(seq[-1].area_px, rel=0.15)


def test_rgb_frames_match_grey(scan):
    image, mask = scan
    seq = list(
        injectate_sequence(
            image, 10, np.random.default_rng(4), centre_xy=BESIDE, final_radii_px=(40, 30),
            labels=mask, spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    _, grey = run(seq, mask, BESIDE)
    rgb = [np.repeat(r.image[:, :, None], 3, axis=2) for r in seq]
    _, colour = run(rgb, mask, BESIDE)
    assert [s.area_px for s in grey] == [s.area_px for s in colour]


def test_tip_lost_uses_the_anchor(scan):
    image, mask = scan
    seq = list(
        injectate_sequence(
            image, 15, np.random.default_rng(0), centre_xy=BESIDE, final_radii_px=(48, 34),
            labels=mask, spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    stage = InjectateSpread()
    stage.arm(frame_of(seq[0].image, 0), BESIDE)
    assert stage.anchor_xy == BESIDE
    states = [stage(frame_of(r.image, i), r.labels, None) for i, r in enumerate(seq)]
    assert states[-1].detected
    assert states[-1].area_px == pytest.approx(seq[-1].area_px, rel=0.15)


def test_no_labels_or_no_nerve_gives_none(scan):
    image, mask = scan
    seq = list(
        injectate_sequence(
            image, 10, np.random.default_rng(0), centre_xy=BESIDE, final_radii_px=(48, 34),
            spacing_mm=SPACING, region=BOX,
        )
    )  # fmt: skip
    _, states = run(seq, None, BESIDE)
    assert states[-1].detected and states[-1].surrounds_nerve is None
    _, states = run(seq, np.where(mask == NERVE, 0, mask).astype(np.uint8), BESIDE)
    assert states[-1].detected and states[-1].nerve_coverage is None


def test_flat_black_frames(scan):
    image, _ = scan
    black = np.zeros_like(image)
    stage = InjectateSpread()
    stage.arm(frame_of(black, 0), (100.0, 100.0))
    for i, pixels in enumerate([black, black, image, black]):
        state = stage(frame_of(pixels, i + 1), np.zeros_like(image), (100.0, 100.0))
        assert not state.detected and state.area_px == 0
    # A tip outside the frame, and a tiny region, do not crash either.
    state = stage(frame_of(black, 9), None, (-50.0, 2000.0))
    assert not state.detected
    tiny = InjectateSpread()
    tiny.arm(frame_of(black, 0, box=(0, 0, 3, 3)), (1.0, 1.0))
    assert not tiny(frame_of(black, 1, box=(0, 0, 3, 3)), None, (1.0, 1.0)).detected


def test_region_change_disarms_and_reset(scan):
    image, _ = scan
    stage = InjectateSpread()
    stage.arm(frame_of(image, 0), BESIDE)
    assert stage.armed
    state = stage(frame_of(image, 1, box=(0, 80, 533, 405)), None, BESIDE)
    assert not state.armed and not stage.armed
    stage.arm(frame_of(image, 2), BESIDE)
    stage.reset()
    assert not stage.armed and not stage(frame_of(image, 3), None, BESIDE).armed


def test_hot_path_allocates_little(scan):
    image, mask = scan
    big = cv2.resize(image, (640, 480), interpolation=cv2.INTER_AREA)
    labels = cv2.resize(mask, (640, 480), interpolation=cv2.INTER_NEAREST)
    box, tip = (0, 0, 639, 479), (390.0, 230.0)
    seq = list(
        injectate_sequence(
            big, 8, np.random.default_rng(0), centre_xy=tip, final_radii_px=(60, 40),
            labels=labels, spacing_mm=(0.1, 0.1), region=box,
        )
    )  # fmt: skip
    stage = InjectateSpread()
    frames = [frame_of(r.image, i, (0.1, 0.1), box) for i, r in enumerate(seq)]
    stage.arm(frames[0], tip)
    for frame, r in zip(frames[:4], seq, strict=False):
        stage(frame, r.labels, tip)
    tracemalloc.start()
    try:
        for frame, r in zip(frames[4:], seq[4:], strict=True):
            tracemalloc.reset_peak()
            before = tracemalloc.get_traced_memory()[0]
            state = stage(frame, r.labels, tip)
            assert tracemalloc.get_traced_memory()[1] - before < 640 * 480 // 4
    finally:
        tracemalloc.stop()
    assert state.detected


def test_labels_must_match_the_frame(scan):
    image, _ = scan
    stage = InjectateSpread()
    stage.arm(frame_of(image, 0), BESIDE)
    with pytest.raises(ValueError, match="labels"):
        stage(frame_of(image, 1), np.zeros((10, 10), np.uint8), BESIDE)


def test_config_is_checked():
    with pytest.raises(ValueError, match="max_ratio"):
        SpreadConfig(max_ratio=1.5)
    with pytest.raises(ValueError, match="confirm_frames"):
        SpreadConfig(confirm_frames=0)


def test_random_pocket_is_fluid_beside_the_nerve_not_nerve(test_data) -> None:
    import cv2
    from PIL import Image

    from usguide.data.injectate_render import random_pocket
    from usguide.imaging_region import find_imaging_region
    from usguide.labels import NERVE

    image = cv2.imread(str(test_data / "usgra-seg" / "images" / "0050.png"), cv2.IMREAD_GRAYSCALE)
    mask = np.array(
        Image.open(test_data / "usgra-seg" / "masks" / "0050.png")
    )  # palette index is the class
    x0, y0, x1, y1 = find_imaging_region(image)  # as training crops every image
    image, mask = image[y0 : y1 + 1, x0 : x1 + 1], mask[y0 : y1 + 1, x0 : x1 + 1]
    assert (mask == NERVE).any()
    rng = np.random.default_rng(0)
    drawn_fluid = 0
    for _ in range(6):
        drawn, labels = random_pocket(image, mask, rng)
        fluid = drawn.astype(int) < image.astype(int) - 30
        drawn_fluid += fluid.sum() > 50
        assert not (labels[fluid] == NERVE).any()  # fluid is never taught as nerve
        # The nerve is not flooded: it keeps most of its pixels.
        assert (labels == NERVE).sum() >= 0.8 * (mask == NERVE).sum()
    assert drawn_fluid >= 4  # a pocket may fall where the tissue is already black


def test_a_frame_without_the_pocket_does_not_make_it_grow_later(scan):
    """The tip looks away for one frame (nothing detected): a second later, the unchanged pocket
    was measured against that frame's zero area and reported growing."""
    image, mask = scan
    grey = image if image.ndim == 2 else cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    pocket = render_injectate(
        grey, BESIDE, (40, 30), rng=np.random.default_rng(7), spacing_mm=SPACING, region=BOX
    ).image
    noise = np.random.default_rng(0)
    stage = InjectateSpread()
    growing = []
    for i in range(60):
        base = grey if i == 0 else pocket
        noisy = np.clip(np.rint(base + noise.normal(0, 3, grey.shape)), 0, 255).astype(np.uint8)
        frame = frame_of(noisy, i)
        if i == 0:
            stage.arm(frame, BESIDE)
        tip = (BESIDE[0] + 150, BESIDE[1] + 120) if i == 30 else BESIDE
        state = stage(frame, mask, tip)
        if i >= 25:
            growing.append(state.growing)
        if i == 49:
            assert state.detected
    assert not any(growing)
