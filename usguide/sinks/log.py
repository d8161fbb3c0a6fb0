"""The JSON-lines results log: one object per frame, flushed per frame so the file is always
valid JSON lines, even while it is being written or after a crash."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from usguide.frame import FrameResult


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(float(value), digits)


def result_record(result: FrameResult) -> dict[str, Any]:
    """One frame's results as plain JSON values.

    Keys: ``frame``, ``timestamp_s``, ``spacing_mm`` (row, col or null), ``tip`` (visible, x, y,
    x_mm, y_mm, angle_deg, inserted_length_mm, confidence, status, shaft_visible: a needle is
    seen, its tip or not), ``units``, ``targets``,
    ``active_target``, ``distances`` (tip_to_target, tip_to_nerve, tip_to_vessel in ``units``),
    ``path_crosses_vessel``, ``path_crosses_nerve``, ``time_on_target_s``, ``warnings`` (code,
    message), ``spread``, ``stage_ms`` and ``errors``. Nothing from a patient's header.
    """
    frame = result.frame
    spacing = frame.region_spacing_mm
    record: dict[str, Any] = {
        "frame": frame.index,
        "timestamp_s": _r(frame.timestamp_s, 4),
        "spacing_mm": [round(float(v), 5) for v in spacing] if spacing else None,
    }
    n = result.needle
    if n is not None:
        record["tip"] = {
            "visible": n.visible,
            "x": _r(n.tip_xy[0], 2) if n.tip_xy else None,
            "y": _r(n.tip_xy[1], 2) if n.tip_xy else None,
            "x_mm": _r(n.tip_mm[0]) if n.tip_mm else None,
            "y_mm": _r(n.tip_mm[1]) if n.tip_mm else None,
            "angle_deg": _r(n.angle_deg, 2),
            "inserted_length_mm": _r(n.inserted_length_mm),
            "confidence": _r(n.confidence),
            "status": n.status,
            "shaft_visible": n.shaft_visible,
        }
    else:
        record["tip"] = None
    if result.guidance is not None:
        record.update(result.guidance.to_dict())
    else:
        record.update(
            {"units": "mm" if spacing else "px", "targets": [], "active_target": None,
             "distances": None, "path_crosses_vessel": None, "path_crosses_nerve": None,
             "time_on_target_s": 0.0, "warnings": [], "spread": None}
        )  # fmt: skip
    record["stage_ms"] = {k: round(v, 3) for k, v in result.stage_ms.items()}
    record["errors"] = dict(result.errors)
    return record


class JsonLinesLog:
    """Append one JSON object per frame to ``path`` (created, or replaced when it exists).

    Each line is written whole and flushed at once, so a reader, or the file left by a crash,
    never sees half a line.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        if self.path.parent != Path():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - closed in close()
        self.lines = 0

    def write(self, result: FrameResult) -> None:
        self.write_record(result_record(result))

    def write_record(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, separators=(",", ":"), allow_nan=False) + "\n")
        self._file.flush()
        self.lines += 1

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()
