"""experiments.sft_seeds: the distractor split, and the demo's own SFT reused, others trained."""
import json
import random

import pytest

from experiments import sft_seeds
from oreo_fast.io import write_jsonl
from oreo_fast.tasks.arithmetic import ArithmeticConfig, make_problem


def test_has_distractor_matches_the_generator():
    rng, cfg = random.Random(0), ArithmeticConfig(distractor_rate=0.5)
    seen = set()
    for _ in range(300):
        question, gold, _, _ = make_problem(rng, cfg)
        # "Start with N." and one sentence per gold line but "#### N"; a distractor adds one
        extra = question.count(".") - len(gold.splitlines())
        assert extra in (0, 1)
        assert sft_seeds.has_distractor(question) == (extra == 1)
        seen.add(extra)
    assert seen == {0, 1}


def test_split_accuracy():
    questions = ["Start with 2. Tom has 3 pens. Add 1. What is the result?",
                 "Start with 2. Add 1. What is the result?",
                 "Start with 2. A box holds 4 cups. Add 1. What is the result?",
                 "Start with 5. Add 1. What is the result?"]
    got = sft_seeds.split_accuracy([1, 1, 0, 0], questions)
    assert got == {"accuracy": 0.5, "n": 4, "without_distractor": 0.5,
                   "n_without_distractor": 2, "with_distractor": 0.5, "n_with_distractor": 2}
    assert sft_seeds.split_accuracy([0, 1], questions[1::2])["with_distractor"] is None
    with pytest.raises(ValueError, match="3 outcomes for 4 questions"):
        sft_seeds.split_accuracy([1, 0, 1], questions)


def test_the_demo_sft_is_reused_and_other_seeds_trained(tmp_path, monkeypatch):
    import oreo_fast.pipeline.evaluate as evaluate
    import oreo_fast.pipeline.sft as sft

    run = tmp_path / "run"
    questions = ["Start with 2. Tom has 3 pens. Add 1. What is the result?",
                 "Start with 2. Add 1. What is the result?"]
    for split in ("val.jsonl", "test_held_out.jsonl"):
        write_jsonl(run / "default" / split, [{"id": str(i), "question": q, "answer": "#### 3"}
                                              for i, q in enumerate(questions)])
    (run / "results.json").write_text(json.dumps({"sft_seed": 0, "stage_threads": 2}))
    for split in ("val", "test"):
        (run / f"eval_sft_{split}.json").write_text(json.dumps({"greedy_correct": [0, 1]}))
    trained = []
    monkeypatch.setattr(sft, "run_sft", lambda c: trained.append(c.seed))

    def fake_eval(config):
        (tmp_path / config.out).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / config.out).write_text(json.dumps({"greedy_correct": [1, 1]}))

    monkeypatch.setattr(evaluate, "run_eval", fake_eval)
    out = tmp_path / "seeds.json"
    sft_seeds.main(["--run", str(run), "--seeds", "0", "1", "--out", str(out)])
    assert trained == [1]  # seed 0 is the demo's own SFT
    result = json.loads(out.read_text())
    assert [result["by_seed"][s]["test"]["accuracy"] for s in ("0", "1")] == [0.5, 1.0]
    assert result["by_seed"]["0"]["test"]["with_distractor"] == 0.0
    assert result["test_mean"] == 0.75 and result["test_sd"] == pytest.approx(0.5 ** 0.5 / 2)
    sft_seeds.main(["--run", str(run), "--seeds", "0", "1", "--out", str(out)])
    assert trained == [1]  # resumed: nothing trained again
    with pytest.raises(SystemExit, match="sft_settings"):
        sft_seeds.main(["--run", str(run), "--seeds", "2", "--epochs", "3", "--out", str(out)])
