"""Offline trajectories: the records OREO learns from, their validation and balancing.

One JSON object per line: ``{"prompt", "response", "reward", "problem_id"}`` (the paper's
format plus a problem id; ``oreo-fast sample`` adds ``answer``, ``sample_index`` and
``finished``). ``prompt`` is the exact text given to the model, ``response`` the sampled
continuation without EOS, ``reward`` 0 or 1.
"""
from __future__ import annotations

import os
import random
from collections import defaultdict

from oreo_fast.errors import DataError
from oreo_fast.io import require
from oreo_fast.tasks.sources import read_records


def read_trajectory_records(path: str | os.PathLike) -> list[dict]:
    """All records of a trajectory file, checked: a missing field, a wrong type, an empty
    prompt or response, or a reward other than 0/1 raises a DataError naming file and line."""
    records = []
    for lineno, record in read_records(path):  # JSONL, parquet or arrow
        require(record, "prompt", str, path, lineno)
        require(record, "response", str, path, lineno)
        reward = require(record, "reward", (int, float, bool), path, lineno)
        if reward not in (0, 1):
            raise DataError(f"must be 0 or 1, got {reward!r}", path, lineno, "reward")
        require(record, "problem_id", (str, int), path, lineno)
        records.append({**record, "reward": int(reward)})
    if not records:
        raise DataError("no trajectories in file", path)
    return records


def balance(records: list[dict], n: int, seed: int = 0) -> list[dict]:
    """The paper's balancing: keep at most ``n`` positive and ``n`` negative responses per
    problem (a seeded random choice), in the original order."""
    if n < 1:
        raise ValueError("balance needs n >= 1")
    groups: dict[tuple, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[(r["problem_id"], r["reward"])].append(i)
    rng = random.Random(seed)
    keep: set[int] = set()
    for key in sorted(groups, key=str):
        idx = groups[key]
        keep.update(idx if len(idx) <= n else rng.sample(idx, n))
    return [r for i, r in enumerate(records) if i in keep]
