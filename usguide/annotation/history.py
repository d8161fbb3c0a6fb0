"""A bounded undo/redo stack for label maps.

A step (one user action: a pre-annotation, a propagation over several frames, an edit) is kept as
the *changed rectangle* of each label map it touched, before and after, so a brush stroke costs
a few kilobytes rather than a full frame. The stack forgets its oldest steps when it holds more
than ``max_bytes`` or ``max_steps``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection, Hashable, Mapping, MutableMapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["ArrayChange", "History", "diff"]


@dataclass(frozen=True, eq=False)
class ArrayChange:
    """The changed rectangle of one array: where, what it held, what it holds now."""

    key: Hashable
    rows: slice
    cols: slice
    before: np.ndarray
    after: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.before.nbytes + self.after.nbytes)


def diff(key: Hashable, before: np.ndarray, after: np.ndarray) -> ArrayChange | None:
    """The change from ``before`` to ``after`` (same shape), or None when they are equal.

    Parameters
    ----------
    key : hashable
        Which array (for example a frame's key).
    before, after : numpy.ndarray
        ``(H, W)`` arrays; copies of their differing bounding box are kept.
    """
    if before.shape != after.shape:
        raise ValueError(f"shapes differ: {before.shape} and {after.shape}")
    changed = before != after
    if not changed.any():
        return None
    rows = np.flatnonzero(changed.any(axis=1))
    cols = np.flatnonzero(changed.any(axis=0))
    r, c = slice(int(rows[0]), int(rows[-1]) + 1), slice(int(cols[0]), int(cols[-1]) + 1)
    return ArrayChange(key, r, c, before[r, c].copy(), after[r, c].copy())


@dataclass(frozen=True, eq=False)
class _Step:
    label: str
    changes: tuple[ArrayChange, ...]

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in self.changes)


class History:
    """Undo and redo of label-map changes, within a memory budget.

    Parameters
    ----------
    max_bytes : int
        Most bytes of stored rectangles (undo and redo together). Default 256 MiB.
    max_steps : int
        Most undo steps kept. Default 100.

    Notes
    -----
    A new step clears the redo side, as in every editor. A single step larger than the budget
    is not kept (it cannot be undone) and the stack is emptied, so no older step is undone on top
    of a state it does not belong to.
    """

    def __init__(self, max_bytes: int = 256 * 2**20, max_steps: int = 100) -> None:
        if max_bytes <= 0 or max_steps <= 0:
            raise ValueError("max_bytes and max_steps must be > 0")
        self.max_bytes = max_bytes
        self.max_steps = max_steps
        self._undo: deque[_Step] = deque()
        self._redo: list[_Step] = []

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored rectangles."""
        return sum(s.nbytes for s in self._undo) + sum(s.nbytes for s in self._redo)

    @property
    def can_undo(self) -> bool:
        return bool(self._undo)

    @property
    def can_redo(self) -> bool:
        return bool(self._redo)

    def record(self, label: str, changes: Sequence[ArrayChange | None]) -> bool:
        """Keep one step made of ``changes`` (None entries, unchanged arrays, are skipped).

        Returns
        -------
        bool
            True when the step was kept; False when it changed nothing or exceeds the budget.
        """
        kept = tuple(c for c in changes if c is not None)
        if not kept:
            return False
        self._redo.clear()
        step = _Step(label, kept)
        if step.nbytes > self.max_bytes:
            self._undo.clear()
            return False
        self._undo.append(step)
        while len(self._undo) > self.max_steps or self.nbytes > self.max_bytes:
            self._undo.popleft()
        return True

    def undo(self, arrays: MutableMapping[Hashable, np.ndarray]) -> str | None:
        """Put back the last step's ``before`` rectangles into ``arrays`` (in place).

        Returns the step's label, or None when there is nothing to undo.

        Raises
        ------
        ValueError
            When a rectangle of the step does not fit its array (missing, or of another size):
            nothing is written and the step stays.
        """
        if not self._undo:
            return None
        _check_fits(self._undo[-1], arrays)
        step = self._undo.pop()
        for c in reversed(step.changes):
            arrays[c.key][c.rows, c.cols] = c.before
        self._redo.append(step)
        return step.label

    def redo(self, arrays: MutableMapping[Hashable, np.ndarray]) -> str | None:
        """Apply again the last undone step; its label, or None when there is none.

        Raises ValueError, writing nothing, as :meth:`undo`.
        """
        if not self._redo:
            return None
        _check_fits(self._redo[-1], arrays)
        step = self._redo.pop()
        for c in step.changes:
            arrays[c.key][c.rows, c.cols] = c.after
        self._undo.append(step)
        return step.label

    def forget(self, keys: Collection[Hashable]) -> None:
        """Drop every change of the arrays ``keys`` (replaced by arrays the changes do not
        belong to); a step left with no change goes."""

        def without(step: _Step) -> _Step | None:
            kept = tuple(c for c in step.changes if c.key not in keys)
            if len(kept) == len(step.changes):
                return step
            return _Step(step.label, kept) if kept else None

        undo = (without(s) for s in self._undo)
        self._undo = deque(s for s in undo if s is not None)
        self._redo = [s for s in map(without, self._redo) if s is not None]

    def clear(self) -> None:
        self._undo.clear()
        self._redo.clear()


def _check_fits(step: _Step, arrays: Mapping[Hashable, np.ndarray]) -> None:
    """Raise ValueError when a change of ``step`` does not fit its array in ``arrays``."""
    for c in step.changes:
        array = arrays.get(c.key)
        if array is None or array[c.rows, c.cols].shape != c.before.shape:
            shape = None if array is None else array.shape
            raise ValueError(
                f"undo step {step.label!r} does not fit {c.key!r} (array {shape}); not applied"
            )
