"""Accuracy summaries and paired bootstrap differences against hand-worked cases."""
import math
import random

import pytest

from oreo_fast.pipeline.stats import paired_difference, summarize


def test_summary_over_seeds_and_for_one_seed():
    s = summarize([[1, 0, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])
    assert s.per_seed == [0.75, 0.5, 1.0]
    assert s.mean == pytest.approx(0.75)
    # seeds: sample sd of (0.75, 0.5, 1.0) is 0.25, variance 0.25^2 / 3; problems: the
    # per-problem means (2/3, 1/3, 1, 1) have population variance 11/144, over 4 problems
    assert s.se == pytest.approx(math.sqrt(0.25 ** 2 / 3 + (11 / 144) / 4))
    one = summarize([[1, 0, 0, 0]])
    assert one.se == pytest.approx(math.sqrt(0.25 * 0.75 / 4))


def test_identical_methods_differ_by_zero_and_a_dominant_one_excludes_zero():
    rng = random.Random(0)
    a = [[rng.random() < 0.5 and 1 or 0 for _ in range(200)] for _ in range(3)]
    same = paired_difference(a, a, n_boot=300)
    assert same["difference"] == 0 and same["low"] <= 0 <= same["high"]
    assert not same["excludes_zero"]
    ones, zeros = [[1] * 50] * 2, [[0] * 50] * 2
    best = paired_difference(ones, zeros, n_boot=100)
    assert best["difference"] == best["low"] == best["high"] == 1.0 and best["excludes_zero"]


def test_the_interval_width_matches_the_paired_standard_error():
    """One seed each, a = b except on 20% of 2000 problems where a is right and b wrong: the
    difference is 0.2 with standard error sqrt(0.2 * 0.8 / 2000); a 95% interval spans about
    2 x 1.96 of it."""
    n = 2000
    b = [[1 if i % 2 else 0 for i in range(n)]]
    a = [[1 if (i % 2 or i % 10 == 0 or i % 10 == 2) else 0 for i in range(n)]]
    out = paired_difference(a, b, n_boot=2000, seed=1)
    assert out["difference"] == pytest.approx(0.2)
    se = math.sqrt(0.2 * 0.8 / n)
    assert (out["high"] - out["low"]) == pytest.approx(2 * 1.96 * se, rel=0.15)
    assert out["low"] < 0.2 < out["high"]


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="same problems"):
        summarize([[1, 0], [1]])
    with pytest.raises(ValueError, match="different problem counts"):
        paired_difference([[1, 0]], [[1, 0, 1]])
    with pytest.raises(ValueError, match="0 or 1"):
        summarize([[2]])


def test_the_demo_reports_standard_errors_and_paired_intervals():
    from oreo_fast.pipeline.demo import uncertainty
    from oreo_fast.pipeline.demo_report import format_table

    correct = {"sft": [[0, 1, 0, 1] * 25], "rft": [[0, 1, 1, 1] * 25],
               "oreo": [[1, 1, 1, 1] * 25]}
    out = uncertainty(correct)
    assert out["standard_errors"]["sft"] == pytest.approx(math.sqrt(0.25 / 100))
    assert set(out["paired_differences"]) == {"oreo - rft", "oreo - sft", "rft - sft"}
    assert out["paired_differences"]["oreo - sft"]["difference"] == pytest.approx(0.5)
    table = format_table({"sft": 0.5, "rft": 0.75, "oreo": 1.0, "n_problems": 100,
                          "validation": {}, **out})
    assert "0.500 ± 0.050" in table and "oreo - rft: +0.250" in table


def test_the_demo_pools_seeds_and_the_single_sft():
    """Several seeds of RFT and OREO against SFT's one checkpoint: the means are over seeds,
    the interval of oreo - sft resamples both (here the seeds disagree, so it is wider than
    the single-seed one)."""
    from oreo_fast.pipeline.demo import uncertainty
    from oreo_fast.pipeline.demo_report import format_table

    sft = [[0, 1] * 100]
    oreo = [[1, 1] * 100, [0, 1] * 100, [1, 1] * 50 + [0, 1] * 50]
    out = uncertainty({"sft": sft, "oreo": oreo})
    d = out["paired_differences"]["oreo - sft"]
    assert d["difference"] == pytest.approx((0.5 + 0 + 0.25) / 3)
    single = uncertainty({"sft": sft, "oreo": oreo[2:]})["paired_differences"]["oreo - sft"]
    assert d["high"] - d["low"] > single["high"] - single["low"]
    table = format_table({"sft": 0.5, "oreo": 0.75, "n_problems": 200,
                          "validation": {}, "seeds": 3, **out})
    assert "3 seeds of sampling, RFT and OREO; one SFT" in table
