"""Accuracy with its uncertainty: per-seed means and standard errors, and paired differences
between methods with bootstrap intervals over problems and seeds.

Accuracies are 0/1 outcomes ``correct[seed][problem]`` on one shared list of problems, so two
methods can be compared problem by problem (paired), which removes the problems' own
difficulty from the difference's variance. The bootstrap resamples problems (and seeds, when
there are several) with replacement, the same draw for both methods.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Summary:
    per_seed: list[float]  # accuracy of each seed
    mean: float  # mean over seeds
    se: float  # standard error of the mean, over problems and (when several) seeds


def summarize(correct: list[list[int]]) -> Summary:
    """``correct[seed][problem]`` in {0, 1}: per-seed accuracy, its mean and standard error.

    The mean varies with the problems drawn and with the training seeds, so its variance is
    taken as the sum of both parts: the variance over problems of each problem's mean outcome
    over seeds, divided by the number of problems (one seed: the binomial p(1 - p) / n), and
    the sample variance of the per-seed accuracies divided by the number of seeds (which
    also holds the seeds' share of the problem noise: a slight overestimate, never an
    underestimate)."""
    _check(correct)
    per_seed = [sum(row) / len(row) for row in correct]
    mean = sum(per_seed) / len(per_seed)
    per_problem = np.asarray(correct, dtype=np.float64).mean(axis=0)
    var = float(per_problem.var()) / per_problem.size
    if len(per_seed) > 1:
        var += sum((a - mean) ** 2 for a in per_seed) / (len(per_seed) - 1) / len(per_seed)
    return Summary(per_seed, mean, math.sqrt(var))


def paired_difference(a: list[list[int]], b: list[list[int]], n_boot: int = 2000,
                      level: float = 0.95, seed: int = 0) -> dict:
    """Mean accuracy of ``a`` minus that of ``b`` with a percentile bootstrap interval; each
    resample draws problems (and seeds of each method, independently, as the runs are) with
    replacement, the problems shared by both methods."""
    _check(a)
    _check(b)
    if len(a[0]) != len(b[0]):
        raise ValueError(f"the methods were scored on different problem counts: "
                         f"{len(a[0])} vs {len(b[0])}")
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError("need 0 < level < 1 and n_boot >= 1")
    rng = np.random.default_rng(seed)
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    n = a.shape[1]
    diffs = []
    for _ in range(n_boot):
        problems = rng.integers(0, n, n)
        seeds_a = rng.integers(0, a.shape[0], a.shape[0])
        seeds_b = rng.integers(0, b.shape[0], b.shape[0])
        diffs.append(a[np.ix_(seeds_a, problems)].mean() - b[np.ix_(seeds_b, problems)].mean())
    diffs.sort()
    tail = (1 - level) / 2
    low = float(diffs[max(0, math.floor(tail * n_boot))])
    high = float(diffs[min(n_boot - 1, math.ceil((1 - tail) * n_boot) - 1)])
    point = float(a.mean(axis=1).mean() - b.mean(axis=1).mean())
    return {"difference": point, "low": low, "high": high, "level": level, "n_boot": n_boot,
            "excludes_zero": low > 0 or high < 0}


def _check(correct) -> None:
    if not correct or not correct[0]:
        raise ValueError("need at least one seed and one problem")
    if any(len(row) != len(correct[0]) for row in correct):
        raise ValueError("every seed must be scored on the same problems")
    if any(v not in (0, 1) for row in correct for v in row):
        raise ValueError("outcomes must be 0 or 1")
