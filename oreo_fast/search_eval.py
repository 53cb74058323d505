"""Accuracy of value-guided beam search and best-of-N on a problem file (``oreo-fast eval
--value DIR --beams B --candidates K``, ``--best-of N``): the glue between ``evaluate`` and
``search``."""
from __future__ import annotations

import logging
import statistics
import time

from oreo_fast.generation import SamplingConfig
from oreo_fast.jsonl import DataError
from oreo_fast.models import ValueModel
from oreo_fast.sample import stop_token_ids
from oreo_fast.search import (SearchConfig, TokenCounts, beam_search, best_of_n, check_models,
                              step_end_ids)
from oreo_fast.tasks.problems import extract_answer, is_correct
from oreo_fast.tokenizer import load_tokenizer

log = logging.getLogger("oreo_fast")


def load_value(path: str, policy, tokenizer, dtype: str = "float32",
               trust_remote_code: bool = False) -> ValueModel:
    """The value model at ``path``, checked against the policy (vocabulary and tokenizer)."""
    value = ValueModel.from_pretrained(path, dtype, trust_remote_code)
    value.to(next(policy.parameters()).device)
    try:
        value_tokenizer = load_tokenizer(path, trust_remote_code)
    except (OSError, ValueError):
        value_tokenizer = None  # a value folder without tokenizer files: vocabulary check only
    try:
        check_models(policy, value, tokenizer, value_tokenizer)
    except ValueError as e:
        raise DataError(str(e), path) from None
    return value


def _final_answer(kind: str, tokenizer):
    """A candidate is final once its text gives an answer (GSM8K ``#### N``, MATH boxed)."""
    return lambda tokens: extract_answer(kind, tokenizer.decode(tokens)) is not None


def value_diagnostics(results) -> dict:
    """How the value model separated what the search compared, from ``SearchResult``s:
    the spread (max - min) of the values of one parent's distinct unfinished children at one
    step (median and mean over such groups), against the spread across problems (standard
    deviation of each problem's mean first-step value); and how many of the kept beams
    were distinct. A value model that only knows how hard a problem is shows a small
    within-beam spread next to a large across-problem one."""
    spreads, first_means, steps, kept, distinct = [], [], 0, 0, 0
    for res in results:
        for step, candidates in enumerate(res.candidates_per_step):
            groups: dict[int, dict[tuple[int, ...], float]] = {}
            for c in candidates:
                if not c.finished:
                    groups.setdefault(c.parent, {})[tuple(c.tokens)] = c.value
            spreads += [max(g.values()) - min(g.values()) for g in groups.values() if len(g) > 1]
            if step == 0 and candidates:
                first_means.append(sum(c.value for c in candidates) / len(candidates))
        for beams in res.beams_per_step:
            steps += 1
            kept += len(beams)
            distinct += len({tuple(c.tokens) for c in beams})
    return {"sibling_groups": len(spreads),
            "sibling_value_spread_median": statistics.median(spreads) if spreads else None,
            "sibling_value_spread_mean": statistics.fmean(spreads) if spreads else None,
            "across_problems_value_std": statistics.pstdev(first_means) if first_means else None,
            "beams_kept_per_step": kept / steps if steps else None,
            "distinct_beams_per_step": distinct / steps if steps else None}


def search_accuracy(policy, value, tokenizer, encoded, cfg: SearchConfig,
                    batch_size: int = 16) -> dict:
    """Beam-search accuracy over ``encoded`` (problem, prompt ids) pairs, and the tokens each
    model processed. Problems are batched; each problem's draws depend on its index only."""
    t0 = time.time()
    eos, ends = stop_token_ids(policy, tokenizer), step_end_ids(tokenizer)
    counts, correct, pool_correct, predictions, all_results = TokenCounts(), 0, 0, [], []
    kinds = {p.kind for p, _ in encoded}
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        # one is_final per batch: problems of one file share their kind
        is_final = _final_answer(chunk[0][0].kind, tokenizer) if len(kinds) == 1 else None
        results = beam_search(policy, value, [ids for _, ids in chunk], cfg, eos, ends,
                              tokenizer.pad_token_id, is_final=is_final,
                              problem_keys=list(range(start, start + len(chunk))), counts=counts)
        all_results += results
        for (problem, _), res in zip(chunk, results):
            text = tokenizer.decode(res.tokens, skip_special_tokens=True)
            answer = extract_answer(problem.kind, text)
            ok = is_correct(problem.kind, problem.answer, answer)
            correct += ok
            # the oracle pick: some finished answer was right (what a perfect ranking reaches)
            pool_correct += any(is_correct(problem.kind, problem.answer, extract_answer(
                problem.kind, tokenizer.decode(c.tokens, skip_special_tokens=True)))
                for c in res.pool)
            predictions.append({"problem_id": problem.id, "response": text, "answer": answer,
                                "value": res.value, "finished": res.finished, "correct": ok})
    n = max(len(encoded), 1)
    return {"accuracy": correct / n, "pool_accuracy": pool_correct / n, "beams": cfg.beams,
            "candidates": cfg.candidates,
            "policy_tokens": counts.policy, "value_tokens": counts.value,
            "padded_slots": counts.padded_slots, "seconds": round(time.time() - t0, 2),
            "value_diagnostics": value_diagnostics(all_results), "predictions": predictions}


def best_of_n_accuracy(policy, value, tokenizer, encoded, n: int, sampling: SamplingConfig,
                       seed: int = 0, batch_size: int = 8, kv_sharing: str = "cascade") -> dict:
    t0 = time.time()
    eos = stop_token_ids(policy, tokenizer)
    counts, correct = TokenCounts(), 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        results = best_of_n(policy, value, [ids for _, ids in chunk], n, sampling, eos,
                            tokenizer.pad_token_id, seed=seed + start, counts=counts,
                            kv_sharing=kv_sharing)
        for (problem, _), res in zip(chunk, results):
            answer = extract_answer(problem.kind, tokenizer.decode(res.tokens,
                                                                   skip_special_tokens=True))
            correct += is_correct(problem.kind, problem.answer, answer)
    return {"accuracy": correct / max(len(encoded), 1), "n": n, "value_tokens": counts.value,
            "seconds": round(time.time() - t0, 2)}


# The demo's search knobs: B = 7 as in the paper's main results, K = 4 candidates per beam,
# steps of one line of the embedded task; temperature 0.3 from the validation split (one OREO
# checkpoint, B = 5: 0.135 at 0.3, 0.12 at 0.6, 0.08 at 1.0 with B = 7; greedy 0.14).
DEMO_SEARCH = dict(beams=7, candidates=4, max_steps=10, max_step_tokens=24, temperature=0.3)
DEMO_SWEEP_BEAMS = (1, 3, 5, 7)  # the paper's Figure 3


def demo_beam_search(run_dir, test_file, val_file, sweep_limit: int | None = None) -> dict:
    """The demo's "oreo_beam" stage: value-guided beam search with the OREO policy and value
    model in ``run_dir`` on the test and validation problems, and a sweep over B (K fixed)
    on the first ``sweep_limit`` test problems (all when None)."""
    from pathlib import Path

    from oreo_fast.models import load_policy
    from oreo_fast.sample import encode_problems
    from oreo_fast.tasks.problems import load_problems

    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(run_dir / "policy")
    policy = load_policy(run_dir / "policy")
    value = load_value(str(run_dir / "value"), policy, tokenizer)
    split = {}
    for name, path in (("test", test_file), ("val", val_file)):
        split[name] = encode_problems(tokenizer, load_problems(path), 512, False, str(path))[0]
    cfg = SearchConfig(**DEMO_SEARCH)
    out = {"config": dict(DEMO_SEARCH)}
    for name, encoded in split.items():
        res = search_accuracy(policy, value, tokenizer, encoded, cfg, batch_size=50)
        out[name] = res["accuracy"]
        out[f"{name}_pool_accuracy"] = res["pool_accuracy"]
        out[f"{name}_value_diagnostics"] = res["value_diagnostics"]
        out[f"{name}_tokens"] = {k: res[k] for k in ("policy_tokens", "value_tokens",
                                                     "seconds")}
    sweep_problems = split["test"][:sweep_limit] if sweep_limit else split["test"]
    sweep = {}
    for beams in DEMO_SWEEP_BEAMS:
        if beams == cfg.beams and len(sweep_problems) == len(split["test"]):
            sweep[beams] = out["test"]
            continue
        res = search_accuracy(policy, value, tokenizer, sweep_problems,
                              SearchConfig(**{**DEMO_SEARCH, "beams": beams}), batch_size=50)
        sweep[beams] = res["accuracy"]
    out["sweep"] = {"candidates": cfg.candidates, "n_problems": len(sweep_problems),
                    "accuracy_by_beams": sweep}
    return out
