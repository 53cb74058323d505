"""Tuning sweeps and ablations of RFT and OREO on the validation split of a ``make demo`` run.

Every configuration trains from the run's SFT checkpoint on the trajectories of each chosen
seed (``RUN/trajectories.jsonl`` for seed 0, ``RUN/seed-s/trajectories.jsonl`` for seed s:
the demo's own samples) with that seed as the data-order seed, and is scored by greedy
accuracy on ``RUN/default/val.jsonl``; the test split is never read. Fair tuning gives RFT and
OREO the same number of configurations on the same seeds.

A configuration is a name and trainer overrides (``key=value``, on top of the demo's own
``RFT_OVERRIDES`` / ``OREO_OVERRIDES``; a configuration without any is the demo's setting,
whose runs the demo already made and evaluated on validation: they are read, not redone),
plus two data ablations:

- ``@positives``: train on the reward-1 trajectories only (OREO without its negatives);
- ``@k=N``: keep the first N samples of each problem (fewer samples per problem);

and one of the value: ``@oracle-value`` trains OREO against the prefix oracle of
``experiments.oracle_value`` (gold solutions from ``RUN/default/train.jsonl``) in place of
its value model.

    python -m experiments.tune --run runs/demo --algorithm oreo --seeds 0 1 \\
        --config lr3e-4 policy_lr=3e-4 value_lr=3e-4 --config kl0.3 kl_coef=0.3 \\
        --out benchmarks/results/tune_oreo.json

Each finished (configuration, seed) is written to ``--out`` at once, and one already there
is not trained again, so an interrupted sweep resumes.
"""
from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

from oreo_fast.io import read_jsonl, write_json, write_jsonl
from oreo_fast.pipeline.demo import (EMBEDDED_MAX_NEW_TOKENS, OREO_OVERRIDES, RFT_OVERRIDES,
                                     machine_facts, seed_dir)
from oreo_fast.pipeline.iterate import launch_training


ORACLE_VALUE = "@oracle-value"


def trajectories_of(run: Path, seed: int) -> Path:
    return seed_dir(run, seed) / "trajectories.jsonl"


def ablated_data(source: Path, ablations: list[str], out: Path) -> Path:
    """``source`` itself, or a filtered copy at ``out`` for the ``@`` data ablations."""
    data_ablations = [a for a in ablations if a != ORACLE_VALUE]  # the oracle keeps the data
    if not data_ablations:
        return source
    records = [r for _, r in read_jsonl(source)]
    for ablation in data_ablations:
        if ablation == "@positives":
            records = [r for r in records if r["reward"] == 1]
        elif ablation.startswith("@k="):
            k, seen = int(ablation[3:]), Counter()
            kept = []
            for r in records:  # a problem's samples in file order
                seen[r["problem_id"]] += 1
                if seen[r["problem_id"]] <= k:
                    kept.append(r)
            records = kept
        else:
            raise ValueError(f"unknown ablation {ablation!r} (@positives, @k=N, "
                             f"{ORACLE_VALUE})")
    write_jsonl(out, records)
    return out


def train_and_score(run: Path, algorithm: str, name: str, overrides: list[str], seed: int,
                    nproc: int, threads: int, work: Path) -> dict:
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval

    if not overrides:  # the demo's own setting: its run and validation report exist
        report = seed_dir(run, seed) / f"eval_{algorithm}_val.json"
        return {"val_accuracy": json.loads(report.read_text())["greedy_accuracy"],
                "from": str(report)}

    ablations = [o for o in overrides if o.startswith("@")]
    knobs = [o for o in overrides if not o.startswith("@")]
    out = work / f"{algorithm}-{name}-seed{seed}"
    data = ablated_data(trajectories_of(run, seed), ablations, out / "trajectories.jsonl")
    base = RFT_OVERRIDES if algorithm == "rft" else OREO_OVERRIDES
    args = [f"policy={run / 'sft'}", f"train_file={data}", f"seed={seed}", "device=cpu",
            f"output_dir={out / 'train'}", f"algorithm={algorithm}", *base, *knobs]
    entry = "oreo_fast.train"
    if ORACLE_VALUE in ablations:
        if algorithm != "oreo":
            raise ValueError(f"{ORACLE_VALUE}: only OREO has a value model")
        entry = "experiments.oracle_value"
        args = [f"gold={run / 'default' / 'train.jsonl'}", *args]  # its own first argument
    t0 = time.time()
    launch_training(args, nproc if algorithm == "oreo" else 1, out / "train.log", threads,
                    module=entry)
    seconds = time.time() - t0
    report = run_eval(EvalConfig(model=str(out / "train" / "policy"),
                                 problems=str(run / "default" / "val.jsonl"), n_samples=0,
                                 max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, device="cpu",
                                 out=str(out / "eval_val.json")))
    return {"val_accuracy": report["greedy_accuracy"], "train_seconds": round(seconds, 1)}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="a make demo folder")
    p.add_argument("--algorithm", required=True, choices=("rft", "oreo"))
    p.add_argument("--config", nargs="+", action="append", required=True,
                   metavar=("NAME", "OVERRIDE"), help="a name then its overrides")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1])
    p.add_argument("--nproc", type=int, default=2, help="OREO training processes")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training process")
    p.add_argument("--stage-threads", type=int, default=2,
                   help="torch threads of the evaluation, run in this process (the demo's 2)")
    p.add_argument("--work", type=Path, help="training folders (default RUN/tune)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.stage_threads)
    work = args.work or args.run / "tune"
    results = {}
    if args.out.exists():
        results = json.loads(args.out.read_text())
    results.update({"run": str(args.run), "algorithm": args.algorithm,
                    "base_overrides": RFT_OVERRIDES if args.algorithm == "rft"
                    else OREO_OVERRIDES, "split": "validation", "threads": args.threads,
                    "stage_threads": args.stage_threads, **machine_facts()})
    configs = results.setdefault("configs", {})
    for name, *overrides in args.config:
        entry = configs.setdefault(name, {"overrides": overrides, "seeds": {}})
        for seed in args.seeds:
            if str(seed) in entry["seeds"]:
                continue
            entry["seeds"][str(seed)] = train_and_score(
                args.run, args.algorithm, name, overrides, seed, args.nproc, args.threads, work)
            accs = [s["val_accuracy"] for s in entry["seeds"].values()]
            entry["mean_val_accuracy"] = sum(accs) / len(accs)
            write_json(args.out, results)
            print(f"[tune] {args.algorithm} {name} seed {seed}: val "
                  f"{entry['seeds'][str(seed)]['val_accuracy']:.3f}", flush=True)
    ranked = sorted(configs.items(), key=lambda kv: -kv[1].get("mean_val_accuracy", 0))
    results["best"] = ranked[0][0] if ranked else None
    write_json(args.out, results)
    for name, entry in ranked:
        print(f"{name:24s} {entry.get('mean_val_accuracy', float('nan')):.3f}  "
              f"{' '.join(entry['overrides'])}")


if __name__ == "__main__":
    main()
