"""The OREO losses in plain PyTorch: the readable specification.

Conventions (shared by every module of oreo_fast)
-------------------------------------------------
A batch of B trajectories of L tokens gives per-token tensors of shape [B, T] with T = L - 1
(the usual shift). Index t is the transition from state s_t = ids[:, :t+1] by action
a_t = ids[:, t+1].

- ``actions[b, t]``      int64, a_t.
- ``action_mask[b, t]``  bool, true iff a_t is a trained response token (never prompt,
                          padding or, in multi-turn data, observation tokens).
- ``state_mask[b, t]``   bool, true iff the Bellman residual is enforced at s_t: token level,
                          every action position; step level, the first action of each step;
                          response level, the first action only. Always a subset of action_mask.
- ``values[b, t]``       V(s_t), the value model's output at the last token of s_t.
- ``rewards[b]``         the terminal reward R.
- ``logits[b, t]``       the policy's next-token logits at s_t (the model output at position t).

With m = action_mask, S = state_mask, lr_t = m_t * (logp_t - ref_logp_t),
A_t = sum_{i>=t} lr_i, sg = stop-gradient and next(t) the first state after t
(A_next(t) := 0 when there is none):

- value residual   V_t - R + beta * sg(A_t)
- policy residual  sg(V_t) - R + beta * (A_t - A_next(t)) + beta * sg(A_next(t))

The policy residual is the paper's at every level: at token level next(t) = t + 1 for
consecutive actions, so A_t - A_next(t) = lr_t; at step level it is the sum of the step's own
log-ratios; at response level there is one state and no next one, so the gradient reaches every
token through A_t0. Each loss is a mean of squared residuals over the states of a sequence,
then a mean over the batch; a sequence without states contributes 0. The policy loss adds
kl_coef * mean_b [sum_t m_t KL_t / sum_t m_t], with KL_t = KL(pi(.|s_t) || pi_ref(.|s_t)) over
the full vocabulary ("full") or the sampled k3 estimator ("k3"), the gradient through pi only.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

# the one precision rule of every implementation: float64 in float64, all else in float32
from oreo_fast.kernels import compute_dtype  # noqa: F401 (part of the specification)

LEVELS = ("token", "step", "response")
KL_ESTIMATORS = ("full", "k3")


class OreoLossOutput(NamedTuple):
    """What the OREO losses return. ``loss`` = value_loss + policy_loss; the rest is detached."""

    loss: torch.Tensor
    value_loss: torch.Tensor
    policy_loss: torch.Tensor  # Bellman part + KL term
    kl: torch.Tensor  # mean over sequences of the per-sequence mean KL over actions
    residual_abs: torch.Tensor  # mean |policy residual| over all states of the batch
    first_value: torch.Tensor  # mean over sequences of V at their first state
    first_advantage: torch.Tensor  # mean over sequences of A at their first state


def token_logprobs_and_kl(logits: torch.Tensor, ref_logits: torch.Tensor, actions: torch.Tensor):
    """Per-token log pi(a_t|s_t), log pi_ref(a_t|s_t) and full-vocabulary KL(pi || pi_ref).

    Materialises both log-softmaxes: the recipe the fused ops replace. Gradient flows to
    ``logits`` only.
    """
    dtype = compute_dtype(logits.dtype)
    logp_all = torch.log_softmax(logits.to(dtype), dim=-1)
    ref_logp_all = torch.log_softmax(ref_logits.detach().to(dtype), dim=-1)
    index = actions.unsqueeze(-1)
    logp = logp_all.gather(-1, index).squeeze(-1)
    ref_logp = ref_logp_all.gather(-1, index).squeeze(-1)
    kl = (logp_all.exp() * (logp_all - ref_logp_all)).sum(-1)
    return logp, ref_logp, kl


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """Sampled KL estimator k3 = exp(d) - d - 1 with d = log pi_ref(a) - log pi(a); >= 0."""
    d = ref_logp.detach() - logp
    return torch.expm1(d) - d


def reverse_cumsum(x: torch.Tensor) -> torch.Tensor:
    """A_t = sum_{i >= t} x_i along the last dimension."""
    return x.flip(-1).cumsum(-1).flip(-1)


def next_state_index(state_mask: torch.Tensor) -> torch.Tensor:
    """For each t, the index of the first state strictly after t, or T when there is none."""
    T = state_mask.shape[-1]
    positions = torch.arange(T, device=state_mask.device).expand_as(state_mask)
    at_states = torch.where(state_mask, positions, torch.full_like(positions, T))
    # suffix minimum of the state positions, shifted by one so that t itself is excluded
    suffix_min = at_states.flip(-1).cummin(-1).values.flip(-1)
    return torch.cat([suffix_min[..., 1:], torch.full_like(suffix_min[..., :1], T)], dim=-1)


def masked_sequence_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per row: sum of x over mask / count of mask, 0 for a row with an empty mask."""
    count = mask.sum(-1)
    total = torch.where(mask, x, torch.zeros_like(x)).sum(-1)
    return total / count.clamp(min=1).to(x.dtype)


def state_diagnostics(V: torch.Tensor, A: torch.Tensor, residual: torch.Tensor,
                      S: torch.Tensor):
    """(mean V at each sequence's first state, mean A there, mean |residual| over all
    states); sequences without a state are left out."""
    zero = torch.zeros((), dtype=V.dtype, device=V.device)
    has_state = S.any(1)
    first = S.to(torch.int8).argmax(1, keepdim=True)  # index of the first state
    n_with_state = has_state.sum().clamp(min=1).to(V.dtype)
    first_value = torch.where(has_state, V.gather(1, first).squeeze(1), zero).sum() / n_with_state
    first_adv = torch.where(has_state, A.gather(1, first).squeeze(1), zero).sum() / n_with_state
    residual_abs = torch.where(S, residual.abs(), zero).sum() / S.sum().clamp(min=1)
    return first_value, first_adv, residual_abs


def bellman_losses(
    logp: torch.Tensor,
    ref_logp: torch.Tensor,
    kl: torch.Tensor | None,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    kl_coef: float = 0.01,
    kl_estimator: str = "full",
    num_sequences: int | None = None,
) -> OreoLossOutput:
    """Assemble the OREO value and policy losses from per-token quantities ([B, T] each).

    ``kl`` is the full-vocabulary KL per token (ignored, may be None, for ``kl_estimator="k3"``).
    ``num_sequences`` divides the summed per-sequence losses (default B): a trainer that splits
    a global batch over micro-batches or ranks passes the global count so the result does not
    depend on the split.
    """
    dtype = compute_dtype(logp.dtype)
    B = logp.shape[0]
    denominator = float(num_sequences if num_sequences is not None else B)
    m, S = action_mask.bool(), state_mask.bool()
    zero = torch.zeros((), dtype=dtype, device=logp.device)

    logp, ref_logp = logp.to(dtype), ref_logp.to(dtype)
    log_ratio = torch.where(m, logp - ref_logp.detach(), zero)
    A = reverse_cumsum(log_ratio)
    A_padded = torch.cat([A, torch.zeros_like(A[:, :1])], dim=1)  # A_T := 0 for "no next state"
    A_next = A_padded.gather(1, next_state_index(S))
    V = values.to(dtype)
    R = rewards.to(dtype).unsqueeze(1)

    value_residual = V - R + beta * A.detach()
    policy_residual = V.detach() - R + beta * (A - A_next) + beta * A_next.detach()
    value_loss = masked_sequence_mean(value_residual.square(), S).sum() / denominator
    bellman_loss = masked_sequence_mean(policy_residual.square(), S).sum() / denominator

    if kl_estimator == "full":
        per_token_kl = kl.to(dtype)
    elif kl_estimator == "k3":
        per_token_kl = k3_kl(logp, ref_logp.to(dtype))
    else:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    sequence_kl = masked_sequence_mean(per_token_kl, m)
    policy_loss = bellman_loss + kl_coef * sequence_kl.sum() / denominator

    with torch.no_grad():
        first_value, first_adv, residual_abs = state_diagnostics(V, A, policy_residual, S)
    return OreoLossOutput(
        loss=value_loss + policy_loss,
        value_loss=value_loss,
        policy_loss=policy_loss,
        kl=sequence_kl.detach().mean(),
        residual_abs=residual_abs,
        first_value=first_value,
        first_advantage=first_adv,
    )


def oreo_loss_reference(
    logits, ref_logits, actions, values, rewards, action_mask, state_mask, **kwargs
) -> OreoLossOutput:
    """The whole OREO loss from [B, T, V] logits, with materialised log-softmaxes."""
    logp, ref_logp, kl = token_logprobs_and_kl(logits, ref_logits, actions)
    return bellman_losses(logp, ref_logp, kl, values, rewards, action_mask, state_mask, **kwargs)
