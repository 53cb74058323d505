"""The embedded synthetic task: a start number and a chain of 2 to 6 arithmetic operations.

Question: ``Start with 12. Multiply by 3. Add 7. What is the result?``
Gold solution, one line per step, GSM8K's answer convention at the end::

    12 * 3 = 36
    36 + 7 = 43
    #### 43

Every intermediate value stays in ``[0, max_value]`` and divisions are exact, so answers are
integers. Problems come from a seeded ``random.Random``: the same config gives the same files.
Train and test are drawn from one pool of distinct questions, so they never share a question.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from oreo_fast.config import reject, require_at_least

OPS = ("+", "-", "*", "/")
_WORDS = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}.", "/": "Divide by {}."}


@dataclass
class ArithmeticConfig:
    """Knobs of the synthetic task (the defaults are the embedded default's difficulty)."""

    n_train: int = 2000
    n_test: int = 200
    min_steps: int = 2
    max_steps: int = 6
    start_min: int = 2
    start_max: int = 20
    add_max: int = 9  # operands of + and - are drawn from [1, add_max]
    mul_max: int = 4  # operands of * and / are drawn from [2, mul_max]
    max_value: int = 40  # every intermediate result stays in [0, max_value]
    ops: tuple[str, ...] = OPS
    seed: int = 0

    def __post_init__(self):
        require_at_least(self, 0, "n_train", "n_test", "start_min")
        require_at_least(self, 1, "min_steps", "add_max")
        require_at_least(self, 2, "mul_max")
        if self.max_steps < self.min_steps:
            reject(self, "max_steps", f"must be >= min_steps ({self.min_steps})")
        if not self.ops or any(op not in OPS for op in self.ops):
            reject(self, "ops", f"must be a non-empty subset of {OPS}")
        if not self.start_min <= self.start_max <= self.max_value:
            reject(self, "start_max", f"must be in [start_min, max_value] = "
                   f"[{self.start_min}, {self.max_value}]")


def _step(rng: random.Random, value: int, cfg: ArithmeticConfig) -> tuple[str, int, int] | None:
    """Draw one operation that keeps the value in range: (op, operand, new value), or None
    when none is found (e.g. only + and * allowed and the value is already at the maximum)."""
    for _ in range(100):
        op = rng.choice(cfg.ops)
        if op == "+":
            b = rng.randint(1, cfg.add_max)
            new = value + b
        elif op == "-":
            b = rng.randint(1, cfg.add_max)
            new = value - b
        elif op == "*":
            b = rng.randint(2, cfg.mul_max)
            new = value * b
        else:
            divisors = [d for d in range(2, cfg.mul_max + 1) if value % d == 0]
            if value == 0 or not divisors:
                continue
            b = rng.choice(divisors)
            new = value // b
        if 0 <= new <= cfg.max_value:
            return op, b, new
    return None


def make_problem(rng: random.Random, cfg: ArithmeticConfig) -> tuple[str, str, int]:
    """One random problem: (question, gold solution, answer)."""
    for _ in range(1000):  # a chain that runs out of valid operations is drawn again
        value = rng.randint(cfg.start_min, cfg.start_max)
        n_steps = rng.randint(cfg.min_steps, cfg.max_steps)
        sentences, lines = [f"Start with {value}."], []
        for _ in range(n_steps):
            step = _step(rng, value, cfg)
            if step is None:
                break
            op, b, new = step
            sentences.append(_WORDS[op].format(b))
            lines.append(f"{value} {op} {b} = {new}")
            value = new
        if len(lines) == n_steps:
            break
    else:
        raise ValueError("these knobs leave no valid chain of operations")
    question = " ".join(sentences) + " What is the result?"
    solution = "\n".join(lines) + f"\n#### {value}"
    return question, solution, value


def generate_splits(cfg: ArithmeticConfig) -> tuple[list[dict], list[dict]]:
    """Train and test problems in GSM8K's shape: ``{"id", "question", "answer"}`` where
    ``answer`` is the gold solution ending in ``#### N``. Questions are distinct across both."""
    rng = random.Random(cfg.seed)
    wanted = cfg.n_train + cfg.n_test
    seen: set[str] = set()
    pool: list[tuple[str, str]] = []
    attempts = 0
    while len(pool) < wanted:
        attempts += 1
        if attempts > 50 * wanted + 1000:
            raise ValueError(f"only {len(pool)} distinct problems exist for these knobs; "
                             f"asked for {wanted}")
        question, solution, _ = make_problem(rng, cfg)
        if question not in seen:
            seen.add(question)
            pool.append((question, solution))
    # test first, so growing n_train with the same seed keeps the test split unchanged
    test = [{"id": f"test-{i}", "question": q, "answer": s}
            for i, (q, s) in enumerate(pool[:cfg.n_test])]
    train = [{"id": f"train-{i}", "question": q, "answer": s}
             for i, (q, s) in enumerate(pool[cfg.n_test:])]
    return train, test


def solve(question: str) -> int:
    """Compute the answer of a question written by :func:`make_problem` (for checks)."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(sentences[0].removeprefix("Start with "))
    for s in sentences[1:]:
        if s.startswith("What"):
            break
        word, _, arg = s.rpartition(" ")
        b = int(arg)
        value = {"Add": value + b, "Subtract": value - b,
                 "Multiply by": value * b, "Divide by": value // b}[word]
    return value
