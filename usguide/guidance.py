"""Guidance: injection targets, distances and safety warnings, frame by frame.

The stage reads a frame's label map (nerve, vessel, fascia) and the needle tracker's state and
answers what the anaesthetist needs on screen:

- **targets**: perineural points just outside the nerve's outline, in the fascial plane where one
  is present, reachable from the insertion side without the straight path crossing a vessel or
  the nerve; or, in mesotherapy mode, evenly spaced points at a set depth below the skin line.
  Users add, move and delete their own. Targets follow the tissue between frames (optical flow
  on the image around them) and move at most ``max_target_step_mm`` per frame, so they never jump;
- **measures**: tip to target, tip to the nerve's edge (negative inside), tip to the nearest
  vessel, whether the projected path crosses a vessel or the nerve, and time on target;
- **warnings**: tip inside the nerve, tip near a vessel or path through one, tip lost while
  advancing, and unknown calibration (distances then in px, and the result says so);
- **injectate spread** (:mod:`usguide.spread`), armed when the tip first reaches a target.

Distances are millimetres when the frame is calibrated and pixels otherwise (``units``); a
nominal spacing is used only to size planning geometry and to turn the mm thresholds (on
target, vessel margin) into px on uncalibrated frames, never to report a distance.
"""

from __future__ import annotations

import itertools
import math
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import cv2
import numpy as np

from usguide.frame import Frame
from usguide.labels import FASCIA, NEEDLE, NERVE, VESSEL
from usguide.needle import NeedleState
from usguide.spread import InjectateSpread, SpreadConfig, SpreadState

TargetKind = Literal["perineural", "mesotherapy", "user"]
Point = tuple[float, float]

# Imaging regions smaller than this on a side (px) hold nothing to follow or plan around.
_MIN_REGION_PX = 8


@dataclass(frozen=True, slots=True)
class GuidanceConfig:
    """Settings of the guidance stage; lengths in mm, times in seconds.

    Attributes
    ----------
    mode : "perineural", "mesotherapy" or "manual"
        What the automatic targets are: beside the nerve, superficial points below the skin, or
        none (user targets only).
    target_offset_mm : float
        Distance of a perineural target outside the nerve's outline (1-2 mm is usual).
    max_targets : int
        Most automatic perineural targets suggested at once.
    insertion_side : "left", "right" or "auto"
        Side the needle enters from; "auto" takes the tracked needle's side, and while none is
        seen accepts targets reachable from either side.
    vessel_margin_mm : float
        Tip closer than this to a vessel warns; a planned path keeps this clear of vessels. On
        an uncalibrated frame the warning uses ``vessel_margin_mm / nominal_spacing_mm`` px, and
        its message gives the distance in px.
    nerve_margin_mm : float
        A planned path keeps this clear of the nerve.
    on_target_mm : float
        The tip counts as on target within this distance (``on_target_mm /
        nominal_spacing_mm`` px on an uncalibrated frame).
    path_beyond_target_mm : float
        The projected path is checked up to the target's depth plus this; to the region's edge
        when there is no target.
    max_target_step_mm : float
        Most a target moves between two frames.
    target_follow : float
        Share of the way an automatic target moves towards its re-planned place per frame.
    target_hold_s : float
        An automatic perineural target outlives its nerve's labels this long.
    min_nerve_area_mm2 : float
        Smaller nerve labels are noise, not a nerve to plan around.
    meso_depth_mm, meso_count, meso_spacing_mm : float, int, float
        Mesotherapy: depth below the skin line, number of points and their spacing.
    advancing_mm, advancing_window_s : float
        The needle was advancing when its inserted length grew by this much within the window.
    nominal_spacing_mm : float
        Spacing used on uncalibrated frames to size planning geometry and to turn the mm
        thresholds above into px (never for a reported distance).
    """

    mode: Literal["perineural", "mesotherapy", "manual"] = "perineural"
    target_offset_mm: float = 1.5
    max_targets: int = 2
    insertion_side: Literal["left", "right", "auto"] = "auto"
    vessel_margin_mm: float = 2.0
    nerve_margin_mm: float = 0.5
    on_target_mm: float = 1.0
    path_beyond_target_mm: float = 1.0
    max_target_step_mm: float = 0.5
    target_follow: float = 0.25
    target_hold_s: float = 1.0
    min_nerve_area_mm2: float = 2.0
    meso_depth_mm: float = 3.0
    meso_count: int = 5
    meso_spacing_mm: float = 5.0
    advancing_mm: float = 1.0
    advancing_window_s: float = 0.5
    nominal_spacing_mm: float = 0.1
    frame_time_s: float = 0.05
    spread: SpreadConfig = field(default_factory=SpreadConfig)

    def __post_init__(self) -> None:
        if self.mode not in ("perineural", "mesotherapy", "manual"):
            raise ValueError(f"mode must be perineural, mesotherapy or manual, got {self.mode!r}")
        if self.insertion_side not in ("left", "right", "auto"):
            raise ValueError(
                f"insertion_side must be left, right or auto, got {self.insertion_side!r}"
            )
        for name in ("target_offset_mm", "on_target_mm", "max_target_step_mm", "meso_spacing_mm"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.meso_depth_mm < 0 or self.meso_count < 1 or self.max_targets < 0:
            raise ValueError("meso_depth_mm must be >= 0, meso_count >= 1 and max_targets >= 0")
        if not 0 < self.target_follow <= 1:
            raise ValueError(f"target_follow must be in (0, 1], got {self.target_follow}")


@dataclass(frozen=True, slots=True)
class Target:
    """An injection target: ``xy`` in frame pixels; ``kind`` says who placed it."""

    id: int
    xy: Point
    kind: TargetKind

    def to_dict(self) -> dict[str, Any]:
        x, y = self.xy
        return {"id": self.id, "x": round(x, 2), "y": round(y, 2), "kind": self.kind}


@dataclass(frozen=True, slots=True)
class GuidanceWarning:
    """A safety warning: a stable ``code`` for programs and a ``message`` for people.

    Codes: ``intraneural``, ``vessel_near``, ``path_vessel``, ``path_nerve``,
    ``tip_lost_advancing``, ``calibration_unknown``.
    """

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class GuidanceResult:
    """What guidance found in one frame. Distances are in ``units`` ("mm" or "px").

    Attributes
    ----------
    frame_index : int
    units : "mm" or "px"
        "px" when the frame is not calibrated; no distance is then given in mm.
    targets : tuple of Target
    active_target : int or None
        Id of the target the needle is heading for (the nearest to the tip).
    tip_to_target, tip_to_nerve, tip_to_vessel : float or None
        Tip to the active target, to the nerve's edge (negative inside the nerve) and to the
        nearest vessel's edge (negative inside); None when the tip or the structure is not seen.
    path : ((float, float), (float, float)) or None
        The projected needle path from the tip, frame pixels.
    path_crosses_vessel, path_crosses_nerve : bool or None
        None when no path is projected.
    time_on_target_s : float
        How long the tip has stayed on the active target, seconds.
    warnings : tuple of GuidanceWarning
    spread : SpreadState or None
        Injectate spread, once the tip has reached a target.
    skin_line : ((float, float), (float, float)) or None
        Mesotherapy mode: the skin line's ends, frame pixels.
    """

    frame_index: int
    units: Literal["mm", "px"]
    targets: tuple[Target, ...]
    active_target: int | None
    tip_to_target: float | None
    tip_to_nerve: float | None
    tip_to_vessel: float | None
    path: tuple[Point, Point] | None
    path_crosses_vessel: bool | None
    path_crosses_nerve: bool | None
    time_on_target_s: float
    warnings: tuple[GuidanceWarning, ...]
    spread: SpreadState | None = None
    skin_line: tuple[Point, Point] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready values (the results log's ``guidance`` object)."""

        def r(v: float | None) -> float | None:
            return None if v is None else round(float(v), 3)

        spread = None
        if self.spread is not None:
            s = self.spread
            spread = {
                "armed": s.armed,
                "detected": s.detected,
                "area_mm2": r(s.area_mm2),
                "area_px": int(s.area_px),
                "growing": s.growing,
                "surrounds_nerve": s.surrounds_nerve,
                "nerve_coverage": r(s.nerve_coverage),
            }
        return {
            "units": self.units,
            "targets": [t.to_dict() for t in self.targets],
            "active_target": self.active_target,
            "distances": {
                "tip_to_target": r(self.tip_to_target),
                "tip_to_nerve": r(self.tip_to_nerve),
                "tip_to_vessel": r(self.tip_to_vessel),
            },
            "path_crosses_vessel": self.path_crosses_vessel,
            "path_crosses_nerve": self.path_crosses_nerve,
            "time_on_target_s": round(self.time_on_target_s, 3),
            "warnings": [{"code": w.code, "message": w.message} for w in self.warnings],
            "spread": spread,
        }


class Guidance:
    """The guidance stage: configured once, called with each frame, its labels and the needle.

    Parameters
    ----------
    config : GuidanceConfig, optional
    targets : sequence of (x, y), optional
        User targets to start with, frame pixels.

    Examples
    --------
    >>> guidance = Guidance(GuidanceConfig(target_offset_mm=2.0))  # doctest: +SKIP
    >>> result = guidance(frame, labels, needle_state)              # doctest: +SKIP
    >>> guidance.add_target((320.0, 240.0))                         # doctest: +SKIP
    """

    def __init__(self, config: GuidanceConfig | None = None, targets: tuple[Point, ...] = ()):
        self.config = config or GuidanceConfig()
        self.spread = InjectateSpread(self.config.spread)
        self._ids = itertools.count(1)
        self._targets: dict[int, Target] = {}
        for xy in targets:
            self.add_target(xy)
        self.reset()

    # -- user targets ------------------------------------------------------------------------
    @property
    def targets(self) -> tuple[Target, ...]:
        return tuple(self._targets.values())

    def add_target(self, xy: Point) -> int:
        """Add a user target at ``xy`` (frame pixels); returns its id."""
        target = Target(next(self._ids), (float(xy[0]), float(xy[1])), "user")
        self._targets[target.id] = target
        return target.id

    def move_target(self, target_id: int, xy: Point) -> None:
        """Move a target (any kind) to ``xy``; a moved automatic target becomes the user's."""
        if target_id not in self._targets:
            raise KeyError(f"no target {target_id}")
        self._targets[target_id] = Target(target_id, (float(xy[0]), float(xy[1])), "user")

    def delete_target(self, target_id: int) -> None:
        """Delete a target; a deleted automatic target is not suggested again at that place
        until the anatomy is lost."""
        target = self._targets.pop(target_id, None)
        if target is None:
            raise KeyError(f"no target {target_id}")
        if target.kind == "perineural":
            self._declined += 1

    def reset(self) -> None:
        """Forget the sequence (another cine, a seek); user targets stay."""
        self._targets = {k: t for k, t in self._targets.items() if t.kind == "user"}
        self._previous_half: np.ndarray | None = None
        self._previous_box: tuple[int, int, int, int] | None = None
        self._nerve_seen_at = -math.inf
        self._active: int | None = None
        self._on_target_since: float | None = None
        self._lengths: deque[tuple[float, float]] = deque()
        self._was_visible = False
        self._lost_advancing = False
        self._declined = 0
        self._vessel_at_arming: np.ndarray | None = None
        self.spread.reset()

    # -- per frame ---------------------------------------------------------------------------
    def __call__(
        self, frame: Frame, labels: np.ndarray | None, needle: NeedleState | None
    ) -> GuidanceResult:
        cfg = self.config
        t = frame.timestamp_s if frame.timestamp_s is not None else frame.index * cfg.frame_time_s
        spacing = frame.region_spacing_mm
        units: Literal["mm", "px"] = "mm" if spacing else "px"
        plan_spacing = spacing or (cfg.nominal_spacing_mm, cfg.nominal_spacing_mm)
        x0, y0, x1, y1 = frame.region.bbox
        crop = (slice(y0, y1 + 1), slice(x0, x1 + 1))
        grey = _grey(frame.pixels[crop])
        region_labels = labels[crop] if labels is not None else None

        tip = needle.tip_xy if needle is not None and needle.visible else None
        spread = None
        if self.spread.armed:
            spread_tip = tip if tip is not None else self.spread.anchor_xy
            spread = self.spread(frame, labels, spread_tip)
            if spread.detected and region_labels is not None:
                # The pocket that grew around the tip after it reached the target is injectate,
                # however vessel-like (anechoic) the model finds it; a vessel labelled before
                # the injection stays a vessel.
                pocket = self.spread.mask[crop]
                if pocket.shape == region_labels.shape:
                    region_labels = _without_injectate_vessels(
                        region_labels,
                        pocket,
                        self._vessel_at_arming,
                        spread.shift_xy,
                        plan_spacing,
                        slack_mm=cfg.spread.motion_tolerance_mm,
                    )

        self._follow_tissue(grey, (x0, y0), region_labels, plan_spacing)
        skin_line = None
        # Automatic targets are re-planned until an injection starts; then they only follow
        # the tissue, so the target does not wander while the injectate reshapes the labels.
        if region_labels is not None and cfg.mode == "perineural" and not self.spread.armed:
            self._plan_perineural(region_labels, (x0, y0), plan_spacing, needle, t)
        elif cfg.mode == "mesotherapy":
            skin_line = self._plan_mesotherapy(grey, (x0, y0), plan_spacing)

        warnings: list[GuidanceWarning] = []
        if spacing is None:
            warnings.append(
                GuidanceWarning("calibration_unknown", "calibration unknown: distances in px")
            )
        scale = (spacing[1], spacing[0]) if spacing else (1.0, 1.0)  # (x, y) units per px
        unit = units

        def threshold(mm: float) -> float:
            # A threshold in the result's units: px through the nominal spacing when the frame
            # is uncalibrated (decides a warning; the distances shown stay in px).
            return mm if spacing else mm / cfg.nominal_spacing_mm

        # Active target: the one nearest the tip; kept while the tip is not seen.
        if tip is not None and self._targets:
            self._active = min(
                self._targets, key=lambda k: scaled_distance(self._targets[k].xy, tip, scale)
            )
        elif self._active not in self._targets:
            self._active = next(iter(self._targets), None)
        target = self._targets.get(self._active) if self._active is not None else None

        tip_to_target = tip_to_nerve = tip_to_vessel = None
        path = None
        crosses_vessel = crosses_nerve = None
        if tip is not None:
            if target is not None:
                tip_to_target = scaled_distance(target.xy, tip, scale)
            if region_labels is not None:
                local = (tip[0] - x0, tip[1] - y0)
                tip_to_nerve = signed_edge_distance(region_labels, NERVE, local, scale)
                tip_to_vessel = signed_edge_distance(region_labels, VESSEL, local, scale)
                if tip_to_nerve is not None and tip_to_nerve < 0:
                    warnings.append(
                        GuidanceWarning("intraneural", "tip inside the nerve: intraneural risk")
                    )
                # Inside (negative) or within the margin.
                near = max(0.0, threshold(cfg.vessel_margin_mm))
                if tip_to_vessel is not None and tip_to_vessel < near:
                    where = "inside" if tip_to_vessel < 0 else f"{tip_to_vessel:.1f} {unit} from"
                    warnings.append(GuidanceWarning("vessel_near", f"tip {where} a vessel"))
            if needle is not None and needle.entry_xy is not None:
                path = self._project_path(needle.entry_xy, tip, target, frame, plan_spacing)
                if path is not None and region_labels is not None:
                    crossed = _labels_on_segment(region_labels, path, (x0, y0))
                    crosses_vessel = VESSEL in crossed
                    crosses_nerve = NERVE in crossed
                    if crosses_vessel:
                        warnings.append(
                            GuidanceWarning("path_vessel", "projected path crosses a vessel")
                        )
                    if crosses_nerve:
                        warnings.append(
                            GuidanceWarning("path_nerve", "projected path crosses the nerve")
                        )

        # Time on target: continuous dwell within on_target of the active target.
        on_target = tip_to_target is not None and tip_to_target <= threshold(cfg.on_target_mm)
        if on_target:
            if self._on_target_since is None:
                self._on_target_since = t
                if not self.spread.armed:
                    self.spread.arm(frame, tip)
                    # Vessels seen before any fluid: never taken for injectate later.
                    self._vessel_at_arming = None
                    if region_labels is not None:
                        vessel = (region_labels == VESSEL).view(np.uint8)
                        self._vessel_at_arming = vessel if vessel.any() else None
        else:
            self._on_target_since = None
        time_on_target = t - self._on_target_since if self._on_target_since is not None else 0.0

        if self._tip_lost_while_advancing(needle, t):
            warnings.append(
                GuidanceWarning("tip_lost_advancing", "tip lost while the needle was advancing")
            )

        if spread is None and self.spread.armed:  # armed on this frame
            spread = self.spread(frame, labels, tip)

        return GuidanceResult(
            frame_index=frame.index,
            units=units,
            targets=self.targets,
            active_target=self._active if target is not None else None,
            tip_to_target=tip_to_target,
            tip_to_nerve=tip_to_nerve,
            tip_to_vessel=tip_to_vessel,
            path=path,
            path_crosses_vessel=crosses_vessel,
            path_crosses_nerve=crosses_nerve,
            time_on_target_s=float(time_on_target),
            warnings=tuple(warnings),
            spread=spread,
            skin_line=skin_line,
        )

    # -- targets follow the tissue -----------------------------------------------------------
    def _follow_tissue(
        self,
        grey: np.ndarray,
        origin: tuple[int, int],
        region_labels: np.ndarray | None,
        spacing: tuple[float, float],
    ) -> None:
        """Move every target with the image around it (pyramidal Lucas-Kanade on a small grid
        of points, median of the points that track forward and back and are not on the needle),
        so targets stay on the same tissue under probe motion. A region under
        ``_MIN_REGION_PX`` on a side holds no tissue to follow: targets stay where they are."""
        box = (origin[0], origin[1], grey.shape[1], grey.shape[0])
        if min(grey.shape) < _MIN_REGION_PX:
            self._previous_half, self._previous_box = None, None
            return
        # Half resolution is plenty for tissue motion and costs a quarter.
        half = cv2.resize(
            grey, (grey.shape[1] // 2, grey.shape[0] // 2), interpolation=cv2.INTER_AREA
        )
        previous, self._previous_half = self._previous_half, half
        changed = self._previous_box != box
        self._previous_box = box
        if previous is None or changed or not self._targets:
            return
        radius = max(3.0, 2.0 / spacing[1])  # ~2 mm grid around each target
        offsets = np.array(
            [(dx, dy) for dx in (-radius, 0, radius) for dy in (-radius, 0, radius)], np.float32
        )
        ids = list(self._targets)
        centres = np.array(
            [(self._targets[k].xy[0] - origin[0], self._targets[k].xy[1] - origin[1]) for k in ids],
            np.float32,
        )
        points = (centres[:, None, :] + offsets[None]).reshape(-1, 1, 2)
        params = {
            "winSize": (15, 15),
            "maxLevel": 2,
            "criteria": (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 20, 0.03),
        }
        # Only the neighbourhood of the targets is tracked: a crop of both half-size images.
        small = points / 2.0
        hh, hw = half.shape
        reach = 15 * 4 + 8  # window times the pyramid's reach, plus the motion allowed
        cx0 = int(np.clip(small[:, 0, 0].min() - reach, 0, hw - 1))
        cy0 = int(np.clip(small[:, 0, 1].min() - reach, 0, hh - 1))
        cx1 = int(np.clip(small[:, 0, 0].max() + reach, cx0 + 1, hw))
        cy1 = int(np.clip(small[:, 0, 1].max() + reach, cy0 + 1, hh))
        a, b = previous[cy0:cy1, cx0:cx1], half[cy0:cy1, cx0:cx1]
        small = small - np.array([cx0, cy0], np.float32)
        forward, ok, _ = cv2.calcOpticalFlowPyrLK(a, b, small, None, **params)
        back, ok_back, _ = cv2.calcOpticalFlowPyrLK(b, a, forward, None, **params)
        shift = np.array([cx0, cy0], np.float32)
        forward, back = (forward + shift) * 2.0, (back + shift) * 2.0
        good = (ok[:, 0] == 1) & (ok_back[:, 0] == 1)
        good &= np.linalg.norm((back - points)[:, 0], axis=1) < 0.5
        if region_labels is not None:
            # A point on the needle moves with the needle, not the tissue.
            h, w = region_labels.shape
            px = np.clip(np.round(points[:, 0, 0]).astype(int), 0, w - 1)
            py = np.clip(np.round(points[:, 0, 1]).astype(int), 0, h - 1)
            good &= region_labels[py, px] != NEEDLE
        motion = (forward - points)[:, 0].reshape(len(ids), len(offsets), 2)
        good = good.reshape(len(ids), len(offsets))
        for k, moves, keep in zip(ids, motion, good, strict=True):
            if keep.sum() < 3:
                continue
            median = np.median(moves[keep], axis=0)
            dx, dy = capped_step(
                float(median[0]), float(median[1]), self.config.max_target_step_mm, spacing
            )
            t = self._targets[k]
            self._targets[k] = replace(t, xy=(t.xy[0] + float(dx), t.xy[1] + float(dy)))

    # -- perineural planning -----------------------------------------------------------------
    def _plan_perineural(
        self,
        region_labels: np.ndarray,
        origin: tuple[int, int],
        spacing: tuple[float, float],
        needle: NeedleState | None,
        t: float,
    ) -> None:
        cfg = self.config
        sides: tuple[str, ...]
        if cfg.insertion_side != "auto":
            sides = (cfg.insertion_side,)
        elif needle is not None and needle.side is not None:
            sides = (needle.side,)
        else:
            sides = ("left", "right")
        entry = None
        if needle is not None and needle.visible and needle.entry_xy is not None:
            entry = (needle.entry_xy[0] - origin[0], needle.entry_xy[1] - origin[1])
        candidates = plan_perineural_targets(
            region_labels,
            spacing,
            offset_mm=cfg.target_offset_mm,
            vessel_margin_mm=cfg.vessel_margin_mm,
            nerve_margin_mm=cfg.nerve_margin_mm,
            min_nerve_area_mm2=cfg.min_nerve_area_mm2,
            sides=sides,
            entry_xy=entry,
            count=cfg.max_targets,
        )
        auto = [k for k, v in self._targets.items() if v.kind == "perineural"]
        if not candidates:
            if t - self._nerve_seen_at > cfg.target_hold_s:
                for k in auto:
                    del self._targets[k]
                self._declined = 0
            return
        self._nerve_seen_at = t
        planned = [(c[0] + origin[0], c[1] + origin[1]) for c in candidates]
        # Each existing automatic target moves a share of the way towards the nearest planned
        # place, capped per frame: it follows the anatomy and never jumps.
        unused = list(planned)
        for k in auto:
            if not unused:
                del self._targets[k]
                continue
            xy = self._targets[k].xy
            j = min(range(len(unused)), key=lambda i: math.dist(unused[i], xy))
            goal = unused.pop(j)
            dx, dy = (goal[0] - xy[0]) * cfg.target_follow, (goal[1] - xy[1]) * cfg.target_follow
            dx, dy = capped_step(dx, dy, cfg.max_target_step_mm, spacing)
            self._targets[k] = replace(self._targets[k], xy=(xy[0] + dx, xy[1] + dy))
        missing = cfg.max_targets - len(auto) - self._declined
        for xy in unused[: max(0, missing)]:
            target = Target(next(self._ids), (float(xy[0]), float(xy[1])), "perineural")
            self._targets[target.id] = target

    # -- mesotherapy -------------------------------------------------------------------------
    def _plan_mesotherapy(
        self, grey: np.ndarray, origin: tuple[int, int], spacing: tuple[float, float]
    ) -> tuple[Point, Point] | None:
        cfg = self.config
        line = find_skin_line(grey)
        auto = [k for k, v in self._targets.items() if v.kind == "mesotherapy"]
        if line is None:
            return None
        h, w = grey.shape
        depth_px = cfg.meso_depth_mm / spacing[0]
        step = cfg.meso_spacing_mm / spacing[1]
        xs = w / 2 + (np.arange(cfg.meso_count) - (cfg.meso_count - 1) / 2) * step
        xs = xs[(xs >= 0) & (xs <= w - 1)]
        planned = [
            (float(x + origin[0]), float(np.polyval(line, x) + depth_px + origin[1])) for x in xs
        ]
        planned = [p for p in planned if p[1] <= origin[1] + h - 1]
        if len(auto) != len(planned):
            for k in auto:
                del self._targets[k]
            for xy in planned:
                target = Target(next(self._ids), xy, "mesotherapy")
                self._targets[target.id] = target
        else:
            for k, goal in zip(auto, planned, strict=True):
                xy = self._targets[k].xy
                dx, dy = capped_step(
                    goal[0] - xy[0], goal[1] - xy[1], cfg.max_target_step_mm, spacing
                )
                self._targets[k] = replace(self._targets[k], xy=(xy[0] + dx, xy[1] + dy))
        ends = (0.0, float(w - 1))
        return (
            (ends[0] + origin[0], float(np.polyval(line, ends[0])) + origin[1]),
            (ends[1] + origin[0], float(np.polyval(line, ends[1])) + origin[1]),
        )

    # -- path and advancing ------------------------------------------------------------------
    def _project_path(
        self,
        entry: Point,
        tip: Point,
        target: Target | None,
        frame: Frame,
        spacing: tuple[float, float],
    ) -> tuple[Point, Point] | None:
        dx, dy = tip[0] - entry[0], tip[1] - entry[1]
        norm = math.hypot(dx, dy)
        if norm < 1e-6:
            return None
        ux, uy = dx / norm, dy / norm
        x0, y0, x1, y1 = frame.region.bbox
        # Distance to the region's edge along the shaft, in px.
        limits = []
        for p, u, lo, hi in ((tip[0], ux, x0, x1), (tip[1], uy, y0, y1)):
            if abs(u) > 1e-9:
                limits.append(((hi if u > 0 else lo) - p) / u)
        reach = max(0.0, min(limits)) if limits else 0.0
        if target is not None:
            along = (target.xy[0] - tip[0]) * ux + (target.xy[1] - tip[1]) * uy
            mm_per_px = math.hypot(ux * spacing[1], uy * spacing[0])  # along the shaft
            reach = min(reach, max(0.0, along) + self.config.path_beyond_target_mm / mm_per_px)
        if reach < 1.0:
            return None
        return (tip, (tip[0] + ux * reach, tip[1] + uy * reach))

    def _tip_lost_while_advancing(self, needle: NeedleState | None, t: float) -> bool:
        """True from the frame the tip is lost, after its inserted length grew by
        ``advancing_mm`` within ``advancing_window_s``, until it is seen again."""
        cfg = self.config
        if needle is not None and needle.visible and needle.inserted_length_px is not None:
            length_mm = needle.inserted_length_mm
            if length_mm is None:  # only to decide "advancing", never reported
                length_mm = needle.inserted_length_px * cfg.nominal_spacing_mm
            self._lengths.append((t, length_mm))
            while self._lengths and t - self._lengths[0][0] > cfg.advancing_window_s:
                self._lengths.popleft()
            self._lost_advancing = False
            self._was_visible = True
        elif self._was_visible:
            grown = self._lengths[-1][1] - self._lengths[0][1] if self._lengths else 0.0
            self._lost_advancing = grown >= cfg.advancing_mm
            self._lengths.clear()
            self._was_visible = False
        return self._lost_advancing


# -- plain array functions -------------------------------------------------------------------


def _grey(pixels: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(pixels, cv2.COLOR_RGB2GRAY) if pixels.ndim == 3 else pixels


def scaled_distance(a: Point, b: Point, scale: tuple[float, float]) -> float:
    """Distance between two points in pixels, in the units of ``scale`` ((x, y) per pixel)."""
    return math.hypot((a[0] - b[0]) * scale[0], (a[1] - b[1]) * scale[1])


def capped_step(
    dx: float, dy: float, max_mm: float, spacing_mm: tuple[float, float]
) -> tuple[float, float]:
    """The move ``(dx, dy)`` (px) shortened, direction kept, to at most ``max_mm`` of physical
    length at ``spacing_mm`` ((row, col) mm per px: a vertical px may be longer than a
    horizontal one)."""
    length_mm = math.hypot(dx * spacing_mm[1], dy * spacing_mm[0])
    if length_mm <= max_mm:
        return dx, dy
    shrink = max_mm / length_mm
    return dx * shrink, dy * shrink


def signed_edge_distance(
    labels: np.ndarray, cls: int, xy: Point, scale: tuple[float, float]
) -> float | None:
    """Distance from ``xy`` (region pixels) to the nearest outline of class ``cls``, in the
    units of ``scale``; None when the class is absent.

    Inside is decided by the label of the pixel under ``xy``, and an inside distance is strictly
    negative: the edge lies at least half a pixel beyond the centre of an outline pixel, so a tip
    on the outline (every pixel of a one-pixel region) reads ``-0.5`` px, never ``-0.0``."""
    mask = (labels == cls).view(np.uint8)
    contours, _ = cv2.findContours(mask, cv2.RETR_LIST, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return None
    points = np.concatenate([c[:, 0, :] for c in contours]).astype(np.float64)
    d = float(np.hypot((points[:, 0] - xy[0]) * scale[0], (points[:, 1] - xy[1]) * scale[1]).min())
    h, w = labels.shape
    c, r = round(xy[0]), round(xy[1])
    inside = 0 <= r < h and 0 <= c < w and labels[r, c] == cls
    return -(d + 0.5 * min(scale)) if inside else d


def _without_injectate_vessels(
    labels: np.ndarray,
    pocket: np.ndarray,
    vessel_at_arming: np.ndarray | None,
    shift_xy: Point,
    spacing: tuple[float, float],
    *,
    slack_mm: float = 0.3,
) -> np.ndarray:
    """A copy of ``labels`` without the vessel labels the injectate pocket explains.

    In every vessel region that overlaps the pocket, the pixels that were not vessel when the
    spread stage was armed are background. ``vessel_at_arming`` (uint8, nonzero on a vessel;
    None when none was labelled) is moved by the probe's ``shift_xy`` (px) since, and grown by
    ``slack_mm`` (at least a pixel) for residual motion and label jitter. A vessel that does not
    touch the pocket, or that was labelled before the injection, stays; one that first appears
    where it touches the pocket cannot be told from injectate.
    """
    vessel = (labels == VESSEL).view(np.uint8)
    n, components = cv2.connectedComponents(vessel, connectivity=8)
    if n <= 1:
        return labels
    touched = np.unique(components[pocket])
    touched = touched[touched > 0]
    if not len(touched):
        return labels
    explained = np.isin(components, touched)
    if vessel_at_arming is not None and vessel_at_arming.shape == labels.shape:
        h, w = labels.shape
        move = np.float32([[1, 0, shift_xy[0]], [0, 1, shift_xy[1]]])
        before = cv2.warpAffine(vessel_at_arming, move, (w, h), flags=cv2.INTER_NEAREST)
        rx, ry = max(1, round(slack_mm / spacing[1])), max(1, round(slack_mm / spacing[0]))
        before = cv2.dilate(
            before, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * rx + 1, 2 * ry + 1))
        )
        explained &= before == 0
    if not explained.any():
        return labels
    out = labels.copy()
    out[explained] = 0
    return out


def _labels_on_segment(labels: np.ndarray, segment: tuple[Point, Point], origin: Point) -> set[int]:
    """Classes under the straight segment (frame pixels) on the region's label map."""
    (ax, ay), (bx, by) = segment
    n = max(2, int(math.hypot(bx - ax, by - ay)) + 1)
    xs = np.linspace(ax - origin[0], bx - origin[0], n).round().astype(int)
    ys = np.linspace(ay - origin[1], by - origin[1], n).round().astype(int)
    h, w = labels.shape
    inside = (xs >= 0) & (xs < w) & (ys >= 0) & (ys < h)
    return {int(v) for v in np.unique(labels[ys[inside], xs[inside]])}


def plan_perineural_targets(
    labels: np.ndarray,
    spacing_mm: tuple[float, float],
    *,
    offset_mm: float = 1.5,
    vessel_margin_mm: float = 2.0,
    nerve_margin_mm: float = 0.5,
    min_nerve_area_mm2: float = 2.0,
    sides: tuple[str, ...] = ("left", "right"),
    entry_xy: Point | None = None,
    count: int = 2,
    work_mm: float = 0.2,
) -> list[Point]:
    """Perineural target points around the largest nerve, best first.

    Parameters
    ----------
    labels : (H, W) uint8
        Label map of the imaging region.
    spacing_mm : (row, col) mm per pixel
    offset_mm : float
        Distance outside the nerve's outline.
    sides : tuple of "left"/"right"
        Sides the needle may come from: its entry is the region's top corner on that side,
        unless ``entry_xy`` (region pixels) gives the actual entry.
    count : int
        Most points returned; they lie at least 3 mm apart.
    work_mm : float
        Planning grid: labels are sampled to square pixels about this size (never finer than
        their own pixels along the coarser axis), which keeps planning well under a millisecond
        and every distance, margin and area physical when rows and columns differ in spacing.

    Returns
    -------
    list of (x, y) in region pixels. A point qualifies when it lies ``offset_mm`` outside the
    nerve, not within ``vessel_margin_mm`` of a vessel, and a straight path from the entry
    reaches it at 10-75 degrees to the surface keeping clear of vessels (``vessel_margin_mm``) and
    the nerve (``nerve_margin_mm``). Points in the fascial plane (fascia within 1 mm) rank first,
    then points facing the entry, then shorter paths.
    """
    if count <= 0 or min(labels.shape) < _MIN_REGION_PX:
        return []
    row_mm, col_mm = spacing_mm
    # Square coarse pixels of cmm mm, so distance maps and dilations are physical: the coarser
    # axis is sampled every f px, the finer one at the matching (maybe fractional) step.
    cell = max(row_mm, col_mm)
    f = max(1, int(work_mm / cell))  # sampling step along the coarser axis, px
    cmm = cell * f  # mm per coarse pixel, both axes
    # px per coarse pixel; exactly f along the coarser axis (both when the pixels are square)
    step_x = float(f) if col_mm == cell else cmm / col_mm
    step_y = float(f) if row_mm == cell else cmm / row_mm
    # Coarse index -> the px index it samples (nearest, at the middle of its step).
    col_at = np.floor(np.arange(math.ceil(labels.shape[1] / step_x)) * step_x + step_x / 2)
    row_at = np.floor(np.arange(math.ceil(labels.shape[0] / step_y)) * step_y + step_y / 2)
    col_at = col_at[col_at < labels.shape[1]].astype(np.intp)
    row_at = row_at[row_at < labels.shape[0]].astype(np.intp)
    # Square pixels (the usual case) take a strided view, no copy.
    square = row_mm == col_mm
    coarse = labels[f // 2 :: f, f // 2 :: f] if square else labels[np.ix_(row_at, col_at)]
    if min(coarse.shape) < 3:  # too small to hold a nerve and the ring around it
        return []
    # Whole-grid work is limited to cheap comparisons and bounding boxes; distance maps are
    # computed only around the nerve, and margins are dilations where a class is present.
    nerve = cv2.compare(coarse, NERVE, cv2.CMP_EQ)
    nx, ny, nw, nh = cv2.boundingRect(nerve)
    if nw == 0:
        return []
    n, components, stats, centroids = cv2.connectedComponentsWithStats(
        nerve[ny : ny + nh, nx : nx + nw], connectivity=8
    )
    if n <= 1:
        return []
    biggest = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    if stats[biggest, cv2.CC_STAT_AREA] * cmm * cmm < min_nerve_area_mm2:
        return []
    # Around this nerve, far enough to hold the offset ring and the fascia 1 mm beyond it.
    pad = math.ceil((offset_mm + 1.0) / cmm) + 2
    bx, by, bw, bh = stats[biggest, :4]
    h, w = coarse.shape
    cx0, cy0 = max(0, nx + bx - pad), max(0, ny + by - pad)
    cx1, cy1 = min(w, nx + bx + bw + pad), min(h, ny + by + bh + pad)
    outside = np.ones((cy1 - cy0, cx1 - cx0), np.uint8)
    ox, oy = nx + bx - cx0, ny + by - cy0  # this nerve's box inside the crop
    comp = components[by : by + bh, bx : bx + bw] == biggest
    outside[oy : oy + bh, ox : ox + bw][comp] = 0
    to_this = cv2.distanceTransform(outside, cv2.DIST_L2, 5)
    ring = (to_this <= offset_mm / cmm).view(np.uint8)
    contours, _ = cv2.findContours(ring, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    if not contours:
        return []
    points = max(contours, key=len)[:, 0, :] + np.array([cx0, cy0])
    points = points[:: max(1, round(0.5 / cmm))]  # every ~0.5 mm
    px, py = points[:, 0], points[:, 1]
    near_vessel = _near(coarse, VESSEL, vessel_margin_mm / cmm)
    keep = coarse[py, px] != NERVE
    if near_vessel is not None:
        keep &= near_vessel[py, px] == 0
    points = points[keep].astype(np.float64)
    if not len(points):
        return []
    fascia = cv2.compare(coarse[cy0:cy1, cx0:cx1], FASCIA, cv2.CMP_NE)
    to_fascia = cv2.distanceTransform(fascia, cv2.DIST_L2, 5)
    in_plane = (
        to_fascia[points[:, 1].astype(int) - cy0, points[:, 0].astype(int) - cx0] * cmm <= 1.0
    )
    near_nerve = _near(coarse, NERVE, nerve_margin_mm / cmm)
    centroid = centroids[biggest] + (nx, ny)

    if entry_xy is not None:
        entries = np.array(
            [[(entry_xy[0] - col_at[0]) / step_x, (entry_xy[1] - row_at[0]) / step_y]]
        )
    else:
        corners = {"left": [0.0, 0.0], "right": [w - 1.0, 0.0]}
        entries = np.array([corners[side] for side in sides])
    # Every (candidate, entry) path sampled at once: K points from entry to candidate, looked
    # up in one map of what a path must keep clear of (1: near a vessel, 2: near the nerve).
    assert near_nerve is not None  # the nerve is present
    blocked = np.where(near_nerve != 0, np.uint8(2), np.uint8(0))
    if near_vessel is not None:
        blocked[near_vessel != 0] |= 1
    k = 96
    s = np.linspace(0.0, 1.0, k, dtype=np.float32)
    a = entries.astype(np.float32)[None, :, None, :]  # (1, E, 1, 2)
    b = points.astype(np.float32)[:, None, None, :]  # (N, 1, 1, 2)
    path = a + (b - a) * s[None, None, :, None]  # (N, E, K, 2)
    xs = np.clip(np.rint(path[..., 0]), 0, w - 1).astype(np.intp)
    ys = np.clip(np.rint(path[..., 1]), 0, h - 1).astype(np.intp)
    on_path = blocked.ravel().take(ys * w + xs)  # (N, E, K)
    vessel_clear = ~(on_path & 1).any(axis=2)
    # The last stretch comes within offset_mm of the nerve by design: check it up to there.
    delta = (b - a)[:, :, 0, :].astype(np.float64) * cmm
    length_mm = np.hypot(delta[..., 0], delta[..., 1])  # (N, E)
    along_mm = s[None, None, :] * length_mm[..., None]
    near_end = along_mm > (length_mm - offset_mm - 0.5)[..., None]
    nerve_clear = ~((on_path & 2).astype(bool) & ~near_end).any(axis=2)
    angle = np.degrees(np.arctan2(delta[..., 1], np.abs(delta[..., 0])))
    ok = vessel_clear & nerve_clear & (angle >= 10.0) & (angle <= 75.0)
    centre = centroid
    to_entry = entries - centre  # (E, 2)
    to_point = points - centre  # (N, 2)
    facing = (to_point @ to_entry.T) / (
        np.linalg.norm(to_point, axis=1)[:, None] * np.linalg.norm(to_entry, axis=1)[None] + 1e-9
    )
    score = 2.0 * in_plane[:, None] + facing - 0.01 * length_mm
    score = np.where(ok, score, -np.inf).max(axis=1)
    order = np.argsort(-score)
    chosen: list[Point] = []
    for i in order:
        if not np.isfinite(score[i]):
            break
        p = (float(col_at[int(points[i, 0])]), float(row_at[int(points[i, 1])]))
        if all(scaled_distance(p, q, (col_mm, row_mm)) >= 3.0 for q in chosen):
            chosen.append(p)
        if len(chosen) == count:
            break
    return chosen


def _near(coarse: np.ndarray, label: int, radius_px: float) -> np.ndarray | None:
    """Where ``coarse`` lies within ``radius_px`` of class ``label`` (uint8, nonzero there), or
    None when the class is absent. Only the class's bounding box (grown by the radius) is
    dilated."""
    mask = cv2.compare(coarse, label, cv2.CMP_EQ)
    x, y, w, h = cv2.boundingRect(mask)
    if w == 0:
        return None
    r = max(0, math.ceil(radius_px - 0.5))
    if r == 0:
        return mask
    disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    rows, cols = coarse.shape
    x0, y0 = max(0, x - r), max(0, y - r)
    x1, y1 = min(cols, x + w + r), min(rows, y + h + r)
    mask[y0:y1, x0:x1] = cv2.dilate(mask[y0:y1, x0:x1], disc)
    return mask


def find_skin_line(grey: np.ndarray, *, step: int = 8) -> np.ndarray | None:
    """The skin line of an imaging region: coefficients of ``y = f(x)`` (a quadratic in region
    pixels, ``np.polyval`` order), or None when no clear first echo is found.

    Per column (every ``step`` px) the skin is the first row where the smoothed brightness
    reaches half the brightest level (99th percentile) of the upper third of the image; a
    robust quadratic fit over the columns ignores columns that disagree (shadows, gel, text).
    """
    h, w = grey.shape
    if h < 16 or w < 16:
        return None
    small = cv2.GaussianBlur(grey[:, ::step].astype(np.float32), (1, 7), 0)
    upper = small[: max(8, h // 3)]
    bright = float(np.percentile(upper, 99))
    dark = float(np.percentile(upper, 5))
    if bright - dark < 25:
        return None
    level = dark + 0.5 * (bright - dark)
    above = small >= level
    first = np.where(above.any(axis=0), above.argmax(axis=0), -1)
    xs = np.arange(small.shape[1]) * step
    ok = first >= 0
    if ok.sum() < max(4, small.shape[1] // 3):
        return None
    x, y = xs[ok].astype(np.float64), first[ok].astype(np.float64)
    med = np.median(y)
    mad = np.median(np.abs(y - med)) + 2.0
    inliers = np.abs(y - med) <= 4 * mad
    if inliers.sum() < 4:
        return None
    coeffs = np.polyfit(x[inliers], y[inliers], 2 if inliers.sum() >= 8 else 1)
    residual = np.abs(np.polyval(coeffs, x) - y)
    inliers = residual <= max(3.0, 3 * np.median(residual[inliers]))
    if inliers.sum() >= 4:
        coeffs = np.polyfit(x[inliers], y[inliers], 2 if inliers.sum() >= 8 else 1)
    return coeffs
