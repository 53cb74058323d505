"""Sampling offline trajectories: K responses per problem, verified, written as JSONL.

Batched generation with a KV cache (``oreo_fast.sampling``), temperature / top-p / top-k,
a tqdm bar with tokens/s. Each response gets the verifier's 0/1 reward. Optionally the
paper's balancing keeps at most n positive and n negative responses per problem. Empty
responses (EOS straight away) are counted and left out: they carry no step to learn from.

The prompt is built by ``oreo_fast.tokenizer.render_prompt`` (``prompt_format`` plain or chat,
an optional system prompt) and written as the exact text given to the model. A response cut
by ``max_new_tokens`` before any stop token is written with ``"truncated": true`` and reward 0:
it never ended, so the trainer must not teach its end (see ``TrainConfig.keep_truncated``).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oreo_fast.config import require_at_least, require_choice
from oreo_fast.sampling import SamplingConfig, check_sampling, generate
from oreo_fast.io import write_json, write_jsonl
from oreo_fast.models import check_device_and_dtype, load_model, stop_token_ids
from oreo_fast.tasks.problems import Problem, extract_answer, is_correct, load_problems
from oreo_fast.tokenizer import (PROMPT_FORMATS, drop_long, encode_pair, load_tokenizer,
                                 render_prompt, resolve_prompt_format)
from oreo_fast.pipeline.trajectories import balance
from oreo_fast.pipeline.vllm_engine import import_vllm, vllm_responses

log = logging.getLogger("oreo_fast")


@dataclass
class SampleConfig:
    model: str  # policy checkpoint folder
    problems: str  # problems: JSONL, parquet, arrow, datasets folder or cached hub name
    out: str  # trajectory JSONL to write
    split: str | None = None  # split of a datasets folder or hub dataset (default: train)
    subset: str | None = None  # configuration of a hub dataset (GSM8K: main)
    columns: str | None = None  # role=column pairs, e.g. question=problem,solution=solution
    k: int = 8  # responses per problem
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 1024  # GSM8K/MATH solutions of 1.5B-7B models (the demo: 128)
    batch_size: int = 32  # problems per batch (x k sequences)
    balance: int | None = None  # keep at most n positive and n negative per problem
    max_prompt_length: int = 512  # longer prompts are dropped (an error under strict)
    strict: bool = False
    limit: int | None = None
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else cpu; or any torch device
    dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU
    trust_remote_code: bool = False
    prompt_format: str = "auto"  # plain | chat | auto (chat when the tokenizer has a template)
    system_prompt: str | None = None  # system message of chat prompts (plain: a first paragraph)
    engine: str = "hf"  # hf (our KV-cache loop) or vllm (extra [vllm], a CUDA GPU)

    def __post_init__(self):
        require_at_least(self, 1, "k", "batch_size", "max_prompt_length", "balance", "limit")
        require_choice(self, "prompt_format", PROMPT_FORMATS)
        require_choice(self, "engine", ("hf", "vllm"))
        check_sampling(self)
        check_device_and_dtype(self)


def encode_problems(tokenizer, problems: list[Problem], max_prompt_length: int, strict: bool,
                    source: str | None, prompt_format: str = "auto",
                    system_prompt: str | None = None) -> tuple[list[tuple[Problem, list[int]]], int]:
    """(problem, prompt ids) pairs whose prompt fits, and how many were dropped; the prompt
    text is ``render_prompt``'s (the same for sampling, evaluation and search)."""
    pairs = [(p, encode_pair(tokenizer, render_prompt(tokenizer, p.question, prompt_format,
                                                      system_prompt))[0]) for p in problems]
    return drop_long(pairs, [len(ids) for _, ids in pairs], max_prompt_length, "prompt",
                     strict, source)


def generate_responses(model, tokenizer, encoded: list[tuple[Problem, list[int]]],
                       sampling: SamplingConfig, k: int, batch_size: int, seed: int,
                       desc: str = "sample") -> tuple[list[list[tuple[str, bool]]], int]:
    """K (response text, finished) per problem, and the number of generated tokens."""
    from tqdm import tqdm

    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    eos = stop_token_ids(model, tokenizer)
    results: list[list[tuple[str, bool]]] = []
    n_tokens = 0
    with tqdm(desc=desc, unit="tok", unit_scale=True, dynamic_ncols=True) as bar:
        def on_tokens(n: int):
            nonlocal n_tokens
            n_tokens += n
            bar.update(n)

        for start in range(0, len(encoded), batch_size):
            chunk = encoded[start:start + batch_size]
            gens = generate(model, [ids for _, ids in chunk], eos, tokenizer.pad_token_id,
                            sampling, num_samples=k, generator=generator, on_tokens=on_tokens)
            for samples in gens:
                results.append([(tokenizer.decode(g.token_ids, skip_special_tokens=True),
                                 g.finished) for g in samples])
            bar.set_postfix(problems=f"{len(results)}/{len(encoded)}")
    return results, n_tokens


def trajectory_record(problem: Problem, prompt: str, text: str, finished: bool, index: int,
                      prompt_format: str) -> dict:
    """One sampled response as a trajectory record: verified, reward 0 when truncated."""
    answer = extract_answer(problem.kind, text)
    reward = int(finished and is_correct(problem.kind, problem.answer, answer))
    return {"prompt": prompt, "response": text, "reward": reward, "problem_id": problem.id,
            "answer": answer, "sample_index": index, "finished": finished,
            "truncated": not finished, "prompt_format": prompt_format}


def run_sample(config: SampleConfig) -> Path:
    """Sample, verify and write the trajectories; a ``<out>.stats.json`` sidecar records the
    counts, reward rate, tokens/s and config. Returns the trajectory path."""
    t0 = time.time()
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    if config.engine == "vllm":
        import_vllm()  # a missing package or GPU fails before any work
    problems = load_problems(config.problems, config.limit, config.split or "train",
                             config.subset, config.columns)
    encoded, dropped = encode_problems(tokenizer, problems, config.max_prompt_length,
                                       config.strict, config.problems, config.prompt_format,
                                       config.system_prompt)
    prompt_format = resolve_prompt_format(tokenizer, config.prompt_format)
    if config.engine == "vllm":
        responses, n_tokens = vllm_responses(config, tokenizer, encoded, config.seed)
    else:
        model = load_model(config.model, device=config.device, dtype=config.dtype,
                           trust_remote_code=config.trust_remote_code)
        responses, n_tokens = generate_responses(model, tokenizer, encoded,
                                                 SamplingConfig.of(config), config.k,
                                                 config.batch_size, config.seed)
    records, empty = [], 0
    for (problem, _), samples in zip(encoded, responses):
        prompt = render_prompt(tokenizer, problem.question, prompt_format, config.system_prompt)
        for i, (text, finished) in enumerate(samples):
            if not text.strip():
                empty += 1
                continue
            records.append(trajectory_record(problem, prompt, text, finished, i, prompt_format))
    unfinished = sum(r["truncated"] for r in records)
    if empty:
        log.warning("left out %d empty responses", empty)
    sampled = len(records)
    if config.balance is not None:
        records = balance(records, config.balance, config.seed)
    seconds = time.time() - t0
    out = Path(config.out)
    write_jsonl(out, records)
    positives = sum(r["reward"] for r in records)
    stats = {
        "problems": len(encoded), "dropped_prompts": dropped, "responses": sampled,
        "empty_responses": empty, "truncated_responses": unfinished, "written": len(records),
        "positive": positives, "reward_rate": positives / max(len(records), 1),
        "generated_tokens": n_tokens, "seconds": round(seconds, 2),
        "tokens_per_second": round(n_tokens / max(seconds, 1e-9), 1), "config": asdict(config),
    }
    write_json(out.with_name(out.name + ".stats.json"), stats)
    log.info("sample: %d responses to %d problems, reward rate %.3f, %d written to %s (%.1fs)",
             sampled, len(encoded), stats["reward_rate"], len(records), out, seconds)
    return out
