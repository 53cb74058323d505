"""Problem files, the prompt template and the verifier dispatch.

Two JSONL shapes are read, those of the public datasets:

- GSM8K (also what ``oreo-fast task`` writes): ``{"question", "answer"}``, ``answer`` being the
  gold solution that ends with ``#### N``;
- MATH: ``{"problem", "solution"}``, the final answer in the solution's last ``\\boxed{}``
  (or in an explicit ``"answer"`` field, as in MATH-500).

An ``id`` (or ``unique_id``) field names the problem; without one the line number does.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from oreo_fast.errors import DataError
from oreo_fast.io import read_jsonl, require
from oreo_fast.tasks.gsm8k import extract_gsm8k_answer, gsm8k_equal
from oreo_fast.tasks.math_verifier import last_boxed, math_equal

# The one place the prompt is built: a question becomes the model's prompt text.
PROMPT_TEMPLATE = "Question: {question}\nAnswer:\n"


def format_prompt(question: str) -> str:
    return PROMPT_TEMPLATE.format(question=question.strip())


@dataclass(frozen=True)
class Problem:
    id: str | int
    question: str
    solution: str  # the gold worked solution (the SFT target)
    answer: str  # the gold final answer
    kind: str  # "gsm8k" or "math": which verifier applies

    @property
    def prompt(self) -> str:
        return format_prompt(self.question)


def extract_answer(kind: str, response: str) -> str | None:
    """The final answer a response gives (None when it gives none)."""
    if kind == "gsm8k":
        return extract_gsm8k_answer(response)
    if kind == "math":
        return last_boxed(response)
    raise ValueError(f"unknown problem kind {kind!r}")


def is_correct(kind: str, gold: str, predicted: str | None) -> bool:
    if kind == "gsm8k":
        return gsm8k_equal(gold, predicted)
    if kind == "math":
        return math_equal(gold, predicted)
    raise ValueError(f"unknown problem kind {kind!r}")


def verify(problem: Problem, response: str) -> int:
    """The 0/1 outcome reward of ``response`` for ``problem``."""
    return int(is_correct(problem.kind, problem.answer, extract_answer(problem.kind, response)))


def parse_problem(record: dict, path, lineno: int) -> Problem:
    """One problem from a GSM8K- or MATH-shaped record; DataError names what is wrong."""
    pid = record.get("id", record.get("unique_id", lineno))
    if not isinstance(pid, (str, int)) or isinstance(pid, bool):
        raise DataError("expected str or int", path, lineno, "id")
    if "question" in record:
        question = require(record, "question", str, path, lineno)
        solution = require(record, "answer", str, path, lineno)
        answer = extract_gsm8k_answer(solution)
        if answer is None:
            raise DataError("no final answer ('#### N') in the gold solution", path, lineno,
                            "answer")
        return Problem(pid, question, solution, answer, "gsm8k")
    if "problem" in record:
        question = require(record, "problem", str, path, lineno)
        solution = require(record, "solution", str, path, lineno)
        answer = record.get("answer")
        if answer is None:
            answer = last_boxed(solution)
        elif not isinstance(answer, str):
            answer = str(answer)
        if answer is None or not answer.strip():
            raise DataError("no final answer (\\boxed{...}) in the gold solution", path, lineno,
                            "solution")
        return Problem(pid, question, solution, answer, "math")
    raise DataError("neither a GSM8K record ('question', 'answer') nor a MATH record "
                    "('problem', 'solution')", path, lineno, "question")


def load_problems(path: str | os.PathLike, limit: int | None = None) -> list[Problem]:
    """All problems of a JSONL file (the first ``limit`` if given); ids must be unique."""
    problems: list[Problem] = []
    seen: dict = {}
    for lineno, record in read_jsonl(path):
        problem = parse_problem(record, path, lineno)
        if problem.id in seen:
            raise DataError(f"duplicate id {problem.id!r} (first on line {seen[problem.id]})",
                            path, lineno, "id")
        seen[problem.id] = lineno
        problems.append(problem)
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError("no problems in file", path)
    return problems
