"""Tokenizer round trip, checkpoint save/load, the value model, and KV-cache decoding."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache

from oreo_fast.sampling import SamplingConfig, filter_logits, generate
from oreo_fast.models import (TinyModelConfig, ValueModel, build_tiny_model, cache_arg,
                              left_pad, load_policy, save_model)
from oreo_fast.tasks import ArithmeticConfig, format_prompt, generate_splits
from oreo_fast.tokenizer import build_tokenizer, encode_pair, load_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


TINY = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, seed=1)


@pytest.fixture(scope="module")
def corpus():
    train, test = generate_splits(ArithmeticConfig(n_train=100, n_test=20, seed=5))
    return [format_prompt(p["question"]) + p["answer"] for p in train + test]


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory, corpus):
    out = tmp_path_factory.mktemp("policy") / "model"
    tok = build_tokenizer(corpus[:100], vocab_size=300)
    model = build_tiny_model(tok, TINY)
    with torch.no_grad():  # random, non-trivial weights everywhere (norms included)
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    save_model(model, tok, out)
    return out


def test_tokenizer_round_trip_and_layout(policy_dir, corpus):
    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    texts = corpus[100:] + ["Unseen: caf\u00e9 \u20ac3,5\n\n  tabs\tand $\\frac{1}{2}$", ""]
    for text in texts:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == text
        pieces = tok.convert_ids_to_tokens(ids)
        for piece in pieces:
            raw = tok.convert_tokens_to_string([piece])
            assert "\n" not in raw or raw == "\n"  # newline is a token of its own
            assert sum(c.isdigit() for c in raw) <= 1  # one digit per token
    assert tok.eos_token and tok.pad_token and tok.bos_token
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id}) == 3


def test_encode_pair_marks_the_prompt(policy_dir):
    tok = load_tokenizer(policy_dir)
    prompt, response = format_prompt("Start with 3. Add 4."), "3 + 4 = 7\n#### 7"
    ids, n_prompt = encode_pair(tok, prompt, response)
    assert ids[-1] == tok.eos_token_id
    assert tok.decode(ids[:n_prompt]) == prompt
    assert tok.decode(ids[n_prompt:-1]) == response
    assert encode_pair(tok, prompt)[0] == ids[:n_prompt]


def test_save_then_load_gives_identical_logits(policy_dir, tmp_path):
    model = load_policy(policy_dir)
    assert next(model.parameters()).dtype == torch.float32
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    before = model(ids).logits
    save_model(model, load_tokenizer(policy_dir), tmp_path / "again")
    assert (tmp_path / "again" / "model.safetensors").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "again")).eval()
    assert torch.equal(before, reloaded(ids).logits)


def test_value_model_from_policy_then_save_and_reload(policy_dir, tmp_path):
    value = ValueModel.from_pretrained(policy_dir)
    assert torch.count_nonzero(value.value_head.weight) == 0
    ids, mask, pos = left_pad([[5, 6, 7, 8], [9, 10]], pad_id=0)
    out = value(ids, mask, pos)
    assert out.values.shape == (2, 4) and torch.count_nonzero(out.values) == 0
    # the head reads the policy's final-norm hidden state
    policy = load_policy(policy_dir)
    hidden = policy(ids, attention_mask=mask, position_ids=pos,
                    output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(out.hidden_states, hidden)

    torch.nn.init.normal_(value.value_head.weight)
    expected = value(ids, mask, pos).values
    torch.testing.assert_close(expected, (hidden @ value.value_head.weight.T).squeeze(-1))
    value.save_pretrained(tmp_path / "value", tokenizer=load_tokenizer(policy_dir))
    config = json.loads((tmp_path / "value" / "config.json").read_text())
    assert config["oreo_value_model"]["base_architectures"] == ["Qwen2ForCausalLM"]
    assert config["model_type"] == "qwen2"
    reloaded = ValueModel.from_pretrained(tmp_path / "value")
    assert torch.equal(reloaded(ids, mask, pos).values, expected)
    assert AutoTokenizer.from_pretrained(str(tmp_path / "value")).eos_token == "<|eos|>"


def test_value_model_incremental_scoring_equals_full(policy_dir):
    value = ValueModel.from_pretrained(policy_dir)
    torch.nn.init.normal_(value.value_head.weight)
    seqs = [[4, 5, 6, 7, 8, 9, 10], [11, 12, 13, 14, 15]]
    ids, mask, pos = left_pad(seqs, pad_id=0)
    full = value(ids, mask, pos).values
    # prefix of 3 columns, then one column at a time with the cache
    out = value(ids[:, :3], mask[:, :3], pos[:, :3], cache=DynamicCache(), use_cache=True)
    parts, cache = [out.values], out.cache
    for t in range(3, ids.shape[1]):
        out = value(ids[:, t:t + 1], mask[:, :t + 1], pos[:, t:t + 1], cache=cache,
                    use_cache=True)
        parts.append(out.values)
        cache = out.cache
    incremental = torch.cat(parts, dim=1)
    real = mask.bool()
    torch.testing.assert_close(incremental[real], full[real], atol=1e-5, rtol=1e-5)


def test_cached_decoding_equals_full_reencode(policy_dir):
    model = load_policy(policy_dir)
    tok = load_tokenizer(policy_dir)
    prompts = [encode_pair(tok, format_prompt(q))[0] for q in
               ["Start with 3. Add 4. What is the result?", "Start with 12. Multiply by 2."]]
    ids, mask, pos = left_pad(prompts, tok.pad_token_id)
    # step-by-step logits with the cache vs one forward over the whole (padded) sequence
    cache = DynamicCache()
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                **cache_arg(model, cache))
    step_logits, seq, cur_mask, next_pos = [out.logits[:, -1]], ids, mask, pos[:, -1] + 1
    for _ in range(6):
        token = step_logits[-1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, token], 1)
        cur_mask = torch.cat([cur_mask, torch.ones_like(token)], 1)
        out = model(input_ids=token, attention_mask=cur_mask, position_ids=next_pos[:, None],
                    use_cache=True, **cache_arg(model, cache))
        step_logits.append(out.logits[:, -1])
        next_pos = next_pos + 1
    full = model(input_ids=seq, attention_mask=cur_mask,
                 position_ids=(cur_mask.cumsum(-1) - 1).clamp(min=0)).logits
    width = ids.shape[1]
    torch.testing.assert_close(torch.stack(step_logits, 1), full[:, width - 1:], atol=1e-4,
                               rtol=1e-4)

    # generate() (shared prefill, row dropping) agrees with unpadded greedy re-encoding
    gens = generate(model, prompts, tok.eos_token_id, tok.pad_token_id,
                    SamplingConfig(max_new_tokens=8, temperature=0), num_samples=2)
    for prompt, samples in zip(prompts, gens):
        seq = list(prompt)
        for _ in range(8):
            nxt = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            seq.append(nxt)
        for sample in samples:
            assert sample.token_ids == seq[len(prompt):]


def test_generation_stops_at_eos_and_drops_finished_rows(policy_dir):
    model = load_policy(policy_dir)
    tok = load_tokenizer(policy_dir)
    prompt = encode_pair(tok, format_prompt("Start with 3."))[0]
    # force EOS to be the greedy choice for one row by making it the model's favourite token
    with torch.no_grad():
        model.lm_head.weight[tok.eos_token_id] = 0
    gens = generate(model, [prompt], tok.eos_token_id, tok.pad_token_id,
                    SamplingConfig(max_new_tokens=5, temperature=1.0), num_samples=16,
                    generator=torch.Generator().manual_seed(0))[0]
    for g in gens:
        assert tok.eos_token_id not in g.token_ids
        assert g.finished or len(g.token_ids) == 5
        assert not g.finished or len(g.token_ids) < 5


def test_sampling_filters():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    probs = logits.softmax(-1)[0]
    # nucleus: the smallest prefix whose mass reaches top_p
    kept = ~torch.isinf(filter_logits(logits, top_p=float(probs[0] + 0.01)))
    assert kept.tolist() == [[True, True, False, False]]
    assert (~torch.isinf(filter_logits(logits, top_p=0.01))).sum() == 1
    gen = torch.Generator().manual_seed(0)
    from oreo_fast.sampling import next_tokens
    draws = next_tokens(logits.repeat(500, 1), SamplingConfig(temperature=1.0, top_k=2), gen)
    assert set(draws.tolist()) == {0, 1}


def test_a_value_folder_is_refused_as_a_policy(policy_dir, tmp_path):
    from oreo_fast.errors import ModelDirError

    value = ValueModel.from_pretrained(policy_dir)
    value.save_pretrained(tmp_path / "value", load_tokenizer(policy_dir))
    with pytest.raises(ModelDirError, match=r"value.*saved value model.*pass the policy folder"):
        load_policy(tmp_path / "value")
    load_policy(policy_dir)  # the policy folder itself loads
