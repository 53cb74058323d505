"""experiments.tune: its data ablations, and the demo's own setting read rather than retrained."""
import json

import pytest

from experiments import tune
from oreo_fast.io import read_jsonl, write_jsonl


def _records():
    return [{"problem_id": p, "response": f"{p}-{i}", "reward": int(i % 3 == 0), "prompt": "q"}
            for p in ("a", "b") for i in range(5)]


def test_ablations_filter_the_trajectories(tmp_path):
    source = tmp_path / "t.jsonl"
    write_jsonl(source, _records())
    assert tune.ablated_data(source, [], tmp_path / "x.jsonl") == source  # no copy
    kept = [r for _, r in read_jsonl(tune.ablated_data(source, ["@positives"], tmp_path / "p"))]
    assert [r["response"] for r in kept] == ["a-0", "a-3", "b-0", "b-3"]
    kept = [r for _, r in read_jsonl(tune.ablated_data(source, ["@k=2"], tmp_path / "k"))]
    assert [r["response"] for r in kept] == ["a-0", "a-1", "b-0", "b-1"]
    kept = [r for _, r in read_jsonl(tune.ablated_data(source, ["@k=4", "@positives"],
                                                       tmp_path / "kp"))]
    assert [r["response"] for r in kept] == ["a-0", "a-3", "b-0", "b-3"]
    with pytest.raises(ValueError, match="unknown ablation"):
        tune.ablated_data(source, ["@negatives"], tmp_path / "n")


def test_the_demo_setting_is_read_from_the_demo_run(tmp_path, monkeypatch):
    run = tmp_path / "run"
    (run / "seed-1").mkdir(parents=True)
    (run / "eval_oreo_val.json").write_text(json.dumps({"greedy_accuracy": 0.25}))
    (run / "seed-1" / "eval_oreo_val.json").write_text(json.dumps({"greedy_accuracy": 0.75}))
    monkeypatch.setattr(tune, "launch_training", lambda *a, **k: pytest.fail("retrained"))
    out = tmp_path / "sweep.json"
    tune.main(["--run", str(run), "--algorithm", "oreo", "--config", "demo", "--seeds", "0",
               "1", "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["configs"]["demo"]["mean_val_accuracy"] == 0.5
    assert result["best"] == "demo" and "torch" in result and result["split"] == "validation"


def test_the_oracle_value_runs_through_its_own_entry_on_the_whole_data(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    write_jsonl(run / "trajectories.jsonl", _records())
    launched = []

    def fake_launch(args, nproc, log, threads, module):
        launched.append((args, module))
        raise RuntimeError("stop after the launch")

    monkeypatch.setattr(tune, "launch_training", fake_launch)
    with pytest.raises(RuntimeError, match="stop after"):
        tune.train_and_score(run, "oreo", "oracle", [tune.ORACLE_VALUE, "level=step"], 0, 2, 1,
                             tmp_path / "work")
    (args, module), = launched
    assert module == "experiments.oracle_value"
    assert args[0] == f"gold={run / 'default' / 'train.jsonl'}"  # the oracle's own argument
    assert f"train_file={run / 'trajectories.jsonl'}" in args  # the data are not filtered
    assert args[-1] == "level=step"
    assert tune.ablated_data(run / "trajectories.jsonl", [tune.ORACLE_VALUE],
                             tmp_path / "x.jsonl") == run / "trajectories.jsonl"
    with pytest.raises(ValueError, match="only OREO"):
        tune.train_and_score(run, "rft", "oracle", [tune.ORACLE_VALUE], 0, 1, 1, tmp_path / "w")
