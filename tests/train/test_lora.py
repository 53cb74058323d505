"""LoRA (issue 13): adapters on the policy, the value model or both train alone (base weights,
embeddings and LM head unchanged); 2 processes equal 1; resume is bit-exact at the same world
size (1 and 2 processes); the merged export loads with AutoModelForCausalLM and gives the
trained model's logits; the adapter export loads with peft."""
import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from oreo_fast.errors import CheckpointError, ConfigError
from oreo_fast.models import ValueModel, load_policy
from oreo_fast.train import checkpoint
from oreo_fast.train.config import TrainConfig
from oreo_fast.train.lora import is_adapter_param
from oreo_fast.train.trainer import Trainer
from processes import run_process_group
from test_reliability import _env, _torchrun
from test_train import _config, tiny  # noqa: F401  (the tiny fixture)

# scaling alpha / r = 2: a merge that forgets the scaling is visible
LORA = dict(lora="both", lora_rank=4, lora_alpha=8.0, epochs=2, threads=1,
            export_dtype="float32")


def _trainer(root, out, **extra):
    torch.set_num_threads(1)
    return Trainer(_config(root, output_dir=str(out), **{**LORA, **extra}))


def _state(trainer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": v.detach().clone() for i, m in enumerate(trainer.algorithm.trained)
            for k, v in m.state_dict().items()}


def _rows(out):
    return [json.loads(line) for line in open(out / "metrics.jsonl")]


@pytest.fixture(scope="module")
def lora_run(tiny, tmp_path_factory):  # noqa: F811
    """An uninterrupted 1-process run, LoRA on both models, 4 steps: the trainer, its
    parameters before and after."""
    root, out = tiny[0], tmp_path_factory.mktemp("lora") / "run"
    trainer = _trainer(root, out)
    before = _state(trainer)
    trainer.fit()
    return trainer, before, _state(trainer), out


@pytest.mark.parametrize("key, value", [
    ("lora", "critic"), ("lora_rank", 0), ("lora_alpha", 0.0), ("lora_dropout", 1.0),
    ("lora_targets", []), ("lora_targets", ["q_proj", "lm_head"]), ("lora_export", "full"),
])
def test_bad_lora_settings_name_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        TrainConfig(**{"policy": "p", "train_file": "t", "lora": "both", key: value})


def test_invalid_lora_combinations_name_the_key():
    with pytest.raises(ConfigError, match="^lora: rft trains no value model"):
        TrainConfig(policy="p", train_file="t", algorithm="rft", lora="value")
    with pytest.raises(ConfigError, match="^lora_export: an adapter export needs lora"):
        TrainConfig(policy="p", train_file="t", lora_export="adapter")


def test_unmatched_targets_are_a_config_error(tiny, tmp_path):  # noqa: F811
    with pytest.raises(ConfigError, match="^lora_targets: Target modules"):
        _trainer(tiny[0], tmp_path / "run", lora_targets="no_such_proj")


def test_missing_peft_is_one_line_naming_the_extra(tiny, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ConfigError, match=r"^lora: needs the peft package "
                                          r"\(pip install oreo-fast\[lora\]\)$"):
        _trainer(tiny[0], tmp_path / "lora", lora="policy")
    # without LoRA nothing needs peft, the export included
    _trainer(tiny[0], tmp_path / "dense", lora="none", max_steps=1).fit()
    assert (tmp_path / "dense" / "policy" / "model.safetensors").is_file()


def _check_only_adapters_trained(trainer, before, after, adapted):
    for i, (name, module) in enumerate(zip(("policy", "value"), trainer.algorithm.trained)):
        changed = {k for k in module.state_dict() if not torch.equal(before[f"{i}.{k}"],
                                                                      after[f"{i}.{k}"])}
        if name not in adapted:
            assert not any(is_adapter_param(k) for k in module.state_dict())
            assert any("embed_tokens" in k for k in changed), name  # dense: all of it trains
            continue
        adapters = {k for k in module.state_dict() if is_adapter_param(k)}
        assert adapters and {k for k in adapters if ".lora_B." in k} <= changed, name
        head = {"value_model.value_head.weight"} if name == "value" else set()
        assert changed <= adapters | head, sorted(changed - adapters - head)[:3]
        assert head <= changed  # the value head always trains
        frozen = [k for k, p in module.named_parameters() if not p.requires_grad]
        assert any("embed_tokens" in k for k in frozen) and any("base_layer" in k for k in frozen)
    policy = trainer.algorithm.policy.model
    assert not policy.get_output_embeddings().weight.requires_grad or "policy" not in adapted


def test_lora_on_both_trains_only_the_adapters(lora_run):
    trainer, before, after, _ = lora_run
    _check_only_adapters_trained(trainer, before, after, ("policy", "value"))
    sizes = [sum(p.numel() for g in o.param_groups for p in g["params"])
             for o in trainer.optimizers]
    dense = [sum(p.numel() for p in m.parameters()) for m in trainer.algorithm.trained]
    assert all(s < d / 2 for s, d in zip(sizes, dense))  # the optimizers hold the adapters


@pytest.mark.parametrize("lora", ["policy", "value"])
def test_lora_on_one_model_trains_the_other_densely(tiny, tmp_path, lora):  # noqa: F811
    # 2 steps: in the first, the zero value head sends its backbone no gradient
    trainer = _trainer(tiny[0], tmp_path / "run", lora=lora, max_steps=2)
    before = _state(trainer)
    trainer.fit()
    _check_only_adapters_trained(trainer, before, _state(trainer), (lora,))


def _batch(trainer):
    from oreo_fast.train.data import collate_examples

    batch = collate_examples(trainer.examples[:5], trainer.tokenizer.pad_token_id, "token")
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def test_merged_export_gives_the_trained_logits(tiny, lora_run):  # noqa: F811
    from transformers import AutoModelForCausalLM

    trainer, _, _, out = lora_run
    inputs = _batch(trainer)
    policy = AutoModelForCausalLM.from_pretrained(str(out / "policy"), dtype=torch.float32)
    assert not any("lora" in k or "base_layer" in k for k in policy.state_dict())
    value = ValueModel.from_pretrained(out / "value")
    with torch.no_grad():
        live = trainer.algorithm.policy.model(**inputs).logits
        base = load_policy(tiny[0] / "policy")(**inputs).logits
        torch.testing.assert_close(policy(**inputs).logits, live, rtol=1e-5, atol=1e-5)
        assert (live - base).abs().max() > 1e-3  # the adapters did change the model
        live_v = trainer.algorithm.value.value_model(**inputs).values
        torch.testing.assert_close(value(**inputs).values, live_v, rtol=1e-5, atol=1e-5)
        assert live_v.abs().max() > 0


def test_adapter_export_loads_with_peft(tiny, lora_run, tmp_path):  # noqa: F811
    from peft import PeftModel
    from transformers import AutoModel

    trainer, _, _, _ = lora_run
    trainer.config.lora_export = "adapter"
    try:
        trainer.export(tmp_path)
    finally:
        trainer.config.lora_export = "merged"
    assert sorted(p.name for p in (tmp_path / "policy").iterdir()
                  if not p.name.startswith("tokenizer")) == ["adapter_config.json",
                                                             "adapter_model.safetensors"]
    inputs = _batch(trainer)
    policy = PeftModel.from_pretrained(load_policy(tiny[0] / "policy"), str(tmp_path / "policy"))
    backbone = PeftModel.from_pretrained(AutoModel.from_pretrained(str(tiny[0] / "policy")),
                                         str(tmp_path / "value"))
    value = ValueModel(backbone)
    value.value_head.load_state_dict(load_file(str(tmp_path / "value" /
                                                   "value_head.safetensors")))
    with torch.no_grad():
        torch.testing.assert_close(policy(**inputs).logits,
                                   trainer.algorithm.policy.model(**inputs).logits,
                                   rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(value(**inputs).values,
                                   trainer.algorithm.value.value_model(**inputs).values,
                                   rtol=1e-6, atol=1e-6)


def test_resume_is_bit_exact(tiny, lora_run, tmp_path):  # noqa: F811
    """Stop after 2 of 4 steps, resume: the same losses and parameters, bit for bit. The
    checkpoint holds the adapters, the value head and their Adam moments, no frozen base."""
    root = tiny[0]
    full, _, full_state, full_out = lora_run
    out = tmp_path / "run"
    _trainer(root, out, max_steps=2, save_every=2).fit()
    saved = checkpoint.read_checkpoint_tensors(out / "checkpoints" / "step-2")
    models = [k for k in saved if k.startswith(("policy.", "value."))]
    assert models and all(is_adapter_param(k) or k == "value.value_model.value_head.weight"
                          for k in models)
    assert any(k.startswith("policy_optimizer.") and ".lora_B." in k for k in saved)
    with pytest.raises(CheckpointError, match="field 'lora'|lora"):
        _trainer(root, out, resume=True, lora_rank=8)
    resumed = _trainer(root, out, resume=True)
    assert resumed.progress.step == 2
    resumed.fit()
    assert [r["loss"] for r in _rows(out)] == [r["loss"] for r in _rows(full_out)]
    state = _state(resumed)
    for k in full_state:
        assert torch.equal(state[k], full_state[k]), k


@pytest.mark.slow
def test_two_processes_equal_one_and_resume_bit_exact(tiny, lora_run, tmp_path):  # noqa: F811
    """torchrun, 2 processes (FSDP2 shards the adapters): the losses and merged parameters of
    the 1-process run; then a 2-process resume from its step-2 ends bit for bit like it."""
    root = tiny[0]
    _, _, _, one = lora_run
    args = [f"{k}={v}" for k, v in LORA.items()]
    out = tmp_path / "two"
    proc = run_process_group(_torchrun(root, out, *args, "save_every=2"), env=_env(),
                             timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows, rows1 = _rows(out), _rows(one)
    assert len(rows) == len(rows1) == 4
    for a, b in zip(rows, rows1):
        for key in ("loss", "value_loss", "policy_loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    pol, pol1 = load_policy(out / "policy").state_dict(), load_policy(one / "policy").state_dict()
    val = ValueModel.from_pretrained(out / "value").state_dict()
    val1 = ValueModel.from_pretrained(one / "value").state_dict()
    for a, b in ((pol, pol1), (val, val1)):
        for k in b:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # resume at the same world size from the run's step-2, exporting the adapters only: the
    # same losses, and adapters and value head bit for bit those of the run's step-4
    again = tmp_path / "again"
    shutil.copytree(out / "checkpoints" / "step-2", again / "checkpoints" / "step-2")
    proc = run_process_group(_torchrun(root, again, *args, "resume=true",
                                       "lora_export=adapter"), env=_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [r["loss"] for r in _rows(again)] == [r["loss"] for r in rows]
    step4 = checkpoint.read_checkpoint_tensors(out / "checkpoints" / "step-4")
    for name, prefix in (("policy", "policy.model."), ("value", "value.value_model.backbone.")):
        adapters = load_file(str(again / name / "adapter_model.safetensors"))
        assert len(adapters) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
        for k, v in adapters.items():
            saved = prefix + k.removeprefix("base_model.model.").replace(
                ".weight", ".default.weight")
            assert torch.equal(v, step4[saved]), k
    head = load_file(str(again / "value" / "value_head.safetensors"))["weight"]
    assert torch.equal(head, step4["value.value_model.value_head.weight"])
