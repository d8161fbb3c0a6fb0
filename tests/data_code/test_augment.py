"""Augmentations: geometry shared by image and mask, mask classes kept, determinism, intensities."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.data.augment import (
    DepthGain,
    EdgeEnhance,
    GreyMap,
    RandomAffine,
    RandomCropScale,
    RandomFlip,
    RandomGain,
    Speckle,
    UltrasoundAugment,
    convex_view_pair,
    default_transforms,
    resize_pair,
    sector_mask,
    sector_view,
    warp_pair,
)
from usguide.data.datasets import Sample
from usguide.labels import N_CLASSES, NERVE, VESSEL

H, W = 128, 160
BRIGHT = 150  # image pixels above this are the square


@pytest.fixture
def pair() -> tuple[np.ndarray, np.ndarray]:
    """Dim speckled image with a bright square labelled nerve, and a vessel with no contrast."""
    rng = np.random.default_rng(0)
    image = rng.integers(30, 90, (H, W), dtype=np.uint8)
    mask = np.zeros((H, W), np.uint8)
    image[40:80, 60:110] = 255
    mask[40:80, 60:110] = NERVE
    mask[95:115, 20:45] = VESSEL
    return image, mask


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


GEOMETRIC = [
    RandomAffine(p=1.0),
    RandomAffine(rotation_deg=10, scale=(0.85, 1.15), translate=0.08, p=1.0),
    RandomFlip(p=1.0),
    RandomCropScale(p=1.0),
    UltrasoundAugment([RandomCropScale(p=1), RandomAffine(p=1), RandomFlip(p=1)]),
    UltrasoundAugment(),
]


@pytest.mark.parametrize("transform", GEOMETRIC, ids=lambda t: type(t).__name__)
def test_geometry_moves_image_and_mask_together(transform, pair) -> None:
    image, mask = pair
    for seed in range(12):
        out_image, out_mask = transform(image, mask, np.random.default_rng(seed))
        assert out_image.shape == (H, W) and out_image.dtype == np.uint8
        assert out_mask.shape == (H, W) and out_mask.dtype == np.uint8
        bright = out_image > BRIGHT
        nerve = out_mask == NERVE
        if not bright.any() and not nerve.any():
            continue  # moved out of view together
        # Bilinear image edges vs nearest mask edges differ by at most a pixel.
        assert iou(bright, nerve) > 0.85, seed
        # Never a class that was not in the input.
        assert set(np.unique(out_mask)) <= set(np.unique(mask))


def test_mask_is_never_interpolated(pair) -> None:
    image, mask = pair
    # Classes 0 and 2 side by side: linear interpolation would create 1 on their border.
    mask = np.where(np.arange(W)[None, :] < W // 2, 0, 2).astype(np.uint8).repeat(H, 0)
    augment = UltrasoundAugment([RandomCropScale(p=1), RandomAffine(p=1)])
    for seed in range(20):
        _, out = augment(image, mask, np.random.default_rng(seed))
        assert set(np.unique(out)) <= {0, 2}


def test_deterministic_given_the_seed(pair) -> None:
    image, mask = pair
    augment = UltrasoundAugment()
    a = augment(image, mask, np.random.default_rng(5))
    b = augment(image, mask, np.random.default_rng(5))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    outs = {augment(image, mask, np.random.default_rng(s))[0].tobytes() for s in range(8)}
    assert len(outs) == 8


def test_inputs_untouched_and_outputs_new(pair) -> None:
    image, mask = pair
    before = image.copy(), mask.copy()
    for t in [*GEOMETRIC, RandomGain(), DepthGain(), Speckle(), UltrasoundAugment(p=0.0)]:
        out_image, out_mask = t(image, mask, np.random.default_rng(1))
        assert not np.shares_memory(out_image, image) and not np.shares_memory(out_mask, mask)
    np.testing.assert_array_equal(image, before[0])
    np.testing.assert_array_equal(mask, before[1])


def test_flip_mirrors_exactly(pair) -> None:
    image, mask = pair
    rng = np.random.default_rng(0)
    out_image, out_mask = RandomFlip(p=1.0)(image, mask, rng)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    # The composed (warp) path mirrors exactly too.
    out_image, out_mask = UltrasoundAugment([RandomFlip(p=1.0)])(image, mask, rng)
    np.testing.assert_array_equal(out_image, image[:, ::-1])
    np.testing.assert_array_equal(out_mask, mask[:, ::-1])
    # p=0: unchanged.
    out_image, _ = RandomFlip(p=0.0)(image, mask, rng)
    np.testing.assert_array_equal(out_image, image)


@pytest.mark.parametrize(
    "transform",
    [
        RandomGain(gain=(1.3, 1.4)),
        RandomGain(gain=(0.5, 0.6)),
        DepthGain(),
        Speckle(),
        GreyMap(),
        EdgeEnhance(),
    ],
    ids=lambda t: type(t).__name__,
)
def test_intensity_transforms_change_the_image_only(transform, pair) -> None:
    image, mask = pair
    out_image, out_mask = transform(image, mask, np.random.default_rng(2))
    np.testing.assert_array_equal(out_mask, mask)
    assert out_image.dtype == np.uint8 and out_image.shape == image.shape
    assert np.any(out_image != image)


def test_gain_direction(pair) -> None:
    image, mask = pair
    rng = np.random.default_rng(0)
    dim = image < 100
    up, _ = RandomGain(gain=(1.3, 1.4))(image, mask, rng)
    down, _ = RandomGain(gain=(0.5, 0.6))(image, mask, rng)
    assert up[dim].mean() > 1.25 * image[dim].mean()
    assert down[dim].mean() < 0.65 * image[dim].mean()
    assert up.max() == 255  # clipped, not wrapped around


def test_depth_gain_curve() -> None:
    rng = np.random.default_rng(0)
    monotone = DepthGain(max_db=6.0, monotone=1.0)
    for _ in range(20):
        c = monotone.curve(200, rng)
        d = np.diff(c)
        assert (d >= -1e-6).all() or (d <= 1e-6).all()
        assert c.min() >= 10 ** (-6 / 20) - 1e-4 and c.max() <= 10 ** (6 / 20) + 1e-4
    # Gain varies with depth (rows) only.
    image = np.full((100, 50), 100, np.uint8)
    out, _ = DepthGain(p=1.0)(image, np.zeros_like(image), rng)
    assert (out == out[:, :1]).all() and out[:, 0].std() > 0


def test_speckle_keeps_mean_brightness() -> None:
    image = np.full((256, 256), 100, np.uint8)
    out, _ = Speckle(strength=(0.4, 0.4), grain=(1.0, 1.0))(
        image, np.zeros_like(image), np.random.default_rng(0)
    )
    assert abs(out.mean() - 100) < 2.0
    assert 0.15 < out.std() / 100 < 0.3  # ~0.52 * 0.4 coefficient of variation


def test_resize_pair(pair) -> None:
    image, mask = pair
    small_image, small_mask = resize_pair(image, mask, (64, 80))
    assert small_image.shape == small_mask.shape == (64, 80)
    assert small_image.dtype == small_mask.dtype == np.uint8
    assert set(np.unique(small_mask)) <= set(np.unique(mask))
    # The square stays aligned: same centroid in image and mask within a quarter pixel.
    rows, cols = np.nonzero(small_image > BRIGHT)
    mrows, mcols = np.nonzero(small_mask == NERVE)
    assert abs(rows.mean() - mrows.mean()) < 0.25 and abs(cols.mean() - mcols.mean()) < 0.25
    big_image, big_mask = resize_pair(image, mask, (256, 320))
    assert iou(big_image > BRIGHT, big_mask == NERVE) > 0.95
    same = resize_pair(image, mask, (H, W))
    np.testing.assert_array_equal(same[0], image)
    assert not np.shares_memory(same[0], image)


def test_resize_pair_mask_centres_match_the_image() -> None:
    # A square not aligned to the factor 3: plain nearest neighbour would put the mask one pixel
    # off the (area-averaged) image.
    image = np.zeros((150, 150), np.uint8)
    mask = np.zeros((150, 150), np.uint8)
    image[61:91, 61:91] = 255
    mask[61:91, 61:91] = NERVE
    small_image, small_mask = resize_pair(image, mask, (50, 50))
    # Edge pixels are 2/3 (170) or 1/3 (85) bright, corners (2/3)² (113): 100 splits them.
    np.testing.assert_array_equal(small_mask == NERVE, small_image > 100)


def test_full_area_crop_is_identity(pair) -> None:
    image, mask = pair
    out_image, out_mask = RandomCropScale(area=(1.0, 1.0))(image, mask, np.random.default_rng(0))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_warp_identity(pair) -> None:
    image, mask = pair
    out_image, out_mask = warp_pair(image, mask, np.eye(3))
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_mask, mask)


def test_augment_sample_keeps_labelled(pair) -> None:
    image, mask = pair
    labelled = (False, True, True, False, True)
    s = Sample(image, mask, labelled, "x/1", "x", "x/1")
    out = UltrasoundAugment().augment_sample(s, np.random.default_rng(0))
    assert out.labelled == labelled and out.name == s.name and out.group == s.group
    assert out.image.shape == image.shape and len(out.labelled) == N_CLASSES


def test_bad_inputs_raise(pair) -> None:
    image, mask = pair
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        RandomFlip()(image.astype(np.float32), mask, rng)
    with pytest.raises(ValueError):
        UltrasoundAugment()(image, mask[:-1], rng)
    with pytest.raises(ValueError):
        RandomAffine(p=2.0)
    with pytest.raises(ValueError):
        RandomCropScale(area=(0.5, 1.5))
    with pytest.raises(TypeError):
        UltrasoundAugment([lambda i, m, r: (i, m)])  # type: ignore[list-item]


def test_grey_map_keeps_black_and_white_and_moves_mid_greys() -> None:
    image = np.arange(256, dtype=np.uint8).reshape(16, 16)
    rng = np.random.default_rng(0)
    dark, _ = GreyMap(exponent=(1.6, 1.7))(image, np.zeros_like(image), rng)
    flat, _ = GreyMap(exponent=(0.6, 0.65))(image, np.zeros_like(image), rng)
    for out in (dark, flat):
        assert out.flat[0] == 0 and out.flat[255] == 255
        assert (np.diff(out.astype(int).ravel()) >= 0).all()  # order of grey levels kept
    assert 128**1.7 / 255**0.7 - 1 <= dark.flat[128] <= 128**1.6 / 255**0.6 + 1
    assert flat.flat[128] > 128 * 1.2
    with pytest.raises(ValueError):
        GreyMap(exponent=(0.0, 1.0))


def test_edge_enhance_sharpens_an_edge_and_leaves_flat_tissue() -> None:
    image = np.full((64, 64), 80, np.uint8)
    image[:, 32:] = 160
    out, _ = EdgeEnhance(amount=(1.0, 1.0), sigma=(2.0, 2.0))(
        image, np.zeros_like(image), np.random.default_rng(0)
    )
    assert (out[:, :20] == 80).all() and (out[:, 44:] == 160).all()  # far from the edge
    assert out[:, 30].mean() < 75 and out[:, 33].mean() > 165  # overshoot either side


def test_default_chain_has_every_kind() -> None:
    kinds = {type(t) for t in default_transforms()}
    assert kinds == {RandomCropScale, RandomAffine, RandomFlip, RandomGain, DepthGain, Speckle}
    looks = default_transforms(scanner_looks=True)
    assert {type(t) for t in looks} == kinds | {GreyMap, EdgeEnhance}
    # Added at the end: without them a generator draws for the same chain as before.
    assert [type(t) for t in looks[: len(kinds)]] == [type(t) for t in default_transforms()]


def test_sector_mask_leaves_the_corners_of_the_box_unimaged() -> None:
    h, w = 300, 400
    fan = sector_mask(h, w, apex_above=0.6, sides_at=0.75)
    assert fan.shape == (h, w) and fan.dtype == bool
    assert not fan[0, 0] and not fan[0, -1]  # beside the fan's top
    assert not fan[-1, 0] and not fan[-1, -1]  # below its far arc, at the sides
    assert fan[h - 1, w // 2] and fan[h // 2, w // 2]
    # The near arc dips below the top edge in the middle (the probe's face) and ends on it.
    assert not fan[0, w // 2] and not fan[15, w // 2] and fan[25, w // 2]
    columns = np.flatnonzero(fan[:3].any(0))
    assert columns.size and np.all(np.abs(columns - (w - 1) / 2) > 80)
    # The straight sides reach the box's edges at 0.75 of its height, not above.
    row = round(0.75 * h)
    assert fan[row + 2, 0] and not fan[row - 10, 0]
    assert fan[row + 2, -1] and not fan[row - 10, -1]
    np.testing.assert_array_equal(fan, fan[:, ::-1])  # symmetric about the centre line
    with pytest.raises(ValueError):
        sector_mask(0, w)
    with pytest.raises(ValueError):
        sector_mask(h, w, apex_above=0.0)


def test_convex_view_indents_the_skin_and_keeps_deep_tissue_flat() -> None:
    h, w, apex_above, sides_at = 300, 400, 0.6, 0.75
    image = np.full((h, w), 40, np.uint8)
    image[0:3, :] = 250  # the skin line
    image[200, :] = 250  # a flat fascia plane, deep
    image[:, 299:302] = 180  # a vertical line, three quarters across
    mask = np.zeros((h, w), np.uint8)
    mask[230:, :] = 2
    out, out_mask = convex_view_pair(image, mask, apex_above, sides_at)
    fan = sector_mask(h, w, apex_above, sides_at)
    assert out.shape == (h, w) and out_mask.shape == (h, w)
    assert not out[~fan].any() and not out_mask[~fan].any()  # nothing beside the fan
    assert set(np.unique(out_mask)) == {0, 2}  # no class that was not in the input
    # The skin line follows the near arc: where the fan begins in each column.
    for x in range(120, 281, 20):
        top = int(np.argmax(fan[:, x]))
        assert out[top : top + 3, x].max() > 200
        assert out[top + 6 : top + 40, x].max() < 100  # and only there
    # The deep plane stays flat, the vertical line vertical, the label's edge where it was.
    for x in range(60, w - 60, 20):
        if fan[200, x] and abs(x - 300) > 3:
            assert out[200, x] > 200
    rows = [y for y in range(60, 290, 10) if fan[y, 300]]
    assert all(out[y, 299:302].min() > 150 for y in rows)
    assert out_mask[225, w // 2] == 0 and out_mask[235, w // 2] == 2
    with pytest.raises(ValueError):
        convex_view_pair(image, mask, apex_above=0.0)


def test_sector_view_converts_the_region_only_and_keeps_tissue_beside_the_fan() -> None:
    rng = np.random.default_rng(5)
    image = rng.integers(30, 220, (240, 320)).astype(np.uint8)
    mask = (rng.random((240, 320)) < 0.3).astype(np.uint8)
    box = (40, 20, 279, 219)  # x0, y0, x1, y1
    out, out_mask, imaged = sector_view(image, mask, box)
    x0, y0, x1, y1 = box
    inside = (slice(y0, y1 + 1), slice(x0, x1 + 1))
    outside = np.ones(image.shape, bool)
    outside[inside] = False
    np.testing.assert_array_equal(out[outside], image[outside])
    np.testing.assert_array_equal(out_mask[outside], mask[outside])
    fan = sector_mask(y1 - y0 + 1, x1 - x0 + 1)
    np.testing.assert_array_equal(imaged[inside], fan)
    assert imaged[outside].all()
    converted, converted_mask = convex_view_pair(image[inside], mask[inside])
    np.testing.assert_array_equal(out[inside][fan], converted[fan])
    np.testing.assert_array_equal(out_mask[inside][fan], converted_mask[fan])
    # Beside the fan the tissue goes on, so moving the frame never moves the fan's edge.
    assert out[inside][~fan].min() >= 30
