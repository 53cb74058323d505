"""The embedded default: synthetic problems, a local tokenizer and a tiny random Qwen2.

``build_default`` writes, under one folder::

    train.jsonl, test.jsonl   problems in GSM8K shape (question, answer ending "#### N", id)
    tokenizer/                the Hugging Face tokenizer folder
    model/                    the random-init causal LM (safetensors) with the tokenizer files

so that every later job reads the same kinds of folders and files as with a real model.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from oreo_fast.config import require_at_least
from oreo_fast.io import atomic_dir, read_jsonl, write_jsonl
from oreo_fast.models import TinyModelConfig, build_tiny_model, save_model
from oreo_fast.tasks.arithmetic import ArithmeticConfig, generate_splits
from oreo_fast.tasks.problems import format_prompt
from oreo_fast.tokenizer import SPECIAL_TOKENS, build_tokenizer

log = logging.getLogger("oreo_fast")


@dataclass
class EmbeddedConfig:
    out: str
    task: ArithmeticConfig = field(default_factory=ArithmeticConfig)
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    vocab_size: int = 384  # BPE vocabulary size

    def __post_init__(self):
        require_at_least(self, len(SPECIAL_TOKENS) + 1, "vocab_size")


def write_task(out: str | Path, cfg: ArithmeticConfig) -> dict[str, Path]:
    """Write ``train.jsonl`` and ``test.jsonl`` (gold solutions) and ``sft.jsonl`` (the
    training problems with the demonstrator's solutions: the SFT data) under ``out``;
    return their paths."""
    out = Path(out)
    train, test = generate_splits(cfg)
    paths = {"train": out / "train.jsonl", "test": out / "test.jsonl", "sft": out / "sft.jsonl"}
    gold = [{k: v for k, v in r.items() if k != "demonstration"} for r in train]
    write_jsonl(paths["train"], gold)
    write_jsonl(paths["test"], test)
    write_jsonl(paths["sft"], [dict(g, answer=r["demonstration"]) for g, r in zip(gold, train)])
    return paths


def build_default(cfg: EmbeddedConfig) -> dict[str, Path]:
    """Build the whole embedded default under ``cfg.out``; return the paths written."""
    out = Path(cfg.out)
    paths = write_task(out, cfg.task)
    # the tokenizer learns its merges from the training split only
    texts = [format_prompt(r["question"]) + r["answer"] for _, r in read_jsonl(paths["train"])]
    tokenizer = build_tokenizer(texts, cfg.vocab_size)
    paths["tokenizer"] = out / "tokenizer"
    with atomic_dir(paths["tokenizer"]) as tmp:
        tokenizer.save_pretrained(str(tmp))
    model = build_tiny_model(tokenizer, cfg.model)
    paths["model"] = save_model(model, tokenizer, out / "model")
    log.info("embedded default in %s: %d-token vocabulary, %.2fM parameters", out,
             len(tokenizer), sum(p.numel() for p in model.parameters()) / 1e6)
    return paths
