"""Accuracy of value-guided beam search and best-of-N on a problem file (``oreo-fast eval
--value DIR --beams B --candidates K``, ``--best-of N``): the glue between the pipeline's
``evaluate`` and the search."""
from __future__ import annotations

import logging
import statistics
import time

from oreo_fast.errors import DataError
from oreo_fast.models import ValueModel, load_model, stop_token_ids
from oreo_fast.sampling import SamplingConfig
from oreo_fast.search.beam import (SearchConfig, TokenCounts, beam_search, best_of_n, check_models,
                                   step_end_ids)
from oreo_fast.tasks.problems import extract_answer, is_correct
from oreo_fast.tokenizer import load_tokenizer

log = logging.getLogger("oreo_fast")


def load_value(path: str, policy, tokenizer, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False) -> ValueModel:
    """The value model at ``path`` on ``device`` in ``dtype`` (as the policy was loaded),
    checked against the policy (vocabulary and tokenizer)."""
    value = load_model(path, value=True, device=device, dtype=dtype,
                       trust_remote_code=trust_remote_code)
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


def _progress_bar(total: int, desc: str, enabled: bool):
    """Problems done and tokens/s on stderr; tqdm's ``disable=None`` keeps it off when stderr
    is not a terminal (logs, pipes, CI), ``enabled=False`` off everywhere."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="problem", dynamic_ncols=True,
                disable=None if enabled else True)


def _advance(bar, done: int, counts: TokenCounts, t0: float) -> None:
    bar.update(done)
    bar.set_postfix_str(f"{counts.generated / max(time.time() - t0, 1e-9):.1f} tok/s")


def search_accuracy(policy, value, tokenizer, encoded, cfg: SearchConfig,
                    batch_size: int = 16, progress: bool = True) -> dict:
    """Beam-search accuracy over ``encoded`` (problem, prompt ids) pairs, and the tokens each
    model processed. Problems are batched; each problem's draws depend on its index only."""
    t0 = time.time()
    bar = _progress_bar(len(encoded), "beam search", progress)
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
        _advance(bar, len(chunk), counts, t0)
    bar.close()
    n = max(len(encoded), 1)
    return {"accuracy": correct / n, "pool_accuracy": pool_correct / n, "beams": cfg.beams,
            "candidates": cfg.candidates, "generated_tokens": counts.generated,
            "policy_tokens": counts.policy, "value_tokens": counts.value,
            "padded_slots": counts.padded_slots, "seconds": round(time.time() - t0, 2),
            "value_diagnostics": value_diagnostics(all_results), "predictions": predictions}


def best_of_n_accuracy(policy, value, tokenizer, encoded, n: int, sampling: SamplingConfig,
                       seed: int = 0, batch_size: int = 8, kv_sharing: str = "cascade",
                       progress: bool = True) -> dict:
    t0 = time.time()
    bar = _progress_bar(len(encoded), f"best-of-{n}", progress)
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
        _advance(bar, len(chunk), counts, t0)
    bar.close()
    return {"accuracy": correct / max(len(encoded), 1), "n": n,
            "generated_tokens": counts.generated, "value_tokens": counts.value,
            "seconds": round(time.time() - t0, 2)}
