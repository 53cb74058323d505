"""Cascade attention: the PyTorch path and the Triton kernel (interpreted on CPU) against an
explicit full attention over [prefix; suffix]; the cascade KV against the copying KV path and a
full re-encode for the policy and the value model; the searcher on the Triton kernel; errors."""
import math

import pytest
import torch

from test_search import SIZE, TEXTS, _value, models  # noqa: F401 (the tiny models fixture)

from oreo_fast.search.cascade import (ChildGroups, cascade_attention, merge_attention,
                                     prefix_attention_torch)
from oreo_fast.search.shared_prefix import materialize_rows, share_prefix
from oreo_fast.kernels import TRITON_AVAILABLE
from oreo_fast.search.kv import expand_rows, gather_compact, prefill

torch.set_num_threads(1)
needs_triton = pytest.mark.skipif(not TRITON_AVAILABLE, reason="Triton is not installed")


def explicit_attention(query, prefix_keys, prefix_values, prefix_mask, parent, suffix_keys,
                       suffix_values, suffix_mask, scale):
    """One (child, head, token) at a time: softmax over the concatenated keys that the token
    may see (its parent's real prefix keys, then its own real suffix keys up to itself)."""
    n, heads, tokens, dim = query.shape
    group = heads // prefix_keys.shape[1]
    length = suffix_keys.shape[2]
    out = torch.zeros(n, heads, tokens, dim, dtype=torch.float64)
    for c in range(n):
        p = int(parent[c])
        for h in range(heads):
            keys = torch.cat([prefix_keys[p, h // group], suffix_keys[c, h // group]]).double()
            values = torch.cat([prefix_values[p, h // group],
                                suffix_values[c, h // group]]).double()
            for t in range(tokens):
                own = [bool(suffix_mask[c, s]) and s <= length - tokens + t
                       for s in range(length)]
                visible = torch.tensor([bool(m) for m in prefix_mask[p]] + own)
                if not visible.any():
                    continue
                scores = keys[visible] @ query[c, h, t].double() * scale
                out[c, h, t] = torch.softmax(scores, 0) @ values[visible]
    return out


def make_case(parents_children, heads, kv_heads, tokens, dim, prefix_len, suffix_len,
              dtype=torch.float64, seed=0):
    """Random inputs with left padding and holes in the prefix mask, suffixes of different
    lengths (children that stopped early) and one child with an empty suffix."""
    gen = torch.Generator().manual_seed(seed)
    parents = len(parents_children)
    parent = torch.tensor([p for p, k in enumerate(parents_children) for _ in range(k)],
                          dtype=torch.long)
    n = len(parent)

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    # queries as transformers makes them: [N, T, H, D] transposed (not contiguous)
    query = rand(n, tokens, heads, dim).transpose(1, 2)
    prefix_keys, prefix_values = rand(parents, kv_heads, prefix_len, dim), \
        rand(parents, kv_heads, prefix_len, dim)
    prefix_mask = torch.ones(parents, prefix_len, dtype=torch.long)
    for p in range(parents):
        prefix_mask[p, :3 * p] = 0  # left padding
        prefix_mask[p, prefix_len // 2 + p: prefix_len // 2 + p + 2] = 0  # a hole
    suffix_keys, suffix_values = rand(n, kv_heads, suffix_len, dim), \
        rand(n, kv_heads, suffix_len, dim)
    suffix_mask = torch.ones(n, suffix_len, dtype=torch.long)
    for c in range(n):
        suffix_mask[c, suffix_len - c % 3:] = 0  # stopped 0, 1 or 2 tokens early
        suffix_mask[c, 0] = c % 2  # a hole
    suffix_mask[n - 1] = 0  # empty suffix: only the prefix is visible
    return (query, prefix_keys, prefix_values, prefix_mask, parent, suffix_keys, suffix_values,
            suffix_mask)


CASES = [
    # (children per parent, heads, kv heads, tokens, head dim, prefix len, suffix len)
    pytest.param((3, 3), 4, 2, 1, 5, 70, 4, id="gqa-odd-dim-decode"),
    pytest.param((2, 2, 2), 6, 2, 3, 8, 40, 5, id="gqa3-several-tokens"),
    pytest.param((4,), 2, 2, 2, 3, 17, 2, id="mha-one-parent"),
    pytest.param((2, 0, 3), 4, 1, 2, 7, 35, 4, id="uneven-groups-empty-parent"),
]


@pytest.mark.parametrize("fused", [True, False], ids=["cpu-fused-op", "matmul"])
@pytest.mark.parametrize("children,heads,kv_heads,tokens,dim,prefix_len,suffix_len", CASES)
def test_torch_path_equals_explicit_attention(children, heads, kv_heads, tokens, dim,
                                              prefix_len, suffix_len, fused, monkeypatch):
    import oreo_fast.search.cascade as cascade

    if not fused:  # the path used off CPU, or where torch lacks the fused CPU op
        monkeypatch.setattr(cascade, "_CPU_FUSED_ATTENTION", None)
    elif cascade._CPU_FUSED_ATTENTION is None:
        pytest.skip("this torch has no fused CPU attention op")
    case = make_case(children, heads, kv_heads, tokens, dim, prefix_len, suffix_len)
    query, pk, pv, pm, parent, sk, sv, sm = case
    groups = ChildGroups.from_parent(parent, len(children))
    assert (groups.per_parent is None) == (len(set(children)) > 1)
    scale = 1 / math.sqrt(dim)
    out, lse = cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, scale, impl="torch")
    assert out.dtype == torch.float64 and out.shape == query.shape
    torch.testing.assert_close(out, explicit_attention(*case, scale), atol=1e-12, rtol=0)
    # lse is the log of the full softmax denominator
    full_lse = torch.stack([torch.logsumexp(torch.cat([
        (pk[parent[c], h // (heads // kv_heads)] @ query[c, h, t])[pm[parent[c]].bool()],
        (sk[c, h // (heads // kv_heads), :suffix_len - tokens + t + 1] @ query[c, h, t])[
            sm[c, :suffix_len - tokens + t + 1].bool()]]) * scale, 0)
        for c in range(len(parent)) for h in range(heads) for t in range(tokens)])
    torch.testing.assert_close(lse.flatten(), full_lse, atol=1e-12, rtol=0)


@needs_triton
@pytest.mark.parametrize("children,heads,kv_heads,tokens,dim,prefix_len,suffix_len", CASES)
def test_triton_kernel_equals_explicit_attention_float64(children, heads, kv_heads, tokens,
                                                         dim, prefix_len, suffix_len):
    from oreo_fast.kernels.cascade_attention import prefix_attention_forward

    case = make_case(children, heads, kv_heads, tokens, dim, prefix_len, suffix_len, seed=1)
    query, pk, pv, pm, parent, sk, sv, sm = case
    groups = ChildGroups.from_parent(parent, len(children))
    scale = 1 / math.sqrt(dim)
    out, lse = cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, scale, impl="triton")
    torch.testing.assert_close(out, explicit_attention(*case, scale), atol=1e-12, rtol=0)
    _, torch_lse = cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, scale, impl="torch")
    torch.testing.assert_close(lse, torch_lse, atol=1e-12, rtol=0)
    # small blocks: several key blocks and several row blocks per parent
    out_p, lse_p = prefix_attention_forward(query, pk, pv, pm, groups.child_start, scale,
                                            block_m=16, block_n=16)
    ref_p, ref_lse_p = prefix_attention_torch(query, pk, pv, pm, groups, scale)
    torch.testing.assert_close(out_p, ref_p, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse_p, ref_lse_p, atol=1e-12, rtol=0)


@needs_triton
# key blocks of 16: the probabilities x values tl.dot needs K >= 16 on a GPU; with 9 tokens
# x 2 heads per child and 40 suffix keys, still several row and key blocks per child
@pytest.mark.parametrize("blocks", [(16, 16), (16, 32)], ids=["small-blocks", "default-blocks"])
def test_triton_suffix_kernel_continues_the_prefix_softmax(blocks):
    """The suffix kernel starts from the prefix's (out, lse), also where a row saw no prefix
    key (parent 0 fully masked) or sees no key at all (that parent's child with an empty
    suffix): against the explicit attention and the torch suffix + merge."""
    from oreo_fast.search.cascade import suffix_attention_torch
    from oreo_fast.kernels.cascade_attention import suffix_merge_forward

    case = list(make_case((2, 3), 4, 2, 9, 5, 20, 40, seed=3))
    case[3][0] = 0  # parent 0: no visible prefix key
    case[7][1] = 0  # its second child: empty suffix too, so nothing visible
    query, pk, pv, pm, parent, sk, sv, sm = case
    groups = ChildGroups.from_parent(parent, 2)
    scale = 0.37
    out_p, lse_p = prefix_attention_torch(query, pk, pv, pm, groups, scale)
    assert torch.isinf(lse_p[:2]).all()
    out, lse = suffix_merge_forward(query, sk, sv, sm, out_p, lse_p, scale, *blocks)
    torch.testing.assert_close(out, explicit_attention(*case, scale), atol=1e-12, rtol=0)
    ref_out, ref_lse = merge_attention(out_p, lse_p, *suffix_attention_torch(query, sk, sv, sm,
                                                                             scale))
    torch.testing.assert_close(out, ref_out, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, ref_lse, atol=1e-12, rtol=0)
    assert torch.isinf(lse[1]).all() and (out[1] == 0).all()


@needs_triton
def test_triton_kernel_float32_dot_path():
    """float32 goes through an IEEE float32 tl.dot (float64 through a float64 one): checked
    against the float64 explicit attention within float32 rounding."""
    case = make_case((3, 2), 4, 2, 2, 5, 45, 3, dtype=torch.float32, seed=2)
    query, pk, pv, pm, parent, sk, sv, sm = case
    groups = ChildGroups.from_parent(parent, 2)
    out, lse = cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, 0.4, impl="triton")
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), explicit_attention(*case, 0.4), atol=2e-6, rtol=0)


def test_merge_of_two_halves_equals_attention_over_the_union():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(*s, generator=gen, dtype=torch.float64)
               for s in ((4, 6), (9, 6), (9, 6)))
    scores = q @ k.T
    full = torch.softmax(scores, -1) @ v
    halves = [(torch.softmax(scores[:, s], -1) @ v[s], torch.logsumexp(scores[:, s], -1))
              for s in (slice(0, 4), slice(4, 9))]
    out, lse = merge_attention(*halves[0], *halves[1])
    torch.testing.assert_close(out, full, atol=1e-12, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(scores, -1), atol=1e-12, rtol=0)
    # an empty half (lse = -inf) contributes nothing; two empty halves give 0, not NaN
    empty = (torch.zeros(4, 6, dtype=torch.float64), torch.full((4,), float("-inf"),
                                                                 dtype=torch.float64))
    torch.testing.assert_close(merge_attention(*halves[0], *empty)[0], halves[0][0])
    both_empty = merge_attention(*empty, *empty)
    assert (both_empty[0] == 0).all() and torch.isneginf(both_empty[1]).all()


def test_bad_arguments_name_the_argument():
    case = make_case((2,), 4, 2, 1, 4, 6, 2)
    query, pk, pv, pm, parent, sk, sv, sm = case
    groups = ChildGroups.from_parent(parent, 1)
    with pytest.raises(ValueError, match="impl"):
        cascade_attention(query, pk, pv, pm, groups, sk, sv, sm, 1.0, impl="cuda")
    with pytest.raises(ValueError, match="prefix_mask"):
        cascade_attention(query, pk, pv, pm[:, 1:], groups, sk, sv, sm, 1.0)
    with pytest.raises(ValueError, match="suffix_keys"):
        cascade_attention(query, pk, pv, pm, groups, sk[:1], sv, sm, 1.0)
    with pytest.raises(ValueError, match="multiple of KV heads"):
        cascade_attention(query[:, :3], pk, pv, pm, groups, sk, sv, sm, 1.0)
    with pytest.raises(ValueError, match="parent must be sorted"):
        ChildGroups.from_parent(torch.tensor([1, 0]), 2)
    with pytest.raises(ValueError, match="parent holds an index"):
        ChildGroups.from_parent(torch.tensor([0, 2]), 2)


# ------------------------------------------------------------------- model level


@pytest.fixture(scope="module")
def tiny_models():
    # the search tests' tiny Qwen2 (GQA: 2 query heads per KV head), in float64
    from oreo_fast.models import TinyModelConfig, build_tiny_model
    from oreo_fast.tokenizer import build_tokenizer

    tok = build_tokenizer(TEXTS, vocab_size=300)
    policy = build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0)).double()
    value = _value(tok)
    torch.manual_seed(2)
    torch.nn.init.normal_(value.value_head.weight, std=1.0)
    return policy, value.double().eval()


def _reencode(model, sequence):
    ids = torch.tensor([sequence])
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids),
                position_ids=torch.arange(len(sequence))[None])
    return out.logits[0, -1] if hasattr(out, "logits") else out.values[0]


PROMPTS = [[5, 17, 33, 40, 41, 7, 9, 12, 60], [3, 4], [100, 101, 102, 103, 104]]


@pytest.mark.parametrize("impl", ["torch", pytest.param("triton", marks=needs_triton)])
@torch.no_grad()
def test_policy_logits_through_the_cascade_equal_copying_and_reencoding(tiny_models, impl):
    policy, _ = tiny_models
    children = 3
    pol = prefill(policy, PROMPTS, 0, None, "policy")
    pol.forward_tokens(policy, torch.tensor([[8], [0], [9]]), torch.tensor([[1], [0], [1]]),
                       None, "policy")  # a hole in the middle prompt's row
    copied = expand_rows(pol, children, reserve=2)
    shared = share_prefix(pol, children, reserve=2, impl=impl)  # grows past its reserve
    texts = [PROMPTS[0] + [8], PROMPTS[1], PROMPTS[2] + [9]]
    texts = [t for t in texts for _ in range(children)]
    gen = torch.Generator().manual_seed(0)
    for t in range(4):
        ids = torch.randint(1, 250, (len(texts), 1), generator=gen)
        mask = (torch.rand(len(texts), 1, generator=gen) < 0.7).long() if t else \
            torch.ones_like(ids)
        mask[0] = 1
        a = copied.forward_tokens(policy, ids, mask, None, "policy")[:, -1]
        b = shared.forward_tokens(policy, ids, mask, None, "policy")[:, -1]
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)
        for row in range(len(texts)):
            if mask[row, 0]:
                texts[row] = texts[row] + [int(ids[row, 0])]
                torch.testing.assert_close(b[row], _reencode(policy, texts[row]), atol=1e-10,
                                           rtol=0)
    # the kept children become ordinary rows: the same as the copying path's
    keep = torch.tensor([7, 0, 4])
    mine, theirs = materialize_rows(shared, keep), gather_compact(copied, keep)
    assert torch.equal(mine.mask, theirs.mask) and torch.equal(mine.next_pos, theirs.next_pos)
    for x, y in zip(mine.cache.layers, theirs.cache.layers):
        torch.testing.assert_close(x.keys, y.keys, atol=1e-12, rtol=0)
        torch.testing.assert_close(x.values, y.values, atol=1e-12, rtol=0)
    assert policy.config._attn_implementation == "sdpa"  # restored after each forward


@torch.no_grad()
def test_values_of_whole_steps_through_the_cascade_equal_copying_and_reencoding(tiny_models):
    _, value = tiny_models
    children = 2
    val = prefill(value, PROMPTS, 0, None, "value")
    copied, shared = expand_rows(val, children, reserve=4), share_prefix(val, children)
    steps = torch.tensor([[11, 12, 13, 14], [20, 21, 0, 0], [30, 0, 0, 0], [40, 41, 42, 0],
                          [0, 0, 0, 0], [50, 51, 52, 53]])  # row 4: an empty step
    lengths = torch.tensor([4, 2, 1, 3, 0, 4])
    mask = (torch.arange(4)[None] < lengths[:, None]).long()
    a = copied.forward_tokens(value, steps, mask, None, "value")
    b = shared.forward_tokens(value, steps, mask, None, "value")
    torch.testing.assert_close(b[mask.bool()], a[mask.bool()], atol=1e-10, rtol=0)
    for row in range(len(steps)):
        n = int(lengths[row])
        if n:
            full = _reencode(value, PROMPTS[row // children] + steps[row, :n].tolist())
            torch.testing.assert_close(b[row, :n], full[-n:], atol=1e-10, rtol=0)


@needs_triton
def test_searcher_on_the_triton_kernel_equals_the_torch_path(models):
    from oreo_fast.search.beam import SearchConfig, TokenCounts, beam_search, step_end_ids

    tok, policy, value, prompts = models
    results = []
    for impl in ("torch", "triton"):
        cfg = SearchConfig(beams=2, candidates=2, max_steps=2, max_step_tokens=3, seed=7,
                           attention_impl=impl)
        results.append(beam_search(policy, value, prompts[:2], cfg, [tok.eos_token_id],
                                   step_end_ids(tok), tok.pad_token_id, counts=TokenCounts()))
    for a, b in zip(*results):
        assert a.tokens == b.tokens and a.value == pytest.approx(b.value, abs=1e-5)


def test_search_config_rejects_unknown_sharing_and_impl():
    from oreo_fast.search.beam import SearchConfig

    with pytest.raises(ValueError, match="kv_sharing"):
        SearchConfig(kv_sharing="paged")
    with pytest.raises(ValueError, match="attention_impl"):
        SearchConfig(attention_impl="flash")


def test_best_of_n_scores_the_same_with_shared_and_copied_prefixes(models):
    from oreo_fast.sampling import SamplingConfig
    from oreo_fast.search.beam import TokenCounts, best_of_n

    tok, policy, value, prompts = models
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0)
    runs = {}
    for sharing in ("cascade", "copy"):
        counts = TokenCounts()
        runs[sharing] = (best_of_n(policy, value, prompts, 3, sampling, [tok.eos_token_id],
                                   tok.pad_token_id, seed=5, counts=counts,
                                   kv_sharing=sharing), counts.value)
    (shared, shared_tokens), (copied, copied_tokens) = runs["cascade"], runs["copy"]
    assert shared_tokens == copied_tokens
    for a, b in zip(shared, copied):
        assert a.tokens == b.tokens
        torch.testing.assert_close(torch.tensor([c.value for c in a.pool]),
                                   torch.tensor([c.value for c in b.pool]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="kv_sharing"):
        best_of_n(policy, value, prompts, 2, sampling, [tok.eos_token_id], 0, kv_sharing="x")


def test_a_model_that_cannot_take_the_cascade_falls_back_to_copying_with_one_notice(
        models, caplog, monkeypatch):
    """A sliding-window Qwen2 (its window longer than every sequence here, so the answers
    must not change): the search copies the prefix KV instead, says so once, and never
    enters the cascade attention."""
    from oreo_fast.search import shared_prefix
    from oreo_fast.search.beam import SearchConfig, TokenCounts, beam_search, step_end_ids

    tok, policy, value, prompts = models
    config = policy.config.to_dict()
    config.pop("layer_types")  # derived again from the window settings
    config.update(use_sliding_window=True, sliding_window=512, max_window_layers=1)
    windowed = type(policy)(type(policy.config).from_dict(config))
    windowed.load_state_dict(policy.state_dict())
    windowed.eval()
    reason = shared_prefix.cascade_unsupported_reason(windowed)
    assert "other than full attention" in reason and "sliding_attention" in reason
    entered = []
    monkeypatch.setattr(shared_prefix, "cascade_attention",
                        lambda *a, **k: entered.append(1) / 0)
    cfg = dict(beams=2, candidates=2, max_steps=2, max_step_tokens=3, seed=7)
    args = (prompts, [tok.eos_token_id], step_end_ids(tok), tok.pad_token_id)
    with caplog.at_level("WARNING", logger="oreo_fast"):
        runs = [beam_search(windowed, value, args[0], SearchConfig(**cfg, kv_sharing=sharing),
                            *args[1:], counts=TokenCounts()) for sharing in
                ("cascade", "cascade", "copy")]
    notices = [r.getMessage() for r in caplog.records if r.name == "oreo_fast"]
    assert len(notices) == 1 and notices[0].count("\n") == 0, notices  # once, one line
    assert "Qwen2ForCausalLM" in notices[0] and "kv_sharing=copy" in notices[0]
    assert not entered
    for a, b in zip(runs[0], runs[2]):
        assert a.tokens == b.tokens and a.value == b.value
    with pytest.raises(ValueError, match="other than full attention"):
        with shared_prefix.cascade_attention_routed([windowed]):
            pass
