"""The value probe's labels and its sibling preference (experiments/value_probe.py)."""
import pytest

from experiments.value_probe import LABELS, sibling_preference, step_labels

GOLD = "10 - 9 = 1\n1 + 8 = 9\n9 / 3 = 3\n#### 3"


def test_step_labels_one_per_completed_line():
    # line 1 right, line 2 carries the error on (its own arithmetic is right), line 3 wrong
    response = "10 - 9 = 1\n1 + 8 = 10\n10 / 3 = 4\n#### 4"
    assert step_labels(response, GOLD, 0, "prefix_correct") == [1.0, 0.0, 0.0]
    assert step_labels(response, GOLD, 0, "line_arithmetic") == [1.0, 0.0, 0.0]
    assert step_labels("10 - 9 = 2\n2 + 8 = 10\n#### 10", GOLD, 0, "line_arithmetic") == [0.0, 1.0]
    assert step_labels(response, GOLD, 0, "outcome") == [0.0, 0.0, 0.0]
    assert step_labels(GOLD, GOLD, 1, "outcome") == [1.0, 1.0, 1.0]
    assert step_labels(GOLD, GOLD, 1, "prefix_correct") == [1.0, 1.0, 1.0]
    assert step_labels(response, GOLD, 0, "result_parity") == [0.0, 1.0, 1.0]
    # an inexact division and a line that is not an equation are wrong, not errors
    assert step_labels("9 / 2 = 4\nfour\n#### 4", GOLD, 0, "line_arithmetic") == [0.0, 0.0]
    assert step_labels("#### 3", GOLD, 1, "prefix_correct") == []
    assert set(LABELS) == {"outcome", "prefix_correct", "line_arithmetic", "result_parity"}
    with pytest.raises(ValueError, match="label must be one of"):
        step_labels(GOLD, GOLD, 1, "reward")


def test_sibling_preference_compares_within_groups_only():
    states = [("a", 1.0, 0.9), ("a", 0.0, 0.1), ("a", 0.0, 0.95),  # 1 of 2 pairs right
              ("b", 1.0, 0.2), ("b", 0.0, 0.2),  # a tie counts half
              ("c", 1.0, 0.0), ("c", 1.0, 5.0)]  # equal labels: no pair
    # across groups the values would rank everything differently; they are never compared
    preference, pairs = sibling_preference(states)
    assert pairs == 3
    assert preference == pytest.approx((1 + 0 + 0.5) / 3)
    preference, pairs = sibling_preference([("a", 1.0, 0.3)])
    assert pairs == 0 and preference != preference  # nan: nothing to compare
