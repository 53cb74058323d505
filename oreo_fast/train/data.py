"""Trajectories for training: JSONL -> token ids, action masks, step starts, batches.

A record is the paper's ``{"prompt", "response", "reward"}`` or, for multi-turn (agent)
trajectories, ``{"prompt", "turns": [{"role", "content"}, ...], "reward"}`` where only
``role == "assistant"`` turns are actions; other turns (observations) are neither states nor
actions, and the Bellman links jump over them. The prompt is encoded as the tokenizer encodes
it (``oreo_fast.tokenizer.encode_prompt``: BOS included, chat-templated text kept exact), each
turn separately, and EOS ends the trajectory as an action. With ``prompt_format`` chat the EOS
is the template's turn end (``<|im_end|>``, ``<|eot_id|>``), every assistant turn ends with it,
and the other turns of a multi-turn record are wrapped in the template's role markup
(not trained).

Truncated responses. A record marked ``"truncated": true`` (``oreo-fast sample`` writes it when
``max_new_tokens`` cut the response) or one that does not fit ``max_length`` never ended: an
EOS after it would teach the policy to stop mid-sentence. By default such trajectories are
left out and counted (as TRL's ``mask_truncated_completions``); with ``keep_truncated`` they
are trained as reward-0 trajectories without an EOS action. The paper's loader instead cuts
the sequence, losing the EOS but keeping the terminal reward.

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
from oreo_fast.io import require
from oreo_fast.tasks.sources import read_records
from oreo_fast.ops.loss import state_mask_for_level
from oreo_fast.tokenizer import chat_markup, encode_prompt, resolve_prompt_format, turn_end_id


@dataclass
class Example:
    """One tokenised trajectory; per-token lists have the length of ``ids``."""

    ids: list[int]
    is_action: list[bool]  # token is a trained response token
    starts_step: list[bool]  # token is the first action of a step
    reward: float
    source: str = ""  # "file:line", for messages
    truncated: bool = False  # the response never ended: no EOS action


@dataclass
class DropCounts:
    too_long: int = 0  # the prompt leaves no room for a response within max_length
    truncated: int = 0  # truncated responses left out (keep_truncated off)


@dataclass
class Layout:
    """How a file's trajectories are laid out: the EOS id, and for chat the role markup."""

    eos_id: int
    chat: bool = False
    markup: dict | None = None  # role -> (text before, text after) the turn's content

    @classmethod
    def of(cls, tokenizer, prompt_format: str = "auto") -> "Layout":
        fmt = resolve_prompt_format(tokenizer, prompt_format)
        return cls(turn_end_id(tokenizer, fmt), fmt == "chat", {} if fmt == "chat" else None)

    def wrap(self, tokenizer, role: str) -> tuple[str, str]:
        if role not in self.markup:
            self.markup[role] = chat_markup(tokenizer, role)
        return self.markup[role]


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


def _text_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def tokenize_trajectory(tokenizer, prompt: str, turns: list[tuple[str, str]], reward: float,
                        max_length: int, delimiters: list[str], source: str = "",
                        truncated: bool = False, layout: Layout | None = None) -> Example | None:
    """Tokenise one trajectory; None when the prompt leaves no room for a response token.

    ``truncated``: the response never ended, so no EOS follows it. A trajectory longer than
    ``max_length`` is cut there and is truncated too (``Example.truncated``)."""
    layout = layout or Layout(tokenizer.eos_token_id)
    prompt_ids = encode_prompt(tokenizer, prompt)  # the prompt ids sampling used
    if len(prompt_ids) + 1 >= max_length:
        return None
    ids, is_action, starts = list(prompt_ids), [False] * len(prompt_ids), [False] * len(prompt_ids)

    def add(new_ids, action, new_starts=None):
        ids.extend(new_ids)
        is_action.extend([action] * len(new_ids))
        starts.extend(new_starts or [False] * len(new_ids))

    for i, (role, content) in enumerate(turns):
        if role == "assistant":
            turn_ids, turn_starts = _step_starts(tokenizer, content, delimiters)
            if turn_starts:
                turn_starts[0] = True  # every assistant turn begins a step
            add(turn_ids, True, turn_starts)
            last = i + 1 == len(turns)
            if layout.chat and not (last and truncated):  # the template's turn end: an action
                add([layout.eos_id], True, [not any(is_action[len(prompt_ids):])])
        else:
            if layout.chat and (i == 0 or turns[i - 1][0] != "assistant" or i + 1 == len(turns)):
                path, _, line = source.rpartition(":")
                raise DataError(f"turn {i} ({role!r}): with chat prompts a non-assistant turn "
                                "must follow an assistant turn and be followed by one",
                                path or None, int(line) if line.isdigit() else None, "turns")
            before, after = layout.wrap(tokenizer, role) if layout.chat else ("", "")
            add(_text_ids(tokenizer, before) + _step_starts(tokenizer, content, delimiters)[0]
                + _text_ids(tokenizer, after), False)
    if not layout.chat and not truncated:  # EOS ends the trajectory, in the last step
        add([layout.eos_id], True, [not any(is_action[len(prompt_ids):])])
    if len(ids) > max_length:
        ids, is_action, starts = ids[:max_length], is_action[:max_length], starts[:max_length]
        truncated = True
    if not any(is_action):
        return Example(ids, is_action, starts, 0.0, source, True)  # nothing trainable
    return Example(ids, is_action, starts, float(reward), source, truncated)


def read_training_examples(path, tokenizer, max_length: int, delimiters: list[str] | None = None,
                           strict: bool = False, prompt_format: str = "auto",
                           keep_truncated: bool = False) -> tuple[list[Example], DropCounts]:
    """Read and tokenise a trajectory JSONL; returns (examples, what was left out).

    Malformed lines, missing or empty fields, non-finite rewards and a record's
    ``prompt_format`` other than the run's raise ``DataError`` naming the file and line.
    Truncated trajectories are left out and counted, or kept with reward 0 and no EOS action
    under ``keep_truncated``.
    """
    delimiters = delimiters or ["\n"]
    layout = Layout.of(tokenizer, prompt_format)
    fmt = "chat" if layout.chat else "plain"
    examples, too_long, truncated = [], [], []
    for lineno, record in read_records(path):  # JSONL, parquet or arrow
        prompt = require(record, "prompt", str, path, lineno, allow_empty=True)
        reward = require(record, "reward", (int, float, bool), path, lineno)
        try:
            reward = float(reward)
        except OverflowError:  # an integer too large for a float
            reward = math.inf
        if not math.isfinite(reward):
            raise DataError(f"reward must be finite, got {record['reward']!r:.40}", path,
                            lineno, "reward")
        was_cut = record.get("truncated", False)
        if not isinstance(was_cut, bool):
            raise DataError(f"expected true or false, got {was_cut!r:.40}", path, lineno,
                            "truncated")
        sampled_as = record.get("prompt_format", fmt)
        if sampled_as != fmt:
            shown = str(sampled_as)[:20]
            raise DataError(f"sampled with prompt_format {shown!r} but this run uses {fmt!r} "
                            f"(set prompt_format={shown})", path, lineno, "prompt_format")
        if "turns" in record:
            turns = _read_turns(record["turns"], path, lineno)
        else:
            turns = [("assistant", require(record, "response", str, path, lineno))]
        example = tokenize_trajectory(tokenizer, prompt, turns, float(reward), max_length,
                                      delimiters, f"{path}:{lineno}", was_cut, layout)
        if example is None:
            if strict:
                raise DataError(f"prompt leaves no room for a response within max_length "
                                f"{max_length}", path, lineno, "prompt")
            too_long.append(lineno)
        elif example.truncated and not (keep_truncated and any(example.is_action)):
            truncated.append(lineno)
        else:
            if example.truncated:
                example.reward = 0.0  # it never reached an answer
            examples.append(example)
    log = logging.getLogger("oreo_fast")
    if too_long:
        log.warning("%s: dropped %d trajectories whose prompt fills max_length %d (first at "
                    "line %d)", path, len(too_long), max_length, too_long[0])
    if truncated:
        log.warning("%s: left out %d truncated trajectories (cut by max_new_tokens or "
                    "max_length %d; first at line %d); keep_truncated=true trains them as "
                    "reward 0 without EOS", path, len(truncated), max_length, truncated[0])
    if not examples:
        raise DataError("no usable trajectory", path)
    return examples, DropCounts(len(too_long), len(truncated))


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
