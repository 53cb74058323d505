"""The naive beam searcher, as the paper's script and search-and-learn run it: no cache, every
forward re-encodes the whole text (prompt + beam + partial step) in both models, one
sequence at a time. Slow by design: it is the reference the cached searcher
(``oreo_fast.search.beam_search``) must match exactly under the same seed (tests), and the
baseline of its benchmark. It shares only the random draws and the bookkeeping rules.
"""
from __future__ import annotations

import torch

from oreo_fast.search.beam import (Candidate, SearchConfig, SearchResult, TokenCounts,
                              children_per_parent, check_models, draw_uniforms, make_candidate,
                              pick_answer, sample_with_uniform, select_beams)


def _encode(model, ids: list[int], counts: TokenCounts, which: str) -> torch.Tensor:
    device = next(model.parameters()).device
    x = torch.tensor([ids], dtype=torch.long, device=device)
    positions = torch.arange(len(ids), device=device)[None]
    out = model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=positions)
    setattr(counts, which, getattr(counts, which) + len(ids))
    return out.values[0] if hasattr(model, "value_head") else out.logits[0]


@torch.no_grad()
def naive_beam_search(policy, value_model, prompts: list[list[int]], cfg: SearchConfig,
                      eos_ids: list[int], step_ends: set[int], pad_id: int, is_final=None,
                      problem_keys: list[int] | None = None,
                      counts: TokenCounts | None = None) -> list[SearchResult]:
    check_models(policy, value_model)
    counts = counts if counts is not None else TokenCounts()
    keys = problem_keys if problem_keys is not None else list(range(len(prompts)))
    results = []
    for prompt, key in zip(prompts, keys):
        root_value = float(_encode(value_model, prompt, counts, "value")[-1])
        beams = [Candidate(-1, [], [], root_value, False, False)]
        pool, history, expanded, last = [], [], [], []
        for step in range(cfg.max_steps):
            if not beams:
                break
            n_children = children_per_parent(step, cfg)
            candidates = []
            for rank, parent in enumerate(beams):
                uniforms = draw_uniforms(cfg.seed, key, step, rank, n_children,
                                         cfg.max_step_tokens)
                for j in range(n_children):
                    step_tokens, ended = [], "end"
                    for t in range(cfg.max_step_tokens):
                        logits = _encode(policy, prompt + parent.tokens + step_tokens, counts,
                                         "policy")[-1:]
                        token = int(sample_with_uniform(logits, uniforms[j, t:t + 1], cfg)[0])
                        if token in eos_ids:
                            ended = "eos"
                            break
                        step_tokens.append(token)
                        if token in step_ends:
                            break
                    if step_tokens:
                        value = float(_encode(value_model, prompt + parent.tokens + step_tokens,
                                              counts, "value")[-1])
                    else:
                        value = parent.value
                    candidates.append(make_candidate(rank, parent.tokens, step_tokens, value,
                                                     ended, is_final))
            finished, beams = select_beams(candidates, cfg.beams, cfg.distinct)
            pool.extend(finished)
            history.append(beams)
            expanded.append(candidates)
            last = beams
        result = pick_answer(pool, last or [Candidate(-1, [], [], root_value, False, False)])
        result.beams_per_step, result.candidates_per_step = history, expanded
        results.append(result)
    return results
