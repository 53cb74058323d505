"""Evaluation: greedy and n-sample accuracy on a problem file, written as a JSON report.

``greedy_accuracy``: one greedy response per problem. With ``n_samples`` > 0 at a
temperature: ``sample_accuracy`` (mean correctness over all samples, the pass@1 estimate),
``pass_at_n`` (some sample correct) and ``majority_at_n`` (the most frequent extracted answer
is correct; ties go to the answer seen first).
"""
from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

from oreo_fast.config import reject, require_at_least, require_choice
from oreo_fast.sampling import SamplingConfig, check_sampling
from oreo_fast.search.beam import SearchConfig, check_kv_sharing
from oreo_fast.search.evaluate import best_of_n_accuracy, load_value, search_accuracy
from oreo_fast.io import write_json, write_jsonl
from oreo_fast.models import check_device_and_dtype, load_model
from oreo_fast.pipeline.sample import encode_problems, generate_responses
from oreo_fast.tasks.problems import extract_answer, is_correct, load_problems
from oreo_fast.tokenizer import PROMPT_FORMATS, load_tokenizer

log = logging.getLogger("oreo_fast")


@dataclass
class EvalConfig:
    model: str  # policy checkpoint folder
    problems: str  # problems: JSONL, parquet, arrow, datasets folder or cached hub name
    out: str  # JSON report to write
    split: str | None = None  # split of a datasets folder or hub dataset (default: test)
    subset: str | None = None  # configuration of a hub dataset (GSM8K: main)
    columns: str | None = None  # role=column pairs, e.g. question=problem,solution=solution
    n_samples: int = 8  # 0: greedy only
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024  # GSM8K/MATH solutions of 1.5B-7B models (the demo: 128)
    batch_size: int = 64
    max_prompt_length: int = 512
    strict: bool = False
    limit: int | None = None
    predictions: str | None = None  # optional JSONL of every greedy response
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else cpu; or any torch device
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    trust_remote_code: bool = False
    prompt_format: str = "auto"  # plain | chat | auto (chat when the tokenizer has a template)
    system_prompt: str | None = None  # system message of chat prompts (plain: a first paragraph)
    # value-guided search (oreo_fast.search.beam); needs --value
    value: str | None = None  # value model folder (OREO's output_dir/value)
    beams: int = 0  # B: beams per problem (0: no beam search)
    candidates: int = 4  # K: sampled next steps per beam
    max_steps: int = 16  # step limit of the beam search
    max_step_tokens: int = 64  # tokens per step at most
    distinct_beams: bool = False  # identical candidates take one beam place
    kv_sharing: str = "cascade"  # children read the parent's KV in place, or "copy" it
    best_of: int = 0  # N: best-of-N by value (0: off)
    search_batch_size: int = 16  # problems per beam-search batch
    progress: bool = True  # progress bars of the search (shown only when stderr is a terminal)

    def __post_init__(self):
        require_choice(self, "prompt_format", PROMPT_FORMATS)
        require_at_least(self, 0, "n_samples", "beams", "best_of")
        require_at_least(self, 1, "batch_size", "max_prompt_length", "search_batch_size")
        check_sampling(self)
        check_device_and_dtype(self)
        if (self.beams or self.best_of) and not self.value:
            reject(self, "value", "--beams and --best-of need --value (a value model folder)")
        if self.beams:
            self.search_config()  # its own checks, on construction
        else:
            check_kv_sharing(self.kv_sharing)

    def search_config(self) -> SearchConfig:
        """The beam search these settings ask for."""
        return SearchConfig(beams=self.beams, candidates=self.candidates,
                            max_steps=self.max_steps, max_step_tokens=self.max_step_tokens,
                            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                            seed=self.seed, distinct=self.distinct_beams,
                            kv_sharing=self.kv_sharing)


def run_eval(config: EvalConfig) -> dict:
    """Evaluate ``config.model`` on ``config.problems``; write and return the report."""
    t0 = time.time()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    model = load_model(config.model, device=config.device, dtype=config.dtype,
                       trust_remote_code=config.trust_remote_code)
    value = None
    if config.value and (config.beams or config.best_of):  # checked before any decoding
        value = load_value(config.value, model, tokenizer, config.device, config.dtype,
                           config.trust_remote_code)
    problems = load_problems(config.problems, config.limit, config.split or "test",
                             config.subset, config.columns)
    encoded, dropped = encode_problems(tokenizer, problems, config.max_prompt_length,
                                       config.strict, config.problems, config.prompt_format,
                                       config.system_prompt)
    greedy = SamplingConfig.of(config, temperature=0.0)
    greedy_out, n_tokens = generate_responses(model, tokenizer, encoded, greedy, 1,
                                              config.batch_size, config.seed, desc="greedy")
    predictions, greedy_correct = [], 0
    for (problem, _), [(text, finished)] in zip(encoded, greedy_out):
        answer = extract_answer(problem.kind, text)
        correct = is_correct(problem.kind, problem.answer, answer)
        greedy_correct += correct
        predictions.append({"problem_id": problem.id, "response": text, "answer": answer,
                            "gold": problem.answer, "correct": correct, "finished": finished})
    n = len(encoded)
    report = {
        "model": str(config.model), "problems": str(config.problems), "n_problems": n,
        "dropped_prompts": dropped, "greedy_accuracy": greedy_correct / max(n, 1),
        # per problem, in file order: what paired comparisons between models need
        "greedy_correct": [int(p["correct"]) for p in predictions],
    }
    if config.n_samples > 0:
        sampling = SamplingConfig.of(config)
        samples, sampled_tokens = generate_responses(
            model, tokenizer, encoded, sampling, config.n_samples, max(1, config.batch_size //
                                                                       config.n_samples),
            config.seed, desc="samples")
        n_tokens += sampled_tokens
        mean_correct = pass_n = majority = 0.0
        for (problem, _), group in zip(encoded, samples):
            answers = [extract_answer(problem.kind, text) for text, _ in group]
            flags = [is_correct(problem.kind, problem.answer, a) for a in answers]
            mean_correct += sum(flags) / len(flags)
            pass_n += any(flags)
            votes = Counter(a for a in answers if a is not None)
            if votes:
                top = max(votes.values())
                winner = next(a for a in answers if a is not None and votes[a] == top)
                majority += is_correct(problem.kind, problem.answer, winner)
        report.update({
            "n_samples": config.n_samples, "sample_accuracy": mean_correct / max(n, 1),
            f"pass_at_{config.n_samples}": pass_n / max(n, 1),
            f"majority_at_{config.n_samples}": majority / max(n, 1),
        })
    if value is not None:
        searches = _search_reports(config, model, value, tokenizer, encoded)
        report.update(searches)
        # tokens/s covers every token the policy generated, the searches' included
        n_tokens += sum(searches[key]["generated_tokens"] for key in ("beam_search", "best_of_n")
                        if key in searches)
    seconds = time.time() - t0
    report.update({"generated_tokens": n_tokens, "seconds": round(seconds, 2),
                   "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1),
                   "config": asdict(config)})
    if config.predictions:
        write_jsonl(config.predictions, predictions)
    write_json(Path(config.out), report)
    log.info("eval: greedy %.3f on %d problems (%.1fs)", report["greedy_accuracy"], n, seconds)
    return report


def _search_reports(config: EvalConfig, model, value, tokenizer, encoded) -> dict:
    out = {}
    if config.beams:
        cfg = config.search_config()
        res = search_accuracy(model, value, tokenizer, encoded, cfg, config.search_batch_size,
                              config.progress)
        res.pop("predictions")
        out["beam_accuracy"], out["beam_search"] = res["accuracy"], res
        log.info("eval: beam search (B=%d, K=%d) %.3f", cfg.beams, cfg.candidates,
                 res["accuracy"])
    if config.best_of:
        sampling = SamplingConfig.of(config)
        res = best_of_n_accuracy(model, value, tokenizer, encoded, config.best_of, sampling,
                                 config.seed, kv_sharing=config.kv_sharing,
                                 progress=config.progress)
        out[f"best_of_{config.best_of}_accuracy"], out["best_of_n"] = res["accuracy"], res
    return out
