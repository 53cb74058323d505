"""GSM8K answers: the number after the last ``####``.

Gold answers in GSM8K end with ``#### N``; model responses are held to the same convention
(with a last ``\\boxed{}`` as fallback, which math-tuned models such as Qwen2.5-Math write).
Numbers compare exactly as decimals after removing thousands separators, currency signs and
trailing zeros, so ``1,000`` equals ``1000`` and ``3.50`` equals ``3.5``.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

from oreo_fast.tasks.math_verifier import last_boxed

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
# a number: optional sign, digits with optional thousands commas, optional decimal part
_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of the first number in ``text``, or None if there is none."""
    text = text.replace("\u2212", "-").replace("$", "").replace(" ", "")
    for match in _NUMBER.finditer(text):
        token = match.group(0)
        if not any(c.isdigit() for c in token):
            continue
        try:
            value = Decimal(token.replace(",", ""))
        except InvalidOperation:
            continue
        if value == 0:
            return "0"  # also turns -0 into 0
        # normalize() drops trailing zeros; format 'f' avoids exponent notation (1E+3)
        return format(value.normalize(), "f")
    return None


def extract_gsm8k_answer(text: str) -> str | None:
    """The normalized number of the last ``#### N`` in ``text`` (else of its last ``\\boxed{}``),
    or None when there is no answer."""
    matches = _HASHES.findall(text)
    if matches:
        return normalize_number(matches[-1])
    boxed = last_boxed(text)
    return normalize_number(boxed) if boxed is not None else None


def gsm8k_equal(gold: str, predicted: str | None) -> bool:
    """True when both are numbers with the same value."""
    if predicted is None:
        return False
    a, b = normalize_number(gold), normalize_number(predicted)
    return a is not None and a == b
