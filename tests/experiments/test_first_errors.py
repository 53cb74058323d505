"""experiments.first_errors: wrong answers filed by their first wrong line, on hand-made cases."""
import json

import pytest

from experiments.first_errors import first_errors, main

Q = "Start with 10. Subtract 9. Tom has 5 pens. Add 8. What is the result?"
GOLD = "Subtract 9: 10 - 9 = 1\nAdd 8: 1 + 8 = 9\n#### 9"
PLAIN_Q = "Start with 4. Multiply by 3. Add 2. What is the result?"
PLAIN_GOLD = "Multiply by 3: 4 * 3 = 12\nAdd 2: 12 + 2 = 14\n#### 14"
PROBLEMS = {"d": {"id": "d", "question": Q, "answer": GOLD},
            "p": {"id": "p", "question": PLAIN_Q, "answer": PLAIN_GOLD}}


def _prediction(problem, response, correct=False):
    return {"problem_id": problem, "response": response, "correct": correct}


PREDICTIONS = [
    _prediction("d", GOLD, correct=True),
    # the demonstrator's habit: the distractor's number, right after its sentence
    _prediction("d", "Subtract 9: 10 - 9 = 1\nTom has 5 pens: 1 + 5 = 6\n#### 6"),
    # the misread avoided, but a number no sentence states in its place
    _prediction("d", "Subtract 9: 10 - 9 = 1\nAdd 3: 1 + 3 = 4\n#### 4"),
    # an arithmetic slip before the distractor
    _prediction("d", "Subtract 9: 10 - 9 = 2\nAdd 8: 2 + 8 = 10\n#### 10"),
    _prediction("p", "Multiply by 3: 4 * 3 = 13\nAdd 2: 13 + 2 = 15\n#### 15"),
    # the right operation on the right running value, with another number
    _prediction("p", "Multiply by 2: 4 * 2 = 8\nAdd 2: 8 + 2 = 10\n#### 10"),
]


def test_each_wrong_answer_is_filed_once_by_its_first_wrong_line():
    result = first_errors(PROBLEMS, PREDICTIONS)
    assert result["problems"] == 6 and result["wrong"] == 5
    assert result["accuracy"] == pytest.approx(1 / 6)
    assert result["first_wrong_line"] == {"misread/at_distractor": 1,
                                          "wrong_operand/at_distractor": 1,
                                          "other/elsewhere": 1,
                                          "other/without_distractor": 1,
                                          "wrong_operand/without_distractor": 1}
    # sampled trajectories say it with their reward
    samples = [{"problem_id": p["problem_id"], "response": p["response"],
                "reward": int(p["correct"])} for p in PREDICTIONS]
    assert first_errors(PROBLEMS, samples) == result


def test_main_writes_each_model(tmp_path, capsys):
    problems, preds = tmp_path / "val.jsonl", tmp_path / "p.jsonl"
    problems.write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS.values()))
    preds.write_text("".join(json.dumps(p) + "\n" for p in PREDICTIONS))
    out = tmp_path / "e.json"
    assert main(["--problems", str(problems), "--predictions", f"oreo={preds}",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["models"]["oreo"]["wrong"] == 5 and "oreo: 5 wrong of 6" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--problems", str(problems), "--predictions", str(preds)])
