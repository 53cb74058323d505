"""Trajectories for training: JSONL -> token ids, action masks, step starts, batches.

A record is the paper's ``{"prompt", "response", "reward"}`` or, for multi-turn (agent)
trajectories, ``{"prompt", "turns": [{"role", "content"}, ...], "reward"}`` where only
``role == "assistant"`` turns are actions; other turns (observations) are neither states nor
actions, and the Bellman links jump over them. Prompt and each turn are tokenised separately
(``oreo_fast.tokenizer.encode_pair`` does the same for single-turn data), EOS follows the
response even when the response is truncated to fit ``max_length``.

Step starts come from character offsets: a response token starts a step if it holds the first
character of the response, of an assistant turn, or of the text after a step delimiter.
"""
from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass

import torch

from oreo_fast.errors import DataError
from oreo_fast.io import read_jsonl, require
from oreo_fast.ops.loss import state_mask_for_level
from oreo_fast.tokenizer import encode_pair


@dataclass
class Example:
    """One tokenised trajectory; per-token lists have the length of ``ids``."""

    ids: list[int]
    is_action: list[bool]  # token is a trained response token
    starts_step: list[bool]  # token is the first action of a step
    reward: float
    source: str = ""  # "file:line", for messages


def _step_starts(tokenizer, text: str, delimiters: list[str]) -> tuple[list[int], list[bool]]:
    """Token ids of ``text`` and which of them hold the first character of a step."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    boundaries = {0}
    for delimiter in delimiters:
        start = text.find(delimiter)
        while start != -1:
            boundaries.add(start + len(delimiter))
            start = text.find(delimiter, start + 1)
    boundaries = sorted(b for b in boundaries if b < len(text))
    starts, k = [False] * len(ids), 0
    for i, (lo, hi) in enumerate(offsets):
        if hi <= lo:
            continue  # zero-width token
        # boundaries not claimed by earlier tokens lie at or after their ends: a boundary
        # before this token's end is inside it (or in the gap just before it)
        while k < len(boundaries) and boundaries[k] < hi:
            starts[i] = True
            k += 1
    return ids, starts


def tokenize_trajectory(tokenizer, prompt: str, turns: list[tuple[str, str]], reward: float,
                        max_length: int, delimiters: list[str], source: str = "") -> Example | None:
    """Tokenise one trajectory; None when the prompt leaves no room for a response token."""
    prompt_ids, _ = encode_pair(tokenizer, prompt)  # the prompt ids sampling used
    if len(prompt_ids) + 1 >= max_length:
        return None
    ids, is_action, starts = list(prompt_ids), [False] * len(prompt_ids), [False] * len(prompt_ids)
    for role, content in turns:
        turn_ids, turn_starts = _step_starts(tokenizer, content, delimiters)
        if role == "assistant" and turn_starts:
            turn_starts[0] = True  # every assistant turn begins a step
        ids += turn_ids
        is_action += [role == "assistant"] * len(turn_ids)
        starts += turn_starts if role == "assistant" else [False] * len(turn_ids)
    # EOS ends the trajectory; it belongs to the last step and is an action
    ids, is_action, starts = ids[:max_length - 1], is_action[:max_length - 1], starts[:max_length - 1]
    ids.append(tokenizer.eos_token_id)
    is_action.append(True)
    starts.append(not any(is_action[len(prompt_ids):-1]))
    return Example(ids, is_action, starts, float(reward), source)


def read_training_examples(path, tokenizer, max_length: int, delimiters: list[str] | None = None,
                      strict: bool = False) -> tuple[list[Example], int]:
    """Read and tokenise a trajectory JSONL; returns (examples, number dropped as too long).

    Malformed lines, missing or empty fields and non-finite rewards raise ``DataError``
    naming the file and line.
    """
    delimiters = delimiters or ["\n"]
    examples, too_long = [], []
    for lineno, record in read_jsonl(path):
        prompt = require(record, "prompt", str, path, lineno, allow_empty=True)
        reward = require(record, "reward", (int, float, bool), path, lineno)
        try:
            reward = float(reward)
        except OverflowError:  # an integer too large for a float
            reward = math.inf
        if not math.isfinite(reward):
            raise DataError(f"reward must be finite, got {record['reward']!r:.40}", path,
                            lineno, "reward")
        if "turns" in record:
            turns = _read_turns(record["turns"], path, lineno)
        else:
            turns = [("assistant", require(record, "response", str, path, lineno))]
        example = tokenize_trajectory(tokenizer, prompt, turns, float(reward), max_length,
                                      delimiters, f"{path}:{lineno}")
        if example is None:
            if strict:
                raise DataError(f"prompt leaves no room for a response within max_length "
                                f"{max_length}", path, lineno, "prompt")
            too_long.append(lineno)
        else:
            examples.append(example)
    if too_long:
        logging.getLogger("oreo_fast").warning(
            "%s: dropped %d trajectories whose prompt fills max_length %d (first at line %d)",
            path, len(too_long), max_length, too_long[0])
    if not examples:
        raise DataError("no usable trajectory", path)
    return examples, len(too_long)


def _read_turns(turns, path, lineno) -> list[tuple[str, str]]:
    if not isinstance(turns, list) or not turns:
        raise DataError("expected a non-empty list of turns", path, lineno, "turns")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise DataError(f"turn {i} is not an object", path, lineno, "turns")
        role = require(turn, "role", str, path, lineno)
        content = require(turn, "content", str, path, lineno)
        out.append((role, content))
    if not any(role == "assistant" for role, _ in out):
        raise DataError("no assistant turn (nothing to train)", path, lineno, "turns")
    return out


# ---------------------------------------------------------------- batching


def plan_global_batches(n_examples: int, global_batch_size: int, seed: int, epoch: int):
    """Shuffled example indices, cut into global batches (the last may be smaller)."""
    order = list(range(n_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return [order[i:i + global_batch_size] for i in range(0, n_examples, global_batch_size)]


def rank_micro_batches(batch: list[int], lengths: list[int], world_size: int, rank: int,
                       micro_batch_size: int) -> list[list[int | None]]:
    """This rank's micro-batches of one global batch. Sequences are sorted by length and dealt
    round-robin, so ranks get similar lengths and micro-batches little padding; every rank gets
    the same number of micro-batches, filled with None (an empty sequence, loss 0) as needed."""
    ordered = sorted(batch, key=lambda i: (-lengths[i], i))
    mine = ordered[rank::world_size]
    n_micro = max(1, math.ceil(math.ceil(len(batch) / world_size) / micro_batch_size))
    micro = [mine[i * micro_batch_size:(i + 1) * micro_batch_size] for i in range(n_micro)]
    return [m if m else [None] for m in micro]


def collate_examples(examples: list[Example | None], pad_id: int, level: str) -> dict[str, torch.Tensor]:
    """Right-padded tensors for one micro-batch; None entries become empty sequences.

    Returns input_ids, attention_mask, position_ids [B, L] and the [B, T = L - 1] per-token
    tensors of the loss: actions, action_mask, state_mask; plus rewards [B].
    """
    real = [e for e in examples if e is not None]
    width = max([len(e.ids) for e in real] + [2])
    B = len(examples)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attention = torch.zeros(B, width, dtype=torch.long)
    is_action = torch.zeros(B, width, dtype=torch.bool)
    starts = torch.zeros(B, width, dtype=torch.bool)
    rewards = torch.zeros(B)
    for b, e in enumerate(examples):
        if e is None:
            continue
        n = len(e.ids)
        ids[b, :n] = torch.tensor(e.ids)
        attention[b, :n] = 1
        is_action[b, :n] = torch.tensor(e.is_action)
        starts[b, :n] = torch.tensor(e.starts_step)
        rewards[b] = e.reward
    action_mask = is_action[:, 1:]
    state_mask = state_mask_for_level(action_mask, level, starts[:, 1:])
    positions = torch.arange(width).expand(B, width).clone()
    return dict(input_ids=ids, attention_mask=attention, position_ids=positions,
                actions=ids[:, 1:].clone(), action_mask=action_mask, state_mask=state_mask,
                rewards=rewards)
