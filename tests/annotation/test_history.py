"""The undo stack keeps changed rectangles only and stays within its budget."""

from __future__ import annotations

import numpy as np

from usguide.annotation.history import History, diff


def test_undo_redo_restore_exact_arrays() -> None:
    arrays = {"a": np.zeros((50, 60), np.uint8), "b": np.zeros((50, 60), np.uint8)}
    history = History()
    new_a = arrays["a"].copy()
    new_a[10:12, 20:25] = 1
    new_b = arrays["b"].copy()
    new_b[0, 0] = 4
    history.record("both", [diff("a", arrays["a"], new_a), diff("b", arrays["b"], new_b)])
    arrays["a"][...] = new_a
    arrays["b"][...] = new_b
    assert history.nbytes == 2 * (2 * 5) + 2 * 1  # rectangles, not frames
    assert history.undo(arrays) == "both"
    assert not arrays["a"].any() and not arrays["b"].any()
    assert history.undo(arrays) is None
    assert history.redo(arrays) == "both"
    np.testing.assert_array_equal(arrays["a"], new_a)
    np.testing.assert_array_equal(arrays["b"], new_b)


def test_no_change_records_nothing_and_new_steps_clear_redo() -> None:
    a = np.zeros((4, 4), np.uint8)
    history = History()
    assert diff("a", a, a.copy()) is None
    assert not history.record("nothing", [None])
    b = a.copy()
    b[1, 1] = 2
    history.record("one", [diff("a", a, b)])
    arrays = {"a": b}
    history.undo(arrays)
    assert history.can_redo
    c = a.copy()
    c[2, 2] = 3
    history.record("two", [diff("a", a, c)])
    assert not history.can_redo


def test_memory_is_bounded() -> None:
    history = History(max_bytes=10_000, max_steps=1000)
    a = np.zeros((100, 100), np.uint8)
    for k in range(50):
        b = a.copy()
        b[: 10 + k % 5, :30] = 1  # 300-420 bytes before + after... per step
        history.record(f"s{k}", [diff("a", a, b)])
    assert history.nbytes <= 10_000
    assert 10 < len(history._undo) < 50  # the oldest steps were forgotten
    huge = History(max_bytes=100)
    assert not huge.record("too big", [diff("a", a, np.ones_like(a))])
    assert not huge.can_undo


def test_step_count_is_bounded() -> None:
    history = History(max_steps=3)
    a = np.zeros((3, 3), np.uint8)
    for k in range(5):
        b = a.copy()
        b[0, 0] = k + 1
        history.record(str(k), [diff("a", a, b)])
    arrays = {"a": a.copy()}
    assert [history.undo(arrays) for _ in range(4)] == ["4", "3", "2", None]


def test_forget_drops_the_changes_of_replaced_arrays() -> None:
    arrays = {"a": np.zeros((4, 4), np.uint8), "b": np.zeros((4, 4), np.uint8)}
    history = History()
    new = np.ones((4, 4), np.uint8)
    history.record("a only", [diff("a", arrays["a"], new)])
    history.record("both", [diff("a", arrays["a"], new), diff("b", arrays["b"], new)])
    history.forget(["a"])
    arrays["b"][...] = new
    assert history.undo(arrays) == "both"  # what is left of it: b
    assert not arrays["b"].any()
    assert history.undo(arrays) is None  # "a only" went with a


def test_a_step_that_does_not_fit_is_refused_and_kept() -> None:
    import pytest

    a = np.zeros((100, 100), np.uint8)
    b = a.copy()
    b[60:90, 60:90] = 1
    history = History()
    history.record("edit", [diff("a", a, b)])
    small = {"a": np.full((50, 50), 3, np.uint8)}
    with pytest.raises(ValueError, match="does not fit"):
        history.undo(small)
    assert (small["a"] == 3).all() and history.can_undo  # nothing written, step kept
    assert history.undo({"a": b}) == "edit" and not b.any()
    with pytest.raises(ValueError, match="does not fit"):
        history.redo({})
    assert history.can_redo
