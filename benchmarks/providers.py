"""Shapes, inputs and the competing implementations ("providers") of the op benchmarks.

Every provider computes the same thing from the same inputs: per-token policy log-prob,
reference log-prob and full-vocabulary KL(pi || pi_ref) for all N = B * T tokens (all
masked in), then the scalar

    loss = sum_t A_t * g1_t + sum_t KL_t * g2,   A_t = sum_{i >= t} (logp_i - ref_logp_i)

(the recipe's reverse cumsum of the log-ratios, with fixed weights g1 standing in for the
Bellman residual gradients) and ``loss.backward()``. The KL weight g2 is one constant, as in
OREO, where the KL term is kl_coef times a per-sequence mean; that is also what lets Liger's
mean-reduced fused JSD compute exactly the same loss.

Two groups, by what the inputs are:
- "hidden": policy hidden [B, T, H] and LM head [V, H] (both require grad) plus the
  reference's (no grad). (a) paper, (b) paper_compiled, (c) liger / liger_torch, (e) ours_fused.
- "logits": policy logits [B, T, V] (requires grad) and reference logits.
  (a) paper_logits, (b) paper_logits_compiled, (d) ours_logits.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import torch
import torch.nn.functional as F

from oreo_fast import ops
from oreo_fast.ops import reference

KL_WEIGHT = 0.05  # g2: any constant works; small like a real kl_coef / tokens-per-sequence
SEED = 1234


# ---------------------------------------------------------------- shapes and device


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    vocab: int
    hidden: int
    dtype: str

    @property
    def tokens(self) -> int:
        return self.batch * self.seq

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def slug(self) -> str:
        short = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}.get(self.dtype, self.dtype)
        return f"n{self.tokens}-v{self.vocab}-h{self.hidden}-{short}"


SHAPES = {
    # the CPU target shape of the issue: N = 4096, V = 32,000, H = 256, float32
    "cpu": Shape(batch=2, seq=2048, vocab=32000, hidden=256, dtype="float32"),
    # a quick smoke run (a few seconds per provider)
    "small": Shape(batch=2, seq=512, vocab=8000, hidden=128, dtype="float32"),
    # the GPU shape of the issue: N = 8192, V = 151,936 (Qwen2.5), H = 1536, bf16
    "gpu": Shape(batch=4, seq=2048, vocab=151936, hidden=1536, dtype="bfloat16"),
}


def bench_device() -> torch.device:
    """OREO_BENCH_DEVICE, else CUDA when present, else CPU."""
    name = os.environ.get("OREO_BENCH_DEVICE")
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def configure_threads() -> int:
    """OREO_BENCH_THREADS, else torch's default. On a CPU shared with other busy processes one
    thread avoids the thread pool waiting for a descheduled core, which adds milliseconds to
    every parallel op and so penalises chunked implementations (many small ops) the most."""
    threads = os.environ.get("OREO_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def bench_shape_name(device: torch.device) -> str:
    """OREO_BENCH_SHAPE, else the issue's shape for the device kind."""
    name = os.environ.get("OREO_BENCH_SHAPE") or ("gpu" if device.type == "cuda" else "cpu")
    if name not in SHAPES:
        raise ValueError(f"OREO_BENCH_SHAPE must be one of {sorted(SHAPES)}, got {name!r}")
    return name


def warmup_rounds(device: torch.device) -> int:
    """Untimed rounds before the timed ones, beyond the checked first step (a CPU step at the
    target shape takes seconds and is warm after one run)."""
    return 3 if device.type == "cuda" else 0


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------- inputs


def make_inputs(shape: Shape, device: torch.device, level: str) -> dict:
    """Deterministic inputs of one group. Logits have a realistic spread (std about 2) and the
    reference is a perturbed copy of the policy, so the KL is small but not zero."""
    gen = torch.Generator(device="cpu").manual_seed(SEED)
    B, T, V, H = shape.batch, shape.seq, shape.vocab, shape.hidden
    dtype = shape.torch_dtype

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dtype)

    hidden = randn(B, T, H)
    weight = randn(V, H, scale=2.0 / H**0.5)
    ref_hidden = hidden + randn(B, T, H, scale=0.1)
    ref_weight = weight + randn(V, H, scale=0.2 / H**0.5)
    common = {
        "actions": torch.randint(0, V, (B, T), generator=gen).to(device),
        "mask": torch.ones(B, T, dtype=torch.bool, device=device),
        "logp_weight": torch.randn(B, T, generator=gen).to(device),
        "kl_weight": torch.full((B, T), KL_WEIGHT, device=device),
    }
    if level == "hidden":
        return {
            "hidden": hidden.requires_grad_(), "weight": weight.requires_grad_(),
            "ref_hidden": ref_hidden, "ref_weight": ref_weight, **common,
        }
    if level == "logits":
        with torch.no_grad():
            logits = hidden @ weight.t()
            ref_logits = ref_hidden @ ref_weight.t()
        del hidden, weight, ref_hidden, ref_weight
        return {"logits": logits.requires_grad_(), "ref_logits": ref_logits, **common}
    raise ValueError(f"level must be 'hidden' or 'logits', got {level!r}")


def trainable(inputs: dict) -> list[torch.Tensor]:
    return [x for x in inputs.values() if isinstance(x, torch.Tensor) and x.requires_grad]


def clear_grads(inputs: dict):
    for x in trainable(inputs):
        x.grad = None


def input_bytes(inputs: dict) -> int:
    return sum(x.numel() * x.element_size() for x in inputs.values() if isinstance(x, torch.Tensor))


# ---------------------------------------------------------------- the shared scalar loss


def oreo_like_loss(logp, ref_logp, kl, mask, logp_weight, kl_weight):
    """The recipe's masked log-ratios, reverse cumsum and weighted sums (see module doc).
    ``kl`` may be None for a provider that adds its (already weighted) KL term itself."""
    log_ratio = (logp.float() - ref_logp.float()) * mask
    advantage = log_ratio.flip(-1).cumsum(-1).flip(-1)
    loss = (advantage * logp_weight).sum()
    if kl is not None:
        loss = loss + (kl.float() * mask * kl_weight).sum()
    return loss


# ---------------------------------------------------------------- providers


@dataclasses.dataclass
class StepOutput:
    """What one forward+backward returns, for the correctness check (not timed)."""

    logp: torch.Tensor
    ref_logp: torch.Tensor
    kl: torch.Tensor | None  # per token [B, T]
    kl_mean: torch.Tensor | None = None  # providers that only give the mean over tokens


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    level: str  # "hidden" or "logits"
    label: str  # the letter and a description
    make_step: Callable[[dict, torch.device], Callable[[], StepOutput]]
    unavailable: Callable[[torch.device], str | None] = lambda device: None
    # uses torch.compile: a failure to build/run is recorded, not raised, and its warm-up has to
    # run at the measured shape (a new shape would recompile)
    compiles: bool = False


def _paper_from_logits(logits, ref_logits, actions):
    """The seed recipe: float32 log_softmax of both models, gather, F.kl_div over the vocab."""
    logp_all = torch.log_softmax(logits.float(), dim=-1)
    ref_logp_all = torch.log_softmax(ref_logits.float(), dim=-1)
    index = actions.unsqueeze(-1)
    logp = logp_all.gather(-1, index).squeeze(-1)
    ref_logp = ref_logp_all.gather(-1, index).squeeze(-1)
    # kl_div(input, target, log_target) = exp(target) * (target - input): target = policy gives
    # sum_v p (log p - log q) = KL(pi || pi_ref)
    kl = F.kl_div(ref_logp_all, logp_all, reduction="none", log_target=True).sum(-1)
    return logp, ref_logp, kl


def _paper_hidden_loss(hidden, weight, ref_hidden, ref_weight, actions, mask, logp_weight,
                       kl_weight):
    logits = hidden @ weight.t()
    ref_logits = ref_hidden @ ref_weight.t()
    logp, ref_logp, kl = _paper_from_logits(logits, ref_logits, actions)
    loss = oreo_like_loss(logp, ref_logp, kl, mask, logp_weight, kl_weight)
    return loss, logp.detach(), ref_logp.detach(), kl.detach()


def _paper_logits_loss(logits, ref_logits, actions, mask, logp_weight, kl_weight):
    logp, ref_logp, kl = _paper_from_logits(logits, ref_logits, actions)
    loss = oreo_like_loss(logp, ref_logp, kl, mask, logp_weight, kl_weight)
    return loss, logp.detach(), ref_logp.detach(), kl.detach()


def _loss_step(loss_fn, arg_names, inputs, device):
    args = [inputs[name] for name in arg_names]

    def step():
        loss, logp, ref_logp, kl = loss_fn(*args)
        loss.backward()
        synchronize(device)
        return StepOutput(logp, ref_logp, kl)

    return step


_HIDDEN_ARGS = ("hidden", "weight", "ref_hidden", "ref_weight", "actions", "mask", "logp_weight",
                "kl_weight")
_LOGITS_ARGS = ("logits", "ref_logits", "actions", "mask", "logp_weight", "kl_weight")


def make_paper(inputs, device):
    return _loss_step(_paper_hidden_loss, _HIDDEN_ARGS, inputs, device)


def make_paper_compiled(inputs, device):
    return _loss_step(torch.compile(_paper_hidden_loss), _HIDDEN_ARGS, inputs, device)


def make_paper_logits(inputs, device):
    return _loss_step(_paper_logits_loss, _LOGITS_ARGS, inputs, device)


def make_paper_logits_compiled(inputs, device):
    return _loss_step(torch.compile(_paper_logits_loss), _LOGITS_ARGS, inputs, device)


def make_ours_logits(inputs, device):
    x = inputs

    def step():
        logp, ref_logp, kl = ops.token_logprobs_kl(x["logits"], x["ref_logits"], x["actions"],
                                                   x["mask"])
        oreo_like_loss(logp, ref_logp, kl, x["mask"], x["logp_weight"], x["kl_weight"]).backward()
        synchronize(device)
        return StepOutput(logp.detach(), ref_logp, kl.detach())

    return step


def make_ours_fused(inputs, device):
    x = inputs

    def step():
        logp, ref_logp, kl = ops.fused_linear_token_logprobs_kl(
            x["hidden"], x["weight"], x["ref_hidden"], x["ref_weight"], x["actions"], x["mask"]
        )
        oreo_like_loss(logp, ref_logp, kl, x["mask"], x["logp_weight"], x["kl_weight"]).backward()
        synchronize(device)
        return StepOutput(logp.detach(), ref_logp, kl.detach())

    return step


def _liger_step(inputs, device, mean_reverse_kl):
    """Liger's nearest composition: per-token log-probs from its fused-linear GRPO path (the
    chunked selective log-prob of LigerFusedLinearPPOBase, pure torch, custom backward), once
    with grad for the policy and once without for the reference, plus a fused-linear JSD with
    beta = 1, which is KL(student || teacher) = KL(pi || pi_ref), mean-reduced over tokens."""
    from liger_kernel.chunked_loss.fused_linear_ppo import LigerFusedLinearPPOBase

    x = inputs
    B, T, H = x["hidden"].shape
    n_tokens = B * T

    def step():
        logp = LigerFusedLinearPPOBase.chunk_forward(x["hidden"], x["weight"], x["actions"])
        with torch.no_grad():
            ref_logp = LigerFusedLinearPPOBase.chunk_forward(x["ref_hidden"], x["ref_weight"],
                                                             x["actions"])
        kl_mean = mean_reverse_kl(x["hidden"].reshape(n_tokens, H), x["weight"],
                                  x["ref_hidden"].reshape(n_tokens, -1), x["ref_weight"],
                                  x["actions"].reshape(n_tokens))
        loss = oreo_like_loss(logp, ref_logp, None, x["mask"], x["logp_weight"], None)
        # all tokens are masked in and g2 is one constant: sum_t KL_t g2 = g2 N mean_t KL_t
        loss = loss + KL_WEIGHT * n_tokens * kl_mean
        loss.backward()
        synchronize(device)
        return StepOutput(logp.detach(), ref_logp, None, kl_mean.detach())

    return step


def make_liger(inputs, device):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    return _liger_step(inputs, device,
                       lambda h, w, rh, rw, labels: jsd(h, w, rh, rw, None))


def make_liger_torch(inputs, device):
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    # its default chunking and compiled chunk accumulation; the hard (CE) loss weighted out
    jsd = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=1.0)
    return _liger_step(inputs, device, jsd)


def _needs_cuda(what: str):
    def unavailable(device):
        if device.type != "cuda":
            return f"{what} runs Triton kernels, CUDA only (no pure-torch path)"
        return None

    return unavailable


def _needs_liger(device):
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed"
    return None


def _liger_unavailable(device):
    return _needs_liger(device) or _needs_cuda("Liger's LigerFusedLinearJSD")(device)


PROVIDERS = {p.name: p for p in (
    Provider("paper", "hidden", "(a) paper recipe, materialised logits, eager", make_paper),
    Provider("paper_compiled", "hidden", "(b) paper recipe under torch.compile",
             make_paper_compiled, compiles=True),
    Provider("liger", "hidden",
             "(c) Liger: fused-linear GRPO per-token log-probs + LigerFusedLinearJSD(jsd_beta=1)",
             make_liger, unavailable=_liger_unavailable),
    Provider("liger_torch", "hidden",
             "(c') Liger, pure torch: fused-linear GRPO per-token log-probs + chunked_loss "
             "LigerFusedLinearJSDLoss(beta=1, compiled)",
             make_liger_torch, unavailable=_needs_liger, compiles=True),
    Provider("ours_fused", "hidden", "(e) oreo_fast fused_linear_token_logprobs_kl, impl=auto",
             make_ours_fused),
    Provider("paper_logits", "logits", "(a) paper recipe from given logits, eager",
             make_paper_logits),
    Provider("paper_logits_compiled", "logits", "(b) paper recipe from given logits, torch.compile",
             make_paper_logits_compiled, compiles=True),
    Provider("ours_logits", "logits", "(d) oreo_fast token_logprobs_kl, impl=auto",
             make_ours_logits),
)}

BASELINE = {"hidden": "paper", "logits": "paper_logits"}


# ---------------------------------------------------------------- correctness


def tolerances(dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return {"logp_atol": 2e-3, "kl_atol": 2e-4, "kl_rtol": 2e-3, "grad_rel": 2e-3}
    # half inputs: providers differ in where the logits are rounded (bf16 matmul output or not)
    return {"logp_atol": 0.1, "kl_atol": 5e-3, "kl_rtol": 5e-2, "grad_rel": 5e-2}


def reference_results(inputs: dict, level: str) -> dict:
    """oreo_fast.ops.reference.token_logprobs_and_kl on the same inputs, and the loss's gradients."""
    x = inputs
    clear_grads(x)
    if level == "hidden":
        logits = x["hidden"] @ x["weight"].t()
        ref_logits = x["ref_hidden"] @ x["ref_weight"].t()
    else:
        logits, ref_logits = x["logits"], x["ref_logits"]
    logp, ref_logp, kl = reference.token_logprobs_and_kl(logits, ref_logits, x["actions"])
    del logits, ref_logits
    oreo_like_loss(logp, ref_logp, kl, x["mask"], x["logp_weight"], x["kl_weight"]).backward()
    out = {"logp": logp.detach(), "ref_logp": ref_logp.detach(), "kl": kl.detach(),
           "grads": [t.grad for t in trainable(x)]}
    clear_grads(x)
    return out


def check_step(name: str, output: StepOutput, grads: list, expected: dict, dtype: torch.dtype):
    """Assert that a provider's values and gradients match the reference."""
    tol = tolerances(dtype)

    def max_err(a, b):
        return float((a.float() - b.float()).abs().max())

    for field in ("logp", "ref_logp"):
        err = max_err(getattr(output, field), expected[field])
        assert err <= tol["logp_atol"], f"{name}: {field} max abs error {err:.3g}"
    if output.kl is not None:
        err = (output.kl.float() - expected["kl"].float()).abs()
        bound = tol["kl_atol"] + tol["kl_rtol"] * expected["kl"].float().abs()
        assert bool((err <= bound).all()), f"{name}: kl max abs error {float(err.max()):.3g}"
    else:
        got, want = float(output.kl_mean), float(expected["kl"].float().mean())
        assert abs(got - want) <= tol["kl_atol"] + tol["kl_rtol"] * abs(want), (
            f"{name}: mean kl {got:.6g} vs reference {want:.6g}"
        )
    for i, (g, g_ref) in enumerate(zip(grads, expected["grads"])):
        assert g is not None, f"{name}: no gradient for trainable input {i}"
        rel = float((g.float() - g_ref.float()).norm() / g_ref.float().norm().clamp_min(1e-30))
        assert rel <= tol["grad_rel"], f"{name}: gradient {i} relative error {rel:.3g}"
