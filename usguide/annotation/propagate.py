"""Carry a frame's labels to the following frames with dense optical flow.

For each next frame the flow is computed *backwards* (next -> previous), so every pixel of the
next frame knows where it came from; the previous labels are then sampled there with nearest
neighbour (class indices must never be blended). Flow is DIS (OpenCV's dense inverse search,
fast and robust on speckle) or Farneback. The result is a starting point for the annotator, not
a label: each propagated frame is meant to be checked.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Literal

import cv2
import numpy as np

__all__ = ["backward_flow", "propagate_labels", "warp_labels"]

FlowMethod = Literal["dis", "farneback"]


def _grey(image: np.ndarray) -> np.ndarray:
    # DIS needs contiguous rows; views of a larger frame are not.
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY) if image.ndim == 3 else image
    return np.ascontiguousarray(grey)


def backward_flow(
    previous: np.ndarray, following: np.ndarray, method: FlowMethod = "dis"
) -> np.ndarray:
    """Dense flow from ``following`` back to ``previous``.

    Parameters
    ----------
    previous, following : numpy.ndarray
        ``(H, W)`` uint8 grey or ``(H, W, 3)`` uint8 RGB frames of the same size.
    method : {"dis", "farneback"}
        The flow algorithm.

    Returns
    -------
    numpy.ndarray
        ``(H, W, 2)`` float32: pixel ``(r, c)`` of ``following`` shows what ``previous`` held at
        ``(c + flow[r, c, 0], r + flow[r, c, 1])`` (x, y).
    """
    a, b = _grey(following), _grey(previous)
    if a.shape != b.shape:
        raise ValueError(f"frames differ in size: {a.shape} and {b.shape}")
    if method == "dis":
        dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        return dis.calc(a, b, None)
    if method == "farneback":
        return cv2.calcOpticalFlowFarneback(a, b, None, 0.5, 4, 21, 5, 7, 1.5, 0)
    raise ValueError(f"method must be 'dis' or 'farneback', got {method!r}")


def warp_labels(labels: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """Labels moved by a backward flow (nearest neighbour; outside the frame becomes 0).

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` uint8 class indices of the previous frame.
    flow : numpy.ndarray
        ``(H, W, 2)`` float32 from :func:`backward_flow`.

    Returns
    -------
    numpy.ndarray
        ``(H, W)`` uint8 class indices for the following frame.
    """
    h, w = labels.shape
    if flow.shape != (h, w, 2):
        raise ValueError(f"flow {flow.shape} does not fit labels {labels.shape}")
    grid_x, grid_y = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(
        np.ascontiguousarray(labels),
        grid_x + flow[..., 0],
        grid_y + flow[..., 1],
        interpolation=cv2.INTER_NEAREST,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )


def propagate_labels(
    labels: np.ndarray, frames: Sequence[np.ndarray], *, method: FlowMethod = "dis"
) -> list[np.ndarray]:
    """Carry ``labels`` of ``frames[0]`` through ``frames[1:]``, frame to frame.

    Parameters
    ----------
    labels : numpy.ndarray
        ``(H, W)`` uint8 class indices of ``frames[0]``.
    frames : sequence of numpy.ndarray
        Consecutive frames, all of the labels' size.
    method : {"dis", "farneback"}
        The flow algorithm.

    Returns
    -------
    list of numpy.ndarray
        One label map per frame after the first (``len(frames) - 1``).
    """
    if frames and frames[0].shape[:2] != labels.shape:
        raise ValueError(f"labels {labels.shape} do not fit the frames {frames[0].shape[:2]}")
    out: list[np.ndarray] = []
    current = labels
    for previous, following in itertools.pairwise(frames):
        current = warp_labels(current, backward_flow(previous, following, method))
        out.append(current)
    return out
