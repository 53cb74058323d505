"""The value probe's labels, its sibling preference, and the start state an oracle value for
OREO needs (experiments/value_probe.py)."""
import json

import pytest

from experiments.value_probe import (LABELS, evaluate, load_examples, run_probe,
                                     sibling_preference, start_label, step_labels)
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model, save_model
from oreo_fast.tokenizer import build_tokenizer

GOLD = "10 - 9 = 1\n1 + 8 = 9\n9 / 3 = 3\n#### 3"


def test_step_labels_one_per_completed_line():
    # line 1 right, line 2 carries the error on (its own arithmetic is right), line 3 wrong
    response = "10 - 9 = 1\n1 + 8 = 10\n10 / 3 = 4\n#### 4"
    assert step_labels(response, GOLD, 0, "prefix_correct") == [1.0, 0.0, 0.0]
    assert step_labels(response, GOLD, 0, "line_arithmetic") == [1.0, 0.0, 0.0]
    assert step_labels("10 - 9 = 2\n2 + 8 = 10\n#### 10", GOLD, 0, "line_arithmetic") == [0.0, 1.0]
    assert step_labels(response, GOLD, 0, "outcome") == [0.0, 0.0, 0.0]
    assert step_labels(GOLD, GOLD, 1, "outcome") == [1.0, 1.0, 1.0]
    assert step_labels(GOLD, GOLD, 1, "prefix_correct") == [1.0, 1.0, 1.0]
    assert step_labels(response, GOLD, 0, "result_parity") == [0.0, 1.0, 1.0]
    # an inexact division and a line that is not an equation are wrong, not errors
    assert step_labels("9 / 2 = 4\nfour\n#### 4", GOLD, 0, "line_arithmetic") == [0.0, 0.0]
    assert step_labels("#### 3", GOLD, 1, "prefix_correct") == []
    assert set(LABELS) == {"outcome", "prefix_correct", "line_arithmetic", "result_parity"}
    with pytest.raises(ValueError, match="label must be one of"):
        step_labels(GOLD, GOLD, 1, "reward")


def test_sibling_preference_compares_within_groups_only():
    states = [("a", 1.0, 0.9), ("a", 0.0, 0.1), ("a", 0.0, 0.95),  # 1 of 2 pairs right
              ("b", 1.0, 0.2), ("b", 0.0, 0.2),  # a tie counts half
              ("c", 1.0, 0.0), ("c", 1.0, 5.0)]  # equal labels: no pair
    # across groups the values would rank everything differently; they are never compared
    preference, pairs = sibling_preference(states)
    assert pairs == 3
    assert preference == pytest.approx((1 + 0 + 0.5) / 3)
    preference, pairs = sibling_preference([("a", 1.0, 0.3)])
    assert pairs == 0 and preference != preference  # nan: nothing to compare


def test_start_label_only_where_defined():
    assert start_label("prefix_correct", 0.0) == 1.0  # the empty prefix is always right
    assert start_label("outcome", 0.0) == 0.0 and start_label("outcome", 1.0) == 1.0
    for label in ("line_arithmetic", "result_parity"):
        with pytest.raises(ValueError, match="start state"):
            start_label(label, 1.0)


PROMPT = "Question: Start with 10. Subtract 9. Add 8. What is the result?\nAnswer:\n"
OTHER = ("Question: Start with 3. Add 3. What is the result?\nAnswer:\n", "3 + 3 = 6\n#### 6")


@pytest.fixture
def probe_run(tmp_path):
    """A run folder: gold solutions, one trajectory of problem 1 (the probe holds out group 0,
    the first problem seen) and four of problem 0, and a tiny SFT model."""
    responses = [(GOLD, 1), ("10 - 9 = 1\n1 + 8 = 10\n10 / 3 = 4\n#### 4", 0),
                 ("10 - 9 = 2\n2 + 8 = 10\n10 / 3 = 4\n#### 4", 0), (GOLD, 1)]
    tok = build_tokenizer([PROMPT + r for r, _ in responses] + ["".join(OTHER)], vocab_size=300)
    (tmp_path / "default").mkdir()
    (tmp_path / "default" / "train.jsonl").write_text("".join(json.dumps(
        {"id": i, "question": q, "answer": g}) + "\n"
        for i, q, g in (("train-0", PROMPT, GOLD), ("train-1", *OTHER))))
    records = [(OTHER[0], OTHER[1], 1, "train-1")] + [(PROMPT, r, w, "train-0")
                                                      for r, w in responses]
    (tmp_path / "trajectories.jsonl").write_text("".join(json.dumps(
        {"prompt": p, "response": r, "reward": w, "problem_id": i}) + "\n"
        for p, r, w, i in records))
    size = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1)
    save_model(build_tiny_model(tok, TinyModelConfig(**size, seed=0)), tok, tmp_path / "sft")
    return tmp_path, tok


def test_the_start_state_is_the_prompt_end_trained_but_never_compared(probe_run):
    root, tok = probe_run
    plain = load_examples(root, tok, "prefix_correct")
    start = load_examples(root, tok, "prefix_correct", start_state=True)
    assert [e.labels for e in plain] == [[1.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0],
                                         [1.0, 1.0, 1.0]]
    for a, b in zip(plain, start):
        assert b.positions[1:] == a.positions and b.labels == [1.0, *a.labels]
        assert b.prefix_correct == [1.0, *a.prefix_correct]
        assert (a.compared_from, b.compared_from) == (0, 1)
        # V of the start state is read at the prompt's last token: the next is the first action
        assert tok.decode(b.ids[:b.positions[0] + 1]).rstrip() == (PROMPT if b.group else OTHER[0]).rstrip()
    outcome = load_examples(root, tok, "outcome", start_state=True)
    assert [e.labels[0] for e in outcome] == [1.0, 1.0, 0.0, 0.0, 1.0]

    # the start state adds no pair: the same pairs, compared the same way, with or without it
    model = ValueModel.from_pretrained(root / "sft")
    without, with_start = evaluate(model, plain), evaluate(model, start)
    assert without == with_start
    assert without["pairs"] == 3 * 1 + 2 * 2 + 2 * 2  # right x wrong states after line 1, 2, 3


def test_a_saved_start_state_probe_is_a_value_model_for_oreo(probe_run, tmp_path):
    root, _ = probe_run
    result = run_probe(root, "prefix_correct", None, epochs=1, lr=1e-3, batch_size=2,
                       save=tmp_path / "oracle", start_state=True)
    assert result["start_state"] is True and result["history"][0]["mse"] >= 0
    assert result["train_fit"]["pairs"] == 3 * 1 + 2 * 2 + 2 * 2  # problem 0 trained
    assert ValueModel.from_pretrained(tmp_path / "oracle").value_head.weight.abs().sum() > 0
