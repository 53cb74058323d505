"""Where greedy answers go wrong: each wrong prediction's first wrong line, by kind.

Reads the predictions ``oreo-fast eval --predictions FILE`` writes (or sampled trajectories,
whose ``reward`` says which are right) and the problems they answer (``id``, ``question``,
``answer``: the gold solution). Every wrong answer is filed under its first line that leaves
the gold solution (``experiments.oreo_diagnostics.line_categories``), by kind: ``misread``
(it uses a distractor's number: the demonstrator's habit), ``wrong_operand`` (the gold line's
operation on the right running value, with a number the question does not give for that
step) or ``other``; and by place: the step right after the distractor sentence
(``at_distractor``), another step of a problem with a distractor (``elsewhere``), or a problem
without one (``without_distractor``).

    oreo-fast eval --model RUN/oreo/policy --problems RUN/default/val.jsonl --n-samples 0 \\
        --out /tmp/e.json --predictions /tmp/oreo.jsonl
    python -m experiments.first_errors --problems RUN/default/val.jsonl \\
        --predictions oreo=/tmp/oreo.jsonl rft=/tmp/rft.jsonl --out errors.json
"""
from __future__ import annotations

import argparse
import time
from collections import Counter
from pathlib import Path

from experiments.oreo_diagnostics import distractor_numbers, line_categories
from experiments.sft_seeds import has_distractor
from experiments.value_probe import SOLUTION_LINE
from oreo_fast.io import read_jsonl, write_json


def _kind(category: str, response: str, gold_lines: list[str], line: int) -> str:
    """``misread``; ``wrong_operand`` (the gold line's operation and running value with
    another operand); or ``other``."""
    if category == "first_wrong_misread":
        return "misread"
    mine = SOLUTION_LINE.match(response.split("\n")[line])
    theirs = SOLUTION_LINE.match(gold_lines[line]) if line < len(gold_lines) else None
    if mine and theirs and mine.group(1, 2) == theirs.group(1, 2) and mine[3] != theirs[3]:
        return "wrong_operand"
    return "other"


def first_errors(problems: dict[str, dict], predictions: list[dict]) -> dict:
    """Counts of the wrong predictions by the category of their first wrong line."""
    counts, wrong = Counter(), 0
    for p in predictions:
        if p["correct"] if "correct" in p else p["reward"] > 0.5:  # a prediction, a sample
            continue
        wrong += 1
        problem = problems[p["problem_id"]]
        categories = line_categories(problem["question"], p["response"], problem["answer"], 0.0)
        line = next((k for k, c in enumerate(categories) if c.startswith("first_wrong")), None)
        if line is None:
            counts["no_wrong_line"] += 1
            continue
        gold_lines = problem["answer"].strip().split("\n")
        if not has_distractor(problem["question"]):
            where = "without_distractor"
        else:  # the line right after the distractor sentence, or another one
            steps = distractor_numbers(problem["question"], len(gold_lines) - 1)
            where = "at_distractor" if line in steps or None in steps else "elsewhere"
        counts[f"{_kind(categories[line], p['response'], gold_lines, line)}/{where}"] += 1
    return {"problems": len(predictions), "wrong": wrong,
            "accuracy": 1 - wrong / len(predictions) if predictions else float("nan"),
            "first_wrong_line": dict(sorted(counts.items()))}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--problems", required=True, type=Path)
    parser.add_argument("--predictions", required=True, nargs="+", metavar="NAME=FILE")
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    problems = {r["id"]: r for _, r in read_jsonl(args.problems)}
    result = {"problems_file": str(args.problems), "date": time.strftime("%Y-%m-%d"),
              "models": {}}
    for item in args.predictions:
        name, _, path = item.partition("=")
        if not path:
            parser.error(f"--predictions takes NAME=FILE, got {item!r}")
        figures = first_errors(problems, [p for _, p in read_jsonl(path)])
        result["models"][name] = {"predictions": path, **figures}
        print(f"{name}: {figures['wrong']} wrong of {figures['problems']}: "
              f"{figures['first_wrong_line']}")
    if args.out:
        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
