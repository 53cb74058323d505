"""The public OREO losses: per-token ops from ``oreo_fast.ops``, Bellman assembly from
``oreo_fast.reference`` (tensor conventions: see that module's docstring).

``oreo_loss`` takes [B, T, V] logits; ``oreo_loss_fused_linear`` takes final-norm hidden states
and LM-head weights and never materialises more than one chunk of logits.
"""
from __future__ import annotations

import math

import torch

from oreo_fast import ops, reference
from oreo_fast.reference import KL_ESTIMATORS, LEVELS, OreoLossOutput


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
        first = m.to(torch.int8).argmax(1, keepdim=True)
        return torch.zeros_like(m).scatter(1, first, True) & m
    raise ValueError(f"level must be one of {LEVELS}, got {level!r}")


def _validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                             kl_estimator):
    B, T = mask.shape
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    for name, x in (("beta", beta), ("kl_coef", kl_coef)):
        if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    ops._check_float("values", values, 2)
    if tuple(values.shape) != (B, T):
        raise ValueError(f"values must have shape {(B, T)}, got {tuple(values.shape)}")
    ops._check_float("rewards", rewards, 1)
    if tuple(rewards.shape) != (B,):
        raise ValueError(f"rewards must have shape {(B,)}, got {tuple(rewards.shape)}")
    ops._check_index("state_mask", state_mask, (B, T), integer=False)
    m, S = mask, state_mask.bool()
    # one host sync for every content check
    problems = torch.stack([
        (S & ~m).any(),
        (S != m).any() if level == "token" else torch.zeros((), dtype=torch.bool, device=S.device),
        (S != state_mask_for_level(m, "response")).any() if level == "response"
        else torch.zeros((), dtype=torch.bool, device=S.device),
        ~torch.isfinite(rewards).all(),
    ]).tolist()
    messages = (
        "state_mask has a state where action_mask is false (states are a subset of actions)",
        "state_mask must equal action_mask at level='token'",
        "state_mask must hold exactly the first action of each sequence at level='response'",
        "rewards contain NaN or Inf",
    )
    for bad, message in zip(problems, messages):
        if bad:
            raise ValueError(message)
    return S


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
) -> OreoLossOutput:
    """OREO value and policy losses from policy and reference logits [B, T, V].

    Returns an ``OreoLossOutput`` whose ``.loss`` (value + policy) is ready for backward.
    ``num_sequences`` overrides the batch-mean denominator (the global batch size when a
    batch is split across micro-batches or ranks).
    """
    actions, mask = ops.validate_logits_inputs(logits, ref_logits, actions, action_mask)
    S = _validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                                 kl_estimator)
    logp, ref_logp, kl = ops._token_logprobs_kl(
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
) -> OreoLossOutput:
    """OREO losses from final-norm hidden states [B, T, H] and LM-head weights [V, H] of the
    policy and the reference; logits exist one chunk of ``chunk_rows`` tokens at a time."""
    actions, mask = ops.validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions,
                                              action_mask)
    S = _validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                                 kl_estimator)
    logp, ref_logp, kl = ops._fused_linear_token_logprobs_kl(
        hidden, weight, ref_hidden, ref_weight, actions, mask,
        compute_kl=kl_estimator == "full", impl=impl, chunk_rows=chunk_rows,
    )
    return reference.bellman_losses(
        logp, ref_logp, kl, values, rewards, mask, S, beta=beta, kl_coef=kl_coef,
        kl_estimator=kl_estimator, num_sequences=num_sequences,
    )
