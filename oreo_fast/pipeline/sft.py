"""Supervised fine-tuning: cross-entropy on the response tokens only.

The loss goes through the fused hidden-level op (``oreo_fast.ops``,
``fused_linear_token_logprobs_kl`` with ``compute_kl=False`` and the policy itself standing
in for the reference, as RFT does): the LM head is applied a chunk of tokens at a time, so
no [B, L, V] logits exist. A batch runs as micro-batches of ``micro_batch_size`` sequences
whose gradients accumulate, each normalised by the whole batch's response tokens, so the
step is the same whatever the split. Master weights stay float32; ``dtype`` is the compute
dtype (bf16 on CUDA by default: the decoder under autocast, the LM head cast for the op).

The result is the policy that is both the frozen reference pi_ref and the starting point of
OREO. Examples are problems (their gold solution is the response) read from a GSM8K- or
MATH-shaped JSONL file; each becomes prompt + solution + EOS, the loss masking the prompt.
"""
from __future__ import annotations

import logging
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from oreo_fast.config import require_at_least, require_choice, require_finite
from oreo_fast.models import (check_device_and_dtype, load_model, model_device, resolve_device,
                              resolve_dtype, save_model)
from oreo_fast.ops import fused_linear_token_logprobs_kl
from oreo_fast.tasks.problems import load_problems
from oreo_fast.tokenizer import (PROMPT_FORMATS, drop_long, encode_pair, load_tokenizer,
                                 render_prompt, turn_end_id)
from oreo_fast.train.schedule import cosine_with_warmup

log = logging.getLogger("oreo_fast")
IGNORE = -100


@dataclass
class SFTConfig:
    model: str  # checkpoint folder to start from
    train: str  # problems: JSONL, parquet, arrow, datasets folder or cached hub name
    out: str  # checkpoint folder to write
    split: str | None = None  # split of a datasets folder or hub dataset (default: train)
    subset: str | None = None  # configuration of a hub dataset (GSM8K: main)
    columns: str | None = None  # role=column pairs, e.g. question=problem,solution=solution
    # defaults for a 1.5B-7B model on GSM8K/MATH (estimated, see README "Bring your own model
    # and data"); the embedded demo passes its own (oreo_fast.pipeline.demo.EMBEDDED_SFT)
    epochs: float = 3.0
    batch_size: int = 32
    micro_batch_size: int = 0  # sequences per forward, gradients accumulated (0: batch_size)
    lr: float = 1e-5
    min_lr_ratio: float = 0.1  # cosine decay ends at lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    max_length: int = 1024  # prompt + response tokens; longer examples are dropped
    limit: int | None = None  # use only the first N problems
    strict: bool = False  # an over-long example is an error instead of a warning
    log_every: int = 20
    eval_examples: int = 256  # loss measured on this many training examples, before and after
    seed: int = 0
    device: str = "auto"  # "auto": CUDA when present, else cpu; or any torch device
    dtype: str = "auto"  # compute dtype; "auto": bfloat16 on CUDA, float32 on CPU
    trust_remote_code: bool = False
    prompt_format: str = "auto"  # plain | chat | auto (chat when the tokenizer has a template)
    system_prompt: str | None = None  # system message of chat prompts (plain: a first paragraph)

    def __post_init__(self):
        require_choice(self, "prompt_format", PROMPT_FORMATS)
        require_finite(self, "epochs", "lr", positive=True)
        require_finite(self, "min_lr_ratio", "weight_decay", "grad_clip", minimum=0)
        require_at_least(self, 1, "batch_size", "max_length", "limit", "log_every")
        require_at_least(self, 0, "warmup_steps", "eval_examples", "micro_batch_size")
        check_device_and_dtype(self)


def build_examples(tokenizer, problems, max_length: int, strict: bool = False,
                   source: str | None = None, prompt_format: str = "auto",
                   system_prompt: str | None = None) -> list[tuple[list[int], int]]:
    """(token ids, prompt length) per problem, over-long ones dropped (or an error): the
    prompt as sampling builds it, the gold solution, and the EOS trajectories end with."""
    eos = turn_end_id(tokenizer, prompt_format)
    pairs = [encode_pair(tokenizer, render_prompt(tokenizer, p.question, prompt_format,
                                                  system_prompt), p.solution, eos_id=eos)
             for p in problems]
    kept, _ = drop_long(pairs, [len(ids) for ids, _ in pairs], max_length, "example", strict,
                        source)
    return kept


def collate_sft_batch(examples: list[tuple[list[int], int]], pad_id: int):
    """Right-padded (input_ids, attention_mask, labels); labels are IGNORE outside responses."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for i, (ids, n_prompt) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        attention[i, :len(ids)] = 1
        labels[i, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])
    return input_ids, attention, labels


def response_nll_sum(model, input_ids, attention, labels,
                     compute_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over response tokens (float32), and how many there were: the
    decoder's hidden states through the fused LM-head op, never the [B, L, V] logits."""
    device = model_device(model)
    input_ids, attention, labels = (t.to(device) for t in (input_ids, attention, labels))
    with torch.autocast(device.type, dtype=compute_dtype,
                        enabled=compute_dtype != torch.float32):
        hidden = model.get_decoder()(input_ids=input_ids,
                                     attention_mask=attention).last_hidden_state[:, :-1]
    targets = labels[:, 1:]
    mask = targets != IGNORE
    weight = model.get_output_embeddings().weight
    hidden, weight = hidden.to(compute_dtype), weight.to(compute_dtype)
    # compute_kl=False with the policy as its own "reference": only logp is used
    logp, _, _ = fused_linear_token_logprobs_kl(
        hidden, weight, hidden.detach(), weight.detach(), targets.clamp(min=0), mask,
        compute_kl=False)
    return -(logp.float() * mask).sum(), int(mask.sum())


def micro_batches(examples: list, size: int) -> list[list]:
    """``examples`` in consecutive groups of ``size`` (0: one group)."""
    size = size or len(examples)
    return [examples[i:i + size] for i in range(0, len(examples), size)]


def sft_step_loss(model, batch: list, pad_id: int, micro_batch_size: int,
                  compute_dtype: torch.dtype = torch.float32) -> float:
    """Backward of the batch's mean response cross-entropy, one micro-batch at a time
    (each normalised by the whole batch's response-token count, so the accumulated gradient
    is the full batch's); returns that mean."""
    groups = [collate_sft_batch(group, pad_id) for group in micro_batches(batch, micro_batch_size)]
    n_total = sum(int((labels[:, 1:] != IGNORE).sum()) for _, _, labels in groups)
    total = 0.0
    for group in groups:
        nll, _ = response_nll_sum(model, *group, compute_dtype)
        loss = nll / max(n_total, 1)
        loss.backward()
        total += loss.item()
    return total


@torch.no_grad()
def mean_loss(model, examples, pad_id: int, batch_size: int = 64,
              compute_dtype: torch.dtype = torch.float32) -> float:
    """Token-weighted mean response loss over ``examples``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for group in micro_batches(examples, batch_size):
        nll, n = response_nll_sum(model, *collate_sft_batch(group, pad_id), compute_dtype)
        total += float(nll)
        count += n
    model.train(was_training)
    return total / max(count, 1)


def run_sft(config: SFTConfig) -> Path:
    """Fine-tune ``config.model`` on ``config.train``; write the checkpoint folder and its
    ``sft_log.json`` (losses, sizes, time) to ``config.out`` and return that path."""
    t0 = time.time()
    torch.manual_seed(config.seed)
    rng = random.Random(config.seed)
    tokenizer = load_tokenizer(config.model, config.trust_remote_code)
    device = resolve_device(config.device)
    compute_dtype = resolve_dtype(config.dtype, device)
    # float32 master weights; the forward runs in compute_dtype
    model = load_model(config.model, device=device, dtype=torch.float32,
                       trust_remote_code=config.trust_remote_code)
    micro = config.micro_batch_size or config.batch_size
    problems = load_problems(config.train, config.limit, config.split or "train", config.subset,
                             config.columns)
    examples = build_examples(tokenizer, problems, config.max_length, config.strict,
                              config.train, config.prompt_format, config.system_prompt)
    if not examples:
        raise ValueError(f"no training example fits max_length={config.max_length}")
    eval_set = examples[:config.eval_examples]
    initial_loss = mean_loss(model, eval_set, tokenizer.pad_token_id, micro, compute_dtype)

    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total_steps = max(1, round(config.epochs * steps_per_epoch))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                  weight_decay=config.weight_decay, betas=(0.9, 0.98))

    lr_factor = cosine_with_warmup(total_steps, config.warmup_steps, config.min_lr_ratio)

    from tqdm import tqdm

    model.train()
    history, order = [], []
    bar = tqdm(range(total_steps), desc="sft", unit="step", dynamic_ncols=True)
    for step in bar:
        if len(order) < config.batch_size:  # next epoch: reshuffle
            order += rng.sample(range(len(examples)), len(examples))
        batch = [examples[i] for i in order[:config.batch_size]]
        del order[:config.batch_size]
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(step)
        optimizer.zero_grad(set_to_none=True)
        loss = sft_step_loss(model, batch, tokenizer.pad_token_id, micro, compute_dtype)
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        history.append(loss)
        if (step + 1) % config.log_every == 0 or step + 1 == total_steps:
            recent = history[-config.log_every:]
            bar.set_postfix(loss=f"{sum(recent) / len(recent):.4f}")
    model.eval()
    final_loss = mean_loss(model, eval_set, tokenizer.pad_token_id, micro, compute_dtype)
    report = {
        "config": asdict(config), "examples": len(examples),
        "dropped": len(problems) - len(examples), "steps": total_steps,
        "initial_loss": initial_loss, "final_loss": final_loss, "train_losses": history,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": round(time.time() - t0, 2),
    }
    log.info("sft: loss %.4f -> %.4f in %d steps (%.1fs)", initial_loss, final_loss,
             total_steps, report["seconds"])
    return save_model(model, tokenizer, config.out, extra_files={"sft_log.json": report})
