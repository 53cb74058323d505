"""The public OREO losses: per-token ops from ``oreo_fast.ops.logits`` / ``.fused_linear``, Bellman assembly from
``oreo_fast.ops.reference`` (tensor conventions: see that module's docstring).

``oreo_loss`` takes [B, T, V] logits; ``oreo_loss_fused_linear`` takes final-norm hidden states
and LM-head weights and never materialises more than one chunk of logits.
"""
from __future__ import annotations

import torch

from oreo_fast.ops import reference
from oreo_fast.ops.fused_linear import two_pass_loss
from oreo_fast.ops.grad_in_forward import oreo_loss_fused_linear_gif, oreo_loss_gif
from oreo_fast.ops.logits import token_logprobs_kl_unchecked
from oreo_fast.ops.reference import LEVELS, OreoLossOutput, compute_dtype
from oreo_fast.ops.validation import (first_action_mask, validate_bellman_inputs,
                                      validate_fused_inputs, validate_logits_inputs)


def state_mask_for_level(action_mask: torch.Tensor, level: str, step_start: torch.Tensor | None = None):
    """The state mask of a level: every action (token), the first action of each step (step;
    ``step_start[b, t]`` true iff a_t begins a step), or the first action only (response)."""
    m = action_mask.bool()
    if level == "token":
        return m.clone()
    if level == "step":
        if step_start is None:
            raise ValueError("level='step' needs step_start")
        return m & step_start.bool()
    if level == "response":
        return first_action_mask(m)
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def oreo_loss(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    kl_coef: float = 0.01,
    level: str = "token",
    kl_estimator: str = "full",
    impl: str = "auto",
    num_sequences: int | None = None,
    grad_in_forward: bool = True,
    inplace: bool = False,
) -> OreoLossOutput:
    """OREO value and policy losses from policy and reference logits [B, T, V].

    Returns an ``OreoLossOutput`` whose ``.loss`` (value + policy) is ready for backward.
    ``num_sequences`` overrides the batch-mean denominator (the global batch size when a
    batch is split across micro-batches or ranks). By default the gradient is computed in the
    forward (``ops.grad_in_forward``: one backward per forward, which only scales it); with
    ``inplace`` it is written into ``logits`` itself, destroying them. ``grad_in_forward=False``
    (or ``impl="reference"``) runs the per-token op and the Bellman assembly instead, whose
    graph can be reused.
    """
    if grad_in_forward and impl != "reference":
        return oreo_loss_gif(logits, ref_logits, actions, values, rewards, action_mask,
                             state_mask, beta=beta, kl_coef=kl_coef, level=level,
                             kl_estimator=kl_estimator, num_sequences=num_sequences, impl=impl,
                             inplace=inplace)
    actions, mask = validate_logits_inputs(logits, ref_logits, actions, action_mask)
    S = validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                                kl_estimator)
    logp, ref_logp, kl = token_logprobs_kl_unchecked(
        logits, ref_logits, actions, mask, compute_kl=kl_estimator == "full", impl=impl
    )
    return reference.bellman_losses(
        logp, ref_logp, kl, values, rewards, mask, S, beta=beta, kl_coef=kl_coef,
        kl_estimator=kl_estimator, num_sequences=num_sequences,
    )


def oreo_loss_fused_linear(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    actions: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    kl_coef: float = 0.01,
    level: str = "token",
    kl_estimator: str = "full",
    impl: str = "auto",
    num_sequences: int | None = None,
    chunk_rows: int | None = None,
    grad_in_forward: bool = True,
) -> OreoLossOutput:
    """OREO losses from final-norm hidden states [B, T, H] and LM-head weights [V, H] of the
    policy and the reference; logits exist one chunk of ``chunk_rows`` tokens at a time
    (default: a memory budget).

    By default the gradient is computed in the forward, walking each sequence backwards
    (``ops.grad_in_forward``: 4 [rows x V x H] matmuls per step, one backward per forward).
    ``grad_in_forward=False`` (or ``impl="reference"``) runs the two-pass path: the per-token
    op, whose backward recomputes the logits (6 matmuls), and the Bellman assembly.
    """
    if grad_in_forward and impl != "reference":
        budget = None if chunk_rows is None else \
            chunk_rows * weight.shape[0] * compute_dtype(hidden.dtype).itemsize
        return oreo_loss_fused_linear_gif(
            hidden, weight, ref_hidden, ref_weight, actions, values, rewards, action_mask,
            state_mask, beta=beta, kl_coef=kl_coef, level=level, kl_estimator=kl_estimator,
            num_sequences=num_sequences, chunk_budget_bytes=budget, impl=impl)
    actions, mask = validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions,
                                          action_mask)
    S = validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                                kl_estimator)
    return two_pass_loss(hidden, weight, ref_hidden, ref_weight, actions, mask, values, rewards,
                         S, beta=beta, kl_coef=kl_coef, kl_estimator=kl_estimator, impl=impl,
                         num_sequences=num_sequences, chunk_rows=chunk_rows)
