"""MATH answers: the content of the last ``\\boxed{...}``, compared with math-verify.

Brace matching is done here (nested braces such as ``\\boxed{\\frac{1}{2}}``); whether two
answers are equal is left entirely to the math-verify package (``\\frac12`` = ``0.5``,
``x^{2}`` = ``x^2``, ...), with no hand-written LaTeX rules.
"""
from __future__ import annotations

import re

_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed 5``) in ``text``;
    None when there is none or its braces never close."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        start = match.end()
        if start < len(text) and text[start] == "{":
            depth = 0
            for i in range(start, len(text)):
                if text[i] == "{":
                    depth += 1
                elif text[i] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[start + 1:i].strip()
            continue  # unbalanced: try an earlier box
        # "\boxed 5": the argument runs to the next whitespace or '$'
        rest = re.match(r"[^\s$]+", text[start:])
        if rest:
            return rest.group(0)
    return None


def math_equal(gold: str, predicted: str | None, timeout_seconds: int = 5) -> bool:
    """True when math-verify finds the two LaTeX answers equivalent."""
    if predicted is None or not predicted.strip():
        return False
    # imported here: math-verify pulls in sympy, which is slow to import
    from math_verify import parse, verify

    gold_parsed = parse(f"${gold}$", parsing_timeout=timeout_seconds)
    pred_parsed = parse(f"${predicted}$", parsing_timeout=timeout_seconds)
    if not gold_parsed or not pred_parsed:
        # math-verify could not read one side: only an exact string match counts
        return gold.strip() == predicted.strip()
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=timeout_seconds))
