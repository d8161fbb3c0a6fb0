"""Optical-flow propagation moves labels with the tissue."""

from __future__ import annotations

import numpy as np
import pytest

from tests.annotation.conftest import speckle
from usguide.annotation.propagate import backward_flow, propagate_labels, warp_labels


def centroid(mask: np.ndarray) -> np.ndarray:
    ys, xs = np.nonzero(mask)
    return np.array([xs.mean(), ys.mean()])


@pytest.mark.parametrize("method", ["dis", "farneback"])
@pytest.mark.parametrize("shift", [(3, 0), (-2, 4), (5, -3)])
def test_labels_follow_a_known_shift_within_one_pixel(method, shift) -> None:
    dx, dy = shift
    scene = speckle((160, 200), seed=7)
    previous = scene[20:140, 20:180]
    following = scene[20 - dy : 140 - dy, 20 - dx : 180 - dx]  # content moved by (dx, dy)
    labels = np.zeros(previous.shape, np.uint8)
    labels[40:70, 50:90] = 1
    labels[80:95, 100:130] = 2
    moved = warp_labels(labels, backward_flow(previous, following, method))
    assert moved.dtype == np.uint8 and set(np.unique(moved)) <= {0, 1, 2}  # never blended
    for c in (1, 2):
        assert np.abs(centroid(moved == c) - centroid(labels == c) - (dx, dy)).max() <= 1.0
        expected = np.roll(labels == c, (dy, dx), axis=(0, 1))
        overlap = (moved == c) & expected
        assert overlap.sum() >= 0.9 * expected.sum()


def test_propagation_chains_over_frames() -> None:
    scene = speckle((140, 200), seed=2)
    frames = [scene[10:130, 30 - 3 * i : 170 - 3 * i] for i in range(5)]
    labels = np.zeros(frames[0].shape, np.uint8)
    labels[50:70, 60:80] = 3
    out = propagate_labels(labels, frames)
    assert len(out) == 4
    assert abs(centroid(out[-1] == 3)[0] - centroid(labels == 3)[0] - 12) <= 1.0


def test_propagation_checks_sizes() -> None:
    with pytest.raises(ValueError):
        propagate_labels(np.zeros((5, 5), np.uint8), [np.zeros((6, 5), np.uint8)])
    with pytest.raises(ValueError):
        backward_flow(np.zeros((5, 5), np.uint8), np.zeros((5, 5), np.uint8), "magic")  # type: ignore[arg-type]
