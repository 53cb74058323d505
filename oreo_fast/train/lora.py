"""LoRA adapters (``peft``) on the policy, the value model or both (``TrainConfig.lora``).

The adapters are injected into the loaded Hugging Face modules in place
(``peft.inject_adapter_in_model``), before FSDP2 wraps them, so the model keeps its class:
``get_decoder()`` and ``get_output_embeddings()`` work as without LoRA, the decoder's hidden
states carry the adapters, and the fused loss still reads the LM head as one dense weight.
Only the adapters train (and the value model's scalar head); the embeddings, the LM head
and every base weight are frozen, so checkpoints hold only the trained tensors.

Export (``lora_export``): ``merged`` writes ordinary dense folders, each adapted weight
``W + scaling * B @ A`` gathered and merged one tensor at a time while it is written (the
live modules are never merged in place: an unmerge would not restore the weights bit for
bit); ``adapter`` writes peft's adapter folder (``adapter_config.json`` +
``adapter_model.safetensors``) against the folder the model was loaded from.
"""
from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from oreo_fast.errors import ConfigError

ADAPTER = "default"  # peft's adapter name; one adapter per model
ADAPTER_WEIGHTS = "adapter_model.safetensors"  # peft's file names, read by PeftModel
ADAPTER_CONFIG = "adapter_config.json"
# peft's on-disk names are the PeftModel's: the wrapper's prefix, no adapter name
PEFT_PREFIX = "base_model.model."


def import_peft():
    """peft, or a one-line :class:`ConfigError` saying how to install it."""
    try:
        import peft
    except ImportError:
        raise ConfigError("lora: needs the peft package (pip install oreo-fast[lora])") from None
    return peft


def lora_roles(lora: str) -> tuple[str, ...]:
    """The models ``lora`` (none | policy | value | both) adapts."""
    return {"none": (), "policy": ("policy",), "value": ("value",),
            "both": ("policy", "value")}[lora]


def lora_settings(cfg) -> dict:
    """The settings a checkpoint must be resumed with (written to its manifest)."""
    return {"lora": cfg.lora, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha,
            "lora_targets": sorted(cfg.lora_targets)} if cfg.lora != "none" else {"lora": "none"}


def is_adapter_param(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def add_lora(model: nn.Module, cfg, base_path) -> nn.Module:
    """Inject LoRA adapters into ``model`` (in place) and freeze everything else. The
    adapters' A is drawn from torch's RNG (every rank seeded alike), B starts at zero, so
    the adapted model starts equal to the base. ``base_path`` is recorded for the adapter
    export."""
    peft = import_peft()
    config = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout,
                             target_modules=list(cfg.lora_targets), bias="none")
    try:
        peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    except ValueError as e:
        raise ConfigError(f"lora_targets: {e}".splitlines()[0]) from None
    for name, layer in lora_layers(model).items():
        if not isinstance(layer, peft.tuners.lora.Linear):
            # the merged export and the sharding assume dense Linear layers
            raise ConfigError(f"lora_targets: {name} is a {type(layer.base_layer).__name__}, "
                              "only Linear layers can be adapted")
    for name, param in model.named_parameters():
        # not left to peft: whatever it marks, only the adapters train
        param.requires_grad_(is_adapter_param(name))
    # kept on the module for the export (FSDP2 keeps plain attributes)
    model.oreo_lora = {"config": config, "base_path": str(Path(base_path).resolve())}
    return model


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """name -> peft LoRA layer, names relative to ``model``."""
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def has_lora(model: nn.Module) -> bool:
    return getattr(model, "oreo_lora", None) is not None


def trainable(module: nn.Module) -> list[nn.Parameter]:
    """The parameters the optimizer steps (all of them without LoRA)."""
    return [p for p in module.parameters() if p.requires_grad]


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


class MergedWeight:
    """A LoRA layer's dense weight ``W + scaling * B @ A``, computed in float32 when it is
    gathered (``full_tensor``, collective like a DTensor's: every rank calls it in the same
    order); sized like ``W`` for the export's shard plan."""

    def __init__(self, layer):
        self.layer = layer

    def numel(self) -> int:
        return self.layer.base_layer.weight.numel()

    def full_tensor(self) -> torch.Tensor:
        layer = self.layer
        weight = _full(layer.base_layer.weight).detach().float()
        a = _full(layer.lora_A[ADAPTER].weight).detach().float()
        b = _full(layer.lora_B[ADAPTER].weight).detach().float()
        delta = (b @ a) * layer.scaling[ADAPTER]
        return weight + (delta.t() if layer.fan_in_fan_out else delta)


def merged_items(model: nn.Module, items: list[tuple[str, torch.Tensor]]) -> list:
    """``items`` (name relative to ``model``, tensor) as a dense model's: each adapted
    layer's ``base_layer`` weight replaced by its lazy merge, its bias renamed, the adapter
    tensors left out. Unchanged without LoRA."""
    if not has_lora(model):
        return items
    renamed = {}
    for name, layer in lora_layers(model).items():
        renamed[f"{name}.base_layer.weight"] = (f"{name}.weight", MergedWeight(layer))
        renamed[f"{name}.base_layer.bias"] = (f"{name}.bias", None)
    out = []
    for key, tensor in items:
        if is_adapter_param(key):
            continue
        new, merged = renamed.get(key, (key, None))
        out.append((new, tensor if merged is None else merged))
    return out


def adapter_items(model: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """The adapter tensors under peft's saved names (``base_model.model.<module>.lora_A
    .weight``: the adapter name dropped, as ``PeftModel.save_pretrained`` writes them)."""
    return [(PEFT_PREFIX + name.replace(f".{ADAPTER}.", "."), param)
            for name, param in model.named_parameters() if is_adapter_param(name)]


def write_adapter(model: nn.Module, out: Path | None, dtype: torch.dtype,
                  task_type: str | None) -> None:
    """peft's adapter folder for ``model`` (``adapter_config.json`` naming the folder the
    base was loaded from, ``adapter_model.safetensors``). Every rank calls it (the gathers
    are collective); only the one with ``out`` set writes."""
    from safetensors.torch import save_file

    tensors = {}
    for name, param in adapter_items(model):
        full = _full(param).detach()
        if out is not None:
            tensors[name] = full.to(device="cpu", dtype=dtype).contiguous()
    if out is None:
        return
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = copy.deepcopy(model.oreo_lora["config"])
    config.base_model_name_or_path = model.oreo_lora["base_path"]
    config.task_type = task_type
    config.inference_mode = True
    config.save_pretrained(str(out))
