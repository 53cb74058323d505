"""Value probe: can this value model learn to rank one beam's candidate steps at all?

Beam search needs a value model that prefers a right candidate step to a wrong sibling. This
probe separates "OREO's 0/1 outcome signal is too weak" from "the network cannot learn to
check a step": it trains the value architecture (``ValueModel``, from any causal-LM
checkpoint) by mean squared error at the step-level states that OREO trains, against one of
these per-state labels, then measures on held-out problems how often a state with the higher
label gets the higher value (and the same against ``prefix_correct``, whatever was trained):

- ``outcome``: the trajectory's 0/1 reward (what OREO's value regresses to, beta = 0);
- ``prefix_correct``: every line so far equals the gold solution's (an oracle label that no
  outcome-trained model gets; the best a value for search could learn);
- ``line_arithmetic``: the last line's own arithmetic ``a op b = c`` is right (a purely local
  check, whatever its operands);
- ``result_parity``: the last line ends in an even digit (a control: a surface feature of the
  same states; a probe that cannot learn this is broken).

Pairs are compared within one problem and one step index (states of sibling-like
trajectories), so a value that only knows how hard a problem is scores 0.5.

    python -m experiments.value_probe --run runs/demo --label prefix_correct --epochs 2 \
        --out benchmarks/results/value_probe.json

``--run`` is a ``make demo`` folder (``default/train.jsonl`` with the gold solutions,
``trajectories.jsonl``, ``sft/``); ``--init`` another checkpoint to start the value from.

A value model for OREO learned from the prefix label: ``--label prefix_correct --start-state
--save DIR`` regresses it at every state OREO's step level reads (the prompt's end included),
and ``oreo-fast train value=DIR level=step`` then starts OREO's value from it (a very small
``value_lr`` keeps it fixed). It is only as good as its fit (``train_fit``, and the held-out
``history``); ``experiments.oracle_value`` gives OREO the exact label instead.
"""
from __future__ import annotations

import argparse
import json
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

LABELS = ("outcome", "prefix_correct", "line_arithmetic", "result_parity")
# a solution line, after the sentence it cites ("Add 7: 12 + 7 = 19"; older files: no citation)
SOLUTION_LINE = re.compile(r"(?:[^:\n]*: )?(\d+) ([-+*/]) (\d+) = (\d+)$")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b,
          "/": lambda a, b: a // b if a % b == 0 else None}


def step_labels(response: str, gold: str, reward: float, label: str) -> list[float]:
    """One label per completed line of ``response`` (the states after line 1, 2, ...)."""
    if label not in LABELS:
        raise ValueError(f"label must be one of {LABELS}, got {label!r}")
    lines, gold_lines = response.split("\n"), gold.strip().split("\n")
    labels = []
    for k in range(1, len(lines)):  # the last line has no state after it but the end
        line = lines[k - 1]
        if label == "outcome":
            labels.append(float(reward))
        elif label == "prefix_correct":
            labels.append(float(lines[:k] == gold_lines[:k]))
        elif label == "line_arithmetic":
            m = SOLUTION_LINE.match(line)
            right = m is not None and _APPLY[m[2]](int(m[1]), int(m[3])) == int(m[4])
            labels.append(float(right))
        else:
            labels.append(float(line[-1:].isdigit() and int(line[-1]) % 2 == 0))
    return labels


def sibling_preference(states: list[tuple[object, float, float]]) -> tuple[float, int]:
    """``states``: (group, label, value). Over pairs in one group with different labels, the
    share where the higher label has the higher value (ties count half); and the pair count."""
    groups: dict[object, list[tuple[float, float]]] = {}
    for group, label, value in states:
        groups.setdefault(group, []).append((label, value))
    score, pairs = 0.0, 0
    for members in groups.values():
        for label_a, value_a in members:
            for label_b, value_b in members:
                if label_a > label_b:
                    pairs += 1
                    score += 1.0 if value_a > value_b else 0.5 if value_a == value_b else 0.0
    return (score / pairs if pairs else float("nan")), pairs


def start_label(label: str, reward: float) -> float:
    """The label of the state before the first line (the prompt alone), which OREO's step
    level also trains: the empty prefix is right, and its outcome is the trajectory's."""
    if label == "prefix_correct":
        return 1.0
    if label == "outcome":
        return float(reward)
    raise ValueError(f"the start state has no {label!r} label (only prefix_correct, outcome)")


@dataclass
class ProbeExample:
    ids: list[int]
    positions: list[int]  # where V of each state is read: the token before a step's first
    labels: list[float]  # the trained label
    prefix_correct: list[float]  # what a search needs, whatever the trained label
    group: int  # the problem's index in order of first appearance
    compared_from: int = 0  # 1 when positions[0] is the start state (trained, not compared)


def load_examples(run: Path, tokenizer, label: str, start_state: bool = False
                  ) -> list[ProbeExample]:
    """The states after each line of every trajectory in ``run``; ``start_state`` adds the
    state before the first line (trained, never compared: its siblings share its prefix)."""
    from oreo_fast.train.data import read_training_examples
    from oreo_fast.io import read_jsonl

    gold = {r["id"]: r["answer"] for _, r in read_jsonl(run / "default" / "train.jsonl")}
    path = run / "trajectories.jsonl"
    records = [r for _, r in read_jsonl(path)]
    tokenized, dropped = read_training_examples(path, tokenizer, max_length=256)
    if dropped.too_long or dropped.truncated:
        raise ValueError(f"{path}: {dropped} trajectories too long or truncated for the probe")
    examples, group_of, skipped = [], {}, 0
    for record, ex in zip(records, tokenized):
        labels, checks = (step_labels(record["response"], gold[record["problem_id"]],
                                      record["reward"], name) for name in (label, "prefix_correct"))
        starts = [i for i, s in enumerate(ex.starts_step) if s]
        if len(starts) != len(labels) + 1:  # e.g. an empty line: no state of its own; skip it
            skipped += 1
            continue
        if not start_state:  # the states after line k >= 1 only
            starts = starts[1:]
        else:
            labels = [start_label(label, record["reward"]), *labels]
            checks = [1.0, *checks]
        group = group_of.setdefault(record["problem_id"], len(group_of))
        examples.append(ProbeExample(ex.ids, [s - 1 for s in starts], labels, checks, group,
                                     compared_from=int(start_state)))
    if skipped:
        print(f"{path}: skipped {skipped} trajectories whose lines and states disagree")
    return examples


def _pad(batch: list[ProbeExample]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(e.ids) for e in batch)
    ids = torch.zeros(len(batch), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(batch):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        mask[i, :len(e.ids)] = 1
    return ids, mask


@torch.no_grad()
def evaluate(model, held_out: list[ProbeExample], batch_size: int = 128) -> dict:
    model.eval()
    trained, checked = [], []
    for s in range(0, len(held_out), batch_size):
        batch = held_out[s:s + batch_size]
        values = model(*_pad(batch)).values
        for i, e in enumerate(batch):
            for k, pos in enumerate(e.positions[e.compared_from:], e.compared_from):
                value = float(values[i, pos])
                trained.append(((e.group, k), e.labels[k], value))
                checked.append(((e.group, k), e.prefix_correct[k], value))
    model.train()
    (preference, pairs), (preference_check, pairs_check) = map(sibling_preference,
                                                                (trained, checked))
    mse = sum((label - value) ** 2 for _, label, value in trained) / max(len(trained), 1)
    return {"sibling_preference": preference, "pairs": pairs, "mse": mse,
            "sibling_preference_prefix_correct": preference_check,
            "pairs_prefix_correct": pairs_check}


def run_probe(run: Path, label: str, init: Path | None, epochs: int, lr: float,
              batch_size: int = 64, seed: int = 0, save: Path | None = None,
              start_state: bool = False) -> dict:
    from benchmarks.report import environment
    from oreo_fast.models import ValueModel
    from oreo_fast.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    init = init or run / "sft"
    tokenizer = load_tokenizer(run / "sft")
    examples = load_examples(run, tokenizer, label, start_state)
    train = [e for e in examples if e.group % 10 != 0]  # every 10th problem held out
    held_out = [e for e in examples if e.group % 10 == 0]
    model = ValueModel.from_pretrained(init)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    history, t0 = [], time.time()
    for epoch in range(epochs):
        random.Random(seed + epoch).shuffle(train)
        for s in range(0, len(train) - batch_size + 1, batch_size):
            batch = train[s:s + batch_size]
            values = model(*_pad(batch)).values
            loss = torch.stack([((values[i, e.positions] - torch.tensor(e.labels)) ** 2).mean()
                                for i, e in enumerate(batch)]).mean()  # per sequence, then batch
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        history.append({"epoch": epoch + 1, **evaluate(model, held_out),
                        "seconds": round(time.time() - t0, 1)})
        print(json.dumps(history[-1]), flush=True)
    if save is not None:  # e.g. to search with it: oreo-fast eval --value SAVE
        model.save_pretrained(save, tokenizer)
    # how it fits the states it trained on (a tenth of the problems, as many as held out): a
    # value trained for OREO reads those
    fit = evaluate(model, [e for e in train if e.group % 10 == 1])
    return {"label": label, "start_state": start_state, "run": str(run), "init": str(init),
            "epochs": epochs, "lr": lr, "train_fit": fit,
            "batch_size": batch_size, "train_trajectories": len(train),
            "held_out_trajectories": len(held_out), "history": history,
            "environment": environment(torch.device("cpu")), "date": time.strftime("%Y-%m-%d")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--label", required=True, choices=LABELS)
    parser.add_argument("--init", type=Path, help="checkpoint to start from (default RUN/sft)")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results JSON")
    parser.add_argument("--save", type=Path, help="save the trained value model here")
    parser.add_argument("--start-state", action="store_true",
                        help="also train the state before the first line (OREO's step level"
                             " reads V there: needed for a value to train OREO with)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_probe(args.run, args.label, args.init, args.epochs, args.lr, save=args.save,
                       start_state=args.start_state)
    if args.out:
        from oreo_fast.io import write_json

        write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
