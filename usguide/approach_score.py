"""Scoring a trainee's needle approach on a recorded scan, and the session summary.

Training mode: the trainee places a target before the needle appears; the recorded approach is
then played and scored frame by frame by :class:`ApproachScorer`:

- **time to target**: from the first frame the tip is seen (the needle appears) to the first
  frame the tip is within ``on_target_mm`` of the trainee's target (``on_target_px`` when the
  frame is not calibrated); None when never reached. Seconds from the frames' timestamps (or
  ``frame_time_s``); the frame count is always given too;
- **closest approach to the nerve and to vessels**: the smallest distance from the tip to the
  class's outline over the attempt (:func:`usguide.guidance` measures it the same way), negative
  when the tip was inside; ``entered_nerve`` / ``entered_vessel`` say whether it ever was;
- **redirections**: the tip's insertion depth is its distance from where it first appeared (or
  a given entry point). A redirection is a withdrawal of at least ``withdraw_mm`` from the
  deepest point reached since the last advance, followed by a re-advance of at least
  ``readvance_mm`` from the shallowest point of that withdrawal (hysteresis, so tracking jitter
  below those distances counts nothing). A change of angle without pulling back is steering,
  not a redirection;
- **final tip-to-target distance**: at the last frame the tip was seen.

Distances are millimetres when every frame the tip was seen on is calibrated; otherwise pixels,
and the score says so (``units`` and ``note``): a guess is never shown as a measurement.

:class:`SessionSummary` appends one row per attempt to a CSV file and a JSON file, each written
atomically (temporary file, then rename), so a crash never leaves a half-written summary.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import numpy as np

from usguide.frame import Frame
from usguide.guidance import scaled_distance, signed_edge_distance
from usguide.labels import NERVE, VESSEL

__all__ = [
    "CSV_COLUMNS",
    "ApproachScore",
    "ApproachScorer",
    "FrameAnalysis",
    "ScoreConfig",
    "SessionSummary",
    "pipeline_analyser",
    "score_recording",
]

Point = tuple[float, float]
SpacingMM = tuple[float, float]


@dataclass(frozen=True, slots=True)
class ScoreConfig:
    """Thresholds of the approach score.

    Attributes
    ----------
    on_target_mm, on_target_px : float
        The tip is on target within this distance (mm on calibrated frames, px otherwise).
    withdraw_mm, readvance_mm : float
        A redirection: pulled back at least ``withdraw_mm`` then advanced at least
        ``readvance_mm``.
    withdraw_px, readvance_px : float
        The same on uncalibrated frames.
    frame_time_s : float or None
        Seconds between frames when frames carry no timestamp; None leaves times unknown.
    """

    on_target_mm: float = 1.0
    on_target_px: float = 10.0
    withdraw_mm: float = 1.0
    readvance_mm: float = 1.0
    withdraw_px: float = 10.0
    readvance_px: float = 10.0
    frame_time_s: float | None = None

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:
                raise ValueError(f"{f.name} must be > 0, got {value}")


@dataclass(frozen=True, slots=True)
class ApproachScore:
    """The score of one attempt; distances in ``units``.

    Attributes
    ----------
    units : "mm" or "px"
        Unit of every distance below.
    reached_target : bool
        Whether the tip came within the on-target distance of the target.
    time_to_target_s : float or None
        Seconds from the needle's first appearance to reaching the target; None when not
        reached or when frame times are unknown.
    frames_to_target : int or None
        The same in frames.
    closest_nerve, closest_vessel : float or None
        Smallest tip-to-outline distance (negative: inside); None when the class was never
        labelled on a frame with the tip.
    entered_nerve, entered_vessel : bool
        The tip was inside on some frame.
    redirections : int
        Withdrawals followed by re-advances (see the module notes).
    final_tip_to_target : float or None
        At the last frame the tip was seen; None when it never was.
    target_xy : (float, float)
        The trainee's target, frame pixels.
    target_before_needle : bool or None
        The target was placed before the needle first appeared (None: not told when).
    needle_first_frame, last_tip_frame : int or None
        Frame indices of the tip's first and last sighting.
    frames, tip_frames : int
        Frames scored, and those on which the tip was seen.
    note : str
        Why distances are in px, or other caveats; empty otherwise.
    """

    units: Literal["mm", "px"]
    reached_target: bool
    time_to_target_s: float | None
    frames_to_target: int | None
    closest_nerve: float | None
    closest_vessel: float | None
    entered_nerve: bool
    entered_vessel: bool
    redirections: int
    final_tip_to_target: float | None
    target_xy: Point
    target_before_needle: bool | None
    needle_first_frame: int | None
    last_tip_frame: int | None
    frames: int
    tip_frames: int
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_xy"] = list(self.target_xy)
        return d

    def lines(self) -> list[str]:
        """The score as short lines of text for display, every distance with its unit."""
        u = self.units

        def dist(value: float | None, absent: str) -> str:
            if value is None:
                return absent
            return f"{abs(value):.1f} {u} inside" if value < 0 else f"{value:.1f} {u}"

        if self.reached_target:
            when = f"{self.frames_to_target} frames"
            if self.time_to_target_s is not None:
                when = f"{self.time_to_target_s:.1f} s ({when})"
            reached = f"time to target: {when}"
        else:
            reached = "target not reached"
        out = [
            reached,
            f"final tip to target: {dist(self.final_tip_to_target, 'tip never seen')}",
            f"closest to the nerve: {dist(self.closest_nerve, 'no nerve labelled')}",
            f"closest to a vessel: {dist(self.closest_vessel, 'no vessel labelled')}",
            f"redirections: {self.redirections}",
        ]
        if self.target_before_needle is False:
            out.append("the target was placed after the needle appeared")
        if self.note:
            out.append(self.note)
        return out


@dataclass(slots=True)
class _Track:
    """Per-unit running state (mm and px are kept apart and never mixed)."""

    closest_nerve: float | None = None
    closest_vessel: float | None = None
    final: float | None = None
    peak: float = 0.0
    trough: float = 0.0
    withdrawn: bool = False
    redirections: int = 0


class ApproachScorer:
    """Score a recorded approach against the trainee's target, frame by frame.

    Parameters
    ----------
    target_xy : (float, float)
        The trainee's target, frame pixels ``(x, y)``.
    config : ScoreConfig, optional
        Thresholds.
    entry_xy : (float, float), optional
        Where the needle enters (frame pixels), for the insertion depth; default the tip's
        first sighting.
    target_frame : int, optional
        The frame index at which the target was placed, to check it preceded the needle.

    Examples
    --------
    >>> scorer = ApproachScorer((120.0, 80.0))
    >>> for i, tip in enumerate([None, (20.0, 20.0), (60.0, 50.0), (119.0, 80.0)]):
    ...     scorer.update(i, None, tip, None, (0.1, 0.1))
    >>> scorer.result().reached_target
    True
    """

    def __init__(
        self,
        target_xy: Point,
        *,
        config: ScoreConfig | None = None,
        entry_xy: Point | None = None,
        target_frame: int | None = None,
    ) -> None:
        self.target_xy = (float(target_xy[0]), float(target_xy[1]))
        self.config = config or ScoreConfig()
        self.entry_xy = entry_xy
        self.target_frame = target_frame
        self._mm = _Track()
        self._px = _Track()
        self._frames = 0
        self._tip_frames = 0
        self._uncalibrated_tip_frames = 0
        self._first: tuple[int, float | None] | None = None  # (frame, time) of first sighting
        self._reached: tuple[int, float | None] | None = None
        self._last_tip_frame: int | None = None
        self._entered_nerve = False
        self._entered_vessel = False

    def _time(self, frame_index: int, timestamp_s: float | None) -> float | None:
        if timestamp_s is not None:
            return float(timestamp_s)
        if self.config.frame_time_s is not None:
            return frame_index * self.config.frame_time_s
        return None

    def update(
        self,
        frame_index: int,
        timestamp_s: float | None,
        tip_xy: Point | None,
        labels: np.ndarray | None,
        spacing_mm: SpacingMM | None,
    ) -> None:
        """Score one frame.

        Parameters
        ----------
        frame_index : int
            The frame's index in the recording.
        timestamp_s : float or None
            Its time in seconds; None when unknown.
        tip_xy : (float, float) or None
            The needle tip, frame pixels; None when not seen.
        labels : numpy.ndarray or None
            ``(H, W)`` uint8 class indices of the frame (for nerve and vessel distances).
        spacing_mm : (float, float) or None
            mm per pixel ``(row, col)``; None when unknown.
        """
        self._frames += 1
        if tip_xy is None:
            return
        tip = (float(tip_xy[0]), float(tip_xy[1]))
        t = self._time(frame_index, timestamp_s)
        self._tip_frames += 1
        self._last_tip_frame = frame_index
        if self._first is None:
            self._first = (frame_index, t)
            if self.entry_xy is None:
                self.entry_xy = tip
        if spacing_mm is None:
            self._uncalibrated_tip_frames += 1
        c = self.config
        # Pixels always; mm too when this frame is calibrated. The two are never mixed.
        tracks = [(self._px, (1.0, 1.0), c.withdraw_px, c.readvance_px)]
        if spacing_mm is not None:
            scale = (float(spacing_mm[1]), float(spacing_mm[0]))  # (x, y) mm per px
            tracks.append((self._mm, scale, c.withdraw_mm, c.readvance_mm))
        entry = self.entry_xy if self.entry_xy is not None else tip
        for track, scale, withdraw, readvance in tracks:
            track.final = scaled_distance(self.target_xy, tip, scale)
            if labels is not None:
                d_nerve = signed_edge_distance(labels, NERVE, tip, scale)
                d_vessel = signed_edge_distance(labels, VESSEL, tip, scale)
                track.closest_nerve = _min(track.closest_nerve, d_nerve)
                track.closest_vessel = _min(track.closest_vessel, d_vessel)
                self._entered_nerve |= d_nerve is not None and d_nerve < 0
                self._entered_vessel |= d_vessel is not None and d_vessel < 0
            _redirection_step(track, scaled_distance(entry, tip, scale), withdraw, readvance)
        # On target in the frame's own units: mm when calibrated, px otherwise.
        on_target = (
            self._mm.final <= c.on_target_mm  # type: ignore[operator]
            if spacing_mm is not None
            else self._px.final <= c.on_target_px  # type: ignore[operator]
        )
        if self._reached is None and on_target:
            self._reached = (frame_index, t)

    def result(self) -> ApproachScore:
        """The score of the frames seen so far."""
        calibrated = self._tip_frames > 0 and self._uncalibrated_tip_frames == 0
        track = self._mm if calibrated else self._px
        units: Literal["mm", "px"] = "mm" if calibrated else "px"
        notes = []
        if not calibrated and self._tip_frames:
            notes.append(
                f"calibration unknown on {self._uncalibrated_tip_frames} of {self._tip_frames} "
                "frames with the tip: distances in px"
            )
        if self._tip_frames == 0:
            notes.append("the needle tip was never seen")
        time_to = frames_to = None
        if self._reached is not None and self._first is not None:
            frames_to = self._reached[0] - self._first[0]
            if self._reached[1] is not None and self._first[1] is not None:
                time_to = self._reached[1] - self._first[1]
            else:
                notes.append("frame times unknown: time to target in frames only")
        before = None
        if self.target_frame is not None:
            before = self._first is None or self.target_frame < self._first[0]
        return ApproachScore(
            units=units,
            reached_target=self._reached is not None,
            time_to_target_s=time_to,
            frames_to_target=frames_to,
            closest_nerve=track.closest_nerve,
            closest_vessel=track.closest_vessel,
            entered_nerve=self._entered_nerve,
            entered_vessel=self._entered_vessel,
            redirections=track.redirections,
            final_tip_to_target=track.final,
            target_xy=self.target_xy,
            target_before_needle=before,
            needle_first_frame=self._first[0] if self._first else None,
            last_tip_frame=self._last_tip_frame,
            frames=self._frames,
            tip_frames=self._tip_frames,
            note="; ".join(notes),
        )


def _min(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    return a if b is None else min(a, b)


def _redirection_step(track: _Track, depth: float, withdraw: float, readvance: float) -> None:
    """Advance the withdraw / re-advance state machine by one insertion depth."""
    if not track.withdrawn:
        track.peak = max(track.peak, depth)
        if depth <= track.peak - withdraw:
            track.withdrawn, track.trough = True, depth
    else:
        track.trough = min(track.trough, depth)
        if depth >= track.trough + readvance:
            track.redirections += 1
            track.withdrawn, track.peak = False, depth


# -- a whole recording -----------------------------------------------------------------------

# What the scorer needs of one frame: the tip (frame pixels) or None, the labels, the spacing.
FrameAnalysis = tuple[Point | None, np.ndarray | None, SpacingMM | None]


def pipeline_analyser(
    model: str | os.PathLike[str] | None = None, **options: Any
) -> Callable[[Frame], FrameAnalysis]:
    """Segmentation and needle tracking of :class:`usguide.pipeline.Pipeline`, per frame.

    Guidance runs in manual mode (no suggested targets: the trainee's is the one that counts)
    and no overlay is drawn. ``options`` go to the pipeline (``threads``, ``engine`` ...).
    """
    from usguide.guidance import GuidanceConfig
    from usguide.pipeline import Pipeline

    pipeline = Pipeline(model, guidance=GuidanceConfig(mode="manual"), overlay=False, **options)

    def analyse(frame: Frame) -> FrameAnalysis:
        result = pipeline.process(frame)
        needle = result.needle
        tip = needle.tip_xy if needle is not None and needle.visible else None
        return tip, result.labels, result.frame.region_spacing_mm

    return analyse


def score_recording(
    frames: Iterable[Frame],
    target_xy: Point,
    *,
    target_frame: int | None = None,
    analyse: Callable[[Frame], FrameAnalysis] | None = None,
    config: ScoreConfig | None = None,
    progress: Callable[[int], None] | None = None,
) -> ApproachScore:
    """Play a recorded approach and score it against the trainee's target.

    Parameters
    ----------
    frames : iterable of Frame
        The recording, in order (a source from :func:`usguide.sources.open_source`).
    target_xy : (float, float)
        The trainee's target, frame pixels.
    target_frame : int, optional
        The frame at which the target was placed (checked against the needle's appearance).
    analyse : callable, optional
        Frame -> (tip, labels, spacing); default :func:`pipeline_analyser` with the shipped
        model.
    config : ScoreConfig, optional
        Thresholds.
    progress : callable, optional
        Called with each frame's index after it is scored.

    Returns
    -------
    ApproachScore
    """
    analyse = analyse or pipeline_analyser()
    scorer = ApproachScorer(target_xy, config=config, target_frame=target_frame)
    for frame in frames:
        tip, labels, spacing = analyse(frame)
        scorer.update(frame.index, frame.timestamp_s, tip, labels, spacing)
        if progress is not None:
            progress(frame.index)
    return scorer.result()


# -- session summary --------------------------------------------------------------------------

CSV_COLUMNS: tuple[str, ...] = (
    "attempt",
    "scored_at",
    "trainee",
    "source",
    "units",
    "reached_target",
    "time_to_target_s",
    "frames_to_target",
    "closest_nerve",
    "closest_vessel",
    "entered_nerve",
    "entered_vessel",
    "redirections",
    "final_tip_to_target",
    "target_x",
    "target_y",
    "target_before_needle",
    "needle_first_frame",
    "last_tip_frame",
    "frames",
    "tip_frames",
    "note",
)


@dataclass
class SessionSummary:
    """One training session's attempts, kept as a CSV file and a JSON file.

    Parameters
    ----------
    csv_path, json_path : path
        The two files; created on the first attempt, rewritten whole (atomically) on each.
    trainee : str
        Who is training (written with each attempt).

    Notes
    -----
    The JSON file (``{"format": "usguide-training-session", "attempts": [...]}``) is the record;
    the CSV, one row per attempt in :data:`CSV_COLUMNS` order, is rebuilt from it each time so
    the two always agree. Sources are written as safe labels (no folders, no identifiers).
    """

    csv_path: Path
    json_path: Path
    trainee: str = ""
    _identifiers: dict[str, str] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.csv_path = Path(self.csv_path)
        self.json_path = Path(self.json_path)

    def attempts(self) -> list[dict[str, Any]]:
        """The attempts recorded so far (empty when the JSON file does not exist yet)."""
        if not self.json_path.exists():
            return []
        data = json.loads(self.json_path.read_text(encoding="utf-8"))
        return list(data.get("attempts", []))

    def append(self, score: ApproachScore, *, source: str = "") -> dict[str, Any]:
        """Add an attempt; returns the row written.

        Parameters
        ----------
        score : ApproachScore
            The attempt's score.
        source : str
            The recording (a path is reduced to a safe label).
        """
        from usguide.annotation.deid import dicom_identifiers, safe_label
        from usguide.sources import is_dicom_file

        dicom = bool(source) and is_dicom_file(source)
        if dicom:
            self._identifiers.update(dicom_identifiers(source))
        attempts = self.attempts()
        d = score.to_dict()
        target = d.pop("target_xy")
        row: dict[str, Any] = {
            "attempt": len(attempts) + 1,
            "scored_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "trainee": self.trainee,
            # A DICOM file's name (a UID, an ID) is never written: a pseudonym stands for it.
            "source": safe_label(source, self._identifiers, dicom=dicom) if source else "",
            **d,
            "target_x": target[0],
            "target_y": target[1],
        }
        attempts.append(row)
        document = {
            "format": "usguide-training-session",
            "version": 1,
            "attempts": attempts,
        }
        text = json.dumps(document, indent=1, allow_nan=False) + "\n"
        _atomic_write(self.json_path, text)
        _atomic_write(self.csv_path, _csv(attempts))
        return row


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _cell(row.get(k)) for k in CSV_COLUMNS})
    return buf.getvalue()


def _cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.3f}" if math.isfinite(value) else ""
    return value


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, rename it over."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
