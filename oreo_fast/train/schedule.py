"""The learning-rate schedule shared by the trainer and SFT: linear warmup, then cosine decay
to ``min_ratio`` of the peak."""
from __future__ import annotations

import math


def warmup_steps_for(total_steps: int, warmup_ratio: float) -> int:
    """Warmup steps for a ratio of the run: at least one when the ratio is above 0."""
    return max(1, math.ceil(total_steps * warmup_ratio)) if warmup_ratio > 0 else 0


def cosine_with_warmup(total_steps: int, warmup_steps: int, min_ratio: float):
    """The multiplier of the peak learning rate at each 0-based step (for ``LambdaLR``)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor
