"""``oreo-fast sample --engine vllm`` with a FAKE vllm module (monkeypatched into
sys.modules; no vLLM runs here, it needs a GPU): the fake answers ``LLM.generate`` by running
our HF decoding loop on the prompt ids it is given and returns vLLM-shaped outputs
(``token_ids`` with the stop token, ``finish_reason`` "stop" or "length"). What is tested is
our side: the arguments given to vLLM and the conversion of its outputs, which must give the
same JSONL as the HF engine. The real engine is checked on the GPU machine."""
import json
import sys
import types

import pytest
import torch

from oreo_fast.errors import ConfigError
from oreo_fast.models import TinyModelConfig, build_tiny_model, load_policy, save_model
from oreo_fast.pipeline.sample import SampleConfig, run_sample
from oreo_fast.sampling import SamplingConfig, generate
from oreo_fast.tasks import ArithmeticConfig, format_prompt, generate_splits
from oreo_fast.tokenizer import build_tokenizer, load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    train, _ = generate_splits(ArithmeticConfig(n_train=6, n_test=1, seed=3))
    tok = build_tokenizer([format_prompt(p["question"]) + p["answer"] for p in train], 300)
    torch.manual_seed(0)
    model = build_tiny_model(tok, TinyModelConfig(hidden_size=32, intermediate_size=64,
                                                  num_hidden_layers=2, num_attention_heads=4,
                                                  num_key_value_heads=2, seed=2))
    with torch.no_grad():  # EOS likely after some tokens only: some samples end, some are cut
        model.model.embed_tokens.weight[:, 0] = 30 * torch.randn(len(tok))
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = 0.5 * torch.randn(len(tok))
        model.lm_head.weight[tok.eos_token_id, 0] = 6.0
    save_model(model, tok, root / "model")
    problems = root / "p.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in train))
    return root, problems


def fake_vllm_module(model_dir, calls):
    """A stand-in for vllm: LLM(...).generate(prompts, params) decoded by our HF loop, all
    prompts in one batch with a generator seeded by LLM(seed=...), as the HF engine does."""
    module = types.ModuleType("vllm")

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    class LLM:
        def __init__(self, **kwargs):
            calls["llm"] = kwargs
            self.model = load_policy(model_dir)

        def generate(self, prompts, params):
            calls["params"] = params
            p = params[0]
            cfg = SamplingConfig(max_new_tokens=p.max_tokens, temperature=p.temperature,
                                 top_p=p.top_p, top_k=max(p.top_k, 0))
            tok = load_tokenizer(model_dir)
            generator = torch.Generator().manual_seed(calls["llm"]["seed"])
            batch = generate(self.model, [q["prompt_token_ids"] for q in prompts],
                             p.stop_token_ids, tok.pad_token_id, cfg, num_samples=p.n,
                             generator=generator)
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(
                token_ids=g.token_ids + ([p.stop_token_ids[0]] if g.finished else []),
                finish_reason="stop" if g.finished else "length") for g in gens])
                for gens in batch]

    module.LLM, module.SamplingParams = LLM, SamplingParams
    return module


def test_vllm_engine_writes_the_hf_engines_jsonl(setup, tmp_path, monkeypatch):
    root, problems = setup
    common = dict(model=str(root / "model"), problems=str(problems), k=2, temperature=1.0,
                  max_new_tokens=10, seed=5)
    hf = run_sample(SampleConfig(out=str(tmp_path / "hf.jsonl"), **common))
    calls = {}
    monkeypatch.setitem(sys.modules, "vllm", fake_vllm_module(root / "model", calls))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    out = run_sample(SampleConfig(out=str(tmp_path / "v.jsonl"), engine="vllm", **common))
    hf_records = hf.read_text().splitlines()
    assert out.read_text().splitlines() == hf_records
    flags = {json.loads(line)["truncated"] for line in hf_records}
    assert flags == {True, False}  # both finish reasons were converted
    assert calls["llm"]["model"] == str(root / "model") and calls["llm"]["seed"] == 5
    p = calls["params"][0]
    assert (p.n, p.max_tokens, p.temperature, p.seed) == (2, 10, 1.0, 5)
    assert calls["params"][1].seed == 6  # one seed per problem


def test_vllm_missing_or_without_gpu_is_one_line_naming_the_fix(setup, tmp_path, monkeypatch):
    root, problems = setup
    config = SampleConfig(model=str(root / "model"), problems=str(problems),
                          out=str(tmp_path / "v.jsonl"), engine="vllm")
    monkeypatch.setitem(sys.modules, "vllm", None)  # as if not installed
    with pytest.raises(ConfigError, match=r"vllm is not installed: pip install 'oreo_fast\[vllm\]'"):
        run_sample(config)
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="vllm needs a CUDA GPU"):
        run_sample(config)
    assert not (tmp_path / "v.jsonl").exists()
