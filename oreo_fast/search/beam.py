"""Value-guided step-level beam search and best-of-N, with the KV cache shared across beams.

The search (OREO's test-time use of its value model): each problem keeps B beams; every beam
expands K sampled candidate next steps (a step ends at a token holding a newline, or at EOS);
the value model scores each candidate at the state where the next step would begin, i.e.
``values[t]`` at the step's last token (the newline), exactly the index training reads for
step-level states (``data.py``: the state of a step starting at token p is read at p - 1).
Candidates that finish (EOS, or a final answer by ``is_final``) go to an answer pool, the
others compete for the B places by value (with ``distinct``, identical candidates count
once). The search stops when no beam is left or after ``max_steps`` steps and returns the
highest-valued finished answer (the best beam when nothing finished). At the first step the
prompt is the only parent and expands B x K candidates (B copies of the root).

Cost: every token goes through each model once. The policy and the value model each keep
their own cache; the prompt is prefilled once per model; a beam's cache is reused by all its
children, which only feed their new step tokens; by default without copying it
(``kv_sharing="cascade"``: ``oreo_fast.search.cascade`` attends to a parent's prefix once for all
its children and merges that with each child's own step by log-sum-exp). The policy holds
back each beam's last step token ("pending"): it is fed at the start of the next step, once
per beam, not once per child, and never for candidates that are dropped. Positions are
explicit everywhere (rows have different prompt lengths and the step caches have holes).

Randomness is drawn per (problem, step, parent rank, child, token index) from its own
generator and turned into a token by inverse-CDF sampling, so any batching, caching or
searcher sees the same draws: ``search_reference.naive_beam_search`` (no cache, everything
re-encoded) returns the same beams, values and answers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from oreo_fast.config import require_at_least, require_choice
from oreo_fast.errors import ConfigError
from oreo_fast.models import check_same_vocabulary
from oreo_fast.sampling import check_sampling, filter_logits, generate
from oreo_fast.search.cascade import IMPLS
from oreo_fast.search.shared_prefix import (CascadeKV, materialize_rows, routed_for, share_prefix,
                                           usable_kv_sharing)
from oreo_fast.search.kv import expand_rows, gather_compact, prefill
from oreo_fast.tokenizer import loaded_tokenizer_signature

# ----------------------------------------------------------------- configuration, results

KV_SHARING = ("cascade", "copy")


def check_kv_sharing(kv_sharing: str) -> None:
    if kv_sharing not in KV_SHARING:
        raise ConfigError(f"kv_sharing: must be one of {KV_SHARING} (got {kv_sharing!r})")


@dataclass
class SearchConfig:
    beams: int = 4  # B: beams kept per problem
    candidates: int = 4  # K: sampled next steps per beam
    max_steps: int = 16  # step limit
    max_step_tokens: int = 64  # a step that reaches this length ends there (and continues)
    temperature: float = 1.0  # 0: greedy steps (B = K = 1 then is greedy decoding)
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    # identical candidates (same tokens: one state, one value) take one place. Off, as in
    # the paper: copies of a beam then draw more children from that one state (README,
    # "Value-guided beam search", measures both)
    distinct: bool = False
    # how children reuse their parent's KV: "cascade" (the prefix is read in place, merged
    # with each child's own suffix by log-sum-exp) or "copy" (expand_rows: one copy per child)
    kv_sharing: str = "cascade"
    attention_impl: str = "auto"  # cascade prefix attention: auto (Triton on CUDA), torch, triton

    def __post_init__(self):
        require_at_least(self, 1, "beams", "candidates", "max_steps", "max_step_tokens")
        check_sampling(self)
        check_kv_sharing(self.kv_sharing)
        require_choice(self, "attention_impl", IMPLS)


@dataclass
class Candidate:
    parent: int  # rank of the parent beam (-1: the prompt)
    tokens: list[int]  # response tokens so far, this step included, EOS excluded
    step: list[int]  # this step's tokens, EOS excluded
    value: float
    finished: bool
    eos: bool


@dataclass
class SearchResult:
    tokens: list[int]  # the chosen response (EOS excluded)
    value: float
    finished: bool
    pool: list[Candidate]  # every finished candidate, in the order found
    beams_per_step: list[list[Candidate]] = field(default_factory=list)  # the kept beams
    candidates_per_step: list[list[Candidate]] = field(default_factory=list)  # all expanded


@dataclass
class TokenCounts:
    """Tokens each model actually processed (real tokens, not padding)."""

    policy: int = 0
    value: int = 0
    padded_slots: int = 0  # padding positions run through a model (wasted compute)
    generated: int = 0  # tokens the policy sampled (EOS included), as ``generate`` counts

    def add(self, other: "TokenCounts") -> None:
        self.policy += other.policy
        self.value += other.value
        self.padded_slots += other.padded_slots
        self.generated += other.generated


# ----------------------------------------------------------------------- sampling, draws


def draw_uniforms(seed: int, problem_key: int, step: int, parent: int, n: int,
                  length: int) -> torch.Tensor:
    """[n, length] uniforms for the children of one parent at one step; a function of the
    keys only, so every searcher and batch layout draws the same numbers."""
    key = ((seed * 1_000_003 + problem_key) * 10_007 + step) * 1_009 + parent + 1
    gen = torch.Generator().manual_seed(key % (2 ** 63))
    return torch.rand(n, length, generator=gen, dtype=torch.float64)


def sample_with_uniform(logits: torch.Tensor, u: torch.Tensor, cfg: SearchConfig) -> torch.Tensor:
    """One token per row of [N, V] logits, by inverse CDF at the uniform u[N]."""
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(-1)
    probs = filter_logits(logits / cfg.temperature, cfg.top_k, cfg.top_p).softmax(-1).double()
    cdf = probs.cumsum(-1)
    target = (u.to(cdf.device) * cdf[:, -1]).unsqueeze(-1)
    # side="right": the first token whose cumulative probability exceeds the target, so a
    # filtered (zero-probability) token is never drawn, not even at u = 0
    return torch.searchsorted(cdf, target, side="right").squeeze(-1).clamp(
        max=logits.shape[-1] - 1)


def step_end_ids(tokenizer) -> set[int]:
    """Ids of every token whose text holds a newline: a step ends with one of them."""
    ends = set()
    for token_id in range(len(tokenizer)):
        if "\n" in tokenizer.decode([token_id]):
            ends.add(token_id)
    return ends


def check_models(policy, value_model, tokenizer=None, value_tokenizer=None) -> None:
    """Clear errors for a value model that cannot score the policy's tokens: another
    vocabulary size, or (when both are given) another tokenizer."""
    signature = (lambda tok: None if tok is None else loaded_tokenizer_signature(tok))
    check_same_vocabulary({
        "policy": ("(policy)", policy.config.vocab_size, signature(tokenizer)),
        "value": ("(value)", value_model.config.vocab_size, signature(value_tokenizer))})


# -------------------------------------------------------------------- beam bookkeeping


def select_beams(candidates: list[Candidate], n_beams: int, distinct: bool = False
                 ) -> tuple[list[Candidate], list[Candidate]]:
    """(finished candidates, the top ``n_beams`` unfinished by value). Ties keep the
    earlier candidate, so the choice is deterministic. With ``distinct``, candidates with
    the same tokens (one state, one value) count once, the earliest."""
    if distinct:
        seen: set[tuple[bool, tuple[int, ...]]] = set()
        unique = []
        for c in candidates:
            key = (c.finished, tuple(c.tokens))
            if key not in seen:
                seen.add(key)
                unique.append(c)
        candidates = unique
    finished = [c for c in candidates if c.finished]
    live = [i for i, c in enumerate(candidates) if not c.finished]
    live.sort(key=lambda i: (-candidates[i].value, i))
    return finished, [candidates[i] for i in live[:n_beams]]


def pick_answer(pool: list[Candidate], beams: list[Candidate]) -> SearchResult:
    """The highest-valued finished candidate (first found on ties), else the best beam."""
    source = pool or beams
    best = max(range(len(source)), key=lambda i: (source[i].value, -i))
    c = source[best]
    return SearchResult(list(c.tokens), c.value, c.finished, pool)


def make_candidate(parent: int, parent_tokens: list[int], step: list[int], value: float,
                   ended_by: str, is_final) -> Candidate:
    tokens = parent_tokens + step
    eos = ended_by == "eos"
    finished = eos or bool(is_final is not None and is_final(tokens))
    return Candidate(parent, tokens, step, value, finished, eos)


def children_per_parent(step: int, cfg: SearchConfig) -> int:
    return cfg.beams * cfg.candidates if step == 0 else cfg.candidates


def children_kv(kv, n_children: int, reserve: int, sharing: str, impl: str = "auto"):
    """The children's view of their parents' KV: shared in place (cascade) or copied."""
    if sharing == "cascade":
        return share_prefix(kv, n_children, reserve=reserve, impl=impl)
    return expand_rows(kv, n_children, reserve=reserve)


def kept_rows_kv(kv, rows: torch.Tensor):
    """The kept children as the next step's parents (prefix + own step, holes removed)."""
    return materialize_rows(kv, rows) if isinstance(kv, CascadeKV) else gather_compact(kv, rows)


# ----------------------------------------------------------------- the cached searcher


@torch.no_grad()
def beam_search(policy, value_model, prompts: list[list[int]], cfg: SearchConfig,
                eos_ids: list[int], step_ends: set[int], pad_id: int,
                is_final: Callable[[list[int]], bool] | None = None,
                problem_keys: list[int] | None = None,
                counts: TokenCounts | None = None) -> list[SearchResult]:
    """Value-guided beam search for a batch of prompts (token-id lists), all problems' beams
    in one forward per token. ``problem_keys`` name each problem's random draws (default:
    its index), so a problem's result does not depend on the batch it is in."""
    if any(len(p) < 2 for p in prompts):
        raise ValueError("every prompt needs at least 2 tokens")
    check_models(policy, value_model)
    sharing = usable_kv_sharing(cfg.kv_sharing, (policy, value_model))
    with routed_for(sharing, (policy, value_model)):
        return _search(policy, value_model, prompts, cfg, sharing, eos_ids, step_ends, pad_id,
                       is_final, problem_keys, counts)


def _search(policy, value_model, prompts, cfg, sharing, eos_ids, step_ends, pad_id, is_final,
            problem_keys, counts) -> list[SearchResult]:
    device = next(policy.parameters()).device
    keys = problem_keys if problem_keys is not None else list(range(len(prompts)))
    counts = counts if counts is not None else TokenCounts()
    eos_t = torch.tensor(sorted(eos_ids), device=device)
    end_t = torch.tensor(sorted(step_ends | set(eos_ids)), device=device)

    # prefill: the policy gets the prompt but its last token (pending), the value all of it
    pol = prefill(policy, [p[:-1] for p in prompts], pad_id, counts, "policy")
    val, root_values = prefill(value_model, prompts, pad_id, counts, "value", values=True)
    # per live beam row: (problem, its Candidate); rows of pol/val follow this list
    rows: list[tuple[int, Candidate]] = [
        (i, Candidate(-1, [], [], float(root_values[i]), False, False))
        for i in range(len(prompts))]
    pending = torch.tensor([p[-1] for p in prompts], device=device)
    pools: list[list[Candidate]] = [[] for _ in prompts]
    history: list[list[list[Candidate]]] = [[] for _ in prompts]
    expanded: list[list[list[Candidate]]] = [[] for _ in prompts]
    last_beams: list[list[Candidate]] = [[] for _ in prompts]

    for step in range(cfg.max_steps):
        if not rows:
            break
        n_children = children_per_parent(step, cfg)
        # 1. the policy feeds each beam's pending token once, for all of its children
        logits = pol.forward_tokens(policy, pending[:, None], torch.ones_like(pending)[:, None],
                                    counts, "policy")[:, -1]
        # 2. children share the parent's prefix: read in place (cascade) or copied
        pol_c = children_kv(pol, n_children, cfg.max_step_tokens, sharing, cfg.attention_impl)
        logits = logits.repeat_interleave(n_children, dim=0)
        uniforms = []
        rank_in_problem: dict[int, int] = {}
        for problem, _ in rows:
            rank = rank_in_problem.get(problem, 0)
            rank_in_problem[problem] = rank + 1
            uniforms.append(draw_uniforms(cfg.seed, keys[problem], step, rank, n_children,
                                          cfg.max_step_tokens))
        uniforms = torch.cat(uniforms)
        # 3. decode the candidate steps; a row that ended feeds padding (mask 0) until all end
        n_rows = len(rows) * n_children
        steps = torch.full((n_rows, cfg.max_step_tokens), pad_id, dtype=torch.long, device=device)
        length = torch.zeros(n_rows, dtype=torch.long, device=device)
        ended_by_eos = torch.zeros(n_rows, dtype=torch.bool, device=device)
        alive = torch.ones(n_rows, dtype=torch.bool, device=device)
        for t in range(cfg.max_step_tokens):
            tokens = sample_with_uniform(logits, uniforms[:, t], cfg)
            counts.generated += int(alive.sum())
            is_eos = torch.isin(tokens, eos_t)
            steps[:, t] = torch.where(alive & ~is_eos, tokens, steps[:, t])
            length += (alive & ~is_eos).long()
            ended_by_eos |= alive & is_eos
            alive = alive & ~torch.isin(tokens, end_t)
            if not alive.any() or t + 1 == cfg.max_step_tokens:
                break
            # the token just sampled is fed only by rows that go on (a step's last token
            # waits as "pending" until its beam is kept)
            feed = torch.where(alive, tokens, torch.full_like(tokens, pad_id))
            logits = pol_c.forward_tokens(policy, feed[:, None], alive.long()[:, None],
                                          counts, "policy")[:, -1]
        # 4. the value model reads every candidate at its last token: the next step's state
        val_c = children_kv(val, n_children, cfg.max_step_tokens, sharing, cfg.attention_impl)
        width = max(int(length.max()), 1)
        step_mask = (torch.arange(width, device=device)[None] < length[:, None]).long()
        cand_values = val_c.forward_tokens(value_model, steps[:, :width], step_mask, counts,
                                           "value")
        last = (length - 1).clamp(min=0)
        read = cand_values.gather(1, last[:, None]).squeeze(1)
        parent_values = torch.tensor([c.value for _, c in rows], device=device,
                                     dtype=read.dtype).repeat_interleave(n_children)
        read = torch.where(length > 0, read, parent_values)  # EOS at once: the parent's state
        # 5. bookkeeping, problem by problem
        length_l, eos_l, read_l = length.tolist(), ended_by_eos.tolist(), read.tolist()
        by_problem: dict[int, list[tuple[int, Candidate]]] = {}
        for r, (problem, parent) in enumerate(rows):
            rank = sum(1 for p, _ in rows[:r] if p == problem)
            for j in range(n_children):
                row = r * n_children + j
                step_tokens = steps[row, :length_l[row]].tolist()
                cand = make_candidate(rank, parent.tokens, step_tokens, read_l[row],
                                      "eos" if eos_l[row] else "end", is_final)
                by_problem.setdefault(problem, []).append((row, cand))
        keep_rows, new_rows = [], []
        for problem in sorted(by_problem):
            pairs = by_problem[problem]
            finished, kept = select_beams([c for _, c in pairs], cfg.beams, cfg.distinct)
            pools[problem].extend(finished)
            history[problem].append(kept)
            expanded[problem].append([c for _, c in pairs])
            last_beams[problem] = kept
            row_of = {id(c): row for row, c in pairs}
            for c in kept:
                keep_rows.append(row_of[id(c)])
                new_rows.append((problem, c))
        rows = new_rows
        if not rows:
            break
        # 6. the kept beams' caches, holes squeezed out; the policy's pending token is the
        # step's last token (it was sampled, not fed)
        keep = torch.tensor(keep_rows, device=device)
        pending = steps[keep, length[keep] - 1]
        pol = kept_rows_kv(pol_c, keep)
        val = kept_rows_kv(val_c, keep)
    results = []
    for i in range(len(prompts)):
        res = pick_answer(pools[i], last_beams[i] or [Candidate(-1, [], [], float(root_values[i]),
                                                                False, False)])
        res.beams_per_step, res.candidates_per_step = history[i], expanded[i]
        results.append(res)
    return results


# ------------------------------------------------------------------------- best-of-N


@torch.no_grad()
def best_of_n(policy, value_model, prompts: list[list[int]], n: int, sampling, eos_ids,
              pad_id: int, seed: int = 0, counts: TokenCounts | None = None,
              kv_sharing: str = "cascade") -> list[SearchResult]:
    """N full samples per prompt (``sampling.generate``), each scored by the value model at
    its last response token (EOS excluded); the highest-valued one is returned."""
    if n < 1:
        raise ValueError(f"best-of-N needs N >= 1, got {n}")
    check_kv_sharing(kv_sharing)
    check_models(policy, value_model)
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    counts = counts if counts is not None else TokenCounts()

    def count_generated(n_tokens: int) -> None:
        counts.generated += n_tokens

    samples = generate(policy, prompts, eos_ids, pad_id, sampling, num_samples=n, generator=gen,
                       on_tokens=count_generated)
    kv_sharing = usable_kv_sharing(kv_sharing, (value_model,))
    with routed_for(kv_sharing, (value_model,)):
        return [_best_of_group(value_model, prompt, group, pad_id, counts, kv_sharing)
                for prompt, group in zip(prompts, samples)]


def _best_of_group(value_model, prompt, group, pad_id, counts, kv_sharing) -> SearchResult:
    """The sample of ``group`` (one prompt's N samples) the value model rates highest."""
    n, device = len(group), next(value_model.parameters()).device
    val, root = prefill(value_model, [prompt], pad_id, counts, "value", values=True)
    val = children_kv(val, n, 0, kv_sharing)
    lengths = torch.tensor([len(g.token_ids) for g in group], device=device)
    width = max(int(lengths.max()), 1)
    ids = torch.full((n, width), pad_id, dtype=torch.long, device=device)
    for j, g in enumerate(group):
        ids[j, :len(g.token_ids)] = torch.tensor(g.token_ids, dtype=torch.long)
    mask = (torch.arange(width, device=device)[None] < lengths[:, None]).long()
    values = val.forward_tokens(value_model, ids, mask, counts, "value")
    read = values.gather(1, (lengths - 1).clamp(min=0)[:, None]).squeeze(1)
    read = torch.where(lengths > 0, read, torch.full_like(read, float(root[0])))
    pool = [Candidate(-1, g.token_ids, g.token_ids, float(v), g.finished, g.finished)
            for g, v in zip(group, read.tolist())]
    best = max(range(n), key=lambda j: (pool[j].value, -j))
    return SearchResult(list(pool[best].tokens), pool[best].value, pool[best].finished, pool)
