"""OREO trained against an oracle value: the upper bound of what a working value gives.

The oracle is the prefix label of every state: V(s) = 1 while the tokens so far are a prefix
of the problem's gold trajectory (its prompt, the gold solution, EOS), and 0 from the first
token that leaves it. With OREO's small β this is close to the optimal soft value that the value
model is meant to learn, V*(s) = β·log E_ref[exp(R/β) | s]: that is 0 where no continuation
can reach the answer (on this task a line that leaves the gold solution makes the answer
wrong), and 1 + β·log p where the reference still reaches it with probability p (0.95 at
p = 0.2 and β = 0.03). Against it, OREO's fixed point blames the first token that leaves
the gold solution alone: β·Σ_{i≥t} lr_i = R − V(s_t) is −1 there and 0 everywhere else.

It runs as the trainer itself, the gold file first; everything after it is the trainer's:

    torchrun --nproc_per_node 2 -m experiments.oracle_value gold=RUN/default/train.jsonl \\
        policy=RUN/sft train_file=RUN/trajectories.jsonl output_dir=OUT level=token ...

The value model is still built, trained and exported, so the trainer runs unchanged, but its
output is replaced by the oracle's (its gradient is zero). ``experiments.tune`` runs it for
a configuration holding ``@oracle-value``.
"""
from __future__ import annotations

import sys

import torch

from oreo_fast.io import read_jsonl
from oreo_fast.train.data import Layout, read_training_examples, tokenize_trajectory
from oreo_fast.train.parallelize import Values


def prefix_values(ids: list[int], gold: list[int]) -> list[float]:
    """The oracle's V for each state of ``ids``: entry j is the state of ``ids[:j + 1]``,
    which the value model reads at position j (so j < len(ids) - 1); 1.0 while that is a
    prefix of ``gold``, 0.0 from the first token that differs on."""
    values, on_track = [], True
    for j in range(len(ids) - 1):
        on_track = on_track and j < len(gold) and ids[j] == gold[j]
        values.append(float(on_track))
    return values


def oracle_table(cfg, tokenizer, gold_file) -> dict[tuple[int, ...], list[float]]:
    """The oracle's values of every trajectory the trainer reads from ``cfg.train_file``
    (tokenised as the trainer does), keyed by its token ids. A trajectory's gold is that of
    its ``problem_id`` in ``gold_file`` (``id``, ``answer``: the gold solution)."""
    gold = {r["id"]: r["answer"] for _, r in read_jsonl(gold_file)}
    layout = Layout.of(tokenizer, cfg.prompt_format)
    delimiters = cfg.step_delimiters or ["\n"]
    gold_by_prompt, seen = {}, set()  # the prompt's token ids -> the gold trajectory's ids
    for lineno, record in read_jsonl(cfg.train_file):
        if record["problem_id"] not in gold:
            raise ValueError(f"{cfg.train_file}:{lineno}: problem_id "
                             f"{record['problem_id']!r} has no gold solution in {gold_file}")
        if (record["prompt"], record["problem_id"]) in seen:  # a problem's other samples
            continue
        seen.add((record["prompt"], record["problem_id"]))
        example = tokenize_trajectory(tokenizer, record["prompt"],
                                      [("assistant", gold[record["problem_id"]])], 1.0,
                                      10 ** 9, delimiters, layout=layout)
        start = example.is_action.index(True)
        gold_by_prompt[tuple(example.ids[:start])] = example.ids
    examples, _ = read_training_examples(cfg.train_file, tokenizer, cfg.max_length,
                                         cfg.step_delimiters, cfg.strict, cfg.prompt_format,
                                         cfg.keep_truncated)
    table = {}
    for e in examples:
        start = e.is_action.index(True)
        table[tuple(e.ids)] = prefix_values(e.ids, gold_by_prompt[tuple(e.ids[:start])])
    return table


class OracleValues(Values):
    """``Values`` whose output is the oracle's (times one plus the model's times zero, so
    that FSDP's backward hooks and the trainer's value optimizer run as usual)."""

    table: dict[tuple[int, ...], list[float]] = {}

    def forward(self, input_ids, attention_mask, position_ids):
        values = super().forward(input_ids, attention_mask, position_ids)
        oracle = torch.zeros_like(values)
        for b, n in enumerate(attention_mask.sum(1).tolist()):
            if n == 0:  # an empty row (a rank's padding)
                continue
            key = tuple(input_ids[b, :n].tolist())
            if key not in self.table:
                raise KeyError(f"row {b}: a trajectory the oracle table does not hold")
            oracle[b, :n - 1] = torch.tensor(self.table[key], dtype=values.dtype)
        return values * 0 + oracle


def main(argv: list[str] | None = None) -> int:
    from oreo_fast.tokenizer import load_tokenizer
    from oreo_fast.train import step, trainer
    from oreo_fast.train.config import load_train_config

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or not argv[0].startswith("gold="):
        raise SystemExit("usage: python -m experiments.oracle_value gold=FILE key=value ...")
    gold_file, overrides = argv[0].removeprefix("gold="), argv[1:]
    cfg = load_train_config(None, overrides)
    if cfg.algorithm != "oreo":
        raise SystemExit("an oracle value needs algorithm=oreo")
    tokenizer = load_tokenizer(cfg.policy, trust_remote_code=cfg.trust_remote_code)
    OracleValues.table = oracle_table(cfg, tokenizer, gold_file)
    # what OreoStep wraps its value model in; restored after, for a caller that trains again
    # in the same process (a test)
    learned, step.Values = step.Values, OracleValues
    try:
        return trainer.main(overrides)
    finally:
        step.Values, OracleValues.table = learned, {}


if __name__ == "__main__":
    sys.exit(main())
