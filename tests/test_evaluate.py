"""Dice, bootstrap intervals and the per-class table: unlabelled classes are never scored."""

from __future__ import annotations

import numpy as np
import pytest

from usguide.evaluate import DiceTable, bootstrap_ci, dice, format_table


def test_dice_values() -> None:
    a = np.zeros((10, 10), bool)
    b = np.zeros((10, 10), bool)
    assert dice(a, b) == 1.0
    a[:5] = True
    assert dice(a, b) == 0.0
    b[:5, :5] = True
    assert dice(a, b) == pytest.approx(2 * 25 / (50 + 25))


def test_bootstrap_interval_brackets_the_mean() -> None:
    values = np.random.default_rng(0).uniform(0.6, 0.9, 50)
    lo, hi = bootstrap_ci(values)
    assert lo < values.mean() < hi
    assert hi - lo < 0.1
    assert bootstrap_ci([0.5] * 10) == pytest.approx((0.5, 0.5))
    assert all(np.isnan(bootstrap_ci([])))


def test_table_ignores_unlabelled_classes() -> None:
    truth = np.zeros((20, 20), np.uint8)
    truth[2:8, 2:8] = 1  # nerve
    pred = truth.copy()
    pred[10:18, 10:18] = 3  # fascia predicted where the set labels no fascia
    table = DiceTable()
    table.add(pred, truth, [True, True, True, False, True])
    summary = table.summary()
    assert summary["nerve"]["dice"] == 1.0 and summary["nerve"]["n"] == 1
    assert "fascia" not in summary  # unlabelled: neither Dice nor false positive
    assert summary["vessel"]["false_positive_rate"] == 0.0
    table.add(pred, truth, [True, True, True, True, True])
    assert table.summary()["fascia"]["false_positive_rate"] == 1.0
    assert "| nerve | 1.000 |" in format_table(table.summary())


def test_shape_mismatch_is_an_error() -> None:
    with pytest.raises(ValueError, match="differ in shape"):
        DiceTable().add(np.zeros((4, 4), np.uint8), np.zeros((4, 5), np.uint8), [True] * 5)


def test_bootstrap_resamples_whole_groups() -> None:
    """Ten near-duplicates of one scan are one draw, not ten: two scans scoring 0 and 1 leave
    the mean anywhere from 0 to 1."""
    values = [0.0] * 10 + [1.0] * 10
    lo, hi = bootstrap_ci(values)
    assert 0.25 < lo < hi < 0.75
    assert bootstrap_ci(values, groups=["a"] * 10 + ["b"] * 10) == (0.0, 1.0)
    table = DiceTable()
    for i, score in enumerate(values):
        truth = np.zeros((4, 4), np.uint8)
        truth[:2] = 1
        pred = truth if score else np.zeros_like(truth)
        table.add(pred, truth, [True, True, False, False, False], group="ab"[i // 10])
    assert table.summary()["nerve"]["ci95"] == [0.0, 1.0]
