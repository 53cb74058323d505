"""Argument checks of the public ops: every bad argument raises ``ValueError`` naming it."""
from __future__ import annotations

import math

import numpy as np
import torch

from oreo_fast.ops.reference import KL_ESTIMATORS, LEVELS


def check_float(name: str, x: torch.Tensor, ndim: int):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def check_index(name: str, x: torch.Tensor, shape: tuple, integer: bool):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    if not integer and (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"{name} must be a bool (or 0/1 integer) mask, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def validate_token_inputs(policy, ref, actions, action_mask, vocab_size: int, ref_vocab_size: int):
    """Shape and dtype checks shared by both levels; returns (actions int64, mask bool)."""
    B, T = policy.shape[:2]
    if ref.shape[:2] != (B, T):
        raise ValueError(
            f"policy and reference inputs disagree on [B, T]: {tuple(policy.shape[:2])} "
            f"vs {tuple(ref.shape[:2])}"
        )
    if vocab_size != ref_vocab_size:
        raise ValueError(
            f"policy and reference vocabularies differ: {vocab_size} vs {ref_vocab_size}"
        )
    if policy.device != ref.device:
        raise ValueError(f"policy on {policy.device} but reference on {ref.device}")
    check_index("actions", actions, (B, T), integer=True)
    check_index("action_mask", action_mask, (B, T), integer=False)
    actions, mask = actions.long(), action_mask.bool()
    bad = mask & ((actions < 0) | (actions >= vocab_size))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"actions out of range [0, {vocab_size}) at a masked-in position: "
            f"actions[{b}, {t}] = {int(actions[b, t])}"
        )
    return actions, mask


def validate_logits_inputs(logits, ref_logits, actions, action_mask):
    """Checks for the logits-level op; returns (actions int64, mask bool)."""
    check_float("logits", logits, 3)
    check_float("ref_logits", ref_logits, 3)
    return validate_token_inputs(
        logits, ref_logits, actions, action_mask, logits.shape[-1], ref_logits.shape[-1]
    )


def validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions, action_mask):
    """Checks for the hidden-level op; returns (actions int64, mask bool)."""
    check_float("hidden", hidden, 3)
    check_float("weight", weight, 2)
    check_float("ref_hidden", ref_hidden, 3)
    check_float("ref_weight", ref_weight, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(
            f"ref_weight {tuple(ref_weight.shape)} does not match ref_hidden size "
            f"{ref_hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    if ref_weight.dtype != ref_hidden.dtype:
        raise ValueError(
            f"ref_weight ({ref_weight.dtype}) and ref_hidden ({ref_hidden.dtype}) must share a dtype"
        )
    return validate_token_inputs(
        hidden, ref_hidden, actions, action_mask, weight.shape[0], ref_weight.shape[0]
    )


def first_action_mask(action_mask: torch.Tensor) -> torch.Tensor:
    """True at the first action of each sequence (the response level's only state)."""
    m = action_mask.bool()
    first = m.to(torch.int8).argmax(1, keepdim=True)
    return torch.zeros_like(m).scatter(1, first, True) & m


def check_bellman_arguments(values, rewards, mask_shape: tuple, state_mask, level, beta,
                            kl_coef, kl_estimator) -> None:
    """The Bellman arguments' checks that need no device data."""
    B, T = mask_shape
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    for name, x in (("beta", beta), ("kl_coef", kl_coef)):
        if not isinstance(x, (int, float)) or not math.isfinite(x) or x < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {x!r}")
    check_float("values", values, 2)
    if tuple(values.shape) != (B, T):
        raise ValueError(f"values must have shape {(B, T)}, got {tuple(values.shape)}")
    check_float("rewards", rewards, 1)
    if tuple(rewards.shape) != (B,):
        raise ValueError(f"rewards must have shape {(B,)}, got {tuple(rewards.shape)}")
    check_index("state_mask", state_mask, (B, T), integer=False)


def masks_on_host(mask: torch.Tensor, state_mask: torch.Tensor, rewards: torch.Tensor):
    """(action mask, state mask, rewards all finite) as numpy on the host: one transfer, the
    one host sync of the Bellman checks (the fused losses build their plans from it too)."""
    B, T = mask.shape
    packed = torch.cat([mask.bool().flatten(), state_mask.bool().flatten(),
                        torch.isfinite(rewards).all().reshape(1)]).cpu().numpy()
    return packed[:B * T].reshape(B, T), packed[B * T:2 * B * T].reshape(B, T), bool(packed[-1])


def check_bellman_masks(m: np.ndarray, S: np.ndarray, rewards_finite: bool, level: str) -> None:
    """The content checks of the masks and rewards, on their host copies."""
    first = np.zeros_like(m)
    has_action = m.any(1)
    first[np.nonzero(has_action)[0], m.argmax(1)[has_action]] = True
    problems = (
        (S & ~m).any(),
        level == "token" and (S != m).any(),
        level == "response" and (S != first).any(),
        not rewards_finite,
    )
    messages = (
        "state_mask has a state where action_mask is false (states are a subset of actions)",
        "state_mask must equal action_mask at level='token'",
        "state_mask must hold exactly the first action of each sequence at level='response'",
        "rewards contain NaN or Inf",
    )
    for bad, message in zip(problems, messages):
        if bad:
            raise ValueError(message)


def validate_bellman_inputs(values, rewards, mask, state_mask, level, beta, kl_coef,
                            kl_estimator):
    """Checks of the Bellman inputs against the action mask ``mask`` [B, T] (bool); returns
    the state mask as bool. One host sync for every content check."""
    check_bellman_arguments(values, rewards, tuple(mask.shape), state_mask, level, beta, kl_coef,
                            kl_estimator)
    check_bellman_masks(*masks_on_host(mask, state_mask, rewards), level)
    return state_mask.bool()
