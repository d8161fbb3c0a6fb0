"""Segmentation accuracy: per-class Dice with bootstrap confidence intervals.

Only classes a sample labels are scored; a class it leaves unlabelled never counts as background.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from usguide.labels import CLASS_NAMES


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks of the same shape; 1.0 when both are empty."""
    p, t = int(pred.sum()), int(truth.sum())
    if p + t == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / (p + t)


def bootstrap_ci(
    values: Sequence[float],
    *,
    groups: Sequence[str] | None = None,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values``; (nan, nan) when empty.

    With ``groups`` (one per value), whole groups are resampled: near-duplicate frames of one
    scan are not independent, and resampling them one by one makes the interval too narrow.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    if groups is None:
        means = v[rng.integers(0, v.size, size=(n_resamples, v.size))].mean(axis=1)
    else:
        if len(groups) != v.size:
            raise ValueError(f"{len(groups)} groups for {v.size} values")
        _, member = np.unique(np.asarray(groups), return_inverse=True)
        sums = np.bincount(member, weights=v)
        counts = np.bincount(member).astype(np.float64)
        picks = rng.integers(0, sums.size, size=(n_resamples, sums.size))
        means = sums[picks].sum(axis=1) / counts[picks].sum(axis=1)
    tail = (1.0 - level) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(lo), float(hi)


@dataclass
class DiceTable:
    """Per-image Dice per class, accumulated over a data set.

    Dice is recorded for each image where the class is labelled and present in the truth. Where
    it is labelled but absent, the image counts toward ``false_positive_rate`` when the prediction
    marks more than ``min_false_px`` pixels of it.
    """

    class_names: tuple[str, ...] = CLASS_NAMES
    min_false_px: int = 20
    per_class: dict[str, list[float]] = field(default_factory=dict)
    absent: dict[str, list[bool]] = field(default_factory=dict)
    groups: dict[str, list[str | None]] = field(default_factory=dict)

    def add(
        self,
        pred: np.ndarray,
        truth: np.ndarray,
        labelled: Sequence[bool],
        group: str | None = None,
    ) -> None:
        """Score one label map ``pred`` against ``truth`` (both (H, W) uint8 class indices).
        ``group`` names the image's near-duplicate group: the interval resamples whole groups
        when every image of a class has one."""
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
        for c, name in enumerate(self.class_names):
            if c == 0 or not labelled[c]:
                continue
            t = truth == c
            p = pred == c
            if t.any():
                self.per_class.setdefault(name, []).append(dice(p, t))
                self.groups.setdefault(name, []).append(group)
            else:
                self.absent.setdefault(name, []).append(int(p.sum()) > self.min_false_px)

    def summary(self, *, seed: int = 0) -> dict[str, dict[str, Any]]:
        """``{class: {dice, ci95, n, false_positive_rate, n_absent}}`` for every scored class."""
        out: dict[str, dict[str, Any]] = {}
        for name in self.class_names[1:]:
            values = self.per_class.get(name, [])
            absent = self.absent.get(name, [])
            if not values and not absent:
                continue
            groups = self.groups.get(name, [])
            grouped = [g for g in groups if g is not None]
            lo, hi = bootstrap_ci(
                values, groups=grouped if len(grouped) == len(values) else None, seed=seed
            )
            out[name] = {
                "dice": float(np.mean(values)) if values else None,
                "ci95": [lo, hi] if values else None,
                "n": len(values),
                "false_positive_rate": float(np.mean(absent)) if absent else None,
                "n_absent": len(absent),
            }
        return out


def evaluate_pairs(
    segment: Any, pairs: Iterable[tuple[np.ndarray, np.ndarray, Sequence[bool]]]
) -> DiceTable:
    """Run ``segment`` (image -> label map, e.g. a :class:`~usguide.segment.Segmenter`) over
    ``(image, truth, labelled)`` triples and score it."""
    table = DiceTable()
    for image, truth, labelled in pairs:
        table.add(np.asarray(segment(image)), truth, labelled)
    return table


def format_table(summary: dict[str, dict[str, Any]]) -> str:
    """A markdown table of a :meth:`DiceTable.summary`."""
    lines = [
        "| class | Dice | 95% CI | images | false-positive rate (absent) |",
        "|---|---:|---|---:|---:|",
    ]
    for name, s in summary.items():
        d = "-" if s["dice"] is None else f"{s['dice']:.3f}"
        ci = "-" if s["ci95"] is None else f"{s['ci95'][0]:.3f}-{s['ci95'][1]:.3f}"
        fp = "-" if s["false_positive_rate"] is None else f"{s['false_positive_rate']:.2f}"
        lines.append(f"| {name} | {d} | {ci} | {s['n']} | {fp} ({s['n_absent']}) |")
    return "\n".join(lines)
