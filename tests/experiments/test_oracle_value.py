"""experiments.oracle_value: the prefix oracle's values, their table over a trajectory file, and
OREO trained end to end against them (its value model's output replaced, its gradient zero)."""
import json

import pytest
import torch

from experiments.oracle_value import OracleValues, main, oracle_table, prefix_values
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model, save_model
from oreo_fast.tokenizer import build_tokenizer
from oreo_fast.train.config import load_train_config
from oreo_fast.train import step
from oreo_fast.train.data import collate_examples, read_training_examples
from oreo_fast.train.parallelize import Values

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "Question: Start with 10. Subtract 9. Tom has 5 pens. Add 8. What is the result?\nAnswer:\n"
GOLD = "Subtract 9: 10 - 9 = 1\nAdd 8: 1 + 8 = 9\n#### 9"
MISREAD = "Subtract 9: 10 - 9 = 1\nTom has 5 pens: 1 + 5 = 6\n#### 6"
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


def test_prefix_values_against_a_hand_count():
    # state j holds ids[:j + 1]; the first token off the gold (index 3) ends the prefix
    assert prefix_values([1, 2, 3, 4, 5], [1, 2, 3, 9, 9, 9]) == [1.0, 1.0, 1.0, 0.0]
    assert prefix_values([1, 2, 3], [1, 2, 3]) == [1.0, 1.0]  # the gold itself: all 1
    assert prefix_values([7, 2, 3], [1, 2, 3]) == [0.0, 0.0]  # a prefix never comes back
    assert prefix_values([1, 2, 3, 4], [1, 2]) == [1.0, 1.0, 0.0]  # past the gold's end


@pytest.fixture
def oracle_run(tmp_path):
    tok = build_tokenizer([PROMPT + GOLD, PROMPT + MISREAD], vocab_size=300)
    (tmp_path / "gold.jsonl").write_text(json.dumps(
        {"id": "p0", "question": "q", "answer": GOLD}) + "\n")
    records = [(GOLD, 1), (MISREAD, 0), (GOLD, 1), (MISREAD, 0)]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(
        {"prompt": PROMPT, "response": r, "reward": w, "problem_id": "p0"}) + "\n"
        for r, w in records))
    save_model(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0)), tok, tmp_path / "sft")
    return tmp_path, tok


def test_the_table_marks_the_first_token_off_the_gold(oracle_run):
    root, tok = oracle_run
    cfg = load_train_config(None, [f"policy={root / 'sft'}", f"train_file={root / 't.jsonl'}",
                                   "max_length=256"])
    table = oracle_table(cfg, tok, root / "gold.jsonl")
    examples, _ = read_training_examples(root / "t.jsonl", tok, 256)
    right, wrong = examples[0], examples[1]
    assert len(table) == 2  # the repeated trajectories share their ids
    assert table[tuple(right.ids)] == [1.0] * (len(right.ids) - 1)
    values = table[tuple(wrong.ids)]
    first_off = values.index(0.0)  # the state holding the first token that leaves the gold
    assert set(values[first_off:]) == {0.0} and set(values[:first_off]) == {1.0}
    assert right.ids[:first_off] == wrong.ids[:first_off]
    assert right.ids[first_off] != wrong.ids[first_off]  # the misread's first token
    start = wrong.is_action.index(True)
    on_gold = tok.decode(wrong.ids[start:first_off])  # the shared first line
    assert on_gold.startswith("Subtract 9: 10 - 9 = 1") and "Tom" not in on_gold

    bad = root / "orphan.jsonl"
    bad.write_text(json.dumps({"prompt": PROMPT, "response": GOLD, "reward": 1,
                               "problem_id": "p9"}) + "\n")
    with pytest.raises(ValueError, match=r"orphan.jsonl:1: problem_id 'p9' has no gold"):
        oracle_table(load_train_config(None, [f"policy={root / 'sft'}",
                                              f"train_file={bad}"]), tok, root / "gold.jsonl")


def test_oracle_values_replace_the_model_output_with_a_zero_gradient(oracle_run):
    root, tok = oracle_run
    cfg = load_train_config(None, [f"policy={root / 'sft'}", f"train_file={root / 't.jsonl'}"])
    examples, _ = read_training_examples(root / "t.jsonl", tok, cfg.max_length)
    batch = collate_examples([examples[0], None, examples[1]], tok.pad_token_id, "token")
    value = ValueModel(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=2)).model,
                       {"base_model_type": "qwen2", "base_architectures": ["Qwen2ForCausalLM"]})
    torch.nn.init.normal_(value.value_head.weight)  # a model whose own values are not 0/1
    OracleValues.table = oracle_table(cfg, tok, root / "gold.jsonl")
    module = OracleValues(value)
    out = module(batch["input_ids"], batch["attention_mask"], batch["position_ids"])
    for row, e in ((0, examples[0]), (2, examples[1])):
        n = len(e.ids)
        assert out[row, :n - 1].tolist() == OracleValues.table[tuple(e.ids)]
        assert not out[row, n - 1:].any()  # padding
    assert not out[1].any()  # the empty row
    (out * torch.randn_like(out)).sum().backward()
    grads = [p.grad for p in value.parameters() if p.grad is not None]
    assert grads and all(not g.any() for g in grads)

    batch["input_ids"][0, len(examples[0].ids) - 2] += 1  # a trajectory the table lacks
    with pytest.raises(KeyError, match="row 0"):
        module(batch["input_ids"], batch["attention_mask"], batch["position_ids"])


def test_oreo_trains_against_the_oracle_end_to_end(oracle_run, capsys):
    root, _ = oracle_run
    out = root / "out"
    main([f"gold={root / 'gold.jsonl'}", f"policy={root / 'sft'}",
          f"train_file={root / 't.jsonl'}", f"output_dir={out}", "device=cpu",
          "global_batch_size=2", "micro_batch_size=1", "level=token", "policy_lr=1e-2",
          "max_steps=2", "max_length=256"])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    # the oracle's first state is the prompt's end, on the gold: V = 1 for every trajectory
    assert all(r["first_value"] == pytest.approx(1.0) for r in rows)
    assert all(r["value_grad_norm"] == 0 for r in rows)
    assert (out / "policy" / "config.json").exists()
    # the trainer's own value wrapper is back: later training in this process learns its value
    assert step.Values is Values and OracleValues.table == {}
    with pytest.raises(SystemExit, match="usage"):
        main([f"policy={root / 'sft'}"])
