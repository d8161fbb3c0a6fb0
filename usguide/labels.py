"""The class indices used everywhere: label maps, masks, models and overlays."""

from __future__ import annotations

BACKGROUND = 0
NERVE = 1
VESSEL = 2
FASCIA = 3
NEEDLE = 4

CLASS_NAMES: tuple[str, ...] = ("background", "nerve", "vessel", "fascia", "needle")
N_CLASSES = len(CLASS_NAMES)

# Fixed display colours (RGB) so every view of usguide paints a class the same way.
CLASS_COLOURS: tuple[tuple[int, int, int], ...] = (
    (0, 0, 0),
    (255, 220, 0),  # nerve: yellow
    (230, 40, 40),  # vessel: red
    (60, 160, 255),  # fascia: blue
    (40, 255, 120),  # needle: green
)
