"""The vLLM sampling engine (``oreo-fast sample --engine vllm``, extra ``[vllm]``, CUDA only).

The prompts go to vLLM as token ids (``encode_problems``' ids, BOS and chat template
included, exactly what the HF engine feeds), K samples per prompt through
``SamplingParams(n=K, ...)`` with a per-problem seed, stopping at the same ids as the HF engine
(``models.stop_token_ids``). Each sample's ``token_ids`` are decoded here as the HF engine
decodes them and its ``finish_reason`` kept: ``"length"`` (cut by ``max_tokens``) is a
truncated sample, so both engines write the same JSONL.
"""
from __future__ import annotations

import importlib
from types import SimpleNamespace

from oreo_fast.errors import ConfigError
from oreo_fast.models import stop_token_ids

INSTALL_HINT = "pip install 'oreo_fast[vllm]' on a CUDA machine, or use --engine hf"


def import_vllm():
    """The vllm module, or a one-line ConfigError naming the fix."""
    try:
        vllm = importlib.import_module("vllm")
    except ImportError:
        raise ConfigError(f"engine: vllm is not installed: {INSTALL_HINT}") from None
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"engine: vllm needs a CUDA GPU and none is visible: {INSTALL_HINT}")
    return vllm


def folder_stop_ids(model_dir: str, tokenizer) -> list[int]:
    """``stop_token_ids`` from a checkpoint folder's generation config, without loading it."""
    from transformers import GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        generation = None
    return stop_token_ids(SimpleNamespace(generation_config=generation), tokenizer)


def convert_outputs(outputs, tokenizer, stop_ids) -> tuple[list[list[tuple[str, bool]]], int]:
    """vLLM ``RequestOutput``s -> per problem, K (response text, finished), and the number of
    generated tokens. A trailing stop id is not part of the response; ``finish_reason``
    ``"length"`` means cut by max_tokens (not finished)."""
    stops, results, n_tokens = set(stop_ids), [], 0
    for request in outputs:
        samples = []
        for completion in request.outputs:
            ids = list(completion.token_ids)
            n_tokens += len(ids)
            finished = completion.finish_reason != "length"
            if finished and ids and ids[-1] in stops:
                ids = ids[:-1]
            samples.append((tokenizer.decode(ids, skip_special_tokens=True), finished))
        results.append(samples)
    return results, n_tokens


def vllm_responses(config, tokenizer, encoded, seed: int) -> tuple[list, int]:
    """K responses per (problem, prompt ids) from vLLM, as ``generate_responses`` returns."""
    vllm = import_vllm()
    stop_ids = folder_stop_ids(config.model, tokenizer)
    dtype = "auto" if config.dtype in ("auto", "float32") else config.dtype
    llm = vllm.LLM(model=str(config.model), tokenizer=str(config.model), dtype=dtype, seed=seed,
                   trust_remote_code=config.trust_remote_code)
    params = [vllm.SamplingParams(n=config.k, temperature=config.temperature, top_p=config.top_p,
                                  top_k=config.top_k or -1, max_tokens=config.max_new_tokens,
                                  seed=seed + i, stop_token_ids=stop_ids,
                                  skip_special_tokens=True)
              for i in range(len(encoded))]
    outputs = llm.generate([{"prompt_token_ids": ids} for _, ids in encoded], params)
    return convert_outputs(outputs, tokenizer, stop_ids)
