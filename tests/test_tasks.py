"""The synthetic task (determinism, splits) and the GSM8K / MATH verifiers on hand-written cases."""
import json
import re

import pytest

from oreo_fast.errors import DataError
from oreo_fast.tasks import (ArithmeticConfig, Problem, extract_gsm8k_answer, format_prompt,
                             generate_splits, last_boxed, load_problems, verify)
from oreo_fast.tasks.arithmetic import DISTRACTORS, OP_SENTENCES, solve


def test_task_is_deterministic_and_seeded():
    cfg = ArithmeticConfig(n_train=200, n_test=50, seed=3)
    assert generate_splits(cfg) == generate_splits(ArithmeticConfig(n_train=200, n_test=50, seed=3))
    assert generate_splits(cfg) != generate_splits(ArithmeticConfig(n_train=200, n_test=50, seed=4))


def test_splits_are_disjoint_and_test_split_is_stable():
    train, test = generate_splits(ArithmeticConfig(n_train=500, n_test=100))
    assert len(train) == 500 and len(test) == 100
    questions = [p["question"] for p in train + test]
    assert len(set(questions)) == len(questions)
    _, test_again = generate_splits(ArithmeticConfig(n_train=800, n_test=100))
    assert test_again == test  # more training problems never move test ones


@pytest.mark.parametrize("knobs", [dict(min_steps=2, max_steps=6), dict(min_steps=3, max_steps=3),
                                   dict(max_value=99, add_max=20, mul_max=5, ops=("+", "*"))])
def test_gold_solutions_are_correct_and_respect_knobs(knobs):
    cfg = ArithmeticConfig(n_train=300, n_test=0, seed=1, **knobs)
    train, _ = generate_splits(cfg)
    for p in train:
        lines = p["answer"].split("\n")
        steps = lines[:-1]
        assert cfg.min_steps <= len(steps) <= cfg.max_steps
        value = None
        for line in steps:  # every step line is true arithmetic and chains on the last result
            cited, a, op, b, c = _parse(line)
            assert op in cfg.ops and cited == OP_SENTENCES[op].format(b).removesuffix(".")
            assert cited + "." in p["question"]  # the sentence it uses
            assert value is None or a == value
            assert c == {"+": a + b, "-": a - b, "*": a * b, "/": a // b}[op]
            assert op != "/" or a % b == 0
            assert 0 <= c <= cfg.max_value
            value = c
        assert lines[-1] == f"#### {value}"
        assert solve(p["question"]) == value


def _parse(line: str) -> tuple[str, int, str, int, int]:
    """``Add 7: 12 + 7 = 19`` -> ("Add 7", 12, "+", 7, 19)."""
    cited, colon, arithmetic = line.partition(": ")
    a, op, b, eq, c = arithmetic.split(" ")
    assert colon and eq == "="
    return cited, int(a), op, int(b), int(c)


def _distractor(question: str) -> tuple[int, int] | None:
    """(index of the operation the distractor precedes, its number), or None."""
    sentences = [x.strip() for x in question.split(".") if x.strip()][1:]
    for k, sentence in enumerate(sentences):
        if sentence.startswith(tuple(d.split("{}")[0] for d in DISTRACTORS)):
            return k, int(re.search(r"\d+", sentence)[0])
    return None


def test_distractors_and_the_demonstrators_misreads():
    cfg = ArithmeticConfig(n_train=400, n_test=0, seed=2, distractor_rate=1.0, misread_rate=1.0)
    train, _ = generate_splits(cfg)
    with_distractor = 0
    for p in train:
        gold, shown = p["answer"].split("\n"), p["demonstration"].split("\n")
        found = _distractor(p["question"])
        if found is None:  # no number could be misread into a valid chain: no distractor
            assert shown == gold
            continue
        with_distractor += 1
        k, n = found
        assert shown[:k] == gold[:k]  # the same lines up to the misread one
        _, a, op, b, _ = _parse(gold[k])
        cited, a2, op2, b2, value = _parse(shown[k])
        assert (a2, op2) == (a, op) and b2 == n != b  # the distractor as operand
        # and its line cites the fact it misread, the sentence before the operation's
        fact = [x.strip() for x in p["question"].split(".")][k + 1]
        assert cited == fact and cited.startswith(tuple(d.split("{}")[0] for d in DISTRACTORS))
        # then the demonstrator goes on right from its own wrong value
        for g, line in zip(gold[k + 1:-1], shown[k + 1:-1]):
            cited, x, op, y, z = _parse(line)
            assert x == value and (cited, op, y) == _parse(g)[:1] + _parse(g)[2:4]
            assert z == {"+": value + y, "-": value - y, "*": value * y, "/": value // y}[op]
            value = z
        assert shown[-1] == f"#### {value}" and solve(p["question"]) == int(gold[-1][5:])
    assert with_distractor > 300


def test_distractor_and_misread_rates():
    train, _ = generate_splits(ArithmeticConfig(n_train=2000, n_test=0, seed=5,
                                                distractor_rate=0.5, misread_rate=0.7))
    distracted = [p for p in train if _distractor(p["question"])]
    misread = [p for p in distracted if p["demonstration"] != p["answer"]]
    assert 0.42 < len(distracted) / len(train) < 0.52
    assert 0.65 < len(misread) / len(distracted) < 0.75
    assert all(p["demonstration"] == p["answer"] for p in train if not _distractor(p["question"]))
    clean, _ = generate_splits(ArithmeticConfig(n_train=300, n_test=0, distractor_rate=0.0))
    assert not any(_distractor(p["question"]) or p["demonstration"] != p["answer"] for p in clean)
    careful, _ = generate_splits(ArithmeticConfig(n_train=300, n_test=0, misread_rate=0.0))
    assert any(_distractor(p["question"]) for p in careful)
    assert all(p["demonstration"] == p["answer"] for p in careful)


def test_knobs_are_validated():
    with pytest.raises(ValueError):
        ArithmeticConfig(min_steps=4, max_steps=2)
    with pytest.raises(ValueError):
        ArithmeticConfig(ops=("^",))
    for rate in ("distractor_rate", "misread_rate"):
        with pytest.raises(ValueError, match=rate):
            ArithmeticConfig(**{rate: 1.5})
    with pytest.raises(ValueError, match="distinct"):  # asks for more problems than exist
        generate_splits(ArithmeticConfig(n_train=500, n_test=0, min_steps=1, max_steps=1,
                                         start_min=2, start_max=3, add_max=2, mul_max=2))


def gsm(answer):
    return Problem("p", "q", f"... #### {answer}", extract_gsm8k_answer(f"#### {answer}"), "gsm8k")


@pytest.mark.parametrize("gold,response,expected", [
    ("1000", "so it is\n#### 1,000", 1),
    ("1,000", "#### 1000", 1),
    ("1000", "#### 100", 0),
    ("-5", "#### -5", 1),
    ("-5", "#### 5", 0),
    ("3.5", "#### 3.50", 1),
    ("3.5", "#### 3.05", 0),
    ("1234", "The total is\n#### $1,234.00", 1),
    ("7", "#### 5\nwait, no\n#### 7", 1),  # the last #### counts
    ("5", "#### 5\nwait, no\n#### 7", 0),
    ("18", "The answer is \\boxed{18}.", 1),  # boxed fallback
    ("0", "#### -0", 1),
    ("12", "12 + 0 = 12 and no final answer", 0),  # no answer at all
    ("12", "", 0),
    ("12", "####", 0),
])
def test_gsm8k_verifier(gold, response, expected):
    assert verify(gsm(gold), response) == expected


def test_gsm8k_extraction_cases():
    assert extract_gsm8k_answer("no answer here") is None
    assert extract_gsm8k_answer("#### 1,000,000") == "1000000"
    assert extract_gsm8k_answer("#### \u22123") == "-3"


def math_problem(answer):
    return Problem("m", "q", f"\\boxed{{{answer}}}", answer, "math")


@pytest.mark.parametrize("gold,response,expected", [
    ("\\frac12", "so $\\boxed{0.5}$", 1),
    ("0.5", "$\\boxed{\\frac{1}{2}}$", 1),
    ("\\frac{\\sqrt{2}}{2}", "We get \\boxed{\\frac{1}{\\sqrt{2}}}.", 1),  # nested braces
    ("\\frac{1}{3}", "\\boxed{\\frac{1}{2}}", 0),
    ("x^2+1", "\\boxed{1 + x^{2}}", 1),
    ("3", "first \\boxed{2}, then finally \\boxed{3}", 1),  # the last box counts
    ("2", "first \\boxed{2}, then finally \\boxed{3}", 0),
    ("3", "the answer is 3", 0),  # no box: no answer
    ("3", "\\boxed{3", 0),  # never closed
])
def test_math_verifier(gold, response, expected):
    assert verify(math_problem(gold), response) == expected


def test_last_boxed_nested_braces():
    assert last_boxed("a \\boxed{\\frac{a}{\\sqrt{b^{2}}}} b") == "\\frac{a}{\\sqrt{b^{2}}}"
    assert last_boxed("\\boxed 5$") == "5"
    assert last_boxed("\\fbox{x}") == "x"
    assert last_boxed("nothing") is None
    assert last_boxed("\\boxed{1} and \\boxed{{2}") == "1"  # unbalanced last box: earlier one


def test_load_problems_reads_both_dataset_shapes(tmp_path):
    path = tmp_path / "mixed.jsonl"
    rows = [{"question": "How many?", "answer": "2 + 2 = 4\n#### 4", "id": 7},
            {"problem": "Half of one?", "solution": "It is $\\boxed{\\frac{1}{2}}$."},
            {"problem": "p", "solution": "s", "answer": "5", "unique_id": "test/x.json"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    problems = load_problems(path)
    assert [(p.id, p.kind, p.answer) for p in problems] == [
        (7, "gsm8k", "4"), (2, "math", "\\frac{1}{2}"), ("test/x.json", "math", "5")]
    assert problems[0].prompt == format_prompt("How many?")
    assert re.search(r"How many\?", problems[0].prompt)


@pytest.mark.parametrize("line,field", [
    ('{"question": "q"}', "answer"),
    ('{"question": "q", "answer": "no final answer"}', "answer"),
    ('{"question": "", "answer": "#### 1"}', "question"),
    ('{"question": 3, "answer": "#### 1"}', "question"),
    ('{"problem": "p", "solution": "no box"}', "solution"),
    ('{"text": "neither shape"}', "question"),
])
def test_bad_problem_records_name_file_line_and_field(tmp_path, line, field):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "q", "answer": "#### 1"}\n' + line + "\n")
    with pytest.raises(DataError) as err:
        load_problems(path)
    assert err.value.line == 2 and err.value.field == field and err.value.path == str(path)
    assert f"{path}:2" in str(err.value)


def test_duplicate_ids_are_rejected(tmp_path):
    path = tmp_path / "dup.jsonl"
    row = json.dumps({"question": "q", "answer": "#### 1", "id": "a"})
    path.write_text(row + "\n" + row + "\n")
    with pytest.raises(DataError, match="duplicate"):
        load_problems(path)


def test_write_task_puts_the_demonstrations_in_sft_jsonl_only(tmp_path):
    from oreo_fast.pipeline.embedded import write_task

    paths = write_task(tmp_path, ArithmeticConfig(n_train=200, n_test=5, seed=4))
    gold = [json.loads(line) for line in paths["train"].read_text().splitlines()]
    sft = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    train, _ = generate_splits(ArithmeticConfig(n_train=200, n_test=5, seed=4))
    assert [r["answer"] for r in gold] == [r["answer"] for r in train]  # rewards: gold
    assert [r["answer"] for r in sft] == [r["demonstration"] for r in train]  # SFT: demonstrator
    assert [r["question"] for r in sft] == [r["question"] for r in gold]
    assert all(set(r) == {"id", "question", "answer"} for r in gold + sft)
    assert any(s["answer"] != g["answer"] for s, g in zip(sft, gold))
