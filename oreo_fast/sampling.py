"""Sampling: the settings, the token choice from logits, and batched generation with a KV
cache (our own decoding loop over a ``DynamicCache``); shared by the pipeline (sampling,
evaluation) and the search (best-of-N).

Why not ``model.generate``: the loop is short, makes positions explicit (left padding, with
``position_ids`` counting from each prompt's first real token), prefills each prompt once and
then shares the cache across its K samples, drops finished rows from the cache so long
stragglers do not pay for the whole batch, and reports the number of generated tokens for the
progress bar. Temperature 0 is greedy decoding.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from oreo_fast.config import reject, require_at_least
from oreo_fast.models import cache_arg, left_pad


@dataclass
class SamplingConfig:
    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k filter

    def __post_init__(self):
        check_sampling(self)

    @classmethod
    def of(cls, config, **overrides) -> "SamplingConfig":
        """The sampling settings of a job's config (the fields it shares with this one)."""
        names = [f.name for f in dataclasses.fields(cls) if hasattr(config, f.name)]
        return cls(**{**{name: getattr(config, name) for name in names}, **overrides})


def check_sampling(config) -> None:
    """The sampling fields a config has (``temperature``, ``top_p``, ``top_k``,
    ``max_new_tokens``), each checked with a :class:`ConfigError` naming it."""
    if hasattr(config, "temperature") and not config.temperature >= 0:
        reject(config, "temperature", "must be >= 0 (0 is greedy)")
    if hasattr(config, "top_p") and not 0 < config.top_p <= 1:
        reject(config, "top_p", "must be in (0, 1]")
    if hasattr(config, "top_k"):
        require_at_least(config, 0, "top_k")
    if hasattr(config, "max_new_tokens"):
        require_at_least(config, 1, "max_new_tokens")


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set to -inf every logit outside the top-k and outside the top-p nucleus (the smallest
    set of most likely tokens whose probability reaches top_p; the first always stays)."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the tokens before it already reach top_p
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, cfg: SamplingConfig,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row from last-position logits [N, V]."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    logits = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


@dataclass
class Generation:
    token_ids: list[int]  # generated tokens, EOS excluded
    finished: bool  # True when EOS was produced within max_new_tokens


@torch.no_grad()
def generate(model, prompts: list[list[int]], eos_token_id: int | list[int], pad_token_id: int,
             cfg: SamplingConfig, num_samples: int = 1, generator: torch.Generator | None = None,
             on_tokens=None) -> list[list[Generation]]:
    """Sample ``num_samples`` continuations of each prompt (token-id lists).

    Returns one list per prompt of ``num_samples`` :class:`Generation`. ``on_tokens(n)`` is
    called after each decoding step with the number of tokens just generated.
    """
    from transformers import DynamicCache

    eos_ids = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_pad(prompts, pad_token_id))
    cache = DynamicCache(config=model.config)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                use_cache=True, logits_to_keep=1, **cache_arg(model, cache))
    logits = out.logits[:, -1]
    if num_samples > 1:  # prefill once, then share the prompt's cache across its samples
        cache.batch_repeat_interleave(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)
        mask = mask.repeat_interleave(num_samples, dim=0)
        positions = positions.repeat_interleave(num_samples, dim=0)
    n_rows = logits.shape[0]
    rows = torch.arange(n_rows, device=device)  # original row of each live row
    next_pos = positions[:, -1] + 1
    produced: list[list[int]] = [[] for _ in range(n_rows)]
    finished = [False] * n_rows
    eos_ids = eos_ids.to(device)
    for step in range(cfg.max_new_tokens):
        tokens = next_tokens(logits, cfg, generator)
        is_eos = torch.isin(tokens, eos_ids)
        for r, t, e in zip(rows.tolist(), tokens.tolist(), is_eos.tolist()):
            if e:
                finished[r] = True
            else:
                produced[r].append(t)
        if on_tokens is not None:
            on_tokens(len(rows))
        if step + 1 == cfg.max_new_tokens:
            break
        live = ~is_eos
        if not live.any():
            break
        if not live.all():  # drop finished rows from the batch and the cache
            keep = live.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            rows, tokens, mask, next_pos = rows[keep], tokens[keep], mask[keep], next_pos[keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=1)
        out = model(input_ids=tokens[:, None], attention_mask=mask,
                    position_ids=next_pos[:, None], use_cache=True, **cache_arg(model, cache))
        logits = out.logits[:, -1]
        next_pos = next_pos + 1
    gens = [Generation(produced[r], finished[r]) for r in range(n_rows)]
    return [gens[i * num_samples:(i + 1) * num_samples] for i in range(len(prompts))]
