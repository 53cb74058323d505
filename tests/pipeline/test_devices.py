"""Every job loads its models through ``oreo_fast.models.load_model`` onto the device and in
the dtype it was asked for, and SFT's fused, micro-batched loss equals the materialised
cross-entropy.

The device test replaces ``models.place`` (the one move of every loaded model) by a recorder
that keeps the model on the CPU in float32: each job is then run asking for the ``meta``
device in bfloat16, which no default would give, and what reached the loader is compared."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from oreo_fast import models
from oreo_fast.models import TinyModelConfig, load_policy, resolve_device
from oreo_fast.pipeline.embedded import EmbeddedConfig, build_default
from oreo_fast.pipeline.sft import IGNORE, SFTConfig, collate_sft_batch, run_sft, sft_step_loss
from oreo_fast.tasks import ArithmeticConfig
from oreo_fast.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TASK = ArithmeticConfig(n_train=6, n_test=3, min_steps=2, max_steps=2, max_value=99,
                        add_max=9, mul_max=3, seed=2)
MODEL = TinyModelConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1, seed=0)
ASKED = dict(device="meta", dtype="bfloat16")


@pytest.fixture(scope="module")
def default(tmp_path_factory):
    out = tmp_path_factory.mktemp("devices")
    return build_default(EmbeddedConfig(out=str(out), task=TASK, model=MODEL, vocab_size=300))


@pytest.fixture
def loads(monkeypatch):
    """(device, dtype) of every model that went through ``load_model``; the model itself
    stays on the CPU in float32 so that the job can run."""
    calls = []

    def record(model, device):
        calls.append((device.type, next(model.parameters()).dtype))
        return model.float()

    monkeypatch.setattr(models, "place", record)
    return calls


def test_sample_eval_search_and_sft_load_on_the_asked_device(default, loads, tmp_path):
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval
    from oreo_fast.pipeline.sample import SampleConfig, run_sample

    problems = str(default["train"])
    run_sample(SampleConfig(model=str(default["model"]), problems=problems,
                            out=str(tmp_path / "t.jsonl"), k=2, max_new_tokens=8, **ASKED))
    assert loads == [("meta", torch.bfloat16)]
    run_eval(EvalConfig(model=str(default["model"]), problems=problems, n_samples=0,
                        out=str(tmp_path / "e.json"), max_new_tokens=8, **ASKED))
    assert loads[1:] == [("meta", torch.bfloat16)]
    # the search evaluation: the value model too
    run_eval(EvalConfig(model=str(default["model"]), problems=problems, n_samples=0,
                        out=str(tmp_path / "s.json"), value=str(default["model"]), beams=2,
                        candidates=2, max_steps=2, max_step_tokens=4, best_of=2,
                        max_new_tokens=8, **ASKED))
    assert loads[2:] == [("meta", torch.bfloat16)] * 2
    # SFT: float32 master weights on the device (dtype is its compute dtype)
    run_sft(SFTConfig(model=str(default["model"]), train=problems, out=str(tmp_path / "sft"),
                      epochs=1, batch_size=4, micro_batch_size=2, eval_examples=2,
                      device="meta", dtype="float32"))
    assert loads[4:] == [("meta", torch.float32)]


def test_iterate_passes_the_device_to_every_stage(default, loads, tmp_path, monkeypatch):
    from oreo_fast.pipeline import iterate

    launched = []

    def fake_training(overrides, nproc, log_path, threads=0):
        launched.append(overrides)
        out = log_path.parent
        for name in ("policy", "value"):
            shutil.copytree(default["model"], out / name)

    monkeypatch.setattr(iterate, "launch_training", fake_training)
    iterate.run_iterate(iterate.IterateConfig(
        policy=str(default["model"]), problems=str(default["train"]), out=str(tmp_path / "it"),
        rounds=1, k=2, max_new_tokens=8, eval_problems=str(default["test"]), **ASKED))
    assert loads == [("meta", torch.bfloat16)] * 2  # sampling, then the round's eval
    assert "device=meta" in launched[0]


@pytest.mark.parametrize("seeds,first_seed", [(1, 0), (2, 0), (2, 3)])
def test_demo_passes_the_device_to_every_stage(default, loads, tmp_path, monkeypatch, seeds,
                                               first_seed):
    """The demo's stages with their work replaced: only the settings they get are checked
    (the stages themselves are the jobs tested above); with 2 seeds each seed samples and
    trains with its own seed, and the results pool them; ``first_seed`` shifts the seeds,
    and the first of them evaluates SFT and sweeps the beam width."""
    from oreo_fast.pipeline import demo, evaluate, sample, sft

    seen, real_beam_search = {}, demo.demo_beam_search
    def fake_sft(config):  # and the torch threads the in-process stages run with
        seen.update(sft=config, sft_threads=torch.get_num_threads())

    monkeypatch.setattr(sft, "run_sft", fake_sft)
    monkeypatch.setattr(sample, "run_sample", lambda c: seen.setdefault("sample", c))
    monkeypatch.setattr(evaluate, "run_eval", lambda c: (seen.setdefault("eval", c), {
        "greedy_accuracy": 0.5, "n_problems": 3, "greedy_correct": [1, 0, 1]})[1])
    def fake_training(overrides, nproc, log_path, threads):
        seen.setdefault("train", []).append(overrides)
        seen.setdefault("train_threads", set()).add(("algorithm=rft" in overrides, nproc, threads))

    monkeypatch.setattr(demo, "launch_training", fake_training)

    def fake_beam_search(run_dir, test_file, val_file, **k):
        seen.setdefault("beam", k)
        seen.setdefault("beam_val", []).append(val_file)
        return {"test": 0.5, "config": {"beams": 1, "candidates": 1}, "test_correct": [0, 1, 1],
                **({"val": 0.5, "val_correct": [1, 1, 0]} if val_file else {}),
                "sweep": {"accuracy_by_beams": {}}}

    monkeypatch.setattr(demo, "demo_beam_search", fake_beam_search)
    out = tmp_path / "demo"
    shutil.copytree(default["model"].parent, out / "default")
    for name in ("val.jsonl", demo.TEST_FILE):
        (out / "default" / name).write_text((out / "default" / "test.jsonl").read_text())
    threads = torch.get_num_threads()
    stage_threads = 3 if threads != 3 else 2
    results = demo.run_demo(demo.DemoConfig(out=str(out), reuse=True, seeds=seeds,
                                            first_seed=first_seed, sft_seed=first_seed,
                                            stage_threads=stage_threads, **ASKED))
    assert seen["sft_threads"] == stage_threads == results["stage_threads"]
    assert torch.get_num_threads() == threads  # restored
    for stage in ("sft", "sample", "eval"):
        assert (seen[stage].device, seen[stage].dtype) == ("meta", "bfloat16"), stage
    assert all("device=meta" in overrides for overrides in seen["train"])
    # OREO on nproc processes of `threads` threads; RFT, one process, on all of them
    assert seen["train_threads"] == {(True, 1, 2), (False, 2, 1)}  # (RFT?, nproc, threads)
    assert sorted(o[2] for o in seen["train"]) == sorted(
        [f"seed={s}" for s in range(first_seed, first_seed + seeds)] * 2)  # rft and oreo
    assert seen["sample"].seed == first_seed and seen["sft"].seed == first_seed
    assert seen["sft"].train.endswith("sft.jsonl")  # the demonstrator's solutions
    assert results["seeds"] == seeds and len(results["per_seed"]["oreo"]) == seeds
    assert len(results["per_seed"]["sft"]) == 1  # one SFT checkpoint
    assert seen["beam"]["sweep"] is True  # the first seed's beam stage sweeps
    # and searches the validation problems too; the other seeds the test problems only
    assert seen["beam_val"] == [out / "default" / "val.jsonl"] + [None] * (seeds - 1)
    assert {k: seen["beam"][k] for k in ASKED} == ASKED
    # the beam stage itself: policy and value on the asked device
    run = tmp_path / "run"
    for name in ("policy", "value"):
        shutil.copytree(default["model"], run / name)
    real_beam_search(run, default["test"], default["test"], sweep_limit=1, **ASKED)
    assert loads == [("meta", torch.bfloat16)] * 2


def test_trainer_loads_through_the_one_loader(default, loads, tmp_path):
    from oreo_fast.io import read_jsonl
    from oreo_fast.tasks.problems import format_prompt
    from oreo_fast.train.config import load_train_config
    from oreo_fast.train.trainer import Trainer

    with open(tmp_path / "traj.jsonl", "w") as f:
        for _, r in read_jsonl(default["train"]):
            f.write(json.dumps({"prompt": format_prompt(r["question"]), "response": r["answer"],
                                "reward": 1}) + "\n")
    Trainer(load_train_config(None, [f"policy={default['model']}", "progress=false",
                                     f"train_file={tmp_path / 'traj.jsonl'}", "device=cpu",
                                     f"output_dir={tmp_path / 'run'}"]))
    assert loads == [("cpu", torch.float32), ("cpu", torch.float32), ("cpu", torch.float32)]


def test_device_and_dtype_defaults_and_errors():
    cpu = torch.device("cpu")
    assert models.resolve_dtype("auto", cpu) == torch.float32
    assert models.resolve_dtype("auto", torch.device("cuda", 0)) == torch.bfloat16
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    from oreo_fast.errors import ConfigError
    from oreo_fast.pipeline.sample import SampleConfig

    with pytest.raises(ConfigError, match="dtype"):
        SampleConfig(model="m", problems="p", out="o", dtype="float8")
    with pytest.raises(ConfigError, match="device"):
        SampleConfig(model="m", problems="p", out="o", device="tpu-ish")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA device"):
            SampleConfig(model="m", problems="p", out="o", device="cuda")


# ------------------------------------------------------------------ SFT's fused loss


def materialised_step(model, batch, pad_id):
    """Today's SFT step from full logits: mean cross-entropy over response tokens."""
    ids, attention, labels = collate_sft_batch(batch, pad_id)
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1]
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                             labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    loss.backward()
    return loss.item()


@pytest.mark.parametrize("micro", [0, 1, 3])
def test_sft_fused_micro_batched_step_equals_materialised_cross_entropy(default, micro):
    from oreo_fast.pipeline.sft import build_examples
    from oreo_fast.tasks.problems import load_problems

    tok = load_tokenizer(default["model"])
    examples = build_examples(tok, load_problems(default["train"]), 256)
    expected_model, model = load_policy(default["model"]), load_policy(default["model"])
    expected = materialised_step(expected_model, examples, tok.pad_token_id)
    got = sft_step_loss(model, examples, tok.pad_token_id, micro)
    assert got == pytest.approx(expected, rel=1e-5)
    for (name, a), b in zip(expected_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_sft_runs_no_full_vocabulary_logits(default, monkeypatch):
    """The LM head's forward (the [B, L, V] logits) is never called by the SFT step."""
    from oreo_fast.pipeline.sft import build_examples
    from oreo_fast.tasks.problems import load_problems

    tok = load_tokenizer(default["model"])
    model = load_policy(default["model"])
    model.lm_head.register_forward_hook(lambda *a: pytest.fail("full logits materialised"))
    examples = build_examples(tok, load_problems(default["train"]), 256)
    assert sft_step_loss(model, examples, tok.pad_token_id, 2) > 0


def test_demo_defaults_to_three_seeds_and_quick_to_one():
    from oreo_fast.pipeline.demo import DemoConfig

    assert DemoConfig().seeds == 3
    assert DemoConfig(quick=True, seeds=5).seeds == 1


def test_demo_test_set_extends_the_task_test_split_with_fresh_problems(tmp_path):
    """1000 held-out test problems: the task's own 200 first, then fresh ones; validation and
    test share no question with each other or with train."""
    from oreo_fast.io import read_jsonl
    from oreo_fast.pipeline.demo import TEST_FILE, write_demo_splits
    from oreo_fast.tasks.arithmetic import generate_splits

    train, test = generate_splits(ArithmeticConfig())
    for name, rows in (("train.jsonl", train), ("test.jsonl", test)):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_demo_splits(tmp_path, n_val=300, n_test=1000)
    questions = {name: [r["question"] for _, r in read_jsonl(tmp_path / name)]
                 for name in ("train.jsonl", "test.jsonl", "val.jsonl", TEST_FILE)}
    held_out, val = questions[TEST_FILE], questions["val.jsonl"]
    assert len(held_out) == len(set(held_out)) == 1000 and len(val) == len(set(val)) == 300
    assert held_out[:200] == questions["test.jsonl"]
    assert not set(held_out) & set(questions["train.jsonl"])
    assert not set(held_out) & set(val) and not set(val) & set(questions["train.jsonl"])


@pytest.mark.parametrize("each_round,reference,carries", [
    ("auto", "previous", False), ("auto", "initial", True), ("carry", "previous", True),
    ("fresh", "initial", False)])
def test_iterate_chains_the_value_only_where_one_was_trained(tmp_path, monkeypatch, each_round,
                                                             reference, carries):
    """OREO's first round starts from the given value model, later rounds from the last
    round's when the value carries over (by default only while the reference stays), else
    from none (a fresh one); RFT's rounds, which train none, never name one."""
    from oreo_fast.pipeline import iterate

    for trains_value in (True, False):
        launched = []

        def fake_training(overrides, nproc, log_path, threads=0):
            launched.append([o for o in overrides if o.startswith("value=")])
            for name in ("policy", "value") if trains_value else ("policy",):
                (log_path.parent / name).mkdir(parents=True)

        def fake_sample(config):
            Path(config.out).parent.mkdir(parents=True, exist_ok=True)
            Path(config.out + ".stats.json").write_text('{"reward_rate": 0.5}')
            return Path(config.out)

        monkeypatch.setattr(iterate, "launch_training", fake_training)
        monkeypatch.setattr("oreo_fast.pipeline.sample.run_sample", fake_sample)
        out = tmp_path / str(trains_value)
        iterate.run_iterate(iterate.IterateConfig(
            policy="p", problems="q", out=str(out), rounds=3, k=2, device="cpu",
            value="v0" if trains_value else "", value_each_round=each_round,
            reference=reference))
        if trains_value and carries:
            assert launched == [["value=v0"], [f"value={out / 'round-0' / 'value'}"],
                                [f"value={out / 'round-1' / 'value'}"]]
        elif trains_value:
            assert launched == [["value=v0"], [], []]
        else:
            assert launched == [[], [], []]


def test_demo_iterate_continues_from_the_first_seeds_runs(tmp_path, monkeypatch):
    from oreo_fast.pipeline import demo, iterate

    configs = []

    def fake_iterate(config):
        configs.append(config)
        return {"rounds": [{"greedy_accuracy": 0.1 * (r + 1)} for r in range(config.rounds)]}

    monkeypatch.setattr(iterate, "run_iterate", fake_iterate)
    results = {"per_seed": {"sft": [0.4], "rft": [0.5, 0.6], "oreo": [0.55, 0.65]}}
    config = demo.DemoConfig(out=str(tmp_path), iterate=3, first_seed=2, device="cpu")
    report = demo.demo_iterate(config, tmp_path, results, {})
    rft, oreo = configs
    assert rft.rounds == oreo.rounds == 2 and "algorithm=rft" in rft.train_overrides
    assert rft.policy == str(tmp_path / "seed-2" / "rft" / "policy") and rft.value == ""
    assert oreo.value == "" and oreo.reference == "previous"  # so a fresh value each round
    assert oreo.train_overrides == demo.OREO_OVERRIDES and oreo.nproc == config.nproc
    assert (rft.nproc, rft.threads, oreo.threads) == (1, config.threads * config.nproc,
                                                       config.threads)
    assert report["test_accuracy_by_round"] == {"rft": [0.5, 0.1, 0.2], "oreo": [0.55, 0.1, 0.2]}
