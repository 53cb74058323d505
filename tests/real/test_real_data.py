"""Problems and trajectories from the ``datasets`` formats (parquet, arrow, save_to_disk
folders) read as the same problems as the equivalent JSONL; column mapping; errors."""
import json

import pytest

from oreo_fast.errors import DataError
from oreo_fast.io import write_jsonl
from oreo_fast.pipeline.trajectories import read_trajectory_records
from oreo_fast.tasks.problems import load_problems

datasets = pytest.importorskip("datasets")  # the [datasets] extra

GSM8K = [{"question": f"Tom has {i} apples and buys 2 more. How many?",
          "answer": f"{i} + 2 = {i + 2}\n#### {i + 2}"} for i in range(5)]
MATH = [{"problem": f"Compute ${i}^2$.", "solution": f"${i}^2 = {i * i}$, so \\boxed{{{i * i}}}.",
         "answer": str(i * i), "unique_id": f"test/algebra/{i}.json"} for i in range(4)]


@pytest.mark.parametrize("rows", [GSM8K, MATH], ids=["gsm8k", "math"])
def test_datasets_formats_give_the_problems_of_the_jsonl(tmp_path, rows):
    jsonl = tmp_path / "p.jsonl"
    write_jsonl(jsonl, rows)
    want = load_problems(jsonl)
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "p.parquet"))
    ds.save_to_disk(str(tmp_path / "folder"))
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "splits"))
    arrow = next((tmp_path / "folder").glob("*.arrow"))  # save_to_disk's IPC stream file
    assert load_problems(tmp_path / "p.parquet") == want
    assert load_problems(arrow) == want
    assert load_problems(tmp_path / "folder") == want
    assert load_problems(tmp_path / "splits", split="train") == want
    assert load_problems(tmp_path / "splits", split="test") == want[:2]
    with pytest.raises(DataError, match=r"splits: split 'validation' not found; it has"):
        load_problems(tmp_path / "splits", split="validation")


def test_column_mapping(tmp_path):
    rows = [{"prompt": r["question"], "completion": r["answer"]} for r in GSM8K]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "g.parquet"))
    got = load_problems(tmp_path / "g.parquet", columns="question=prompt,solution=completion")
    want = load_problems_from(tmp_path, GSM8K)
    assert [(p.question, p.solution, p.answer, p.kind) for p in got] == \
        [(p.question, p.solution, p.answer, p.kind) for p in want]
    rows = [{"q": r["problem"], "s": r["solution"], "final": int(r["answer"])} for r in MATH]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "m.parquet"))
    got = load_problems(tmp_path / "m.parquet", columns="question=q,solution=s,answer=final")
    assert [(p.answer, p.kind) for p in got] == [(r["answer"], "math") for r in MATH]
    with pytest.raises(DataError, match=r"m\.parquet:1: field 'text': missing"):
        load_problems(tmp_path / "m.parquet", columns="question=text,solution=s")
    with pytest.raises(DataError, match="columns: expected role=column"):
        load_problems(tmp_path / "m.parquet", columns="prompt=q")


def load_problems_from(tmp_path, rows):
    path = tmp_path / "ref.jsonl"
    write_jsonl(path, rows)
    return load_problems(path)


def test_parquet_trajectories_and_missing_sources(tmp_path, monkeypatch):
    records = [{"prompt": "Q\n", "response": "A", "reward": i % 2, "problem_id": i}
               for i in range(3)]
    write_jsonl(tmp_path / "t.jsonl", records)
    datasets.Dataset.from_list(records).to_parquet(str(tmp_path / "t.parquet"))
    assert read_trajectory_records(tmp_path / "t.parquet") == \
        read_trajectory_records(tmp_path / "t.jsonl")
    with pytest.raises(DataError, match=r"nothing\.parquet: no such file"):
        load_problems(tmp_path / "nothing.parquet")
    (tmp_path / "bad.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: not a readable parquet file"):
        load_problems(tmp_path / "bad.parquet")
    # a hub name that is not in the local cache: one line naming the fix, and offline (the
    # libraries' offline mode answered, no request was tried)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(DataError, match=r"not a dataset in the local datasets cache \(.*"
                                        r"OfflineMode.*load_dataset\('acme/none'\) once online"):
        load_problems("acme/none")


def test_missing_datasets_package_names_the_fix(tmp_path, monkeypatch):
    import sys

    ds = datasets.Dataset.from_list(GSM8K)
    ds.save_to_disk(str(tmp_path / "folder"))
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if not installed
    with pytest.raises(DataError, match=r"needs the datasets package: pip install "
                                        r"'oreo_fast\[datasets\]'"):
        load_problems(tmp_path / "folder")


def test_mixed_parquet_trajectories_train_like_the_jsonl(tmp_path):
    """Single- and multi-turn records in one parquet file: the null cells of the other shape
    are absent, as in JSONL."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from oreo_fast.tokenizer import build_tokenizer
    from oreo_fast.train.data import read_training_examples

    tok = build_tokenizer(["Question: a\nAnswer:\n1 + 2 = 3\n#### 3"])
    turns = [{"role": "assistant", "content": "1 + 2"}, {"role": "user", "content": "and?"},
             {"role": "assistant", "content": "= 3"}]
    records = [{"prompt": "Q\n", "response": "1 + 2 = 3", "reward": 1},
               {"prompt": "Q\n", "turns": turns, "reward": 0}]
    write_jsonl(tmp_path / "t.jsonl", records)
    pq.write_table(pa.table({"prompt": ["Q\n", "Q\n"], "response": ["1 + 2 = 3", None],
                             "turns": [None, turns], "reward": [1, 0]}), tmp_path / "t.parquet")
    want, _ = read_training_examples(tmp_path / "t.jsonl", tok, 64)
    got, _ = read_training_examples(tmp_path / "t.parquet", tok, 64)
    assert [(e.ids, e.is_action, e.starts_step, e.reward) for e in got] == \
        [(e.ids, e.is_action, e.starts_step, e.reward) for e in want]
