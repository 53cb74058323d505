"""The hidden-level op (fused LM head): (logp, ref_logp, kl) per token from final-norm hidden
states and LM-head weights, never more than ``chunk_rows`` tokens' logits at a time.

Same outputs and conventions as ``oreo_fast.ops.logits``. The backward recomputes the chunk
logits (six matmuls in all: two forward, two recomputed, two for the gradients).
"""
from __future__ import annotations

import torch

from oreo_fast.ops import reference
from oreo_fast.ops.dispatch import resolve_impl
from oreo_fast.ops.logits import (active_rows, default_chunk_rows, mark_outputs,
                                  rows_backward_torch, rows_forward_torch,
                                  token_logprobs_kl_unchecked, upstream_grads)
from oreo_fast.ops.validation import validate_fused_inputs


def _chunk_rows_forward(impl, z, r, actions, compute_kl, block_v):
    if impl == "triton":
        from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_forward

        ones = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
        out = logprobs_kl_forward(z[None], r[None], actions[None], ones, compute_kl, block_v)
        return tuple(x[0] for x in out)
    return rows_forward_torch(z, r, actions, compute_kl)


def _chunk_rows_backward(impl, z, r, actions, lse, ref_lse, kl, g_logp, g_kl, block_v):
    """Gradient of the chunk logits, in z's dtype (triton writes it into z itself)."""
    if impl == "triton":
        from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_backward

        ones = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
        return logprobs_kl_backward(
            z[None], r[None], actions[None], ones, lse[None], ref_lse[None], kl[None],
            g_logp[None], None if g_kl is None else g_kl[None], out=z[None], block_v=block_v,
        )[0]
    return rows_backward_torch(z, r, actions, lse, ref_lse, kl, g_logp, g_kl).to(z.dtype)


def accumulate_weight_grad(acc: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor,
                           vocab_slice: int = 16384):
    """acc += grad_z.T @ h. A float32 accumulator of half-precision products goes through
    vocabulary slices, so the temporary is vocab_slice x H rather than a whole V x H."""
    if acc.dtype == grad_z.dtype:
        acc.addmm_(grad_z.t(), h)
        return
    for start in range(0, acc.shape[0], vocab_slice):
        stop = start + vocab_slice
        acc[start:stop] += (grad_z[:, start:stop].t() @ h).to(acc.dtype)


class _HiddenLevel(torch.autograd.Function):
    """Chunks over the masked-in tokens; only chunk_rows x V logits exist at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, actions, mask, compute_kl, impl,
                chunk_rows, block_v):
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        B, T, _ = hidden.shape
        dtype = reference.compute_dtype(hidden.dtype)
        outputs = [torch.zeros(B, T, dtype=dtype, device=hidden.device) for _ in range(5)]
        b_idx, t_idx = active_rows(mask)
        for start in range(0, b_idx.numel(), chunk_rows):
            b, t = b_idx[start:start + chunk_rows], t_idx[start:start + chunk_rows]
            z = hidden[b, t] @ weight.t()
            r = ref_hidden[b, t] @ ref_weight.t()
            results = _chunk_rows_forward(impl, z, r, actions[b, t], compute_kl, block_v)
            for out, value in zip(outputs, results):
                out[b, t] = value
        logp, ref_logp, lse, ref_lse, kl = outputs
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, actions, lse, ref_lse, kl,
                              b_idx, t_idx)
        ctx.impl, ctx.chunk_rows, ctx.block_v = impl, chunk_rows, block_v
        return mark_outputs(ctx, compute_kl, logp, ref_logp, kl)

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        (hidden, weight, ref_hidden, ref_weight, actions, lse, ref_lse, kl,
         b_idx, t_idx) = ctx.saved_tensors
        grad_logp, grad_kl = upstream_grads(grad_logp, grad_kl, ctx.compute_kl, lse)
        grad_hidden = torch.zeros_like(hidden)
        # the weight gradient accumulates in float32 (float64 stays float64) across chunks;
        # none for a frozen LM head (LoRA)
        grad_weight = None
        if ctx.needs_input_grad[1]:
            acc_dtype = reference.compute_dtype(weight.dtype)
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, b_idx.numel(), ctx.chunk_rows):
            b, t = b_idx[start:start + ctx.chunk_rows], t_idx[start:start + ctx.chunk_rows]
            h = hidden[b, t]
            z = h @ weight.t()
            g_kl = None if grad_kl is None else grad_kl[b, t]
            # the reference logits are needed only for the KL gradient
            r = z if g_kl is None else ref_hidden[b, t] @ ref_weight.t()
            grad_z = _chunk_rows_backward(
                ctx.impl, z, r, actions[b, t], lse[b, t], ref_lse[b, t], kl[b, t],
                grad_logp[b, t], g_kl, ctx.block_v,
            )
            grad_hidden[b, t] = grad_z @ weight
            if grad_weight is not None:
                accumulate_weight_grad(grad_weight, grad_z, h)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None, None, None, None, None, None, None, None)


def fused_linear_token_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    compute_kl: bool = True,
    impl: str = "auto",
    chunk_rows: int | None = None,
    block_v: int | None = None,
):
    """(logp, ref_logp, kl) per token from final-norm hidden states and LM-head weights.

    hidden [B, T, H] and weight [V, H] are the policy's; ref_hidden [B, T, H_ref] and
    ref_weight [V, H_ref] the reference's (no gradient). Differentiable w.r.t. hidden, weight.
    ``chunk_rows`` tokens' logits exist at a time (default: about 256 MiB of them on GPU).
    """
    actions, mask = validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions,
                                          action_mask)
    return fused_linear_token_logprobs_kl_unchecked(hidden, weight, ref_hidden, ref_weight,
                                                    actions, mask, compute_kl, impl,
                                                    chunk_rows, block_v)


def fused_linear_token_logprobs_kl_unchecked(hidden, weight, ref_hidden, ref_weight, actions,
                                             mask, compute_kl=True, impl="auto",
                                             chunk_rows=None, block_v=None):
    """``fused_linear_token_logprobs_kl`` for inputs already validated (actions int64, mask
    bool): what the losses and the trainer call after their own checks."""
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        logits = hidden @ weight.t()
        ref_logits = (ref_hidden @ ref_weight.t()).detach()
        return token_logprobs_kl_unchecked(logits, ref_logits, actions, mask, compute_kl, "reference")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    return _HiddenLevel.apply(
        hidden, weight, ref_hidden, ref_weight, actions, mask, compute_kl, impl, chunk_rows, block_v
    )


def two_pass_loss(hidden, weight, ref_hidden, ref_weight, actions, mask, values, rewards,
                  state_mask, *, beta, kl_coef, kl_estimator, impl, num_sequences, chunk_rows):
    """The OREO losses through the per-token op above (logits recomputed in its backward) and
    the Bellman assembly of the reference, for validated inputs: the loss when the gradient
    cannot be computed in the forward (a response longer than a chunk, impl "reference")."""
    logp, ref_logp, kl = fused_linear_token_logprobs_kl_unchecked(
        hidden, weight, ref_hidden, ref_weight, actions, mask,
        compute_kl=kl_estimator == "full", impl=impl, chunk_rows=chunk_rows,
    )
    return reference.bellman_losses(
        logp, ref_logp, kl, values, rewards, mask, state_mask, beta=beta, kl_coef=kl_coef,
        kl_estimator=kl_estimator, num_sequences=num_sequences,
    )
