"""OREO diagnostics: what a trained OREO run's value model learned and what its policy changed.

OREO's value regresses to the 0/1 outcome and its policy is pushed away from the reference by
the soft Bellman residual. Whether that helps reasoning depends on two things a final accuracy
does not show: whether V ranks a right step above a wrong sibling (what value-guided search
needs), and where the policy moved probability (onto the correct early steps of wrong answers,
the credit assignment OREO promises, or only onto whole correct responses, as RFT does). On the
trajectories of a subset of the run's problems this script measures:

1. **Value** at the step-level states that ``experiments.value_probe`` uses (the newline that
   ends each completed response line): the sibling preference (value_probe's
   ``sibling_preference``: pairs of states of one problem at one step index with different
   labels, share where the higher label has the higher value, ties half) against
   ``prefix_correct`` (every line so far equals the gold solution's) and against ``outcome``
   (the trajectory's reward); the Pearson correlation of V with the reward within a problem
   (mean over problems that have both outcomes; at the first state, after line 1, and over all
   states) and across problems (a problem's mean V, at the first state and at the prompt's last
   token, against its mean reward).
2. **KL to the reference**: the exact full-vocabulary KL(pi || pi_ref) per response token (EOS
   included), averaged over tokens, for the OREO policy and the RFT policy when present.
3. **What the policy changed**, per response line (its tokens up to and including the newline
   that ends it; the last line includes EOS): delta = sum of log pi - log pi_ref, reported as
   the mean delta, the mean of exp(delta) - 1 (the change of the line's probability; a few
   lines made much likelier dominate it) and the median delta, for the lines of correct
   responses, the still prefix-correct lines of wrong responses, the first wrong line (split
   into ``misread``: its operand is the number of a distractor sentence such as ``Tom has 5
   pens.`` stated just before that step's operation while the gold operand differs, and
   ``other``; without distractors every first wrong line is ``other``), and the lines after it.

The problems are those whose index in ``default/train.jsonl`` is divisible by ``--every``. They
are in OREO's own training data (``trajectories.jsonl`` is what OREO trained on), so these are
in-sample figures: they say what training did, not how it generalises.

    python -m experiments.oreo_diagnostics --run runs/demo --every 10 --limit 400 \
        --out benchmarks/results/oreo_diagnostics.json

``--run`` is an ``oreo-fast demo`` folder (``default/train.jsonl``, ``trajectories.jsonl``,
``sft/`` the frozen reference, ``oreo/policy``, ``oreo/value``, ``rft/policy``).
"""
from __future__ import annotations

import argparse
import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.value_probe import SOLUTION_LINE, _pad, sibling_preference, step_labels

CATEGORIES = ("correct", "wrong_prefix_correct", "first_wrong_misread", "first_wrong_other",
              "after_first_wrong")
_DISTRACTOR = r"(?:Tom has|A box holds|The bus has) (\d+) (?:pens|cups|seats)\."
_OPERATION = r"(?:Add|Subtract|Multiply by|Divide by) \d+\."


def distractor_numbers(question: str, n_steps: int) -> dict[int | None, set[int]]:
    """Step index -> numbers of the distractor sentences stated just before that step's
    operation (a misreading demonstrator uses them as the next operand). When the operations
    cannot be matched to the ``n_steps`` gold lines (another wording), every distractor number
    is filed under None: it then counts at any step."""
    found, step = {}, 0
    for m in re.finditer(f"{_DISTRACTOR}|{_OPERATION}", question):
        if m[1] is None:
            step += 1
        else:
            found.setdefault(step, set()).add(int(m[1]))
    if step != n_steps and found:
        return {None: set().union(*found.values())}
    return found


def line_categories(question: str, response: str, gold: str, reward: float) -> list[str]:
    """One of CATEGORIES per line of ``response`` (0/1 rewards: above 0.5 is correct)."""
    lines, gold_lines = response.split("\n"), gold.strip().split("\n")
    if reward > 0.5:
        return ["correct"] * len(lines)
    # step_labels labels completed lines; a final newline makes the last line one as well
    prefix = step_labels(response + "\n", gold, reward, "prefix_correct")
    distractors = distractor_numbers(question, len(gold_lines) - 1)  # without "#### N"
    out, seen_wrong = [], False
    for k, (line, right) in enumerate(zip(lines, prefix)):
        if right:
            out.append("wrong_prefix_correct")
        elif seen_wrong:
            out.append("after_first_wrong")
        else:
            seen_wrong = True
            mine = SOLUTION_LINE.match(line)
            theirs = SOLUTION_LINE.match(gold_lines[k]) if k < len(gold_lines) else None
            numbers = distractors.get(k, set()) | distractors.get(None, set())
            misread = (mine is not None and int(mine[3]) in numbers
                       and (theirs is None or theirs[3] != mine[3]))
            out.append("first_wrong_misread" if misread else "first_wrong_other")
    return out


@dataclass
class Trajectory:
    ids: list[int]
    starts: list[int]  # first token of each line; starts[0] - 1 is the prompt's last token
    prefix_correct: list[float]  # per state after line 1, 2, ... (value_probe's states)
    categories: list[str]  # per line
    reward: float
    problem: int  # index in train.jsonl
    values: list[float] = field(default_factory=list)  # V at starts[k] - 1, k = 0, 1, ...
    kl: dict[str, list[float]] = field(default_factory=dict)  # policy -> per response token
    line_delta: dict[str, list[float]] = field(default_factory=dict)  # policy -> per line


def load_trajectories(run: Path, path: Path, tokenizer, every: int, limit: int | None
                      ) -> tuple[list[Trajectory], dict]:
    """The first ``limit`` usable trajectories of the problems whose train.jsonl index is
    divisible by ``every``; and counts of what was skipped."""
    from oreo_fast.io import read_jsonl
    from oreo_fast.train.data import Layout, tokenize_trajectory

    problems = {r["id"]: (i, r["question"], r["answer"])
                for i, (_, r) in enumerate(read_jsonl(run / "default" / "train.jsonl"))}
    layout = Layout.of(tokenizer)
    out, skipped = [], {"truncated": 0, "lines_and_states_disagree": 0}
    for _, record in read_jsonl(path):
        index, question, gold = problems[record["problem_id"]]
        if index % every:
            continue
        if limit is not None and len(out) >= limit:
            break
        if record.get("truncated"):  # never reached an answer; OREO leaves these out too
            skipped["truncated"] += 1
            continue
        response, reward = record["response"], float(record["reward"])
        ex = tokenize_trajectory(tokenizer, record["prompt"], [("assistant", response)],
                                 reward, 1 << 30, ["\n"], layout=layout)
        starts = [i for i, s in enumerate(ex.starts_step) if s]
        if len(starts) != len(response.split("\n")):  # e.g. an empty line: no state of its own
            skipped["lines_and_states_disagree"] += 1
            continue
        out.append(Trajectory(ex.ids, starts, step_labels(response, gold, reward, "prefix_correct"),
                              line_categories(question, response, gold, reward), reward, index))
    return out, skipped


@torch.no_grad()
def score(trajectories: list[Trajectory], reference, policies: dict, value, batch_size: int):
    """Fill in V at the states, and per policy the per-token KL and per-line deltas."""
    device = next(reference.parameters()).device
    for s in range(0, len(trajectories), batch_size):
        batch = trajectories[s:s + batch_size]
        ids, mask = (t.to(device) for t in _pad(batch))
        # position t - 1 predicts token t; float32 log-probabilities over the whole vocabulary
        ref = torch.log_softmax(reference(ids, attention_mask=mask).logits[:, :-1].float(), -1)
        for name, policy in policies.items():
            logp = torch.log_softmax(policy(ids, attention_mask=mask).logits[:, :-1].float(), -1)
            kl = (logp.exp() * (logp - ref)).sum(-1)
            delta = (logp - ref).gather(-1, ids[:, 1:, None]).squeeze(-1)
            for i, t in enumerate(batch):
                n, first = len(t.ids), t.starts[0]  # the response runs from starts[0] to the end
                t.kl[name] = kl[i, first - 1:n - 1].tolist()
                ends = t.starts[1:] + [n]
                t.line_delta[name] = [float(delta[i, a - 1:b - 1].sum())
                                      for a, b in zip(t.starts, ends)]
        if value is not None:
            values = value(ids, mask).values
            for i, t in enumerate(batch):
                t.values = values[i, [a - 1 for a in t.starts]].tolist()


def pearson(xs: list[float], ys: list[float]) -> float:
    """Pearson's r; nan when either side is constant (or has fewer than 2 points)."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def value_figures(trajectories: list[Trajectory]) -> dict:
    """Section 1 from the trajectories' ``values`` (index 0: the prompt; k: after line k)."""
    by_prefix, by_outcome, by_problem = [], [], {}
    for t in trajectories:
        for k, (label, v) in enumerate(zip(t.prefix_correct, t.values[1:]), start=1):
            by_prefix.append(((t.problem, k), label, v))
            by_outcome.append(((t.problem, k), t.reward, v))
        by_problem.setdefault(t.problem, []).append(t)
    prefix, prefix_pairs = sibling_preference(by_prefix)
    outcome, outcome_pairs = sibling_preference(by_outcome)
    first, every_state = [], []
    for ts in by_problem.values():
        if len({t.reward for t in ts}) < 2:
            continue  # the correlation with the outcome needs both outcomes
        with_first = [t for t in ts if len(t.values) > 1]
        first.append(pearson([t.values[1] for t in with_first], [t.reward for t in with_first]))
        every_state.append(pearson([v for t in ts for v in t.values[1:]],
                                   [t.reward for t in ts for _ in t.values[1:]]))
    first, every_state = ([r for r in rs if not math.isnan(r)] for rs in (first, every_state))
    # across problems: V of the first state averaged over a problem's trajectories
    firsts = {p: [t.values[1] for t in ts if len(t.values) > 1] for p, ts in by_problem.items()}
    firsts = {p: vs for p, vs in firsts.items() if vs}
    rewards = {p: _mean([t.reward for t in ts]) for p, ts in by_problem.items()}
    return {
        "sibling_preference_prefix_correct": prefix, "pairs_prefix_correct": prefix_pairs,
        "sibling_preference_outcome": outcome, "pairs_outcome": outcome_pairs,
        "within_problem_corr_first_state": _mean(first), "problems_first_state": len(first),
        "within_problem_corr_all_states": _mean(every_state),
        "problems_all_states": len(every_state),
        "across_problem_corr_first_state": pearson([_mean(vs) for vs in firsts.values()],
                                                   [rewards[p] for p in firsts]),
        "across_problem_corr_prompt_state": pearson(
            [_mean([t.values[0] for t in ts]) for ts in by_problem.values()],
            list(rewards.values())),
        "problems": len(by_problem),
    }


def policy_figures(trajectories: list[Trajectory], name: str) -> dict:
    """Sections 2 and 3 for one policy."""
    kl = [x for t in trajectories for x in t.kl[name]]
    lines: dict[str, list[float]] = {c: [] for c in CATEGORIES}
    for t in trajectories:
        for category, delta in zip(t.categories, t.line_delta[name]):
            lines[category].append(delta)
    lines["first_wrong"] = lines["first_wrong_misread"] + lines["first_wrong_other"]
    return {"kl_per_token": _mean(kl), "tokens": len(kl),
            "lines": {c: {"lines": len(ds), "mean_delta": _mean(ds),
                          "mean_ratio_minus_1": _mean([math.expm1(d) for d in ds]),
                          "median_delta": statistics.median(ds) if ds else math.nan}
                      for c, ds in lines.items()}}


def run_diagnostics(run: Path, policy: Path | None = None, value: Path | None = None,
                    rft: Path | None = None, reference: Path | None = None,
                    trajectories: Path | None = None, every: int = 10, limit: int | None = None,
                    batch_size: int = 16, device: str = "auto") -> dict:
    from benchmarks.report import environment
    from oreo_fast.models import load_model
    from oreo_fast.search.evaluate import load_value
    from oreo_fast.tokenizer import load_tokenizer

    reference = reference or run / "sft"
    paths = {"oreo": policy or run / "oreo" / "policy"}
    if rft is not None or (run / "rft" / "policy").is_dir():
        paths["rft"] = rft or run / "rft" / "policy"
    tokenizer = load_tokenizer(reference)
    ref_model = load_model(reference, device=device, dtype="float32")
    policies = {name: load_model(p, device=device, dtype="float32") for name, p in paths.items()}
    value_model = load_value(str(value or run / "oreo" / "value"), ref_model, tokenizer,
                             device=device, dtype="float32")
    trajs, skipped = load_trajectories(run, trajectories or run / "trajectories.jsonl",
                                       tokenizer, every, limit)
    t0 = time.time()
    score(trajs, ref_model, policies, value_model, batch_size)
    return {
        "run": str(run), "reference": str(reference),
        "policies": {name: str(p) for name, p in paths.items()},
        "value_model": str(value or run / "oreo" / "value"),
        "problems": len({t.problem for t in trajs}), "trajectories": len(trajs),
        "skipped": skipped, "value": value_figures(trajs),
        "policy": {name: policy_figures(trajs, name) for name in paths},
        "seconds": round(time.time() - t0, 1),
        "environment": environment(next(ref_model.parameters()).device),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def _finite(obj):
    """NaN (nothing to measure) as JSON null."""
    if isinstance(obj, float) and math.isnan(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    return obj


def summary(result: dict) -> str:
    v = result["value"]
    out = [f"{result['run']}: {result['problems']} problems, {result['trajectories']} "
           f"trajectories (skipped {result['skipped']})",
           f"value sibling preference: prefix_correct {v['sibling_preference_prefix_correct']:.3f}"
           f" ({v['pairs_prefix_correct']} pairs), outcome {v['sibling_preference_outcome']:.3f}"
           f" ({v['pairs_outcome']} pairs)",
           f"value r with reward within problems: first state "
           f"{v['within_problem_corr_first_state']:.3f} ({v['problems_first_state']} problems), "
           f"all states {v['within_problem_corr_all_states']:.3f}; across problems: first state "
           f"{v['across_problem_corr_first_state']:.3f}, prompt "
           f"{v['across_problem_corr_prompt_state']:.3f} ({v['problems']} problems)"]
    for name, p in result["policy"].items():
        out.append(f"{name}: KL(pi||ref) {p['kl_per_token']:.4f} nats/token "
                   f"({p['tokens']} tokens); per line: mean delta, mean exp(delta)-1, median "
                   "delta, lines")
        out += [f"  {c:22s} {x['mean_delta']:+.3f} {x['mean_ratio_minus_1']:+.3f} "
                f"{x['median_delta']:+.3f} {x['lines']}"
                for c, x in p["lines"].items()]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, type=Path)
    parser.add_argument("--policy", type=Path, help="default RUN/oreo/policy")
    parser.add_argument("--value", type=Path, help="default RUN/oreo/value")
    parser.add_argument("--rft", type=Path, help="default RUN/rft/policy if it exists")
    parser.add_argument("--reference", type=Path, help="default RUN/sft")
    parser.add_argument("--trajectories", type=Path, help="default RUN/trajectories.jsonl")
    parser.add_argument("--every", type=int, default=10,
                        help="problems whose train.jsonl index is divisible by this")
    parser.add_argument("--limit", type=int, help="at most this many trajectories")
    parser.add_argument("--batch-size", type=int, default=16,
                        help="sequences per forward (memory: batch x length x vocab floats)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, help="results JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run_diagnostics(args.run, args.policy, args.value, args.rft, args.reference,
                             args.trajectories, args.every, args.limit, args.batch_size,
                             args.device)
    result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(summary(result))
    if args.out:
        from oreo_fast.io import write_json

        write_json(args.out, _finite(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
