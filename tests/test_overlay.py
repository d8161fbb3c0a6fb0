"""Colour overlays paint each class its fixed colour and leave background untouched; the live
renderer draws needle, path, targets and messages into one reused buffer."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.labels import CLASS_COLOURS, NERVE, VESSEL
from usguide.overlay import (
    ACTIVE_TARGET_COLOUR,
    INJECTATE_COLOUR,
    NEEDLE_COLOUR,
    TARGET_COLOUR,
    OverlayRenderer,
    blend_labels,
)

GREY = 100


def blend(value: float, colour: tuple[int, int, int], alpha: float) -> np.ndarray:
    return np.rint((1 - alpha) * value + alpha * np.asarray(colour, float))


def grey_frame(rows: int = 60, columns: int = 80) -> np.ndarray:
    return np.full((rows, columns), GREY, np.uint8)


def nerve_block() -> np.ndarray:
    labels = np.zeros((60, 80), np.uint8)
    labels[20:40, 30:50] = NERVE
    return labels


def near(pixel: np.ndarray, colour: tuple[int, int, int], tol: int = 20) -> bool:
    """Within ``tol`` of ``colour`` in every channel (anti-aliased thin lines are not exact)."""
    return bool((np.abs(pixel.astype(int) - colour) <= tol).all())


def is_red(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(int)
    return (rgb[..., 0] > 180) & (rgb[..., 1] < 100) & (rgb[..., 2] < 100)


def test_blend_paints_classes_and_keeps_background() -> None:
    grey = np.full((10, 10), 100, np.uint8)
    labels = np.zeros((10, 10), np.uint8)
    labels[:3] = NERVE
    labels[7:] = VESSEL
    out = blend_labels(grey, labels, alpha=0.5)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert (out[5] == 100).all()  # background unchanged
    expected = (0.5 * 100 + 0.5 * np.array(CLASS_COLOURS[NERVE])).round()
    assert np.abs(out[0, 0].astype(int) - expected).max() <= 1
    assert out[8, 0, 0] > out[8, 0, 1]  # vessel is red


def test_blend_rejects_mismatched_sizes() -> None:
    with pytest.raises(ValueError, match="differ in size"):
        blend_labels(np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8))


def test_blend_writes_into_out() -> None:
    out = np.zeros((60, 80, 3), np.uint8)
    assert blend_labels(grey_frame(), nerve_block(), out=out) is out
    assert (out[0, 0] == GREY).all()


def test_blend_labels_matches_renderer_fills() -> None:
    labels = nerve_block()
    labels[5:10, 5:70] = VESSEL
    rendered = OverlayRenderer(alpha=0.3, outlines=False).render(grey_frame(), labels)
    np.testing.assert_array_equal(blend_labels(grey_frame(), labels, alpha=0.3), rendered)


def test_render_fills_classes_and_keeps_background() -> None:
    out = OverlayRenderer(alpha=0.4, outlines=False).render(grey_frame(), nerve_block())
    inside = out[20:40, 30:50].reshape(-1, 3)
    assert (np.abs(inside - blend(GREY, CLASS_COLOURS[NERVE], 0.4)) <= 1).all()
    outside = np.ones((60, 80), bool)
    outside[20:40, 30:50] = False
    assert (out[outside] == GREY).all()


def test_outline_differs_from_fill() -> None:
    out = OverlayRenderer(alpha=0.4, outlines=True).render(grey_frame(), nerve_block())
    edge, fill = out[20, 35], out[30, 40]
    np.testing.assert_array_equal(edge, CLASS_COLOURS[NERVE])  # opaque class colour
    assert (np.abs(fill - blend(GREY, CLASS_COLOURS[NERVE], 0.4)) <= 1).all()
    assert (edge != fill).any()
    assert (out[19, 35] == GREY).all()  # outline lies inside the structure


def test_nothing_to_draw_leaves_the_image() -> None:
    grey = grey_frame()
    out = OverlayRenderer().render(grey, np.zeros_like(grey))
    assert (out == GREY).all()


def test_confident_tip_is_a_filled_disc() -> None:
    out = OverlayRenderer(tip_radius_px=5).render(grey_frame(), None, tip_xy=(40.0, 30.0))
    np.testing.assert_array_equal(out[30, 40], NEEDLE_COLOUR)
    assert (out[30, 52] == GREY).all()


def test_uncertain_tip_is_a_ring() -> None:
    out = OverlayRenderer(tip_radius_px=5).render(
        grey_frame(), None, tip_xy=(40.0, 30.0), tip_confident=False
    )
    assert (out[30, 40] == GREY).all()  # hollow
    ring = out[30, 44:47].astype(int)
    assert (ring[:, 1] > ring[:, 0] + 50).any()  # green on the ring


def test_shaft_runs_from_entry_to_tip() -> None:
    out = OverlayRenderer(line_px=1).render(grey_frame(), None, shaft=((0.0, 10.0), (40.0, 10.0)))
    assert near(out[10, 20], NEEDLE_COLOUR)
    assert (out[10, 50:] == GREY).all()  # nothing beyond the tip


def test_path_is_dashed_from_start_to_end() -> None:
    renderer = OverlayRenderer()
    out = renderer.render(grey_frame(), None, path=((40.0, 30.0), (79.0, 30.0)))
    row = (out[30] != GREY).any(axis=1)
    assert not row[:39].any()  # nothing behind the start
    assert row[70:].any()  # reaches the frame's edge (the last dash)
    drawn = row[40:]
    assert drawn.any() and not drawn.all()  # dashes with gaps
    out = renderer.render(grey_frame(), None, path=((40.0, 30.0), (60.0, 30.0)))
    assert (out[:, 62:] == GREY).all()  # stops at its end


def test_crosshairs_at_targets_and_active_highlighted() -> None:
    out = OverlayRenderer().render(
        grey_frame(), None, targets=[(20.0, 20.0), (60.0, 40.0)], active_target=1
    )
    assert near(out[20, 20], TARGET_COLOUR)
    assert near(out[40, 60], ACTIVE_TARGET_COLOUR)
    assert (out[20, 23] != GREY).any() and (out[23, 20] != GREY).any()  # arms of the cross
    assert (out[5, 40] == GREY).all()


def test_active_target_must_index_targets() -> None:
    with pytest.raises(ValueError, match="active_target"):
        OverlayRenderer().render(grey_frame(), None, targets=[(1.0, 1.0)], active_target=1)


def test_warning_is_red_on_a_dark_box() -> None:
    frame = np.full((120, 200), 200, np.uint8)  # bright, so the box must darken it
    out = OverlayRenderer().render(frame, None, warnings=["Tip near vessel"])
    assert is_red(out[-30:, :120]).sum() > 20
    assert not is_red(out[:-30]).any()
    assert (out[-30:, :120] < 100).mean() > 0.5  # darkened backing box


def test_text_lines_are_white_on_a_dark_box_at_top_left() -> None:
    frame = np.full((120, 200), 200, np.uint8)
    out = OverlayRenderer().render(frame, None, text=["Tip to nerve 4.2 mm", "Angle 31 deg"])
    top = out[:40, :160].astype(int)
    assert ((top > 240).all(axis=2)).sum() > 20  # white letters
    assert (top < 100).all(axis=2).mean() > 0.5  # on a dark box
    assert (out[60:] == 200).all()


@pytest.mark.parametrize("dtype", [bool, np.uint8])
def test_injectate_tints_only_inside_the_mask(dtype: type) -> None:
    mask = np.zeros((60, 80), dtype)
    mask[10:30, 10:40] = 255 if dtype is np.uint8 else True
    out = OverlayRenderer(outlines=False, injectate_alpha=0.5).render(
        grey_frame(), None, injectate=mask
    )
    inside = out[10:30, 10:40].reshape(-1, 3)
    assert (np.abs(inside - blend(GREY, INJECTATE_COLOUR, 0.5)) <= 1).all()
    outside = np.ones((60, 80), bool)
    outside[10:30, 10:40] = False
    assert (out[outside] == GREY).all()


def test_output_buffer_is_reused() -> None:
    renderer = OverlayRenderer()
    first = renderer.render(grey_frame(), nerve_block())
    second = renderer.render(grey_frame(), None, tip_xy=(10.0, 10.0))
    assert first is second
    assert (second[30, 40] == GREY).all()  # the previous frame's labels are gone


def test_grey_and_rgb_inputs() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    renderer = OverlayRenderer()
    np.testing.assert_array_equal(renderer.render(rgb, None), rgb)
    grey = rgb[..., 0].copy()
    np.testing.assert_array_equal(renderer.render(grey, None), np.repeat(grey[..., None], 3, 2))
    out = renderer.render(rgb, nerve_block())
    np.testing.assert_array_equal(out[0, 0], rgb[0, 0])


def test_frame_size_change() -> None:
    renderer = OverlayRenderer(outlines=False)
    small = renderer.render(np.zeros((30, 40), np.uint8), np.ones((30, 40), np.uint8))
    assert small.shape == (30, 40, 3)
    big = renderer.render(grey_frame(), nerve_block(), tip_xy=(70.0, 50.0))
    assert big.shape == (60, 80, 3)
    assert (big[0, 0] == GREY).all() and (big[30, 40] != GREY).any()


def test_labels_of_wrong_shape_name_both_shapes() -> None:
    with pytest.raises(ValueError, match=r"labels \(5, 4\) and pixels \(4, 4\)"):
        OverlayRenderer().render(np.zeros((4, 4), np.uint8), np.zeros((5, 4), np.uint8))


def test_wrong_injectate_and_pixels_are_rejected() -> None:
    renderer = OverlayRenderer()
    with pytest.raises(ValueError, match=r"injectate \(5, 4\) and pixels \(4, 4\)"):
        renderer.render(np.zeros((4, 4), np.uint8), None, injectate=np.zeros((5, 4), bool))
    with pytest.raises(ValueError, match="float32"):
        renderer.render(np.zeros((4, 4), np.uint8), None, injectate=np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="uint8"):
        renderer.render(np.zeros((4, 4), np.float32), None)


def test_drawings_outside_the_frame_are_clipped() -> None:
    out = OverlayRenderer().render(
        grey_frame(),
        None,
        shaft=((-500.0, -500.0), (-100.0, -10.0)),
        tip_xy=(1e12, -1e12),
        path=((-10.0, 70.0), (90.0, 200.0)),
        targets=[(float("nan"), 3.0), (1e9, 1e9)],
    )
    assert (out == GREY).all()
