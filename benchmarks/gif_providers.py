"""Providers of the grad-in-forward benchmark (benchmarks/test_grad_in_forward.py): the whole
OREO loss (token level, full-vocabulary KL, every token an action and a state, values with
gradient), forward + ``out.loss.backward()``, from hidden states and LM heads.

| provider | what |
|---|---|
| `paper` | logits materialised (policy with grad, reference without), then
  `oreo_fast.reference.oreo_loss_reference` (float32 log-softmaxes, gather, full KL) |
| `paper_compiled` | the same function under `torch.compile` |
| `two_pass` | today's fused path, `oreo_fast.oreo_loss_fused_linear` (6 matmuls) |
| `gif` | `oreo_fast.grad_in_forward.oreo_loss_fused_linear_gif` (4 matmuls) |
| `floor` | the gif path's own four matmuls alone, same chunks: policy and reference logits,
  hidden-row gradient and float32 weight-gradient accumulation |

    python -m benchmarks.gif_providers --provider gif --shape cpu --time-rounds 2   # by hand
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch

import oreo_fast

from oreo_fast.ops import chunk_plan, fused_linear, grad_in_forward, reference
from benchmarks.memory import peak_memory
from benchmarks.providers import configure_threads

SEED = 4321
BETA, KL_COEF = 0.03, 0.01


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    seq: int
    vocab: int
    hidden: int

    @property
    def slug(self) -> str:
        return f"n{self.batch * self.seq}-v{self.vocab}-h{self.hidden}-fp32"


SHAPES = {
    "cpu": Shape(batch=2, seq=2048, vocab=32000, hidden=256),  # the op benchmark's CPU shape
    "qwen": Shape(batch=1, seq=2048, vocab=151936, hidden=1536),  # Qwen2.5-1.5B's LM head
    "small": Shape(batch=2, seq=256, vocab=4000, hidden=64),
    "gpu": Shape(batch=4, seq=2048, vocab=151936, hidden=1536),  # issue 15's GPU shape (bf16)
}


def make_inputs(shape: Shape, device="cpu", dtype: torch.dtype = torch.float32) -> dict:
    """Deterministic inputs (drawn on the CPU in float32, then moved): hidden states and LM
    heads of policy and reference in ``dtype``, values, rewards and all-ones masks."""
    g = torch.Generator().manual_seed(SEED)
    B, T, V, H = shape.batch, shape.seq, shape.vocab, shape.hidden
    hidden = torch.randn(B, T, H, generator=g)
    weight = torch.randn(V, H, generator=g) * (2.0 / H**0.5)
    mask = torch.ones(B, T, dtype=torch.bool)
    x = {
        "hidden": hidden, "weight": weight,
        "ref_hidden": hidden + 0.1 * torch.randn(B, T, H, generator=g),
        "ref_weight": weight + torch.randn(V, H, generator=g) * (0.2 / H**0.5),
        "actions": torch.randint(0, V, (B, T), generator=g),
        "values": 0.3 * torch.randn(B, T, generator=g),
        "rewards": (torch.rand(B, generator=g) < 0.5).float(),
        "action_mask": mask, "state_mask": mask.clone(),
    }
    floats = ("hidden", "weight", "ref_hidden", "ref_weight")
    x = {k: v.to(device=device, dtype=dtype if k in floats else v.dtype) for k, v in x.items()}
    for t in trainable(x):
        t.requires_grad_()
    return x


def trainable(x: dict):
    return [x["hidden"], x["weight"], x["values"]]


def clear_grads(x: dict):
    for t in trainable(x):
        t.grad = None


def _paper_loss(hidden, weight, ref_hidden, ref_weight, actions, values, rewards, action_mask,
                state_mask):
    logits = hidden @ weight.t()
    ref_logits = ref_hidden @ ref_weight.t()
    return reference.oreo_loss_reference(logits, ref_logits, actions, values, rewards,
                                         action_mask, state_mask, beta=BETA, kl_coef=KL_COEF)


_ARGS = ("hidden", "weight", "ref_hidden", "ref_weight", "actions", "values", "rewards",
         "action_mask", "state_mask")


def _step_of(loss_fn):
    def make(x, budget=None):
        args = [x[k] for k in _ARGS]

        def step():
            out = loss_fn(*args)
            out.loss.backward()
            return out

        return step

    return make


def make_gif(x, budget=None):
    args = [x[k] for k in _ARGS]

    def step():
        out = grad_in_forward.oreo_loss_fused_linear_gif(
            *args, beta=BETA, kl_coef=KL_COEF, chunk_budget_bytes=budget)
        out.loss.backward()
        return out

    return step


def make_floor(x, budget=None):
    """The four matmuls of the gif path on its own chunks (rows in the same walk order)."""
    hidden, weight = x["hidden"], x["weight"]
    rows = chunk_plan.budget_rows(budget, weight.shape[0], hidden.dtype, hidden.device)

    def step():
        B, T, _ = hidden.shape
        b_idx, t_idx = x["action_mask"].nonzero(as_tuple=True)
        grad_hidden = torch.zeros_like(hidden)
        grad_weight = torch.zeros_like(weight)
        with torch.no_grad():
            for start in range(0, b_idx.numel(), rows):
                b, t = b_idx[start:start + rows], t_idx[start:start + rows]
                h = hidden[b, t]
                z = h @ weight.t()
                r = x["ref_hidden"][b, t] @ x["ref_weight"].t()
                del r
                grad_hidden[b, t] = z @ weight
                fused_linear.accumulate_weight_grad(grad_weight, z, h)
        hidden.grad, weight.grad = grad_hidden, grad_weight
        return None

    return step


PROVIDERS = {
    "paper": _step_of(_paper_loss),
    "paper_compiled": _step_of(torch.compile(_paper_loss)),
    "two_pass": _step_of(lambda *a: oreo_fast.oreo_loss_fused_linear(
        *a, beta=BETA, kl_coef=KL_COEF, grad_in_forward=False)),
    "gif": make_gif,
    "floor": make_floor,
}
CHECKED = ("paper_compiled", "two_pass", "gif")  # against paper; floor computes no loss


def results(x: dict, step) -> tuple:
    clear_grads(x)
    out = step()
    fields = torch.stack([f.detach().float() for f in out])
    grads = [t.grad.clone() for t in trainable(x)]
    clear_grads(x)
    return fields, grads


def check(name: str, got: tuple, expected: tuple, rtol: float = 1e-4, atol: float = 1e-6,
          grad_rel: float = 1e-3):
    """Outputs within ``rtol``/``atol``, gradients within ``grad_rel`` relative L2 (the
    defaults are float32's)."""
    f, g = got
    f0, g0 = expected
    assert torch.allclose(f, f0, rtol=rtol, atol=atol), f"{name}: outputs {f} vs {f0}"
    for i, (a, b) in enumerate(zip(g, g0)):
        rel = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert rel <= grad_rel, f"{name}: gradient {i} relative error {rel:.3g}"


def measure_memory(provider: str, shape_name: str, budget=None) -> dict:
    """Extra peak of one step in this (fresh) process, after a warm-up step."""
    if provider != "paper_compiled":  # eager: warm up (libraries, thread pools) on small
        small = make_inputs(SHAPES["small"])
        PROVIDERS[provider](small, budget)()
        del small
    x = make_inputs(SHAPES[shape_name])
    step = PROVIDERS[provider](x, budget)
    if provider == "paper_compiled":  # compilation is per shape and not counted
        step()
        clear_grads(x)
    gc.collect()
    _, memory = peak_memory(step, torch.device("cpu"))
    return memory


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, choices=sorted(PROVIDERS))
    parser.add_argument("--shape", default="cpu", choices=sorted(SHAPES))
    parser.add_argument("--budget", type=int, default=None)
    parser.add_argument("--time-rounds", type=int, default=0)
    args = parser.parse_args(argv)
    configure_threads()
    result = {"provider": args.provider, "shape": args.shape}
    try:
        result.update(status="ok", memory=measure_memory(args.provider, args.shape, args.budget))
        if args.time_rounds:
            x = make_inputs(SHAPES[args.shape])
            step = PROVIDERS[args.provider](x, args.budget)
            times = []
            for _ in range(args.time_rounds):
                clear_grads(x)
                start = time.perf_counter()
                step()
                times.append((time.perf_counter() - start) * 1e3)
            result["median_ms"] = statistics.median(times)
    except Exception as error:  # reported to the parent
        result.update(status="failed", reason=f"{type(error).__name__}: {error}"[:2000])
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
