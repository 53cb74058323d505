"""Real tokenizer layouts (built locally, tests/real/local_tokenizers.py): BOS as the tokenizer
adds it, chat prompts token for token as the template writes them, the EOS a turn ends with,
every stop id honoured by sampling, and truncated samples marked."""
import json

import pytest
import torch

import local_tokenizers
from oreo_fast.errors import DataError
from oreo_fast.models import stop_token_ids
from oreo_fast.pipeline.sft import build_examples
from oreo_fast.tasks.problems import Problem
from oreo_fast.tokenizer import (encode_pair, encode_prompt, load_tokenizer, render_prompt,
                                 turn_end_id)
from oreo_fast.train.data import Layout, read_training_examples, tokenize_trajectory

pytestmark = pytest.mark.usefixtures("one_thread")
SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
QUESTION = "Tom has 3 apples and buys 4 more. How many apples?"
RESPONSE = "3 + 4 = 7\nHe has 7 apples.\n#### 7"


@pytest.fixture(scope="module")
def toks(tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    return {kind: load_tokenizer(local_tokenizers.build(kind, root / kind))
            for kind in ("qwen", "llama3", "sentencepiece")}


def template_ids(tok, messages, generation_prompt):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=False,
                                        add_generation_prompt=generation_prompt))


@pytest.mark.parametrize("kind,bos", [("qwen", None), ("llama3", "<|begin_of_text|>"),
                                      ("sentencepiece", "<s>")])
def test_plain_prompts_are_encoded_as_the_tokenizer_encodes_them(toks, kind, bos):
    tok = toks[kind]
    prompt = render_prompt(tok, QUESTION, "plain")
    ids, n_prompt = encode_pair(tok, prompt, RESPONSE)
    assert ids == (tok(prompt)["input_ids"] + tok.encode(RESPONSE, add_special_tokens=False)
                   + [tok.eos_token_id])
    assert n_prompt == len(tok(prompt)["input_ids"])
    first = tok.convert_ids_to_tokens(ids[0])
    assert (first == bos) if bos else first not in tok.all_special_tokens
    assert ids.count(tok.bos_token_id) == (1 if bos else 0) or tok.bos_token_id is None
    if kind == "llama3":  # ships no pad token: padding falls back to EOS, on the left
        assert tok.pad_token_id == tok.eos_token_id and tok.padding_side == "left"


@pytest.mark.parametrize("kind,turn_end", [("qwen", "<|im_end|>"), ("llama3", "<|eot_id|>")])
def test_chat_prompt_and_sft_example_are_the_templates_tokens(toks, kind, turn_end):
    tok = toks[kind]
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt = render_prompt(tok, QUESTION, "auto", SYSTEM)  # auto: the tokenizer has a template
    assert prompt == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    want = template_ids(tok, messages, True)
    assert encode_prompt(tok, prompt) == want  # no second BOS for Llama 3
    assert tok.convert_ids_to_tokens(turn_end_id(tok)) == turn_end
    assert turn_end_id(tok, "plain") == tok.eos_token_id
    [(ids, n_prompt)] = build_examples(tok, [Problem(0, QUESTION, RESPONSE, "7", "gsm8k")], 512,
                                       system_prompt=SYSTEM)
    whole = template_ids(tok, messages + [{"role": "assistant", "content": RESPONSE}], False)
    assert n_prompt == len(want) and ids[:n_prompt] == want
    assert ids == whole[:len(ids)] and tok.convert_ids_to_tokens(ids[-1]) == turn_end
    assert len(whole) - len(ids) <= 1  # at most the template's newline after the turn end


@pytest.mark.parametrize("kind", ["qwen", "llama3"])
def test_chat_trajectories_mask_the_template_and_use_its_role_markup(toks, kind):
    tok = toks[kind]
    layout = Layout.of(tok, "chat")
    messages = [{"role": "user", "content": QUESTION}]
    prompt = render_prompt(tok, QUESTION, "chat")
    # (no leading or trailing whitespace: the Llama 3 template trims contents)
    turns = [("assistant", "3 + 4 = 7\nSo 7."), ("user", "Are you sure?"),
             ("assistant", "Yes.\n#### 7")]
    ex = tokenize_trajectory(tok, prompt, turns, 1.0, 512, ["\n"], layout=layout)
    whole = template_ids(tok, messages + [{"role": r, "content": c} for r, c in turns], False)
    assert ex.ids == whole[:len(ex.ids)] and len(whole) - len(ex.ids) <= 1
    n_prompt = len(template_ids(tok, messages, True))
    assert not any(ex.is_action[:n_prompt]) and ex.is_action[n_prompt]
    # actions: both assistant contents, each closed by the turn end; nothing of the markup
    end = turn_end_id(tok)
    trained = [t for t, a in zip(ex.ids, ex.is_action) if a]
    want = (tok.encode(turns[0][1], add_special_tokens=False) + [end]
            + tok.encode(turns[2][1], add_special_tokens=False) + [end])
    assert trained == want
    # truncated: the last turn end is not an action (nor present)
    cut = tokenize_trajectory(tok, prompt, turns, 1.0, 512, ["\n"], truncated=True, layout=layout)
    assert cut.ids == ex.ids[:-1] and cut.truncated


def test_trajectory_file_with_another_prompt_format_is_refused(toks, tmp_path):
    tok = toks["qwen"]
    path = tmp_path / "t.jsonl"
    record = {"prompt": render_prompt(tok, QUESTION, "plain"), "response": RESPONSE,
              "reward": 1, "prompt_format": "plain"}
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'prompt_format'.*prompt_format=plain"):
        read_training_examples(path, tok, 256)  # auto: chat, the tokenizer has a template
    [ex], _ = read_training_examples(path, tok, 256, prompt_format="plain")
    assert ex.ids[-1] == tok.eos_token_id


def _steer(model, first: list[int], then: int):
    """Make greedy decoding (one batch) produce the tokens ``first``, then ``then`` forever."""
    calls = []

    def hook(module, args, out):
        out = torch.zeros_like(out)
        out[..., first[len(calls)] if len(calls) < len(first) else then] = 10.0
        calls.append(1)
        return out
    model.lm_head.register_forward_hook(hook)


GEN_EOS = {"llama3": ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],  # as Llama 3.1 ships
           "qwen": ["<|endoftext|>"]}  # as Qwen2.5-Math-1.5B (base) ships: not <|im_end|>
STARTS = {"llama3": "<|begin_of_text|><|start_header_id|>user", "qwen": "<|im_start|>system"}


@pytest.mark.parametrize("kind,decode_token,truncated", [
    ("llama3", "<|eot_id|>", False), ("llama3", "<|eom_id|>", False),
    ("qwen", "<|im_end|>", False), ("llama3", "0", True)])
def test_sampling_stops_at_every_eos_and_marks_truncation(toks, tmp_path, kind, decode_token,
                                                          truncated):
    """Sampling stops at every EOS of the model's generation config (Llama 3.1 lists
    <|end_of_text|>, <|eom_id|> and <|eot_id|>) and at the template's turn end even when the
    config does not list it (<|im_end|> for Qwen2.5-Math base). Cut by max_new_tokens, the
    sample is marked truncated and gets reward 0 although its text holds the right answer."""
    from oreo_fast.models import save_model
    from oreo_fast.pipeline.sample import SampleConfig, run_sample

    tok = toks[kind]
    gen_eos = tok.convert_tokens_to_ids(GEN_EOS[kind])
    model = local_tokenizers.tiny_model(tok, gen_eos, "llama" if kind == "llama3" else "qwen2")
    assert stop_token_ids(model, tok) == sorted({*gen_eos, turn_end_id(tok)})
    save_model(model, tok, tmp_path / "m")
    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"question": QUESTION, "answer": "#### 7"}) + "\n")
    answer = tok.encode("#### 7", add_special_tokens=False)
    import oreo_fast.pipeline.sample as sample_module
    real_load = sample_module.load_model  # the one loader every job uses

    def load_steered(*args, **kwargs):
        m = real_load(*args, **kwargs)
        _steer(m, answer, tok.convert_tokens_to_ids(decode_token))
        return m

    sample_module.load_model = load_steered
    try:
        out = run_sample(SampleConfig(model=str(tmp_path / "m"), problems=str(problems),
                                      out=str(tmp_path / "s.jsonl"), k=2, temperature=0,
                                      max_new_tokens=len(answer) + (not truncated)))
    finally:
        sample_module.load_model = real_load
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["truncated"] is truncated and r["finished"] is not truncated
        assert r["response"] == "#### 7"
        assert r["reward"] == (0 if truncated else 1) and r["prompt_format"] == "chat"
        assert r["prompt"].startswith(STARTS[kind])
