"""One micro-step per algorithm: the models it trains, and its loss and metrics for one
micro-batch. The trainer's loop is the same for both.

- ``OreoStep``: policy, frozen reference and value model; the fused hidden-level OREO loss.
- ``RftStep``: the policy alone; cross-entropy on the reward-1 trajectories (the
  rejection-sampling baseline).

Losses are normalised by ``num_sequences``, the global batch size, so that gradients summed
over micro-batches and ranks do not depend on how the batch was split.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from oreo_fast.models import ValueModel, check_folders_same_vocabulary, load_model
from oreo_fast.ops import masked_sequence_mean
from oreo_fast.train.lora import add_lora, lora_roles
from oreo_fast.train.parallelize import (HiddenStates, PolicyWithLoss, Values,
                                         gathered_reference_head, mixed_precision, shard,
                                         shard_frozen_reference)

# diagnostics that are means over sequences: summed weighted, divided after the reduction
PER_SEQUENCE_MEANS = ("kl", "residual_abs", "first_value", "first_advantage")


def _model_inputs(batch: dict) -> dict:
    return dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"])


def _enable_gradient_checkpointing(model) -> None:
    # transformers 5 renamed it; the old name is deprecated
    enable = getattr(model, "activation_checkpointing_enable", None) or \
        model.gradient_checkpointing_enable
    enable()


class RftStep:
    """Cross-entropy (per-sequence mean over response tokens) on reward-1 trajectories."""

    algorithm = "rft"
    grad_norm_names = ("policy_grad_norm",)

    def __init__(self, cfg, policy: nn.Module):
        self.impl = cfg.impl
        self.policy = PolicyWithLoss(policy)
        self.trained = [self.policy]
        self.frozen: list[nn.Module] = []

    def select(self, examples: list, source) -> list:
        kept = [e for e in examples if e.reward > 0.5]
        if not kept:
            raise ValueError(f"{source}: no reward-1 trajectory for rft")
        return kept

    def shard(self, compute_dtype: torch.dtype, mesh=None) -> None:
        shard(self.policy, self.policy.model, mixed_precision(compute_dtype, trained=True),
              mesh=mesh)

    def gathered(self):
        """Nothing is gathered outside a model's own forward."""
        return contextlib.nullcontext()

    def __call__(self, batch: dict, num_sequences: int):
        logp, _, _ = self.policy(**_model_inputs(batch), actions=batch["actions"],
                                 action_mask=batch["action_mask"], impl=self.impl)
        m = batch["action_mask"]
        nll = masked_sequence_mean(-logp, m).sum() / num_sequences
        return nll, {"loss": nll.detach(), "sequences": m.any(1).sum().float()}


class OreoStep:
    """The OREO losses: a reference forward without gradient, the value forward, then the
    policy forward whose fused loss (gradient computed in its forward by default) gives both
    models' losses."""

    algorithm = "oreo"
    grad_norm_names = ("policy_grad_norm", "value_grad_norm")

    def __init__(self, cfg, policy: nn.Module, reference: nn.Module, value: ValueModel):
        self.cfg = cfg
        self.policy = PolicyWithLoss(policy)
        self.reference = HiddenStates(reference)
        self.value = Values(value)
        self.trained = [self.policy, self.value]
        self.frozen = [self.reference]

    def select(self, examples: list, source) -> list:
        return examples

    def shard(self, compute_dtype: torch.dtype, mesh=None) -> None:
        trained = mixed_precision(compute_dtype, trained=True)
        shard(self.policy, self.policy.model, trained, mesh=mesh)
        shard(self.value, self.value.value_model.backbone, trained, mesh=mesh)
        shard_frozen_reference(self.reference, compute_dtype, mesh=mesh)

    def gathered(self):
        """The reference's LM head, whole, around a micro-step's forward and backward (the
        trainer enters it); elsewhere each rank holds its shard."""
        return gathered_reference_head(self.reference.model)

    def __call__(self, batch: dict, num_sequences: int):
        cfg = self.cfg
        inputs = _model_inputs(batch)
        with torch.no_grad():
            ref_hidden = self.reference(**inputs)
        ref_weight = self.reference.model.get_output_embeddings().weight
        # the value forward first: the policy's fused loss takes V(s_t) as an input (its value
        # loss sends the gradient back to them; its policy loss uses them detached)
        values = self.value(**inputs)
        bellman = dict(values=values, rewards=batch["rewards"], state_mask=batch["state_mask"],
                       beta=cfg.beta, kl_coef=cfg.kl_coef, level=cfg.level,
                       kl_estimator=cfg.kl_estimator, num_sequences=num_sequences,
                       grad_in_forward=cfg.grad_in_forward)
        out = self.policy(**inputs, actions=batch["actions"], action_mask=batch["action_mask"],
                          ref_hidden=ref_hidden, ref_weight=ref_weight, impl=cfg.impl,
                          bellman=bellman)
        n_real = batch["action_mask"].any(1).sum().float()
        # diagnostics are means over this micro-batch: weight them by its sequences (the KL
        # mean runs over every row, the padding rows adding zeros)
        metrics = {"loss": out.loss.detach(), "value_loss": out.value_loss.detach(),
                   "policy_loss": out.policy_loss.detach(), "sequences": n_real,
                   "kl": out.kl * len(batch["rewards"]), "residual_abs": out.residual_abs * n_real,
                   "first_value": out.first_value * n_real,
                   "first_advantage": out.first_advantage * n_real}
        return out.loss, metrics


def build_step(cfg, policy_init: Path | str, value_init: Path | str, load_kwargs: dict,
               compute_dtype: torch.dtype):
    """Load the models ``cfg.algorithm`` needs onto ``load_kwargs["device"]`` (in
    ``load_kwargs``' master dtype; the frozen reference directly in ``compute_dtype``) and
    wrap them in that algorithm's step."""
    roles = lora_roles(cfg.lora)
    policy = load_model(policy_init, **load_kwargs)
    if "policy" in roles:
        add_lora(policy, cfg, policy_init)
    if cfg.algorithm == "rft":
        step = RftStep(cfg, policy)
        backbones = [policy]
    else:
        reference = load_model(cfg.reference or cfg.policy, **{**load_kwargs,
                                                                "dtype": compute_dtype})
        reference.requires_grad_(False)
        value = load_model(value_init, value=True, **load_kwargs)
        if "value" in roles:
            add_lora(value.backbone, cfg, value_init)  # the scalar head stays trained
        check_folders_same_vocabulary({
            "policy": (Path(cfg.policy), policy.config),
            "reference": (Path(cfg.reference or cfg.policy), reference.config),
            "value": (Path(value_init), value.config)})
        step = OreoStep(cfg, policy, reference, value)
        backbones = [policy, value.backbone]
    if cfg.gradient_checkpointing:
        for model in backbones:
            _enable_gradient_checkpointing(model)
    return step
