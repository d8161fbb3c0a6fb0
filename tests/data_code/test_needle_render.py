"""Rendered needles: the ground truth (mask, tip, angle) must match what is drawn, exactly."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import cv2
import numpy as np
import pytest

from usguide.data.needle_render import (
    MASK_COVERAGE,
    VISIBILITY_THRESHOLD,
    NeedlePose,
    angular_gain,
    needle_sequence,
    random_appearance,
    random_pose,
    render_needle,
)
from usguide.sources.dicom import DicomSource

CINE = "color3d_jpeg_baseline.dcm"


@pytest.fixture(scope="module")
def real_frame(dicom_dir: Path) -> tuple[np.ndarray, tuple[int, int, int, int], float]:
    """Frame 0 of the SonoSite cine, grey, with its imaging region and mm per pixel."""
    with DicomSource(dicom_dir / CINE) as src:
        frame = src.read(0)
    grey = cv2.cvtColor(frame.pixels, cv2.COLOR_RGB2GRAY)
    assert frame.spacing_mm is not None
    return grey, frame.region.bbox, float(frame.spacing_mm[0])


@pytest.fixture(scope="module")
def speckle() -> np.ndarray:
    """Fully developed speckle: Rayleigh-distributed grey levels, (480, 640) uint8."""
    rng = np.random.default_rng(1234)
    return np.clip(rng.rayleigh(35.0, (480, 640)), 0, 255).astype(np.uint8)


def make_pose(
    entry: tuple[float, float],
    angle_deg: float,
    length: float,
    side: str,
    width: float,
    visibility: np.ndarray | None = None,
) -> NeedlePose:
    """A pose from an entry point, an angle below the horizontal, a length and a side."""
    sign = 1.0 if side == "left" else -1.0
    a = math.radians(angle_deg)
    tip = (entry[0] + sign * length * math.cos(a), entry[1] + length * math.sin(a))
    return NeedlePose(entry, tip, width, visibility)


def layer(before: np.ndarray, after: np.ndarray) -> np.ndarray:
    """The drawn needle layer recovered from the screen composition, (H, W) float32 in [0, 1]."""
    b = before.astype(np.float32)
    head = np.maximum(255.0 - b, 1.0)
    return (after.astype(np.float32) - b) / head


def axis_coords(pose: NeedlePose, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel (u, v): arc length from the entry and signed distance from the axis (> 0 below)."""
    (ex, ey), (tx, ty) = pose.entry_xy, pose.tip_xy
    length = pose.length_px
    ax, ay = (tx - ex) / length, (ty - ey) / length
    nx, ny = (-ay, ax) if ax >= 0 else (ay, -ax)
    ys, xs = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float64)
    dx, dy = xs - ex, ys - ey
    return dx * ax + dy * ay, dx * nx + dy * ny


def tip_from_profile(pose: NeedlePose, drawn: np.ndarray) -> float:
    """Arc length where the drawn layer, sampled along the axis, falls to half its tip level."""
    (ex, ey), length = pose.entry_xy, pose.length_px
    ax = (pose.tip_xy[0] - ex) / length
    ay = (pose.tip_xy[1] - ey) / length
    s = np.arange(length - 12.0, length + 8.0, 0.05)
    mx = (ex + s * ax).astype(np.float32)[None, :]
    my = (ey + s * ay).astype(np.float32)[None, :]
    profile = cv2.remap(drawn, mx, my, cv2.INTER_LINEAR)[0]
    level = float(np.median(profile[(s > length - 4.0) & (s < length - 1.5)]))
    above = np.flatnonzero(profile >= 0.5 * level)
    last = int(above[-1])
    # Linear interpolation of the half-level crossing between the last sample above and the next.
    p0, p1 = profile[last], profile[last + 1]
    return float(s[last] + (p0 - 0.5 * level) / (p0 - p1) * (s[1] - s[0]))


# --- the pose ----------------------------------------------------------------------------------


def test_pose_geometry_is_exact() -> None:
    pose = NeedlePose((10.0, 20.0), (10.0 + 40.0 * math.sqrt(3), 60.0), 3.0)
    assert pose.angle_deg == pytest.approx(30.0, abs=1e-9)
    assert pose.length_px == pytest.approx(80.0, abs=1e-9)
    assert pose.side == "left"
    mirrored = NeedlePose((200.0, 20.0), (200.0 - 40.0, 60.0), 3.0)
    assert mirrored.angle_deg == pytest.approx(45.0, abs=1e-9)
    assert mirrored.side == "right"
    assert pose.tip_visible and pose.visibility is None
    with pytest.raises(ValueError, match="width_px"):
        NeedlePose((0, 0), (10, 10), 0.0)
    with pytest.raises(ValueError, match="coincide"):
        NeedlePose((5, 5), (5, 5), 2.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        NeedlePose((0, 0), (10, 10), 2.0, np.array([1.0, 1.5]))


def test_angular_gain_fades_steep_needles() -> None:
    assert angular_gain(15) == angular_gain(30) == 1.0
    assert angular_gain(45) == pytest.approx(2 / 3, abs=1e-6)
    assert angular_gain(60) == pytest.approx(1 / 3, abs=1e-6)
    assert angular_gain(89) == pytest.approx(0.2)
    gains = [angular_gain(a) for a in range(0, 91, 5)]
    assert all(a >= b for a, b in itertools.pairwise(gains))


# --- ground truth of one render -----------------------------------------------------------------


# Edge ramps (box blur, symmetric about the exact edge) as documented: PSF-sized, >= 1 px:
# across min(max(1, 0.2 mm), max(1, width / 2)), along min(max(1, 0.3 mm), 3) px.
RAMPS = {0.3: (1.0, 1.0), 0.1: (2.0, 3.0)}


@pytest.mark.parametrize("angle", [15.0, 30.0, 50.0])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("spacing", sorted(RAMPS))
def test_mask_is_what_is_drawn(
    speckle: np.ndarray, angle: float, side: str, spacing: float
) -> None:
    entry = (-0.5, 60.3) if side == "left" else (639.5, 60.3)
    pose = make_pose(entry, angle, 300.7, side, 6.0)
    rng = np.random.default_rng(0)
    out = render_needle(speckle, pose, rng=rng, spacing_mm=spacing, shadow=0.0)
    before, after = speckle.astype(np.int16), out.image.astype(np.int16)
    mask = out.mask
    assert mask.sum() > 0.8 * 6.0 * 300.0
    # Every mask pixel is clearly brighter: by at least 20 % of its headroom to white, scaled by
    # the angular fading (the weakest are edge pixels at exactly half coverage).
    gain = after - before
    head = 255 - before
    assert np.all(gain[mask] >= np.floor(0.2 * angular_gain(angle) * head[mask]))
    assert np.all(gain[mask & (before < 150)] >= 15)
    # Above the shaft (no reverberation, no shadow there) the pixels outside the mask are only
    # the blurred fringe: within half a ramp of the (bevel's) edge, each fainter than the
    # typical shaft pixel.
    ramp_perp, ramp_axial = RAMPS[spacing]
    u, v = axis_coords(pose, speckle.shape)
    drawn = layer(speckle, out.image)
    fringe = ~mask & (v < 0) & (u > 0) & (u < pose.length_px)
    changed = fringe & (gain > 0)
    assert changed.any()
    assert np.all(np.abs(v[changed]) < 3.0 * 1.3 + 0.5 * ramp_perp)
    assert drawn[fringe].max() < np.median(drawn[mask])
    # Away from the bevel the mask is exactly the analytic one: the product of the box-ramp
    # coverages across (half width 3 px) and along the shaft is >= 0.5 (corners rounded).
    across = np.clip((3.0 - np.abs(v)) / ramp_perp + 0.5, 0, 1)
    along = np.clip(
        np.minimum(u + ramp_axial / 2, 1e9) - np.maximum(u - ramp_axial / 2, 0), 0, None
    )
    coverage = across * np.minimum(along / ramp_axial, 1.0)
    shaft = (u < pose.length_px - 16.0) & (np.abs(coverage - MASK_COVERAGE) > 1e-3)
    assert np.array_equal(mask[shaft], coverage[shaft] >= MASK_COVERAGE)
    # Near the tip the bevel is up to 30 % wider, and nothing passes the tip.
    outside = (np.abs(v) > 3.0 * 1.3 + 0.05) | (u > pose.length_px + 0.05)
    assert not np.any(mask & outside)


@pytest.mark.parametrize("angle", [15.0, 30.0, 50.0])
@pytest.mark.parametrize("side", ["left", "right"])
def test_tip_is_where_the_drawn_profile_ends(
    speckle: np.ndarray, real_frame: tuple, angle: float, side: str
) -> None:
    grey, _, spacing = real_frame
    cases = [
        (speckle, (-0.5, 40.37) if side == "left" else (639.5, 40.37), 0.1, 5.0, 320.3),
        # Inside the fan of the real sector scan; its coarse 0.51 mm/px gives a thin shaft.
        (grey, (250.2, 90.6) if side == "left" else (430.8, 90.6), spacing, 2.5, 150.6),
    ]
    for image, entry, mm, width, length in cases:
        pose = make_pose(entry, angle, length, side, width)
        out = render_needle(image, pose, rng=np.random.default_rng(7), spacing_mm=mm)
        assert out.tip_xy == pose.tip_xy and out.tip_visible
        assert out.angle_deg == pytest.approx(angle, abs=1e-9)
        tip_s = tip_from_profile(pose, layer(image, out.image))
        assert abs(tip_s - pose.length_px) < 1.0, (angle, side, tip_s - pose.length_px)
        # The mask ends there too: its farthest pixel centre along the axis is within 1 px.
        u, _ = axis_coords(pose, image.shape)
        assert pose.length_px - 1.0 < u[out.mask].max() <= pose.length_px + 0.5


def test_steep_needles_are_dimmer(speckle: np.ndarray) -> None:
    means = {}
    for angle in (15.0, 60.0):
        pose = make_pose((-0.5, 30.0), angle, 250.0, "left", 6.0)
        out = render_needle(speckle, pose, rng=np.random.default_rng(3), spacing_mm=0.1)
        bevel = axis_coords(pose, speckle.shape)[0] > pose.length_px - 20.0
        means[angle] = out.image[out.mask & ~bevel].mean()
    assert means[60.0] < means[15.0] - 40
    assert means[15.0] > 170  # the shallow shaft is among the brightest structures


def test_a_fainter_look_draws_a_fainter_needle_with_the_same_truth(speckle: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    looks = [random_appearance(rng, (0.6, 0.7)) for _ in range(50)]
    assert all(0.6 <= look["brightness"] <= 0.7 for look in looks)
    pose = make_pose((-0.5, 30.0), 25.0, 250.0, "left", 8.0)
    drawn = {
        b: render_needle(
            speckle, pose, rng=np.random.default_rng(3), reverb=0.4, shadow=0.0, brightness=b
        )
        for b in (0.65, 1.0)
    }
    assert np.array_equal(drawn[0.65].mask, drawn[1.0].mask)
    inside = drawn[1.0].mask
    assert drawn[0.65].image[inside].mean() < drawn[1.0].image[inside].mean() - 15


def test_shaft_is_bright_but_not_flat(real_frame: tuple) -> None:
    grey, _, spacing = real_frame
    pose = make_pose((150.0, 120.0), 20.0, 200.0, "left", 4.0)
    out = render_needle(grey, pose, rng=np.random.default_rng(5), spacing_mm=spacing)
    core = out.image[out.mask]
    assert np.median(core) > np.percentile(grey[grey > 0], 99.5)
    assert core.std() > 8 and np.mean(core == 255) < 0.05


def test_reverberations_below_not_above(speckle: np.ndarray) -> None:
    pose = make_pose((-0.5, 80.0), 25.0, 300.0, "left", 5.0)
    u, v = axis_coords(pose, speckle.shape)
    along = (u > 0.1 * pose.length_px) & (u < 0.9 * pose.length_px)
    below = along & (v > 5.0) & (v < 30.0)
    above = (v < -(0.5 * 5.0 * 1.3 + 1.0)) & np.isfinite(u)
    gain = {}
    for reverb in (0.0, 0.4):
        out = render_needle(
            speckle, pose, rng=np.random.default_rng(1), spacing_mm=0.1, reverb=reverb, shadow=0.0
        )
        diff = out.image.astype(np.int16) - speckle
        assert not diff[above].any()  # nothing changes above the shaft
        assert not (out.mask & below).any()  # reverberations are never in the mask
        gain[reverb] = float(diff[below].mean())
    assert gain[0.0] == 0.0
    assert gain[0.4] > 5.0
    # Several separate copies: the gain below the shaft oscillates with depth.
    out = render_needle(speckle, pose, rng=np.random.default_rng(1), spacing_mm=0.1, shadow=0.0)
    drawn = layer(speckle, out.image)
    bins = [drawn[along & (v >= d) & (v < d + 1)].mean() for d in range(4, 40)]
    peaks = [i for i in range(1, len(bins) - 1) if bins[i] > bins[i - 1] and bins[i] >= bins[i + 1]]
    assert len(peaks) >= 3


def test_out_of_plane_middle_leaves_a_gap(speckle: np.ndarray) -> None:
    vis = np.array([1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0])
    pose = make_pose((-0.5, 60.0), 30.0, 350.0, "left", 5.0, vis)
    out = render_needle(speckle, pose, rng=np.random.default_rng(2), spacing_mm=0.1)
    # Visibility crosses the threshold at fractions 2/7 + 0.7/7 and 5/7 - 0.7/7 of the length.
    length = pose.length_px
    frac = (1.0 - VISIBILITY_THRESHOLD) / 7.0
    gap0, gap1 = (2 / 7 + frac) * length, (5 / 7 - frac) * length
    u, v = axis_coords(pose, speckle.shape)
    in_gap = (u > gap0 + 1.5) & (u < gap1 - 1.5)  # the ends are blurred over 3 px at 0.1 mm/px
    assert not (out.mask & in_gap).any()
    n_parts, _ = cv2.connectedComponents(out.mask.astype(np.uint8), connectivity=8)
    assert n_parts - 1 == 2
    # Nothing is drawn on the shaft in the gap, and the visible parts end at the crossings.
    shaft = np.abs(v) < 4.0
    assert np.array_equal(out.image[in_gap & shaft], speckle[in_gap & shaft])
    assert abs(u[out.mask & (u < gap0 + 5)].max() - gap0) < 1.0
    assert abs(u[out.mask & (u > gap1 - 5)].min() - gap1) < 1.0


def test_tip_out_of_plane_is_invisible_but_known(speckle: np.ndarray) -> None:
    vis = np.linspace(1.0, 0.0, 11)  # leaves the beam toward the tip
    pose = make_pose((-0.5, 60.0), 30.0, 300.0, "left", 5.0, vis)
    out = render_needle(speckle, pose, rng=np.random.default_rng(4), spacing_mm=0.1)
    assert not out.tip_visible and out.tip_xy == pose.tip_xy
    u, _ = axis_coords(pose, speckle.shape)
    # Visible up to 70 % of the length, where visibility falls below 0.3.
    end = (1.0 - VISIBILITY_THRESHOLD) * pose.length_px
    assert abs(u[out.mask].max() - end) < 1.0
    near_tip = np.hypot(*np.mgrid[0:480, 0:640][::-1] - np.reshape(pose.tip_xy, (2, 1, 1))) < 10
    assert np.array_equal(out.image[near_tip], speckle[near_tip])
    assert not out.mask[near_tip].any()
    # A fully out-of-plane needle draws nothing at all.
    gone = make_pose((-0.5, 60.0), 30.0, 300.0, "left", 5.0, np.full(5, 0.1))
    out = render_needle(speckle, gone, rng=np.random.default_rng(4), spacing_mm=0.1)
    assert not out.mask.any() and np.array_equal(out.image, speckle) and not out.tip_visible


def test_never_wraps_and_only_shadow_darkens(speckle: np.ndarray) -> None:
    bright = np.clip(speckle.astype(np.int16) + 200, 0, 255).astype(np.uint8)  # near white
    for image in (speckle, bright):
        for angle, side in ((20.0, "left"), (45.0, "right")):
            entry = (-0.5, 50.0) if side == "left" else (639.5, 50.0)
            pose = make_pose(entry, angle, 280.0, side, 6.0)
            out = render_needle(image, pose, rng=np.random.default_rng(0), spacing_mm=0.1)
            assert out.image.dtype == np.uint8 and out.image.shape == image.shape
            assert out.mask.dtype == bool
            diff = out.image.astype(np.int16) - image
            # Decreases only under the shaft: below its lower edge (half width 3 px, bevel 3.9).
            ys, xs = np.mgrid[0:480, 0:640]
            tan = math.tan(math.radians(angle))
            y_line = pose.entry_xy[1] + np.abs(xs - pose.entry_xy[0]) * tan
            darker = diff < 0
            assert np.all(ys[darker] > y_line[darker] + 3.9 / math.cos(math.radians(angle)))
            # ... and within the shaft's columns, blurred by the ~1 mm beam width (10 px).
            x_lo, x_hi = sorted((pose.entry_xy[0], pose.tip_xy[0]))
            assert np.all((xs[darker] > x_lo - 5.0) & (xs[darker] < x_hi + 5.0))
            assert not (darker & out.mask).any()
            no_shadow = render_needle(
                image, pose, rng=np.random.default_rng(0), spacing_mm=0.1, shadow=0.0
            )
            assert np.all(no_shadow.image >= image)
            assert np.array_equal(no_shadow.mask, out.mask)
    # The shadow darkens tissue under the shaft slightly, as set.
    pose = make_pose((-0.5, 50.0), 20.0, 300.0, "left", 6.0)
    out = render_needle(speckle, pose, rng=np.random.default_rng(0), spacing_mm=0.1, shadow=0.2)
    region = (slice(300, 480), slice(60, 230))
    ratio = out.image[region].mean() / speckle[region].mean()
    assert 0.75 < ratio < 0.85


def test_nothing_is_drawn_outside_the_region(speckle: np.ndarray) -> None:
    region = (40, 20, 599, 300)
    pose = make_pose((39.5, 40.0), 40.0, 320.0, "left", 6.0)  # tip near the bottom edge
    out = render_needle(speckle, pose, rng=np.random.default_rng(0), shadow=0.3, region=region)
    outside = np.ones(speckle.shape, bool)
    outside[20:301, 40:600] = False
    assert np.array_equal(out.image[outside], speckle[outside])
    assert not out.mask[outside].any()
    # Without the region the reverberations and the shadow run below it.
    free = render_needle(speckle, pose, rng=np.random.default_rng(0), shadow=0.3)
    assert not np.array_equal(free.image[outside], speckle[outside])
    assert np.array_equal(free.mask & ~outside, out.mask)  # the same shaft, cut at the edge


def test_rgb_input_is_rendered_in_grey(real_frame: tuple, dicom_dir: Path) -> None:
    with DicomSource(dicom_dir / CINE) as src:
        rgb = src.read(0).pixels
    grey, _, spacing = real_frame
    pose = make_pose((150.0, 120.0), 25.0, 200.0, "left", 3.0)
    a = render_needle(rgb, pose, rng=np.random.default_rng(9), spacing_mm=(spacing, spacing))
    b = render_needle(grey, pose, rng=np.random.default_rng(9), spacing_mm=spacing)
    assert a.image.ndim == 2 and np.array_equal(a.image, b.image)
    assert np.array_equal(a.mask, b.mask)
    with pytest.raises(ValueError, match="uint8"):
        render_needle(grey.astype(np.float32), pose, rng=np.random.default_rng(9))


def test_render_is_deterministic(speckle: np.ndarray) -> None:
    pose = make_pose((-0.5, 50.0), 35.0, 250.0, "left", 5.0, np.linspace(1.0, 0.5, 4))
    original = speckle.copy()
    a = render_needle(speckle, pose, rng=np.random.default_rng(42))
    assert np.array_equal(speckle, original)  # the input is never drawn on
    b = render_needle(speckle, pose, rng=np.random.default_rng(42))
    c = render_needle(speckle, pose, rng=np.random.default_rng(43))
    assert np.array_equal(a.image, b.image) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, c.image)  # the speckle texture changes with the seed
    assert np.array_equal(a.mask, c.mask)  # the ground truth does not


def test_mask_threshold_is_half_coverage() -> None:
    # A flat background isolates the coverage: a vertical-ish edge sampled at known offsets.
    flat = np.full((100, 200), 40, np.uint8)
    pose = NeedlePose((-0.5, 50.0), (150.0, 50.0), 4.0)  # horizontal, rows 48..52 at half
    out = render_needle(flat, pose, rng=np.random.default_rng(0), reverb=0.0, shadow=0.0)
    rows = np.flatnonzero(out.mask[:, 75])
    assert rows.tolist() == [48, 49, 50, 51, 52]  # |v| <= 2: rows 48 and 52 at exactly 0.5
    assert MASK_COVERAGE == 0.5
    assert out.image[47, 75] == 40 and out.image[53, 75] == 40
    cols = np.flatnonzero(out.mask[50])
    assert cols.min() == 0 and cols.max() == 150  # the tip at x = 150 is a pixel centre


@pytest.mark.parametrize("bend", [6.0, -6.0])
def test_a_bent_shaft_is_drawn_on_its_parabola(bend: float) -> None:
    flat = np.full((100, 200), 40, np.uint8)
    straight = NeedlePose((-0.5, 50.0), (150.0, 50.0), 4.0)
    bent = NeedlePose((-0.5, 50.0), (150.0, 50.0), 4.0, bend_px=bend)
    a = render_needle(flat, straight, rng=np.random.default_rng(0), reverb=0.4, shadow=0.2)
    b = render_needle(flat, bent, rng=np.random.default_rng(0), reverb=0.4, shadow=0.2)
    # The mask's middle in each column follows 4 bend s (1 - s) from the chord, entry to tip.
    for x in (10, 40, 75, 110, 140):
        s = (x + 0.5) / 150.5
        rows = np.flatnonzero(b.mask[:, x])
        assert rows.mean() == pytest.approx(50.0 + 4.0 * bend * s * (1.0 - s), abs=0.6)
        assert 4 <= len(rows) <= 5  # as wide as the straight shaft (4 px), at any sub-pixel
    assert b.tip_xy == a.tip_xy and b.angle_deg == a.angle_deg  # the truth is the chord's
    assert b.mask[50, 150] and b.mask[:, 151:].sum() == 0  # it still ends at the tip
    # Its reverberations bend with it: below the shaft in every column, never above.
    for x in (40, 75, 110):
        top = np.flatnonzero(b.mask[:, x]).min()
        assert (b.image[: top - 1, x] == 40).all()  # (the row above is the edge blur)
        assert (b.image[np.flatnonzero(b.mask[:, x]).max() + 3 :, x] != 40).any()
    with pytest.raises(ValueError, match="bend_px"):
        NeedlePose((0.0, 0.0), (40.0, 0.0), 2.0, bend_px=20.0)


@pytest.mark.parametrize("angle_deg", [60.0, 75.0, 80.0])
def test_a_steep_bent_shaft_is_drawn_whole(angle_deg: float) -> None:
    """Steep and bent, the centre line leaves the chord's columns and spreads over many rows in
    one column: every pixel within the shaft's half-width of it is drawn, none is missed."""
    flat = np.full((500, 500), 60, np.uint8)
    t = math.radians(angle_deg)
    entry, length, width, bend = (-0.5, 10.0), 400.0, 8.0, -30.0
    tip = (entry[0] + length * math.cos(t), entry[1] + length * math.sin(t))
    pose = NeedlePose(entry, tip, width, None, bend)
    drawn = render_needle(flat, pose, rng=np.random.default_rng(0), reverb=0, shadow=0).mask
    # The shaft analytically: within width / 2 of the parabola, between entry and tip.
    yy, xx = np.mgrid[0:500, 0:500].astype(np.float64)
    ax, ay = math.cos(t), math.sin(t)
    nx, ny = -ay, ax
    u = (xx - entry[0]) * ax + (yy - entry[1]) * ay
    s = np.clip(u / length, 0.0, 1.0)
    v = (xx - entry[0]) * nx + (yy - entry[1]) * ny - 4.0 * bend * s * (1.0 - s)
    expected = (np.abs(v) < 0.5 * width - 0.5) & (u > 1.0) & (u < length - 1.0)
    assert drawn[expected].mean() == 1.0  # no gap (the fix: 0.34 of it at 75 degrees)
    assert drawn.sum() <= 1.02 * (np.abs(v) <= 0.5 * width + 0.5)[(u >= 0) & (u <= length)].sum()


# --- random poses -------------------------------------------------------------------------------


def test_random_poses_are_plausible() -> None:
    rng = np.random.default_rng(11)
    region = (84, 31, 595, 414)
    sides, entries_on_skin, out_of_plane = set(), 0, 0
    for _ in range(300):
        pose = random_pose((480, 640), rng, spacing_mm=0.1, region=region)
        x, y = pose.tip_xy
        assert region[0] + 4 - 1e-6 <= x <= region[2] - 4 + 1e-6
        assert region[1] + 4 - 1e-6 <= y <= region[3] - 4 + 1e-6
        assert 10.0 - 1e-6 <= pose.angle_deg <= 60.0 + 1e-6
        assert 5.0 - 1e-6 <= pose.width_px <= 13.0 + 1e-6  # 0.5-1.3 mm at 0.1 mm/px
        assert pose.tip_xy[1] > pose.entry_xy[1]  # heads down
        ex, ey = pose.entry_xy
        on_edge = ex in (region[0] - 0.5, region[2] + 0.5)
        on_skin = ey == region[1] - 0.5
        assert on_edge or on_skin
        entries_on_skin += on_skin
        sides.add(pose.side)
        out_of_plane += pose.visibility is not None
    assert sides == {"left", "right"}
    assert 50 < entries_on_skin < 160 and 50 < out_of_plane < 140
    # Coarse spacing keeps a drawable width; the tissue area keeps the tip in the fan.
    area = np.zeros((480, 640), bool)
    cv2.ellipse(area, (340, 31), (380, 380), 0, 55, 125, 1, -1)
    for _ in range(50):
        pose = random_pose((480, 640), rng, spacing_mm=0.51, region=region, area=area)
        assert pose.width_px >= 1.5
        assert area[round(pose.tip_xy[1]), round(pose.tip_xy[0])]


# --- sequences ----------------------------------------------------------------------------------


def test_sequence_phases_and_truth(real_frame: tuple) -> None:
    grey, region, spacing = real_frame
    phases = [("absent", 4), ("advance", 10), ("pause", 4), ("withdraw", 5), ("absent", 4)]
    frames = list(
        needle_sequence(
            grey, 27, np.random.default_rng(8), spacing_mm=spacing, region=region, phases=phases
        )
    )
    assert len(frames) == 27
    x0, y0, x1, y1 = region
    outside = np.ones(grey.shape, bool)
    outside[y0 : y1 + 1, x0 : x1 + 1] = False
    kinds = [k for k, n in phases for _ in range(n)]
    lengths = []
    for (image, truth), kind in zip(frames, kinds, strict=True):
        assert image.shape == grey.shape and image.dtype == np.uint8
        assert np.array_equal(image[outside], grey[outside])  # the interface never moves
        assert truth.mask.shape == grey.shape and truth.mask.dtype == bool
        if kind == "absent":
            assert not truth.present and not truth.mask.any() and not truth.tip_visible
            assert truth.tip_xy is None and truth.angle_deg is None and truth.pose is None
            continue
        assert truth.present and truth.pose is not None
        assert truth.tip_xy == truth.pose.tip_xy and truth.angle_deg == truth.pose.angle_deg
        assert truth.tip_visible == truth.pose.tip_visible
        assert not truth.mask[outside].any()
        if truth.mask.any():  # drawn pixels stand out from the tissue around them
            assert image[truth.mask].mean() > image[~outside].mean() + 20
        lengths.append(truth.pose.length_px)
    steps = np.diff(lengths)
    assert np.all(steps[:9] > 0)  # advancing
    assert np.all(np.abs(steps[9:13]) < 1e-9)  # pausing
    assert np.all(steps[13:] < 0)  # withdrawing
    # The probe moves: the background inside the region changes between frames.
    assert not np.array_equal(frames[0][0], frames[3][0])


def test_truth_within_an_imaged_area(real_frame: tuple) -> None:
    # A sector shows only part of the needle: the truth keeps the drawn pixels inside it, and
    # the tip is visible only when it lies inside.
    grey, region, spacing = real_frame
    phases = [("advance", 12)]
    frames = list(
        needle_sequence(
            grey, 12, np.random.default_rng(4), spacing_mm=spacing, region=region, phases=phases
        )
    )
    truth = next(t for _, t in reversed(frames) if t.tip_visible)
    assert truth.tip_xy is not None
    tx, ty = round(truth.tip_xy[0]), round(truth.tip_xy[1])
    everywhere = np.ones(grey.shape, bool)
    same = truth.within(everywhere)
    assert same.tip_visible and np.array_equal(same.mask, truth.mask)
    no_tip = everywhere.copy()
    no_tip[ty - 3 : ty + 4, tx - 3 : tx + 4] = False
    cut = truth.within(no_tip)
    assert not cut.tip_visible
    assert cut.mask.sum() < truth.mask.sum() and not cut.mask[~no_tip].any()
    assert cut.present and cut.tip_xy == truth.tip_xy and cut.angle_deg == truth.angle_deg
    assert not truth.within(np.zeros(grey.shape, bool)).mask.any()


def test_sequence_is_deterministic_and_varied(speckle: np.ndarray) -> None:
    small = speckle[:240, :320]

    def run(seed: int) -> list:
        return list(needle_sequence(small, 120, np.random.default_rng(seed), spacing_mm=0.1))

    a, b, c = run(2), run(2), run(3)
    for (ia, ta), (ib, tb) in zip(a, b, strict=True):
        assert np.array_equal(ia, ib) and np.array_equal(ta.mask, tb.mask)
        assert ta.tip_xy == tb.tip_xy
    assert any(not np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c, strict=True))
    # Over a few random sequences: absent frames, hidden tips and angle changes all occur.
    truths = [t for seq in (a, c, run(9)) for _, t in seq]
    assert any(not t.present for t in truths)
    assert any(t.present and not t.tip_visible for t in truths)
    angles = [t.angle_deg for t in truths[:120] if t.present]
    assert max(angles) - min(angles) > 0.5
    for t in truths:
        if not t.present:
            assert not t.mask.any()


def test_sequence_bends_needles_only_when_asked(speckle: np.ndarray) -> None:
    small = speckle[:240, :320]
    phases = [("advance", 30)]

    def run(radius: float | None) -> list:
        return list(
            needle_sequence(
                small,
                30,
                np.random.default_rng(6),
                spacing_mm=0.1,
                phases=phases,
                bend_radius_mm=radius,
            )
        )

    straight, bent = run(None), run(50.0)
    assert all(t.pose is not None and t.pose.bend_px == 0.0 for _, t in straight)
    sagittas = []
    for _, t in bent:
        assert t.pose is not None and t.tip_xy == t.pose.tip_xy
        length_mm = t.pose.length_px * 0.1
        # The arc of one curvature per insertion, never tighter than the radius asked for.
        assert abs(t.pose.bend_px) * 0.1 <= length_mm**2 / (8.0 * 50.0) + 1e-9
        sagittas.append(t.pose.bend_px)
    assert max(abs(b) for b in sagittas) > 0.2
    assert len({math.copysign(1.0, b) for b in sagittas if b}) == 1  # one insertion bends one way
