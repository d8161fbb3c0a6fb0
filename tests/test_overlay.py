"""Colour overlays paint each class its fixed colour and leave background untouched."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.labels import CLASS_COLOURS, NERVE, VESSEL
from usguide.overlay import blend_labels


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
