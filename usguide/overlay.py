"""Colour overlays of label maps, for people to look at.

A lookup-table blend on uint8: each class has a fixed colour (usguide.labels.CLASS_COLOURS) and
background leaves the image untouched.
"""

from __future__ import annotations

import cv2
import numpy as np

from usguide.labels import CLASS_COLOURS


def blend_labels(
    pixels: np.ndarray, labels: np.ndarray, *, alpha: float = 0.45, out: np.ndarray | None = None
) -> np.ndarray:
    """RGB ``(H, W, 3)`` uint8 of ``pixels`` (grey or RGB) with ``labels`` painted in colour.

    Parameters
    ----------
    pixels : (H, W) or (H, W, 3) uint8
    labels : (H, W) uint8 class indices
    alpha : float
        Weight of the class colour where a class is present.
    out : (H, W, 3) uint8, optional
        Buffer to write into (reused across frames on the hot path).
    """
    if labels.shape != pixels.shape[:2]:
        raise ValueError(f"labels {labels.shape} and pixels {pixels.shape[:2]} differ in size")
    rgb = pixels if pixels.ndim == 3 else cv2.cvtColor(pixels, cv2.COLOR_GRAY2RGB)
    if out is None:
        out = np.empty((*labels.shape, 3), np.uint8)
    colours = np.zeros((256, 1, 3), np.uint8)
    colours[: len(CLASS_COLOURS), 0] = CLASS_COLOURS
    painted = cv2.LUT(cv2.cvtColor(labels, cv2.COLOR_GRAY2RGB), colours)
    cv2.addWeighted(rgb, 1.0 - alpha, painted, alpha, 0.0, dst=out)
    background = labels == 0
    out[background] = rgb[background]
    return out
