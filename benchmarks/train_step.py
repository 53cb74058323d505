"""Trainer-step benchmark: our OREO micro-step against a "paper-equivalent" step on the same
models and batch (shapes, model building, the two steps, the correctness check, the JSON).

Both steps compute the same OREO loss (oreo_fast.ops.reference.bellman_losses, token level, full-
vocabulary KL) on the same batch and end with one ``loss.backward()`` into the policy and the
value model (no optimizer step: it is the same for both):

- ``ours``: the trainer's own micro-step, ``oreo_fast.train.step.OreoStep``, built on the
  benchmark's models: policy decoder once with gradient -> hidden states -> the fused
  hidden-level op (policy LM head, the reference's no-grad hidden states and LM head); value
  forward; ``bellman_losses``. Logits are never materialised.
- ``paper``: what the authors' recipe does: policy forward with gradient producing the full
  logits [B, L, V] -> float32 log_softmax -> gather; a second policy forward without gradient
  whose log-ratios give the value targets; reference forward -> full logits -> float32
  log_softmax; full-vocabulary KL ``(p * (logp_all - ref_logp_all)).sum(-1)``; value forward;
  value loss with the advantages of the second forward, policy loss with those of the first.

Models are random-weight Qwen2s built from a config (no files): the reference is a perturbed
copy of the policy (small, non-zero KL), the value model a third backbone with a small random
head (the trainer's is zero-initialised, which would hide the value gradient in the check).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import os
from pathlib import Path

import torch

from benchmarks import report as ops_report
from benchmarks.providers import bench_device, configure_threads  # noqa: F401 (re-exported)
from oreo_fast.models import ValueModel
from oreo_fast.ops import reference
from oreo_fast.train.config import load_train_config
from oreo_fast.train.data import Example, collate_examples
from oreo_fast.train.parallelize import HiddenStates, PolicyWithLoss, Values
from oreo_fast.train.step import OreoStep

PROVIDERS = ("ours", "paper")
LABELS = {
    "ours": "oreo_fast OreoStep (the trainer's micro-step): one policy forward, fused hidden-level loss",
    "paper": "paper-equivalent: two policy forwards, materialised logits, float32 log_softmax, "
             "full-vocab KL",
}
SEED = 1234
BETA, KL_COEF = 0.1, 0.05
STEP_TOKENS = 32  # step level: a new step every 32 response tokens (token level is the default)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    dtype: str
    tie_word_embeddings: bool = True

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def slug(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16"}.get(self.dtype, self.dtype)
        return (f"h{self.hidden}-l{self.layers}-v{self.vocab}-b{self.batch}-s{self.seq}-{short}")

    def qwen2_config(self):
        from transformers import Qwen2Config

        return Qwen2Config(
            vocab_size=self.vocab, hidden_size=self.hidden, intermediate_size=self.intermediate,
            num_hidden_layers=self.layers, num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads, max_position_embeddings=max(4096, self.seq),
            tie_word_embeddings=self.tie_word_embeddings, use_sliding_window=False,
            rope_theta=1_000_000.0, rms_norm_eps=1e-6, bos_token_id=0, eos_token_id=1,
            pad_token_id=1,
        )


SHAPES = {
    # a tiny Qwen2 whose step takes seconds on 2 cores: 4 x 512 tokens, V = 32,000
    "cpu": ModelShape(hidden=256, intermediate=768, layers=4, heads=4, kv_heads=2, vocab=32000,
                      batch=4, seq=512, dtype="float32"),
    # a smoke run
    "small": ModelShape(hidden=64, intermediate=128, layers=2, heads=2, kv_heads=1, vocab=4000,
                        batch=2, seq=128, dtype="float32"),
    # Qwen2.5-1.5B's shape with random weights: 4 x 2048 tokens, V = 151,936, bf16
    "gpu": ModelShape(hidden=1536, intermediate=8960, layers=28, heads=12, kv_heads=2,
                      vocab=151936, batch=4, seq=2048, dtype="bfloat16"),
}


# ---------------------------------------------------------------- settings


def bench_shape(device: torch.device) -> tuple[str, ModelShape]:
    """OREO_BENCH_TRAIN_SHAPE (default by device) with OREO_BENCH_TRAIN_BATCH / _SEQ overrides."""
    name = os.environ.get("OREO_BENCH_TRAIN_SHAPE") or ("gpu" if device.type == "cuda" else "cpu")
    if name not in SHAPES:
        raise ValueError(f"OREO_BENCH_TRAIN_SHAPE must be one of {sorted(SHAPES)}, got {name!r}")
    shape = SHAPES[name]
    overrides = {}
    for key in ("batch", "seq"):
        value = os.environ.get(f"OREO_BENCH_TRAIN_{key.upper()}")
        if value:
            overrides[key] = int(value)
    return name, dataclasses.replace(shape, **overrides)


def gradient_checkpointing() -> bool:
    return os.environ.get("OREO_BENCH_TRAIN_CHECKPOINTING", "0").lower() in ("1", "true", "yes")


def attn_implementation() -> str:
    return os.environ.get("OREO_BENCH_TRAIN_ATTN", "sdpa")


def rounds(device: torch.device) -> int:
    return int(os.environ.get("OREO_BENCH_ROUNDS", 10 if device.type == "cuda" else 7))


def warmup_rounds(device: torch.device) -> int:
    """Untimed steps before the timed ones (besides the checked step on a smaller batch)."""
    return 3 if device.type == "cuda" else 1


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- models and batch


@dataclasses.dataclass
class Setup:
    shape: ModelShape
    device: torch.device
    step: OreoStep  # the trainer's micro-step on these models
    policy: PolicyWithLoss
    reference: HiddenStates
    value: Values
    batch: dict
    checkpointing: bool

    def trainable(self):
        return [p for m in (self.policy, self.value) for p in m.parameters() if p.requires_grad]

    def zero_grad(self):
        for p in self.trainable():
            p.grad = None

    @property
    def tokens(self) -> int:
        return int(self.batch["attention_mask"].sum())


def _build_models(shape: ModelShape, device: torch.device, checkpointing: bool):
    from transformers import Qwen2ForCausalLM, Qwen2Model

    config = shape.qwen2_config()
    config._attn_implementation = attn_implementation()
    dtype = shape.torch_dtype
    with torch.device(device):
        torch.manual_seed(SEED)
        policy = Qwen2ForCausalLM(config).to(dtype)
        ref = copy.deepcopy(policy)
        gen = torch.Generator(device=device).manual_seed(SEED + 1)
        with torch.no_grad():  # a nearby reference: KL(pi || pi_ref) small but not zero
            for p in ref.parameters():
                noise = torch.randn(p.shape, generator=gen, device=device, dtype=torch.float32)
                p.add_((noise * 0.1 * p.float().std().clamp(min=1e-3)).to(dtype))
        ref.requires_grad_(False)
        torch.manual_seed(SEED + 2)
        backbone = Qwen2Model(config).to(dtype)
        value = ValueModel(backbone)
        with torch.no_grad():
            value.value_head.weight.normal_(0.0, 0.5 / shape.hidden**0.5)
    if checkpointing:  # what the trainer's gradient_checkpointing=true does (newer name first)
        for model in (policy, backbone):
            enable = getattr(model, "activation_checkpointing_enable", None) \
                or model.gradient_checkpointing_enable
            enable()
    policy.train()
    value.train()
    ref.eval()
    return PolicyWithLoss(policy), HiddenStates(ref), Values(value)


def make_batch(shape: ModelShape, batch: int | None = None, seq: int | None = None,
               level: str = "token") -> dict:
    """Random token ids, no padding; the second half of every sequence is the response (the
    actions), steps every STEP_TOKENS response tokens, rewards 0/1 alternating."""
    B, L = batch or shape.batch, seq or shape.seq
    gen = torch.Generator().manual_seed(SEED)
    ids = torch.randint(2, shape.vocab, (B, L), generator=gen)
    prompt = L // 2
    examples = []
    for b in range(B):
        is_action = [i >= prompt for i in range(L)]
        starts = [i >= prompt and (i - prompt) % STEP_TOKENS == 0 for i in range(L)]
        examples.append(Example(ids[b].tolist(), is_action, starts, float(b % 2)))
    return collate_examples(examples, pad_id=1, level=level)


def build_setup(shape: ModelShape, device: torch.device, checkpointing: bool | None = None) -> Setup:
    checkpointing = gradient_checkpointing() if checkpointing is None else checkpointing
    policy, ref, value = _build_models(shape, device, checkpointing)
    config = load_train_config(None, ["policy=unused", "train_file=unused", f"beta={BETA}",
                                      f"kl_coef={KL_COEF}", "kl_estimator=full", "level=token",
                                      "impl=auto"])
    step = OreoStep(config, policy.model, ref.model, value.value_model)
    batch = {k: v.to(device) for k, v in make_batch(shape).items()}
    return Setup(shape, device, step, step.policy, step.reference, step.value, batch,
                 checkpointing)


# ---------------------------------------------------------------- the two steps


def ours_loss(setup: Setup, batch: dict):
    """The trainer's own micro-step (forward and loss), unmodified."""
    num_sequences = batch["input_ids"].shape[0]
    loss, metrics = setup.step(batch, num_sequences)
    return loss, {k: metrics[k] for k in ("loss", "value_loss", "policy_loss")}


def paper_loss(setup: Setup, batch: dict):
    """Two policy forwards with materialised logits, float32 log_softmax, full-vocab KL."""
    model = setup.policy.model
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=batch["position_ids"])
    actions = batch["actions"].unsqueeze(-1)

    logits = model(**inputs).logits[:, :-1]  # [B, T, V] with gradient
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    logp = logp_all.gather(-1, actions).squeeze(-1)
    with torch.no_grad():
        # the second, gradient-free policy forward: log-probs for the value targets
        old_logits = model(**inputs).logits[:, :-1]
        old_logp = torch.log_softmax(old_logits.float(), dim=-1).gather(-1, actions).squeeze(-1)
        del old_logits
        ref_logits = setup.reference.model(**inputs).logits[:, :-1]
        ref_logp_all = torch.log_softmax(ref_logits.float(), dim=-1)
        del ref_logits
        ref_logp = ref_logp_all.gather(-1, actions).squeeze(-1)
    kl = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    values = setup.value(**inputs)
    common = dict(rewards=batch["rewards"], action_mask=batch["action_mask"],
                  state_mask=batch["state_mask"], beta=BETA, kl_coef=KL_COEF,
                  kl_estimator="full", num_sequences=batch["input_ids"].shape[0])
    # value loss: targets from the second forward (A detached inside); policy loss: V detached
    value_loss = reference.bellman_losses(old_logp, ref_logp, kl.detach(), values,
                                          **common).value_loss
    policy_loss = reference.bellman_losses(logp, ref_logp, kl, values.detach(),
                                           **common).policy_loss
    loss = value_loss + policy_loss
    return loss, {"loss": loss.detach(), "value_loss": value_loss.detach(),
                  "policy_loss": policy_loss.detach()}


LOSSES = {"ours": ours_loss, "paper": paper_loss}


def make_step(provider: str, setup: Setup, batch: dict | None = None):
    """One forward + backward; returns the detached loss parts."""
    loss_fn, batch = LOSSES[provider], setup.batch if batch is None else batch

    def step():
        loss, parts = loss_fn(setup, batch)
        loss.backward()
        synchronize(setup.device)
        return parts

    return step


# ---------------------------------------------------------------- correctness check


def check_batch(setup: Setup) -> dict:
    """A slice of the batch both steps can run (at most 2 x 512 tokens): the check is about
    the computation, not the size."""
    B, L = min(setup.shape.batch, 2), min(setup.shape.seq, 512)
    return {k: v.to(setup.device) for k, v in make_batch(setup.shape, B, L).items()}


def _grads(setup: Setup) -> dict:
    named = {f"policy.{n}": p for n, p in setup.policy.named_parameters()}
    named.update({f"value.{n}": p for n, p in setup.value.named_parameters()})
    return {n: p.grad.detach().float().clone() for n, p in named.items() if p.grad is not None}


def run_for_check(provider: str, setup: Setup, batch: dict) -> tuple[dict, dict]:
    setup.zero_grad()
    parts = make_step(provider, setup, batch)()
    grads = _grads(setup)
    setup.zero_grad()
    return {k: float(v) for k, v in parts.items()}, grads


def compare(expected: tuple[dict, dict], got: tuple[dict, dict], dtype: torch.dtype) -> dict:
    """Loss parts within tolerance, and every gradient close (float32) or aligned (bf16).
    Raises AssertionError with the worst offender; returns a summary for the JSON."""
    (e_parts, e_grads), (g_parts, g_grads) = expected, got
    fp32 = dtype == torch.float32
    rtol = 1e-4 if fp32 else 3e-2
    for key, value in e_parts.items():
        diff = abs(g_parts[key] - value)
        assert diff <= rtol * abs(value) + 1e-6, f"{key}: {g_parts[key]} vs {value}"
    assert set(e_grads) == set(g_grads), sorted(set(e_grads) ^ set(g_grads))
    worst_rel, worst_name, min_cos = 0.0, None, 1.0
    for name, e in e_grads.items():
        g = g_grads[name]
        scale = e.norm().item()
        rel = (g - e).norm().item() / max(scale, 1e-12)
        cos = torch.nn.functional.cosine_similarity(g.flatten(), e.flatten(), dim=0).item() \
            if scale > 0 else 1.0
        if rel > worst_rel:
            worst_rel, worst_name = rel, name
        min_cos = min(min_cos, cos)
    # all gradients as one vector: in bfloat16 single small tensors (biases) are noise-level
    total_rel = (sum((g_grads[n] - e).square().sum() for n, e in e_grads.items()).sqrt()
                 / sum(e.square().sum() for e in e_grads.values()).sqrt().clamp(min=1e-30)).item()
    limit = 1e-3 if fp32 else 5e-2
    if fp32:
        assert worst_rel <= limit, f"gradient {worst_name}: relative L2 error {worst_rel:.2e} > {limit}"
    else:
        assert total_rel <= limit, f"gradients: relative L2 error {total_rel:.2e} > {limit}"
    return {"all_grads_relative_l2_error": total_rel,"loss_parts_ours": g_parts, "loss_parts_paper": e_parts,
            "max_grad_relative_l2_error": worst_rel, "worst_grad": worst_name,
            "min_grad_cosine": min_cos, "grad_tensors_compared": len(e_grads),
            "tolerance": {"loss_rtol": rtol,
                          ("grad_relative_l2_per_tensor" if fp32 else "grad_relative_l2_all"): limit}}


# ---------------------------------------------------------------- results


def model_parameters(setup: Setup) -> dict:
    def count(module):
        return sum(p.numel() for p in module.parameters())
    return {"policy": count(setup.policy), "reference": count(setup.reference),
            "value": count(setup.value)}


def _ratios(results: dict):
    ours, paper = results.get("ours", {}), results.get("paper", {})
    out = {}
    if ours.get("status") == "ok" and paper.get("status") == "ok":
        if ours.get("tokens_per_s") and paper.get("tokens_per_s"):
            out["tokens_per_s_ours_over_paper"] = ours["tokens_per_s"] / paper["tokens_per_s"]
        if ours.get("tokens_per_cpu_s") and paper.get("tokens_per_cpu_s"):
            out["tokens_per_cpu_s_ours_over_paper"] = (ours["tokens_per_cpu_s"]
                                                       / paper["tokens_per_cpu_s"])
        for key in ("peak_mib", "extra_peak_mib"):
            if ours.get(key) and paper.get(key):
                out[f"{key}_ours_over_paper"] = ours[key] / paper[key]
    return out


def _goals(results: dict, ratios: dict, device: torch.device) -> dict:
    if device.type != "cuda":
        return {"note": "the issue's goals are for the GPU shape; on CPU the run only reports"}
    paper_status = results.get("paper", {}).get("status")
    speed = ratios.get("tokens_per_s_ours_over_paper")
    memory = ratios.get("peak_mib_ours_over_paper")
    goals = {
        "gpu_tokens_per_s_at_least_2x_paper": None if speed is None else speed >= 2.0,
        "gpu_peak_memory_at_most_half_of_paper": None if memory is None else memory <= 0.5,
    }
    if paper_status == "oom" and results.get("ours", {}).get("status") == "ok":
        goals["note"] = "the paper-equivalent step ran out of memory at this batch; ours did not"
    return goals


def build_report(results: dict, device: torch.device, shape_name: str, shape: ModelShape,
                 setup_info: dict) -> dict:
    results = {name: dict(entry) for name, entry in results.items()}
    ratios = _ratios(results)
    return {
        "benchmark": "oreo_fast trainer step: OREO loss forward + backward of policy and value, "
                     "ours (Trainer._micro_step) vs a paper-equivalent step",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": ops_report.environment(device),
        "shape_name": shape_name,
        "model": {"architecture": "Qwen2ForCausalLM (random weights)",
                  "hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
                  "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
                  "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab,
                  "tie_word_embeddings": shape.tie_word_embeddings,
                  "attn_implementation": attn_implementation(), **setup_info},
        "batch": {"sequences": shape.batch, "seq_len": shape.seq, "tokens": shape.tokens,
                  "action_tokens_per_sequence": shape.seq - shape.seq // 2,
                  "padding": "none", "level": "token", "kl_estimator": "full",
                  "beta": BETA, "kl_coef": KL_COEF},
        "dtype": shape.dtype,
        "step": "one micro-step: forwards, OREO loss, one backward into policy and value; "
                "no optimizer step (identical for both)",
        "timing": {"what": "median of pytest-benchmark rounds of one step, ms; tokens/s = "
                           "tokens in the batch / median step time. CPU also: the median "
                           "process CPU time of the same rounds (cpu_time_median_ms, "
                           "tokens_per_cpu_s), less sensitive to other load on a shared CPU",
                   "rounds": rounds(device), "warmup_rounds": warmup_rounds(device)},
        "memory": {"what": "peak_mib: peak during one step (weights, batch and gradients "
                           "included), in a fresh subprocess after a warm-up step; "
                           "extra_peak_mib: that peak minus what was in use just before the "
                           "step. CUDA: torch.cuda.max_memory_allocated; CPU: VmHWM after a "
                           "clear_refs reset (see benchmarks/train_step_runner.py)"},
        "providers": results,
        "ratios": ratios,
        "goal": _goals(results, ratios, device),
    }


def write_report(built: dict, directory: Path = ops_report.RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    env = built["environment"]
    kind = "cuda" if env["device"].startswith("cuda") else f"cpu{env['torch_threads']}t"
    shape = ModelShape(**{k: v for k, v in _shape_fields(built).items()})
    path = directory / f"train_step_{kind}_{shape.slug}_{built['date'][:10]}.json"
    path.write_text(json.dumps(built, indent=2) + "\n")
    return path


def _shape_fields(built: dict) -> dict:
    m, b = built["model"], built["batch"]
    return dict(hidden=m["hidden_size"], intermediate=m["intermediate_size"],
                layers=m["num_hidden_layers"], heads=m["num_attention_heads"],
                kv_heads=m["num_key_value_heads"], vocab=m["vocab_size"], batch=b["sequences"],
                seq=b["seq_len"], dtype=built["dtype"],
                tie_word_embeddings=m["tie_word_embeddings"])


def format_table(built: dict) -> str:
    env, m, b = built["environment"], built["model"], built["batch"]
    lines = [
        f"{env['device_name']} ({env['device']}, {env['torch_threads']} threads): Qwen2 "
        f"h{m['hidden_size']} x {m['num_hidden_layers']} layers, V={m['vocab_size']}, "
        f"{b['sequences']} x {b['seq_len']} tokens, {built['dtype']}"
        + (", gradient checkpointing" if m.get("gradient_checkpointing") else ""),
        "| provider | step ms (median) | tokens/s | CPU-time ms | tokens/CPU-s | peak MiB "
        "| extra peak MiB | status |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, entry in built["providers"].items():
        def num(key, fmt):
            return ops_report.table_cell(entry, key, fmt)

        lines.append(f"| {name} | {num('median_ms', '.0f')} | {num('tokens_per_s', '.0f')} | "
                     f"{num('cpu_time_median_ms', '.0f')} | {num('tokens_per_cpu_s', '.0f')} | "
                     f"{num('peak_mib', '.0f')} | {num('extra_peak_mib', '.0f')} | "
                     f"{ops_report.status_cell(entry)} |")
    for key, value in built.get("ratios", {}).items():
        lines.append(f"{key}: {value:.3f}")
    for key, value in built.get("goal", {}).items():
        text = value if isinstance(value, str) else ("met" if value else "NOT met"
                                                      if value is False else "n/a")
        lines.append(f"goal {key}: {text}")
    return "\n".join(lines)
