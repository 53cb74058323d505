"""Problem files, the prompt template and the verifier dispatch.

Two JSONL shapes are read, those of the public datasets:

- GSM8K (also what ``oreo-fast task`` writes): ``{"question", "answer"}``, ``answer`` being the
  gold solution that ends with ``#### N``;
- MATH: ``{"problem", "solution"}``, the final answer in the solution's last ``\\boxed{}``
  (or in an explicit ``"answer"`` field, as in MATH-500).

An ``id`` (or ``unique_id``) field names the problem; without one the line number does.
Besides JSONL: parquet and arrow files, ``datasets`` folders and cached hub datasets
(``oreo_fast.tasks.sources``); ``columns`` maps other column names, e.g.
``question=prompt,solution=completion,answer=final`` (a solution with ``####`` is GSM8K-shaped,
else MATH-shaped, its final answer from ``answer`` or the solution's last ``\\boxed{}``).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from oreo_fast.errors import DataError
from oreo_fast.io import require
from oreo_fast.tasks.gsm8k import extract_gsm8k_answer, gsm8k_equal
from oreo_fast.tasks.math_verifier import last_boxed, math_equal
from oreo_fast.tasks.sources import read_records

COLUMN_ROLES = ("question", "solution", "answer")

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


def parse_columns(columns: str | None) -> dict[str, str] | None:
    """``"question=problem,solution=solution"`` -> {role: column}; a ValueError says why not."""
    if not columns:
        return None
    mapping = {}
    for part in columns.split(","):
        role, sep, column = (x.strip() for x in part.partition("="))
        if not sep or role not in COLUMN_ROLES or not column:
            raise ValueError(f"columns: expected role=column pairs with roles {COLUMN_ROLES}, "
                             f"got {part!r}")
        mapping[role] = column
    for role in ("question", "solution"):
        if role not in mapping:
            raise ValueError(f"columns: the {role!r} column must be named")
    return mapping


def map_columns(record: dict, columns: dict[str, str], path, row: int) -> dict:
    """A record with other column names, as the GSM8K or MATH shape ``parse_problem`` reads."""
    question = require(record, columns["question"], str, path, row)
    solution = require(record, columns["solution"], str, path, row)
    pid = record.get("id", record.get("unique_id", row))
    if "answer" in columns:
        answer = record.get(columns["answer"])
        if answer is None:
            raise DataError("missing", path, row, columns["answer"])
        return {"id": pid, "problem": question, "solution": solution, "answer": str(answer)}
    if "####" in solution:
        return {"id": pid, "question": question, "answer": solution}
    return {"id": pid, "problem": question, "solution": solution}


def load_problems(path: str | os.PathLike, limit: int | None = None, split: str | None = None,
                  subset: str | None = None, columns: str | None = None) -> list[Problem]:
    """All problems of a source (the first ``limit`` if given); ids must be unique. A source
    is a JSONL, parquet or arrow file, a ``datasets`` folder or a cached hub dataset name."""
    try:
        mapping = parse_columns(columns)
    except ValueError as e:
        raise DataError(str(e), path) from None
    problems: list[Problem] = []
    seen: dict = {}
    for lineno, record in read_records(path, split, subset):
        if mapping is not None:
            record = map_columns(record, mapping, path, lineno)
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
