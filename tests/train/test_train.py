"""The trainer: config validation, masks from known strings, bad trajectory lines, one step
against an independent computation from full logits, and invariance to the micro-batch split
and to the world size (torchrun, 2 processes, gloo)."""
import json
import os
import socket
import sys

import pytest
import torch
from processes import run_process_group

from oreo_fast.ops import reference
from oreo_fast.errors import ConfigError
from oreo_fast.train.config import load_train_config
from oreo_fast.train.data import collate_examples, read_training_examples, tokenize_trajectory
from oreo_fast.errors import DataError
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model, load_policy, save_model
from oreo_fast.tokenizer import build_tokenizer
from oreo_fast.train.trainer import Trainer

PROMPT = "Question: start at {a}, multiply by {b}, add {c}.\nAnswer:\n"


def _records(n=16):
    out = []
    for i in range(n):
        a, b, c = 3 + i, 2 + i % 5, i % 7
        good = i % 3 != 0
        m = a * b
        s = m + c if good else m + c + 1
        out.append({"prompt": PROMPT.format(a=a, b=b, c=c),
                    "response": f"{a} * {b} = {m}\n{m} + {c} = {s}\n#### {s}",
                    "reward": int(good), "problem_id": i})
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    records = _records()
    tok = build_tokenizer([r["prompt"] + r["response"] for r in records], vocab_size=300)
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1)
    save_model(build_tiny_model(tok, TinyModelConfig(**size, seed=0)), tok, root / "policy")
    save_model(build_tiny_model(tok, TinyModelConfig(**size, seed=1)), tok, root / "ref")
    with open(root / "traj.jsonl", "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return root, tok, records


def _config(root, **overrides):
    base = dict(policy=str(root / "policy"), reference=str(root / "ref"),
                train_file=str(root / "traj.jsonl"), output_dir=str(root / "run"),
                global_batch_size=8, micro_batch_size=3, policy_lr=1e-3, value_lr=1e-3,
                beta=0.1, kl_coef=0.05, progress=False)
    base.update(overrides)
    return load_train_config(None, [f"{k}={v}" for k, v in base.items()])


def test_config_rejects_unknown_keys_and_bad_values(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'learning_rate'"):
        load_train_config(None, ["policy=x", "train_file=y", "learning_rate=1"])
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"policy": "x", "train_file": "y", "bogus": 1}))
    with pytest.raises(ConfigError, match=r"c\.json: unknown key 'bogus'"):
        load_train_config(path)
    with pytest.raises(ConfigError, match="beta: expected a number"):
        load_train_config(None, ["policy=x", "train_file=y", "beta=high"])
    with pytest.raises(ConfigError, match="micro_batch_size: must be >= 1"):
        load_train_config(None, ["policy=x", "train_file=y", "micro_batch_size=0"])
    with pytest.raises(ConfigError, match="level"):
        load_train_config(None, ["policy=x", "train_file=y", "level=sentence"])
    with pytest.raises(ConfigError, match="policy: is required"):
        load_train_config(None, ["train_file=y"])
    ok = load_train_config(None, ["policy=x", "train_file=y", "adam_betas=0.9,0.99", "step_delimiters=[\"\\n\", \";\"]"])
    assert ok.adam_betas == (0.9, 0.99) and ok.step_delimiters == ["\n", ";"]


def _segments(tok, example, prompt_len):
    """Decoded text of each step: the response tokens cut at the step starts."""
    pieces, current = [], []
    for token, is_start in zip(example.ids[prompt_len:], example.starts_step[prompt_len:]):
        if is_start and current:
            pieces.append(current)
            current = []
        current.append(token)
    pieces.append(current)
    return [tok.decode(p) for p in pieces]


def test_step_starts_on_a_known_string(tiny):
    _, tok, _ = tiny
    prompt, response = "Question: x\nAnswer:\n", "12 * 3 = 36\n36 + 4 = 40\n#### 40"
    ex = tokenize_trajectory(tok, prompt, [("assistant", response)], 1.0, 512, ["\n"])
    prompt_len = len(tok(prompt, add_special_tokens=False)["input_ids"])
    assert not any(ex.is_action[:prompt_len]) and all(ex.is_action[prompt_len:])
    assert ex.ids[-1] == tok.eos_token_id
    assert _segments(tok, ex, prompt_len) == ["12 * 3 = 36\n", "36 + 4 = 40\n", "#### 40" + tok.eos_token]
    # another delimiter: steps also begin after "= "; the tokenizer glues a space to the digit
    # after it (" 3"), and the token holding a step's first character starts the step
    ex2 = tokenize_trajectory(tok, prompt, [("assistant", response)], 1.0, 512, ["\n", "= "])
    assert _segments(tok, ex2, prompt_len)[:3] == ["12 * 3 =", " 36\n", "36 + 4 ="]


def test_multi_turn_masks(tiny):
    _, tok, _ = tiny
    turns = [("assistant", "go to 1\n"), ("observation", "You see 3.\n"), ("assistant", "take 3")]
    ex = tokenize_trajectory(tok, "Task:\n", turns, 1.0, 512, ["\n"])
    lens = [len(tok(t, add_special_tokens=False)["input_ids"]) for _, t in turns]
    p = len(tok("Task:\n", add_special_tokens=False)["input_ids"])
    obs = range(p + lens[0], p + lens[0] + lens[1])
    assert [ex.is_action[i] for i in obs] == [False] * lens[1]
    assert all(ex.is_action[p:p + lens[0]]) and all(ex.is_action[p + lens[0] + lens[1]:])
    starts = [i for i, s in enumerate(ex.starts_step) if s]
    assert starts == [p, p + lens[0] + lens[1]]  # one step per assistant turn here
    batch = collate_examples([ex], tok.pad_token_id, "token")
    S = batch["state_mask"]
    nxt = reference.next_state_index(S)[0]
    last_of_turn1 = p + lens[0] - 2  # index t of the transition to a_t = last token of turn 1
    assert nxt[last_of_turn1] == p + lens[0] + lens[1] - 1  # jumps over the observation
    assert not S[0, p + lens[0] - 1: p + lens[0] + lens[1] - 1].any()


def test_truncated_responses_get_no_eos_and_long_prompts_are_reported(tiny, tmp_path, caplog):
    _, tok, records = tiny
    r = records[0]
    n_prompt = len(tok(r["prompt"])["input_ids"])
    whole = tokenize_trajectory(tok, r["prompt"], [("assistant", r["response"])], 1.0, 512, ["\n"])
    assert whole.ids[-1] == tok.eos_token_id and whole.is_action[-1] and not whole.truncated
    # cut by max_length: the first tokens of the response, no EOS, marked truncated
    ex = tokenize_trajectory(tok, r["prompt"], [("assistant", r["response"])], 1.0, n_prompt + 4, ["\n"])
    assert ex.truncated and ex.ids == whole.ids[:n_prompt + 4] and tok.eos_token_id not in ex.ids
    # marked truncated by the sampler: the whole response, no EOS
    ex = tokenize_trajectory(tok, r["prompt"], [("assistant", r["response"])], 1.0, 512, ["\n"],
                             truncated=True)
    assert ex.truncated and ex.ids == whole.ids[:-1]
    path = tmp_path / "t.jsonl"
    long = dict(r, prompt=r["prompt"] * 40)
    cut = dict(r, truncated=True, reward=1)
    path.write_text("".join(json.dumps(x) + "\n" for x in (r, long, cut, cut)))
    examples, dropped = read_training_examples(path, tok, 64)
    assert (len(examples), dropped.too_long, dropped.truncated) == (1, 1, 2)
    assert "dropped 1" in caplog.text and "left out 2 truncated" in caplog.text
    examples, dropped = read_training_examples(path, tok, 64, keep_truncated=True)
    assert (len(examples), dropped.truncated) == (3, 0)
    kept = examples[1]
    assert kept.truncated and kept.reward == 0.0 and kept.ids == whole.ids[:-1]
    assert kept.is_action[-1] and kept.ids[-1] != tok.eos_token_id  # the last response token
    with pytest.raises(DataError, match=r"t\.jsonl:2: field 'prompt'"):
        read_training_examples(path, tok, 64, strict=True)
    path.write_text(json.dumps(dict(r, truncated="yes")) + "\n")
    with pytest.raises(DataError, match=r"t\.jsonl:1: field 'truncated'"):
        read_training_examples(path, tok, 64)


@pytest.mark.parametrize("line,match", [
    ('{"prompt": "a", "response": "b"', r":2: malformed JSON"),
    ('{"prompt": "a", "response": "b"}', r":2: field 'reward': missing"),
    ('{"prompt": "a", "response": "", "reward": 1}', r":2: field 'response': empty"),
    ('{"prompt": "a", "response": "b", "reward": NaN}', r":2: field 'reward': reward must be finite"),
    ('{"prompt": "a", "turns": [{"role": "user", "content": "b"}], "reward": 1}', r":2: field 'turns'"),
    ('[1, 2]', r":2: expected a JSON object"),
])
def test_bad_trajectory_lines_name_file_and_line(tiny, tmp_path, line, match):
    _, tok, records = tiny
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(records[0]) + "\n" + line + "\n")
    with pytest.raises(DataError, match=r"bad\.jsonl" + match):
        read_training_examples(path, tok, 256)


def test_one_step_equals_losses_from_full_logits(tiny):
    """The trainer's first-step losses (fused op, micro-batches) against the reference losses
    computed from full [B, T, V] logits of freshly loaded models on the whole batch."""
    root, tok, _ = tiny
    config = _config(root, global_batch_size=16, micro_batch_size=5, level="step",
                     output_dir=str(root / "run_step"))
    trainer = Trainer(config)
    indices = list(range(len(trainer.examples)))
    batch = collate_examples([trainer.examples[i] for i in indices], tok.pad_token_id, "step")
    policy, ref = load_policy(root / "policy"), load_policy(root / "ref")
    value = ValueModel.from_pretrained(root / "policy")
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    with torch.no_grad():
        logits = policy(**inputs).logits[:, :-1]
        ref_logits = ref(**inputs).logits[:, :-1]
        values = value(**inputs).values[:, :-1]
    expected = reference.oreo_loss_reference(
        logits, ref_logits, batch["actions"], values, batch["rewards"], batch["action_mask"],
        batch["state_mask"], beta=0.1, kl_coef=0.05)
    got = trainer.train_step(indices)
    assert got["value_loss"] == pytest.approx(expected.value_loss.item(), rel=1e-5)
    assert got["policy_loss"] == pytest.approx(expected.policy_loss.item(), rel=1e-5)
    assert got["kl"] == pytest.approx(expected.kl.item(), rel=1e-4)
    assert got["kl"] > 0  # a different reference: the KL term is exercised


def _train_losses_and_params(config):
    trainer = Trainer(config)
    trainer.fit()
    rows = [json.loads(l) for l in open(os.path.join(config.output_dir, "metrics.jsonl"))]
    return rows, load_policy(os.path.join(config.output_dir, "policy")).state_dict()


def test_micro_batch_split_does_not_change_training(tiny):
    root, _, _ = tiny
    a_rows, a_params = _train_losses_and_params(_config(root, micro_batch_size=8, output_dir=str(root / "mb8")))
    b_rows, b_params = _train_losses_and_params(_config(root, micro_batch_size=3, output_dir=str(root / "mb3")))
    assert len(a_rows) == 2
    for a, b in zip(a_rows, b_rows):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    for k in a_params:
        torch.testing.assert_close(a_params[k], b_params[k], rtol=1e-4, atol=1e-6)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(tiny):
    root, _, _ = tiny
    args = dict(policy=root / "policy", reference=root / "ref", train_file=root / "traj.jsonl",
                global_batch_size=8, micro_batch_size=3, policy_lr=1e-3, value_lr=1e-3, beta=0.1,
                kl_coef=0.05, progress="false", level="step", epochs=2)
    overrides = [f"{k}={v}" for k, v in args.items()]
    runs = {}
    for n in (1, 2):
        out = root / f"world{n}"
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}",
               f"--master_port={_free_port()}", "-m", "oreo_fast.train", *overrides,
               f"output_dir={out}"]
        proc = run_process_group(cmd, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[n] = [json.loads(l) for l in open(out / "metrics.jsonl")], load_policy(out / "policy").state_dict(), \
            ValueModel.from_pretrained(out / "value").state_dict()
    (rows1, pol1, val1), (rows2, pol2, val2) = runs[1], runs[2]
    assert len(rows1) == len(rows2) == 4
    for a, b in zip(rows1, rows2):
        for key in ("loss", "value_loss", "policy_loss", "kl"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    for k in pol1:
        torch.testing.assert_close(pol1[k], pol2[k], rtol=1e-4, atol=1e-6)
    for k in val1:
        torch.testing.assert_close(val1[k], val2[k], rtol=1e-4, atol=1e-6)
    assert any((pol1[k] != load_policy(root / "policy").state_dict()[k]).any() for k in pol1)


def test_rft_trains_only_on_reward_one(tiny):
    root, _, records = tiny
    trainer = Trainer(_config(root, algorithm="rft", output_dir=str(root / "rft")))
    positives = sum(r["reward"] == 1 for r in records)
    assert len(trainer.examples) == positives < len(records)
    assert all(e.reward == 1.0 for e in trainer.examples)
    summary = trainer.fit()
    assert summary["steps"] == -(-positives // 8)


def test_resume_from_a_checkpoint_equals_an_uninterrupted_run(tiny):
    """Stop after 2 of 4 steps, resume from the newest checkpoint: the same parameters, bit
    for bit, and the same loss curve."""
    root, _, _ = tiny
    full_rows, full_params = _train_losses_and_params(
        _config(root, epochs=2, output_dir=str(root / "full")))
    out = str(root / "interrupted")
    Trainer(_config(root, epochs=2, output_dir=out, max_steps=2, save_every=1,
                    keep_checkpoints=1)).fit()
    assert sorted(p.name for p in (root / "interrupted" / "checkpoints").iterdir()) == ["step-2"]
    resumed = Trainer(_config(root, epochs=2, output_dir=out, resume=True))
    assert resumed.progress.step == 2  # it did resume, not start over
    resumed.fit()
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    params = load_policy(os.path.join(out, "policy")).state_dict()
    assert [r["loss"] for r in rows] == [r["loss"] for r in full_rows]
    for k in full_params:
        assert torch.equal(params[k], full_params[k]), k


def test_liger_on_cpu_is_refused_clearly(tiny):
    root, _, _ = tiny
    if torch.cuda.is_available():
        pytest.skip("CUDA present: liger patches apply")
    with pytest.raises(RuntimeError, match="liger=true needs a CUDA device"):
        Trainer(_config(root, liger=True, output_dir=str(root / "liger")))


def test_gradient_checkpointing_gives_the_same_training(tiny):
    root, _, _ = tiny
    plain, plain_params = _train_losses_and_params(_config(root, output_dir=str(root / "plain")))
    ckpt, ckpt_params = _train_losses_and_params(
        _config(root, output_dir=str(root / "ckpt"), gradient_checkpointing=True))
    assert [r["loss"] for r in ckpt] == pytest.approx([r["loss"] for r in plain], rel=1e-6)
    for k in plain_params:
        torch.testing.assert_close(ckpt_params[k], plain_params[k], rtol=1e-5, atol=1e-7)


def test_iterate_chains_rounds_from_the_last_policy(tiny, tmp_path):
    from oreo_fast.pipeline.iterate import IterateConfig, run_iterate

    root, _, _ = tiny
    problems = tmp_path / "problems.jsonl"
    problems.write_text("".join(json.dumps({"id": i, "question": f"Start with {i}. Add 2. What is the result?",
                                            "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"}) + "\n"
                                for i in range(4)))
    out = tmp_path / "iter"
    summary = run_iterate(IterateConfig(
        policy=str(root / "policy"), problems=str(problems), out=str(out), rounds=2, k=2,
        max_new_tokens=12, eval_problems=str(problems), value_each_round="carry",
        train_overrides=["global_batch_size=8", "micro_batch_size=8", "max_length=128",
                         "keep_truncated=true"]))  # a random policy rarely ends in 12 tokens
    assert [r["round"] for r in summary["rounds"]] == [0, 1]
    assert all(0 <= r["greedy_accuracy"] <= 1 for r in summary["rounds"])
    second = json.loads((out / "round-1" / "config.json").read_text())
    assert second["policy"] == str(out / "round-0" / "policy")
    assert second["reference"] == str(out / "round-0" / "policy")  # the round's start
    assert second["value"] == str(out / "round-0" / "value")  # the value model carries over
    assert (out / "round-1" / "policy" / "model.safetensors").is_file()


def test_progress_bar_total_is_the_planned_steps(tiny):
    root, _, records = tiny
    # 16 trajectories in batches of 8 over 3 epochs: 6 steps, or max_steps when fewer
    assert Trainer(_config(root, epochs=3, output_dir=str(root / "p6"))).planned_steps == 6
    assert Trainer(_config(root, epochs=3, max_steps=4,
                           output_dir=str(root / "p4"))).planned_steps == 4
    assert Trainer(_config(root, epochs=3, max_steps=9,
                           output_dir=str(root / "p9"))).planned_steps == 6


def test_transformers_bars_and_reports_only_on_rank_0():
    from transformers.utils import logging as hf_logging

    from oreo_fast.train.distributed import quiet_transformers_unless_main

    before = hf_logging.get_verbosity()
    hf_logging.enable_progress_bar()
    try:
        quiet_transformers_unless_main(0)
        assert hf_logging.is_progress_bar_enabled() and hf_logging.get_verbosity() == before
        quiet_transformers_unless_main(1)
        assert not hf_logging.is_progress_bar_enabled()
        assert hf_logging.get_verbosity() == hf_logging.ERROR
    finally:
        hf_logging.enable_progress_bar()
        hf_logging.set_verbosity(before)
