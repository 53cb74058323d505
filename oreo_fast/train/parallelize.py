"""The trained and frozen models as FSDP2 roots, and their sharding.

Each model runs inside a small ``nn.Module`` root whose forward returns plain tensors: FSDP2
hooks the backward through the root's forward outputs, and the policy root runs the fused
loss inside its forward so that the LM head is unsharded while the op reads it. ``shard``
wraps each decoder block, then the root, and asks the root too to reshard after its forward
(FSDP2's default keeps a root's parameters, the embedding and tied LM head among them,
unsharded from its forward until after the backward: with three roots per step that is
three whole embeddings per rank, one of which a 1-process run holds anyway). The backward
gathers them again; the saved tensors that alias them are valid again by then.
"""
from __future__ import annotations

import torch
from torch import nn

from oreo_fast.errors import ConfigError
from oreo_fast.models import ValueModel
from oreo_fast.ops import fused_linear_token_logprobs_kl_unchecked, oreo_loss_fused_linear


class PolicyWithLoss(nn.Module):
    """The policy whose forward runs the fused op on its LM head: the OREO losses when handed
    the Bellman inputs (``bellman``: values, rewards, state_mask and the loss settings), else
    per-token (logp, ref_logp, kl)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids, actions, action_mask,
                ref_hidden=None, ref_weight=None, compute_kl=True, impl="auto", bellman=None):
        hidden = self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        ).last_hidden_state[:, :-1]
        weight = self.model.get_output_embeddings().weight
        if ref_hidden is None:  # rft: the reference side is the policy itself, no KL
            ref_hidden, ref_weight, compute_kl = hidden.detach(), weight.detach(), False
        ref_hidden, ref_weight = ref_hidden.to(hidden.dtype), ref_weight.to(weight.dtype)
        if bellman is not None:
            return oreo_loss_fused_linear(hidden, weight, ref_hidden, ref_weight, actions,
                                          action_mask=action_mask, impl=impl, **bellman)
        return fused_linear_token_logprobs_kl_unchecked(
            hidden, weight, ref_hidden, ref_weight, actions, action_mask,
            compute_kl=compute_kl, impl=impl,
        )


class HiddenStates(nn.Module):
    """The reference as an FSDP root: final-norm hidden states at the action positions."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, position_ids):
        return self.model.get_decoder()(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
        ).last_hidden_state[:, :-1]


class Values(nn.Module):
    """The value model as an FSDP root returning a plain tensor, V(s_t) for t < L - 1 (FSDP2
    hooks the backward through the forward's output tensors)."""

    def __init__(self, value_model: ValueModel):
        super().__init__()
        self.value_model = value_model

    def forward(self, input_ids, attention_mask, position_ids):
        values = self.value_model(input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids).values
        return values[:, :-1].clone()  # not a view: FSDP2 hooks its backward on this tensor


def decoder_blocks(model: nn.Module):
    """The decoder's list of blocks (``.layers``), the unit FSDP2 shards one by one."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__}: no decoder .layers to shard")
    return layers


def mixed_precision(compute_dtype: torch.dtype, trained: bool):
    """FSDP2 mixed precision: parameters cast to ``compute_dtype`` for compute, gradients
    reduced in float32 (trained models; the frozen reference has none)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if trained:
        return MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy(param_dtype=compute_dtype)


def shard(module: nn.Module, model: nn.Module, mp_policy, ignored=None, mesh=None):
    """FSDP2: each decoder block, then the root (``ignored`` parameters stay replicated).
    ``mesh``: None for all ranks in one shard group, or a 2-D ``(dp_replicate, dp_shard)``
    mesh for HSDP (``data_parallel_mesh``)."""
    from torch.distributed.fsdp import fully_shard

    for block in decoder_blocks(model):
        fully_shard(block, mp_policy=mp_policy, mesh=mesh)
    fully_shard(module, mp_policy=mp_policy, ignored_params=ignored, reshard_after_forward=True,
                mesh=mesh)


def data_parallel_mesh(device: torch.device, world_size: int, replicate: int):
    """HSDP's mesh: ``replicate`` groups (e.g. one per node) each sharding the models over
    ``world_size / replicate`` ranks; None when ``replicate`` is 1 (plain FSDP over all)."""
    if replicate == 1:
        return None
    from torch.distributed.device_mesh import init_device_mesh

    if world_size % replicate:
        raise ConfigError(f"dp_replicate: {replicate} does not divide the {world_size} "
                          "processes")
    return init_device_mesh(device.type, (replicate, world_size // replicate),
                            mesh_dim_names=("dp_replicate", "dp_shard"))


def reference_head_unit(model: nn.Module) -> list[nn.Module]:
    """The modules that hold the reference's LM head weight: the LM head, with the input
    embedding when the two are tied (one FSDP unit over both, so the shared tensor is
    managed once and both modules see it gathered)."""
    head, embedding = model.get_output_embeddings(), model.get_input_embeddings()
    return [embedding, head] if head.weight is embedding.weight else [head]


def shard_frozen_reference(root: HiddenStates, compute_dtype: torch.dtype, mesh=None) -> None:
    """The frozen reference, everything sharded. The LM head weight (with the tied embedding
    that is the same tensor) is an FSDP unit of its own: the policy's fused loss reads it
    whole, outside the reference's forward, so the step gathers that unit alone around the
    policy's forward and backward (``gathered_reference_head``) and a rank keeps only its
    shard the rest of the time, the optimizer step included."""
    from torch.distributed.fsdp import fully_shard

    model, policy = root.model, mixed_precision(compute_dtype, trained=False)
    # not resharded after the reference's forward (a tied embedding runs in it): the
    # gathered weight must outlive it until the policy's backward
    fully_shard(reference_head_unit(model), mp_policy=policy, reshard_after_forward=False,
                mesh=mesh)
    shard(root, model, policy, mesh=mesh)


class gathered_reference_head:
    """Context manager: the reference's LM head weight, whole, for the length of the block
    (the policy's forward and backward: the two-pass loss reads it again in its backward),
    and back to shards afterwards. Without FSDP it is the model's own tensor."""

    def __init__(self, model: nn.Module):
        self.unit = reference_head_unit(model)[0]
        self.model = model

    def __enter__(self) -> torch.Tensor:
        if hasattr(self.unit, "unshard"):  # an FSDP unit (shard_frozen_reference)
            self.unit.unshard()
        return self.model.get_output_embeddings().weight

    def __exit__(self, *exc) -> None:
        if hasattr(self.unit, "reshard"):
            self.unit.reshard()


def attention_backend(requested: str, device: torch.device) -> str:
    """``attn_implementation`` for the models: "auto" is flash_attention_2 on CUDA when
    flash-attn is installed, sdpa otherwise."""
    if requested != "auto":
        return requested
    if device.type != "cuda":
        return "sdpa"
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return "sdpa"
    return "flash_attention_2"


def apply_liger(policy_dir: str, device: torch.device) -> None:
    """Liger-Kernel's RMSNorm, RoPE and SwiGLU patches for the policy's architecture, applied
    to the modelling classes before any model is built. Its cross-entropy patches stay off:
    the fused OREO loss replaces the LM-head cross-entropy."""
    import json
    from pathlib import Path

    if device.type != "cuda":
        # Liger's kernels do not run under the Triton interpreter
        raise RuntimeError("liger=true needs a CUDA device (Liger-Kernel's Triton kernels)")
    try:
        from liger_kernel.transformers import _apply_liger_kernel
    except ImportError:
        raise RuntimeError("liger=true needs the liger-kernel package") from None
    model_type = json.loads((Path(policy_dir) / "config.json").read_text())["model_type"]
    _apply_liger_kernel(model_type, rms_norm=True, rope=True, swiglu=True,
                        cross_entropy=False, fused_linear_cross_entropy=False)
