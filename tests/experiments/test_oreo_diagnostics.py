"""OREO diagnostics (experiments/oreo_diagnostics.py): line categories with and without
distractors, the value figures on hand-computed states, and the scores of tiny models against
unbatched forwards (policy == reference: KL and deltas 0)."""
import json
import math
import statistics

import pytest
import torch

from experiments.oreo_diagnostics import (Trajectory, line_categories, load_trajectories, main,
                                          score, value_figures)
from oreo_fast.models import TinyModelConfig, ValueModel, build_tiny_model, save_model
from oreo_fast.tokenizer import build_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

Q0 = "Start with 10. Subtract 9. Tom has 5 pens. Add 8. What is the result?"
G0 = "10 - 9 = 1\n1 + 8 = 9\n#### 9"
Q1 = "Start with 4. Multiply by 3. Add 2. What is the result?"
G1 = "4 * 3 = 12\n12 + 2 = 14\n#### 14"
SIZE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            num_key_value_heads=1)


def test_line_categories_split_the_first_wrong_line_by_distractor():
    assert line_categories(Q0, G0, G0, 1) == ["correct"] * 3
    # the distractor's 5 stands before "Add 8": reading it there is a misread
    assert line_categories(Q0, "10 - 9 = 1\n1 + 5 = 6\n#### 6", G0, 0) == [
        "wrong_prefix_correct", "first_wrong_misread", "after_first_wrong"]
    assert line_categories(Q0, "10 - 9 = 1\n1 + 8 = 10\n#### 10", G0, 0) == [
        "wrong_prefix_correct", "first_wrong_other", "after_first_wrong"]
    # the same 5 at the step before the distractor, or in an unparsable line: not a misread
    assert line_categories(Q0, "10 - 5 = 5\n5 + 8 = 13\n#### 13", G0, 0)[0] == "first_wrong_other"
    assert line_categories(Q0, "10 - 9 = 1\n1 plus 5\n#### 6", G0, 0)[1] == "first_wrong_other"
    # the distractor's number is also the gold operand: a wrong line using it is no misread
    same = Q0.replace("5 pens", "8 pens")
    assert line_categories(same, "10 - 9 = 1\n1 + 8 = 10\n#### 10", G0, 0)[1] == \
        "first_wrong_other"
    # no distractor (the older task): never a misread; a wrong answer line alone is first wrong
    assert line_categories(Q1, "4 * 3 = 12\n12 + 3 = 15\n#### 15", G1, 0)[1] == "first_wrong_other"
    assert line_categories(Q1, "4 * 3 = 12\n12 + 2 = 14\n#### 15", G1, 0) == [
        "wrong_prefix_correct", "wrong_prefix_correct", "first_wrong_other"]
    # operations in a wording it does not parse: the distractor's number counts at any step
    odd = "Start with 10. Minus 9. Tom has 5 pens. Plus 8. What is the result?"
    assert line_categories(odd, "10 - 5 = 5\n5 + 8 = 13\n#### 13", G0, 0)[0] == \
        "first_wrong_misread"
    # a longer response than the gold solution: its extra line has no gold line to compare
    assert line_categories(Q1, "4 * 3 = 12\n12 + 2 = 14\n14 + 1 = 15\n#### 15", G1, 0)[2:] == [
        "first_wrong_other", "after_first_wrong"]


def _traj(prefix, reward, values, problem=0):
    return Trajectory([], [], prefix, [], reward, problem, values)


def test_value_figures_on_hand_computed_states():
    # values: [prompt, after line 1, after line 2]
    a = _traj([1.0, 1.0], 1.0, [0.0, 0.9, 0.8])
    b = _traj([1.0, 0.0], 0.0, [0.0, 0.5, 0.9])
    c = _traj([0.0, 0.0], 0.0, [0.0, 0.5, 0.1])
    figures = value_figures([a, b, c])
    # prefix pairs: step 1 a>c right, b=c tie; step 2 a<b wrong, a>c right
    assert figures["pairs_prefix_correct"] == 4
    assert figures["sibling_preference_prefix_correct"] == pytest.approx(2.5 / 4)
    # outcome pairs: step 1 a>b, a>c; step 2 a<b, a>c
    assert figures["pairs_outcome"] == 4
    assert figures["sibling_preference_outcome"] == pytest.approx(3 / 4)
    assert figures["within_problem_corr_first_state"] == pytest.approx(1.0)
    assert figures["within_problem_corr_all_states"] == pytest.approx(
        statistics.correlation([0.9, 0.8, 0.5, 0.9, 0.5, 0.1], [1, 1, 0, 0, 0, 0]))
    # a value equal to the label ranks every pair right; one problem: no across-problem r
    planted = [_traj(t.prefix_correct, t.reward, [0.0] + t.prefix_correct) for t in (a, b, c)]
    assert value_figures(planted)["sibling_preference_prefix_correct"] == 1.0
    assert math.isnan(figures["across_problem_corr_first_state"])
    # across problems: problem 1 all wrong with a lower first-state value than problem 0
    d = _traj([0.0], 0.0, [-1.0, -2.0], problem=1)
    figures = value_figures([a, b, c, d])
    assert figures["across_problem_corr_first_state"] == pytest.approx(
        statistics.correlation([(0.9 + 0.5 + 0.5) / 3, -2.0], [1 / 3, 0.0]))
    assert figures["problems_first_state"] == 1  # problem 1 has only one outcome


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("run")
    prompt = "Question: {}\nAnswer:\n"
    records = [(0, G0, 1), (0, "10 - 9 = 1\n1 + 5 = 6\n#### 6", 0),
               (0, "10 - 9 = 2\n2 + 8 = 10\n#### 10", 0), (1, G1, 1), (1, "#### 14", 1),
               (1, "4 * 3 = 12\n12 + 3 = 15\n#### 15", 0), (2, "3 + 3 = 6\n#### 6", 1)]
    questions = [Q0, Q1, "Start with 3. Add 3. What is the result?"]
    golds = [G0, G1, "3 + 3 = 6\n#### 6"]
    tok = build_tokenizer([prompt.format(q) + g for q, g in zip(questions, golds)],
                          vocab_size=300)
    (root / "default").mkdir()
    (root / "default" / "train.jsonl").write_text("".join(
        json.dumps({"id": f"train-{i}", "question": q, "answer": g}) + "\n"
        for i, (q, g) in enumerate(zip(questions, golds))))
    lines = [{"prompt": prompt.format(questions[p]), "response": r, "reward": w,
              "problem_id": f"train-{p}"} for p, r, w in records]
    lines.insert(2, {**lines[0], "truncated": True})
    (root / "trajectories.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    reference = build_tiny_model(tok, TinyModelConfig(**SIZE, seed=0))
    save_model(reference, tok, root / "sft")
    save_model(reference, tok, root / "oreo" / "policy")  # OREO changed nothing
    save_model(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=1)), tok, root / "rft" / "policy")
    value = ValueModel(build_tiny_model(tok, TinyModelConfig(**SIZE, seed=2)).model,
                       {"base_model_type": "qwen2", "base_architectures": ["Qwen2ForCausalLM"]})
    torch.manual_seed(3)
    torch.nn.init.normal_(value.value_head.weight)  # non-zero head: the values differ
    value.save_pretrained(root / "oreo" / "value", tok)
    return root, tok, reference, value


def test_main_on_a_tiny_run(tiny_run, tmp_path, capsys):
    root = tiny_run[0]
    out = tmp_path / "d.json"
    assert main(["--run", str(root), "--every", "2", "--batch-size", "2", "--device", "cpu",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert "oreo: KL" in capsys.readouterr().out
    assert result["problems"] == 2 and result["trajectories"] == 4  # problem 1 not taken
    assert result["skipped"] == {"truncated": 1, "lines_and_states_disagree": 0}
    oreo, rft = result["policy"]["oreo"], result["policy"]["rft"]
    assert oreo["kl_per_token"] == pytest.approx(0, abs=1e-6) and rft["kl_per_token"] > 1e-3
    assert oreo["tokens"] == rft["tokens"] > 0
    for category, figures in oreo["lines"].items():
        if figures["lines"]:
            assert figures["mean_delta"] == pytest.approx(0, abs=1e-5), category
    counts = {c: x["lines"] for c, x in rft["lines"].items()}
    assert counts == {"correct": 3 + 2, "wrong_prefix_correct": 1, "first_wrong_misread": 1,
                      "first_wrong_other": 1, "after_first_wrong": 1 + 2, "first_wrong": 2}
    # problem 0 at steps 1 and 2: the right response against each wrong one
    assert result["value"]["pairs_outcome"] == 4
    assert result["value"]["problems_first_state"] == 1  # problem 2 has one outcome
    assert result["environment"]["cpu_model"] and result["args"]["every"] == 2


def test_batched_scores_equal_unbatched_forwards(tiny_run):
    root, tok, reference, value = tiny_run
    rft = build_tiny_model(tok, TinyModelConfig(**SIZE, seed=1))
    trajs, _ = load_trajectories(root, root / "trajectories.jsonl", tok, 1, None)
    assert len({len(t.ids) for t in trajs}) > 2  # batches are padded
    score(trajs, reference, {"rft": rft}, value, batch_size=4)
    assert [t.categories[1] for t in trajs[:3]] == [
        "correct", "first_wrong_misread", "after_first_wrong"]
    with torch.no_grad():
        for t in trajs:
            ids = torch.tensor([t.ids])
            logq = torch.log_softmax(reference(ids).logits[0, :-1], -1)
            logp = torch.log_softmax(rft(ids).logits[0, :-1], -1)
            first = t.starts[0]
            kl = torch.nn.functional.kl_div(logq, logp, log_target=True, reduction="none").sum(-1)
            assert t.kl["rft"] == pytest.approx(kl[first - 1:].tolist(), abs=1e-5)
            ratio = (logp - logq).gather(-1, ids[0, 1:, None])[first - 1:]
            assert sum(t.line_delta["rft"]) == pytest.approx(float(ratio.sum()), abs=1e-4)
            assert len(t.line_delta["rft"]) == len(t.categories)
            values = value(ids).values[0, [a - 1 for a in t.starts]]
            assert t.values == pytest.approx(values.tolist(), abs=1e-5)
