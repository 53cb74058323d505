"""How much the demo's starting point moves with SFT's seed: the embedded default's SFT trained
with the demo's settings (``EMBEDDED_SFT``) once per SFT seed, each scored greedily on the
demo's validation and held-out test problems, split by whether the question carries a
distractor sentence (``Tom has 5 pens.``).

The split shows where a seed's accuracy comes from. A converged SFT solves nearly every problem
without a distractor and copies the demonstrator's misreading on most with one; a seed that
scores lower without distractors has not converged, and one that scores higher with them has
not yet learned the demonstrator's habit.

    python -m experiments.sft_seeds --run runs/demo --seeds 0 1 2 \\
        --out benchmarks/results/sft_seeds.json

``--run`` is an ``oreo-fast demo`` folder (its ``default/`` holds the model, ``sft.jsonl`` and
the splits). The run's own SFT is reused for the seed it was trained with (``results.json``'s
``sft_seed``, at its ``stage_threads``); ``--epochs`` overrides the epoch count (then nothing
is reused). Each finished seed is written to ``--out`` at once and not trained again, so an
interrupted run resumes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from oreo_fast.io import read_jsonl, write_json
from oreo_fast.pipeline.demo import (EMBEDDED_MAX_NEW_TOKENS, EMBEDDED_SFT, TEST_FILE,
                                     machine_facts)
from oreo_fast.tasks.arithmetic import DISTRACTORS

# "Tom has {} pens." -> " pens.": what each distractor sentence ends with
_DISTRACTOR_ENDINGS = tuple(d.rsplit("{}", 1)[1] for d in DISTRACTORS)


def has_distractor(question: str) -> bool:
    return any(ending in question for ending in _DISTRACTOR_ENDINGS)


def split_accuracy(correct: list[int], questions: list[str]) -> dict:
    """Greedy accuracy overall and on the questions with and without a distractor."""
    if len(correct) != len(questions):
        raise ValueError(f"{len(correct)} outcomes for {len(questions)} questions")
    out = {"accuracy": sum(correct) / len(correct), "n": len(correct)}
    for name, want in (("without_distractor", False), ("with_distractor", True)):
        picked = [c for c, q in zip(correct, questions) if has_distractor(q) == want]
        out[name] = sum(picked) / len(picked) if picked else None
        out[f"n_{name}"] = len(picked)
    return out


def train_and_score(run: Path, seed: int, epochs: float | None, work: Path,
                    reuse: bool) -> dict:
    from oreo_fast.pipeline.evaluate import EvalConfig, run_eval
    from oreo_fast.pipeline.sft import SFTConfig, run_sft

    default = run / "default"
    settings = {**EMBEDDED_SFT, **({"epochs": epochs} if epochs is not None else {})}
    if reuse:  # the demo's own SFT and its evaluations
        model, reports = run / "sft", {"val": run / "eval_sft_val.json",
                                       "test": run / "eval_sft_test.json"}
        seconds = None
    else:
        model = work / f"sft-e{settings['epochs']:g}-seed{seed}"
        reports = {"val": model / "eval_val.json", "test": model / "eval_test.json"}
        t0 = time.time()
        run_sft(SFTConfig(model=str(default / "model"), train=str(default / "sft.jsonl"),
                          out=str(model), **settings, seed=seed, device="cpu"))
        seconds = round(time.time() - t0, 1)
    result = {"model": str(model), **({"train_seconds": seconds} if seconds else {})}
    for split, problems in (("val", default / "val.jsonl"), ("test", default / TEST_FILE)):
        if not reports[split].exists():
            run_eval(EvalConfig(model=str(model), problems=str(problems), n_samples=0,
                                max_new_tokens=EMBEDDED_MAX_NEW_TOKENS, device="cpu",
                                out=str(reports[split])))
        correct = json.loads(reports[split].read_text())["greedy_correct"]
        questions = [r["question"] for _, r in read_jsonl(problems)]
        result[split] = split_accuracy(correct, questions)
    return result


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, type=Path, help="an oreo-fast demo folder")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--epochs", type=float, help="override EMBEDDED_SFT's epoch count")
    p.add_argument("--work", type=Path, help="SFT folders (default RUN/sft_seeds)")
    p.add_argument("--threads", type=int, default=2,
                   help="torch CPU threads (the demo's stage_threads, 2)")
    p.add_argument("--out", required=True, type=Path)
    args = p.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    demo = json.loads((args.run / "results.json").read_text())
    settings = {**EMBEDDED_SFT, **({"epochs": args.epochs} if args.epochs else {})}
    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    if results.get("sft_settings", settings) != settings:
        raise SystemExit(f"{args.out}: its sft_settings {results['sft_settings']} differ from "
                         f"these {settings}; write to another --out")
    results.update({"run": str(args.run), "sft_settings": settings, "threads": args.threads,
                    "split": "validation and held-out test", **machine_facts()})
    by_seed = results.setdefault("by_seed", {})
    for seed in args.seeds:
        if str(seed) in by_seed:
            continue
        reuse = (seed == demo.get("sft_seed", 0) and args.epochs is None
                 and args.threads == demo.get("stage_threads"))
        by_seed[str(seed)] = train_and_score(args.run, seed, args.epochs,
                                             args.work or args.run / "sft_seeds", reuse)
        for split in ("val", "test"):
            accs = [s[split]["accuracy"] for s in by_seed.values()]
            results[f"{split}_mean"] = statistics.mean(accs)
            results[f"{split}_sd"] = statistics.stdev(accs) if len(accs) > 1 else None
        write_json(args.out, results)
        row = by_seed[str(seed)]["test"]
        print(f"[sft_seeds] seed {seed}: test {row['accuracy']:.3f} (without distractor "
              f"{row['without_distractor']:.3f}, with {row['with_distractor']:.3f})", flush=True)
    print(f"test mean {results.get('test_mean', float('nan')):.3f}, "
          f"SD {results.get('test_sd') or float('nan'):.3f} over {len(by_seed)} seeds")


if __name__ == "__main__":
    main()
