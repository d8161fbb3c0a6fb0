"""The demo scan: a short nerve-block cine built from one real frame shipped with usguide.

The frame (USGRA-Seg image 0212, CC BY 4.0, see ``usguide/demo_data/README.md``) is moved as a
hand-held probe moves; a needle is rendered entering from the right, advancing to a point 1.5 mm
from the nerve's nearest edge (planned from the expert nerve and vessel mask so the path keeps
clear of the vessel), pausing, and then an anechoic pocket of injectate grows around its tip.

The source image carries no calibration: the demo assumes :data:`DEMO_SPACING_MM` and every
output says so. Frames are made on demand and depend only on their index and the seed, so the
demo reads like any recorded source (random access included).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from usguide.data.injectate_render import render_injectate
from usguide.data.needle_render import NeedlePose, render_needle
from usguide.frame import Region
from usguide.labels import NERVE
from usguide.sources.base import SeekableSource

DEMO_DATA = Path(__file__).resolve().parent / "demo_data"
DEMO_IMAGE = DEMO_DATA / "usgra-seg-0212.png"
DEMO_MASK = DEMO_DATA / "usgra-seg-0212-mask.png"
DEMO_SPACING_MM = 0.08  # assumed: the source image carries no calibration
DEMO_FPS = 20.0
DEMO_SIZE = (512, 640)  # rows, columns: the imaging area sits in a scanner-like frame


# Written beside the demo's outputs: the overlay video is adapted from a CC BY 4.0 image, and
# its millimetres rest on an assumed spacing.
DEMO_ABOUT = f"""usguide demo: overlay.mp4 and results.jsonl

Source image: USGRA-Seg image 0212 (a peripheral-nerve-block scan; GitHub tmkand/usgra-seg,
dataset/), licensed CC BY 4.0 (https://creativecommons.org/licenses/by/4.0/). Please cite the
USGRA-Seg authors. Changes: the frame is moved as a hand-held probe moves, and a needle and an
injection are rendered onto it; the overlay draws usguide's labels and guidance over it.

Spacing: the source image carries no calibration. The demo assumes {DEMO_SPACING_MM} mm per pixel,
so every millimetre in these files rests on that assumption.

usguide is not a medical device.
"""


@dataclass(frozen=True, slots=True)
class DemoScript:
    """Frame numbers of the demo's phases (at :data:`DEMO_FPS`)."""

    needle_from: int = 30
    arrive: int = 100
    inject_from: int = 110
    frames: int = 170
    pocket_radius_mm: float = 3.5


def _load_demo() -> tuple[np.ndarray, np.ndarray]:
    from PIL import Image  # palette PNG: the class index is the palette index

    image = cv2.imread(str(DEMO_IMAGE), cv2.IMREAD_GRAYSCALE)
    if image is None:
        raise FileNotFoundError(f"{DEMO_IMAGE}: the demo image is missing from the install")
    mask = np.array(Image.open(DEMO_MASK))
    return image, mask


class DemoScan(SeekableSource):
    """The demo cine as a source of :class:`~usguide.frame.Frame`.

    Parameters
    ----------
    seed : int
        Noise of the renders; the same seed gives the same cine.
    script : DemoScript, optional
    """

    kind = "demo"

    def __init__(self, seed: int = 0, script: DemoScript | None = None) -> None:
        super().__init__("usguide-demo", detect_region=False)
        self.script = script or DemoScript()
        self.seed = seed
        image, mask = _load_demo()
        cols = DEMO_SIZE[1]
        h, w = image.shape
        self._x0, self._y0 = (cols - w) // 2, 0
        self._image, self._mask = image, mask
        self._bbox = (self._x0, self._y0, self._x0 + w - 1, self._y0 + h - 1)
        self.target_xy, self.entry_xy = self._plan()
        self.encoding = "rendered"
        self.colour = "grey"
        self._rendered: list[np.ndarray] | None = None

    def prerender(self) -> None:
        """Render every frame now and keep them (about 56 MB), so reading a frame costs a copy:
        for a viewer that plays the scan again and again beside its own drawing. One pass
        through the scan needs none of it."""
        if self._rendered is None:
            self._rendered = [self._render(i) for i in range(self.frame_count)]

    # -- the plan: where the needle goes -------------------------------------------------------
    def _plan(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """Target 1.5 mm from the nerve's nearest edge, on its upper right (as the guidance
        places a perineural target); entry at the right edge."""
        nerve = (self._mask == NERVE).astype(np.uint8)
        ys, xs = np.nonzero(nerve)
        cx, cy = xs.mean(), ys.mean()
        # Out from the nerve's centre towards the upper right until 1.5 mm from every nerve pixel.
        outside_px = cv2.distanceTransform(1 - nerve, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        direction = np.array([1.0, -0.45]) / math.hypot(1.0, -0.45)
        t = 0.0
        while outside_px[round(cy + direction[1] * t), round(cx + direction[0] * t)] < (
            1.5 / DEMO_SPACING_MM
        ):
            t += 0.25
        target = (self._x0 + cx + direction[0] * t, self._y0 + cy + direction[1] * t)
        x1 = self._bbox[2]
        entry = (x1 + 0.5, target[1] - (x1 - target[0]) * math.tan(math.radians(35.0)))
        return (float(target[0]), float(target[1])), (float(entry[0]), float(entry[1]))

    # -- source interface ----------------------------------------------------------------------
    @property
    def frame_count(self) -> int:
        return self.script.frames

    @property
    def frame_time_s(self) -> float:
        return 1.0 / DEMO_FPS

    @property
    def shape(self) -> tuple[int, int]:
        return DEMO_SIZE

    def _native_regions(self) -> tuple[Region, ...]:
        note = f"demo: {DEMO_SPACING_MM} mm/px assumed (the source image carries no calibration)"
        return (Region(self._bbox, (DEMO_SPACING_MM, DEMO_SPACING_MM), True, "user", note),)

    def _info_details(self) -> dict[str, object]:
        return {"encoding": self.encoding, "colour": self.colour}

    def tip_truth(self, index: int) -> tuple[float, float] | None:
        """Exact needle tip of frame ``index`` in frame pixels; None before insertion."""
        s = self.script
        if index < s.needle_from:
            return None
        progress = min(1.0, (index - s.needle_from) / max(1, s.arrive - s.needle_from))
        ex, ey = self.entry_xy
        tx, ty = self.target_xy
        # Start with 3 mm already in, so the needle is seen from its first frame.
        start = 3.0 / DEMO_SPACING_MM / math.hypot(tx - ex, ty - ey)
        f = start + (1.0 - start) * progress
        mx, my = self._motion(index)[:2]
        return (ex + (tx - ex) * f + mx, ey + (ty - ey) * f + my)

    def labels_truth(self, index: int) -> np.ndarray:
        """The annotators' label map (nerve, vessel) of frame ``index``, moved with the probe as
        the image is, in frame pixels (uint8; background outside the image)."""
        rows, cols = DEMO_SIZE
        h, w = self._mask.shape
        out = np.zeros((rows, cols), np.uint8)
        out[self._y0 : self._y0 + h, self._x0 : self._x0 + w] = cv2.warpAffine(
            self._mask, self._probe_move(index), (w, h), flags=cv2.INTER_NEAREST,
            borderMode=cv2.BORDER_REFLECT,
        )  # fmt: skip
        return out

    def _probe_move(self, index: int) -> np.ndarray:
        """Affine matrix moving the source image (its own pixels) as the probe drifts."""
        dx, dy, angle = self._motion(index)
        m = cv2.getRotationMatrix2D((self._image.shape[1] / 2, 0.0), angle, 1.0)
        m[:, 2] += (dx, dy)
        return m

    def _motion(self, index: int) -> tuple[float, float, float]:
        """Probe drift: a smooth translation (px) and rotation (degrees)."""
        t = index / DEMO_FPS
        return (
            2.5 * math.sin(2 * math.pi * t / 5.0),
            1.5 * math.sin(2 * math.pi * t / 3.7 + 1.0),
            0.6 * math.sin(2 * math.pi * t / 6.1),
        )

    def _read_pixels(self, index: int) -> tuple[np.ndarray, float | None]:
        pixels = self._rendered[index].copy() if self._rendered is not None else None
        return (pixels if pixels is not None else self._render(index)), index / DEMO_FPS

    def _render(self, index: int) -> np.ndarray:
        s = self.script
        rng = np.random.default_rng((self.seed, index))
        rows, cols = DEMO_SIZE
        frame = np.zeros((rows, cols), np.uint8)
        h, w = self._image.shape
        dx, dy = self._motion(index)[:2]
        moved = cv2.warpAffine(
            self._image, self._probe_move(index), (w, h), borderMode=cv2.BORDER_REFLECT
        )
        # Speckle changes a little from frame to frame on a real scanner.
        noise = rng.standard_normal(moved.shape, dtype=np.float32)
        noise *= 3.0
        noise += moved
        moved = np.clip(noise, 0, 255, out=noise).astype(np.uint8)
        tip = self.tip_truth(index)
        if tip is not None:
            local_tip = (tip[0] - self._x0, tip[1] - self._y0)
            if index >= s.inject_from:
                grow = min(1.0, (index - s.inject_from + 1) / (s.frames - s.inject_from) * 1.4)
                r = max(1.0, grow * s.pocket_radius_mm / DEMO_SPACING_MM)
                pocket = render_injectate(
                    moved,
                    local_tip,
                    (r * 1.3, r),
                    rng=np.random.default_rng(self.seed + 7),  # one pocket shape, growing
                )
                moved = pocket.image
            ex, ey = self.entry_xy
            mx, my = dx, dy
            pose = NeedlePose(
                entry_xy=(ex - self._x0 + mx, ey - self._y0 + my),
                tip_xy=local_tip,
                width_px=0.8 / DEMO_SPACING_MM,
            )
            moved = render_needle(moved, pose, rng=rng, spacing_mm=DEMO_SPACING_MM).image
        frame[self._y0 : self._y0 + h, self._x0 : self._x0 + w] = moved
        return frame
