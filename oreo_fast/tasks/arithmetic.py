"""The embedded synthetic task: a start number and a chain of 2 to 4 arithmetic operations.

Question: ``Start with 12. Multiply by 3. Add 7. What is the result?``
Gold solution, one line per step, each citing the sentence it uses, GSM8K's answer convention
at the end::

    Multiply by 3: 12 * 3 = 36
    Add 7: 36 + 7 = 43
    #### 43

Every intermediate value stays in ``[0, max_value]`` and divisions are exact, so answers are
integers. Problems come from a seeded ``random.Random``: the same config gives the same files.
Train and test are drawn from one pool of distinct questions, so they never share a question.

Half the questions (``distractor_rate``) carry an irrelevant fact with a number before one
operation (``Start with 12. Tom has 5 pens. Add 7. ...``). The SFT data is not the gold
solutions but a careless demonstrator's: after a distractor it cites the fact and uses its
number as the next operand (``Tom has 5 pens: 12 + 5 = 17``) with probability
``misread_rate``. So a converged SFT model still fails most distractor problems, and outcome
rewards (from the gold answers) can teach it not to. The wrong step is visible in the text
(a line citing a fact that is no operation), so a small value model can learn to see it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from oreo_fast.config import reject, require_at_least

OPS = ("+", "-", "*", "/")
OP_SENTENCES = {"+": "Add {}.", "-": "Subtract {}.", "*": "Multiply by {}.", "/": "Divide by {}."}
# "Multiply by": "*"
_OPS_BY_WORD = {w.removesuffix(" {}."): op for op, w in OP_SENTENCES.items()}
DISTRACTORS = ("Tom has {} pens.", "A box holds {} cups.", "The bus has {} seats.")


@dataclass
class ArithmeticConfig:
    """Knobs of the synthetic task (the defaults are the embedded default's difficulty)."""

    n_train: int = 2000
    n_test: int = 200
    min_steps: int = 2
    max_steps: int = 4
    start_min: int = 2
    start_max: int = 20
    add_max: int = 9  # operands of + and - are drawn from [1, add_max]
    mul_max: int = 4  # operands of * and / are drawn from [2, mul_max]
    max_value: int = 30  # every intermediate result stays in [0, max_value]
    ops: tuple[str, ...] = OPS
    seed: int = 0

    # a distractor: an irrelevant fact with a number, placed before one operation
    distractor_rate: float = 0.5  # share of problems with one distractor fact
    # the SFT demonstrator's slip: after a distractor it uses the fact's number as the next
    # operation's operand with this probability (its solution is then wrong; the gold one is not)
    misread_rate: float = 0.8

    def __post_init__(self):
        require_at_least(self, 0, "n_train", "n_test", "start_min")
        for name in ("distractor_rate", "misread_rate"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                reject(self, name, "must be in [0, 1]")
        require_at_least(self, 1, "min_steps", "add_max")
        require_at_least(self, 2, "mul_max")
        if self.max_steps < self.min_steps:
            reject(self, "max_steps", f"must be >= min_steps ({self.min_steps})")
        if not self.ops or any(op not in OPS for op in self.ops):
            reject(self, "ops", f"must be a non-empty subset of {OPS}")
        if not self.start_min <= self.start_max <= self.max_value:
            reject(self, "start_max", f"must be in [start_min, max_value] = "
                   f"[{self.start_min}, {self.max_value}]")


def _apply(op: str, value: int, b: int, cfg: ArithmeticConfig) -> int | None:
    """``value op b`` when it is a valid step (exact division, result in range), else None."""
    if op == "/":
        if value == 0 or value % b:
            return None
        new = value // b
    else:
        new = {"+": value + b, "-": value - b, "*": value * b}[op]
    return new if 0 <= new <= cfg.max_value else None


def _operand_range(op: str, cfg: ArithmeticConfig) -> range:
    return range(1, cfg.add_max + 1) if op in "+-" else range(2, cfg.mul_max + 1)


def _step(rng: random.Random, value: int, cfg: ArithmeticConfig) -> tuple[str, int, int] | None:
    """Draw one operation that keeps the value in range: (op, operand, new value), or None
    when none is found (e.g. only + and * allowed and the value is already at the maximum)."""
    for _ in range(100):
        op = rng.choice(cfg.ops)
        if op == "/":
            divisors = [d for d in _operand_range(op, cfg) if value and value % d == 0]
            if not divisors:
                continue
            b = rng.choice(divisors)
        else:
            b = rng.choice(_operand_range(op, cfg))
        new = _apply(op, value, b, cfg)
        if new is not None:
            return op, b, new
    return None


def _run(start: int, steps: list[tuple[str, int]], cfg: ArithmeticConfig,
         cited: dict[int, str] | None = None) -> list[str] | None:
    """The solution lines of ``steps`` from ``start`` (None if a step is invalid). Each line
    first cites the question's sentence it uses, then computes: ``Add 7: 12 + 7 = 19``;
    ``cited`` replaces the sentence of some steps (step index -> sentence, no full stop)."""
    value, lines = start, []
    for k, (op, b) in enumerate(steps):
        new = _apply(op, value, b, cfg)
        if new is None:
            return None
        sentence = (cited or {}).get(k, OP_SENTENCES[op].format(b).removesuffix("."))
        lines.append(f"{sentence}: {value} {op} {b} = {new}")
        value = new
    return lines + [f"#### {value}"]


def _chain(rng: random.Random, cfg: ArithmeticConfig) -> tuple[int, list[tuple[str, int]]]:
    for _ in range(1000):  # a chain that runs out of valid operations is drawn again
        value = start = rng.randint(cfg.start_min, cfg.start_max)
        steps = []
        for _ in range(rng.randint(cfg.min_steps, cfg.max_steps)):
            step = _step(rng, value, cfg)
            if step is None:
                break
            op, b, value = step
            steps.append((op, b))
        else:
            return start, steps
    raise ValueError("these knobs leave no valid chain of operations")


def _distractor(rng: random.Random, start: int, steps: list[tuple[str, int]],
                cfg: ArithmeticConfig) -> tuple[int, int] | None:
    """(index of the operation it precedes, its number) for a distractor whose number, read
    as that operation's operand, still gives a valid chain; None when no such one exists."""
    for k in rng.sample(range(len(steps)), len(steps)):
        op, b = steps[k]
        numbers = [n for n in _operand_range(op, cfg) if n != b and _run(
            start, steps[:k] + [(op, n)] + steps[k + 1:], cfg) is not None]
        if numbers:
            return k, rng.choice(numbers)
    return None


def make_problem(rng: random.Random, cfg: ArithmeticConfig) -> tuple[str, str, int, str]:
    """One random problem: (question, gold solution, answer, the demonstrator's solution).

    With probability ``distractor_rate`` an irrelevant fact with a number (``Tom has 8
    pens.``) precedes one operation; the demonstrator then misreads it as that operation's
    operand with probability ``misread_rate`` (its line cites the fact: ``Tom has 8 pens: 12
    + 8 = 20``), so its solution differs from the gold one from that line on, each line
    still computed right."""
    start, steps = _chain(rng, cfg)
    sentences = [f"Start with {start}."] + [OP_SENTENCES[op].format(b) for op, b in steps]
    demonstrated, cited = steps, None
    if cfg.distractor_rate and rng.random() < cfg.distractor_rate:
        found = _distractor(rng, start, steps, cfg)
        if found is not None:
            k, n = found
            fact = rng.choice(DISTRACTORS).format(n)
            sentences.insert(k + 1, fact)
            if rng.random() < cfg.misread_rate:
                demonstrated = steps[:k] + [(steps[k][0], n)] + steps[k + 1:]
                cited = {k: fact.removesuffix(".")}
    question = " ".join(sentences) + " What is the result?"
    gold = _run(start, steps, cfg)
    answer = int(gold[-1].removeprefix("#### "))
    return question, "\n".join(gold), answer, "\n".join(_run(start, demonstrated, cfg, cited))


def generate_splits(cfg: ArithmeticConfig) -> tuple[list[dict], list[dict]]:
    """Train and test problems in GSM8K's shape: ``{"id", "question", "answer"}`` where
    ``answer`` is the gold solution ending in ``#### N``; training problems also carry the
    demonstrator's solution, ``demonstration`` (the SFT target, :func:`make_problem`).
    Questions are distinct across both."""
    rng = random.Random(cfg.seed)
    wanted = cfg.n_train + cfg.n_test
    seen: set[str] = set()
    pool: list[tuple[str, str, str]] = []
    attempts = 0
    while len(pool) < wanted:
        attempts += 1
        if attempts > 50 * wanted + 1000:
            raise ValueError(f"only {len(pool)} distinct problems exist for these knobs; "
                             f"asked for {wanted}")
        question, solution, _, demonstration = make_problem(rng, cfg)
        if question not in seen:
            seen.add(question)
            pool.append((question, solution, demonstration))
    # test first, so growing n_train with the same seed keeps the test split unchanged
    test = [{"id": f"test-{i}", "question": q, "answer": s}
            for i, (q, s, _) in enumerate(pool[:cfg.n_test])]
    train = [{"id": f"train-{i}", "question": q, "answer": s, "demonstration": d}
             for i, (q, s, d) in enumerate(pool[cfg.n_test:])]
    return train, test


def solve(question: str) -> int:
    """Compute the answer of a question written by :func:`make_problem` (for checks)."""
    sentences = [s.strip() for s in question.split(".") if s.strip()]
    value = int(sentences[0].removeprefix("Start with "))
    for s in sentences[1:]:
        if s.startswith("What"):
            break
        word, _, arg = s.rpartition(" ")
        op = _OPS_BY_WORD.get(word)
        if op is None:
            continue  # a distractor fact
        b = int(arg)
        value = {"+": value + b, "-": value - b, "*": value * b, "/": value // b}[op]
    return value
