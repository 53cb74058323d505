"""The search, sampling and saving on models at the widths of real checkpoints
(tests/real_widths.py: Qwen2.5-1.5B, Llama-3.2-1B, untied TinyLlama-1.1B; random weights, 2
decoder layers; training: tests/train/test_real_width_training.py). Issue 12: the tiny Qwen2
of the other tests hid that the cascade search crashed on every Llama-architecture model."""
import logging

import pytest
import torch
from real_widths import REAL_CONFIGS, real_policy, real_tokenizer, real_value_model

from oreo_fast.models import ValueModel, load_policy, save_model
from oreo_fast.sampling import SamplingConfig, generate
from oreo_fast.search.beam import SearchConfig, TokenCounts, beam_search, best_of_n, step_end_ids
from oreo_fast.search.naive import naive_beam_search
from oreo_fast.search import shared_prefix
from oreo_fast.search.shared_prefix import cascade_unsupported_reason
from oreo_fast.tokenizer import encode_pair

NAMES = list(REAL_CONFIGS)
PROMPT_TEXTS = ["Question: start at 3, multiply by 2, add 1.\nAnswer:\n",
                "Question: start at 17, multiply by 5, add 4.\nAnswer:\n12"]


@pytest.fixture(scope="module")
def tokenizer():
    return real_tokenizer()


@pytest.fixture(scope="module", params=NAMES)
def models(request, tokenizer, one_thread):
    name = request.param
    policy = real_policy(name, tokenizer, layers=2)
    # random weights sample almost uniformly: a bias towards newline and EOS makes steps end
    # and candidates finish within a few tokens, so the search has choices to make
    bias = torch.zeros(policy.config.vocab_size)
    bias[[tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("Ċ")]] = 4.0
    hook = policy.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    prompts = [encode_pair(tokenizer, text)[0] for text in PROMPT_TEXTS]
    assert len({len(p) for p in prompts}) == 2  # rows of different lengths: left padding
    yield name, policy, real_value_model(name, tokenizer, layers=2), prompts, bias
    hook.remove()


def _reencoded_values(value_model, prompt, samples):
    """Each sample's value at its last token, by a full forward of prompt + sample."""
    out = []
    for tokens in samples:
        ids = torch.tensor([prompt + tokens])
        out.append(float(value_model(input_ids=ids, attention_mask=torch.ones_like(ids),
                                     position_ids=torch.arange(ids.shape[1])[None]).values[0, -1]))
    return out


@pytest.fixture
def cascade_calls(monkeypatch):
    """How many times the model's attention took the cascade path (per layer and feed)."""
    calls = []
    attend = shared_prefix.cascade_attention

    def counted(*args, **kwargs):
        calls.append(1)
        return attend(*args, **kwargs)

    monkeypatch.setattr(shared_prefix, "cascade_attention", counted)
    return calls


@torch.no_grad()
def test_search_takes_the_cascade_path_and_equals_copying_and_reencoding(models, tokenizer,
                                                                         caplog, cascade_calls):
    name, policy, value, prompts, _ = models
    # every one of these architectures can take the cascade path (no fall back to copying)
    assert cascade_unsupported_reason(policy) is None
    assert cascade_unsupported_reason(value) is None
    cfg = dict(beams=2, candidates=2, max_steps=2, max_step_tokens=3, temperature=1.0, seed=3)
    args = ([tokenizer.eos_token_id], step_end_ids(tokenizer), tokenizer.pad_token_id)
    runs, calls = {}, {}
    with caplog.at_level(logging.WARNING, logger="oreo_fast"):
        for sharing in ("cascade", "copy"):
            runs[sharing] = beam_search(policy, value, prompts,
                                        SearchConfig(**cfg, kv_sharing=sharing), *args,
                                        counts=TokenCounts())
            calls[sharing] = len(cascade_calls)
    assert "kv_sharing" not in caplog.text
    # both models' layers attended through the cascade, and only when asked to
    assert calls["cascade"] >= 2 * policy.config.num_hidden_layers
    assert calls["copy"] == calls["cascade"]
    naive = naive_beam_search(policy, value, prompts, SearchConfig(**cfg), *args)
    for other in (runs["copy"], naive):
        for a, b in zip(runs["cascade"], other):
            assert a.tokens == b.tokens and a.finished == b.finished
            for kept_a, kept_b in zip(a.beams_per_step, b.beams_per_step):
                assert [c.tokens for c in kept_a] == [c.tokens for c in kept_b]
                torch.testing.assert_close(torch.tensor([c.value for c in kept_a]),
                                           torch.tensor([c.value for c in kept_b]),
                                           atol=1e-4, rtol=1e-4)
            assert [c.tokens for c in a.pool] == [c.tokens for c in b.pool]
    # not trivial: candidates of one step differ in value and in tokens
    assert any(len({tuple(c.tokens) for c in step}) > 1 and len({c.value for c in step}) > 1
               for r in runs["cascade"] for step in r.candidates_per_step)
    assert policy.config._attn_implementation == "sdpa"  # the model's own, given back
    assert value.config._attn_implementation == "sdpa"


@torch.no_grad()
def test_best_of_n_scores_equal_with_cascade_copy_and_reencoding(models, tokenizer,
                                                                 cascade_calls):
    name, policy, value, prompts, _ = models
    sampling = SamplingConfig(max_new_tokens=5, temperature=1.0)
    runs = {}
    for sharing in ("cascade", "copy"):
        runs[sharing] = best_of_n(policy, value, prompts, 3, sampling, [tokenizer.eos_token_id],
                                  tokenizer.pad_token_id, seed=4, kv_sharing=sharing)
        if sharing == "cascade":  # one feed per prompt through every layer
            assert len(cascade_calls) == len(prompts) * value.config.num_hidden_layers
    assert len(cascade_calls) == len(prompts) * value.config.num_hidden_layers
    for prompt, a, b in zip(prompts, runs["cascade"], runs["copy"]):
        assert a.tokens == b.tokens and [c.tokens for c in a.pool] == [c.tokens for c in b.pool]
        full = _reencoded_values(value, prompt, [c.tokens for c in a.pool])
        for result in (a, b):
            torch.testing.assert_close(torch.tensor([c.value for c in result.pool]),
                                       torch.tensor(full), atol=1e-4, rtol=1e-4)
    assert len({len(c.tokens) for r in runs["cascade"] for c in r.pool}) > 1  # ragged samples


@torch.no_grad()
def test_batched_greedy_sampling_equals_decoding_each_prompt_alone(models, tokenizer):
    name, policy, _, prompts, bias = models
    biased = bias.clone()
    bias.zero_()  # greedy decoding of the biased model would stop at once
    try:
        cfg = SamplingConfig(max_new_tokens=4, temperature=0.0)
        batched = generate(policy, prompts, tokenizer.eos_token_id, tokenizer.pad_token_id, cfg)
        for prompt, (gen,) in zip(prompts, batched):
            tokens = list(prompt)
            for _ in range(cfg.max_new_tokens):
                ids = torch.tensor([tokens])
                tokens.append(int(policy(input_ids=ids).logits[0, -1].argmax()))
                if tokens[-1] == tokenizer.eos_token_id:
                    break
            assert gen.token_ids == [t for t in tokens[len(prompt):]
                                     if t != tokenizer.eos_token_id]
            assert gen.finished == (tokens[-1] == tokenizer.eos_token_id)
        assert max(len(gen.token_ids) for (gen,) in batched) > 1
    finally:
        bias.copy_(biased)


@torch.no_grad()
def test_save_and_reload_keep_logits_values_and_tying(models, tokenizer, tmp_path):
    name, policy, value, prompts, _ = models
    ids = torch.tensor([prompts[0]])
    save_model(policy, tokenizer, tmp_path / "policy")
    value.save_pretrained(tmp_path / "value", tokenizer)
    loaded = load_policy(tmp_path / "policy")
    loaded_value = ValueModel.from_pretrained(tmp_path / "value")
    tied = REAL_CONFIGS[name]["tie_word_embeddings"]
    assert (loaded.lm_head.weight.data_ptr() ==
            loaded.get_input_embeddings().weight.data_ptr()) == tied
    assert type(loaded) is type(policy) and type(loaded_value.backbone) is type(value.backbone)
    # the saved policy has no bias hook: compare with the bare LM head's product
    hidden = policy.model(input_ids=ids).last_hidden_state
    torch.testing.assert_close(loaded(input_ids=ids).logits, hidden @ policy.lm_head.weight.T,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded_value(input_ids=ids).values, value(input_ids=ids).values,
                               atol=1e-5, rtol=1e-5)
