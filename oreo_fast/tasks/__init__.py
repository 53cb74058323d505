"""Tasks: the embedded synthetic arithmetic task and the GSM8K / MATH verifiers."""
from oreo_fast.tasks.arithmetic import ArithmeticConfig, generate_splits
from oreo_fast.tasks.gsm8k import extract_gsm8k_answer, gsm8k_equal
from oreo_fast.tasks.math_verifier import last_boxed, math_equal
from oreo_fast.tasks.problems import (PROMPT_TEMPLATE, Problem, extract_answer, format_prompt,
                                      is_correct, load_problems, verify)

__all__ = [
    "ArithmeticConfig", "generate_splits", "extract_gsm8k_answer", "gsm8k_equal", "last_boxed",
    "math_equal", "PROMPT_TEMPLATE", "Problem", "extract_answer", "format_prompt", "is_correct",
    "load_problems", "verify",
]
