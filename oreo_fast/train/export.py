"""Hugging Face export of the trained models: ``output_dir/policy`` and ``output_dir/value``.

The only place where the full parameters are gathered: tensor by tensor (``full_tensor()``,
a collective every rank joins in the same order), cast to the export dtype, and written by
rank 0 into safetensors shards of at most ``shard_bytes``; so the host never holds more than
one shard plus one tensor. Configs come from the live model objects and the tokenizer from
the loaded one: nothing is reloaded from disk.

The pair is committed at once: both folders go into ``exports/step-N`` (a temporary folder
renamed when complete), then the link ``current`` is atomically swapped to it.
``policy`` and ``value`` are fixed links into ``current``, so a reader sees both folders of
one export or none (before the first export the links dangle)."""
from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from oreo_fast.io import atomic_dir, fsync_dir
from oreo_fast.models import VALUE_CONFIG_KEY, VALUE_HEAD_FILE
from oreo_fast.train.lora import has_lora, merged_items, write_adapter

EXPORTS = "exports"
CURRENT = "current"
SHARD_BYTES = 2 * 2**30


def _full(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _shard_plan(items: list[tuple[str, torch.Tensor]], dtype: torch.dtype,
                shard_bytes: int) -> list[list[str]]:
    """Names grouped into shards by their (global) sizes in ``dtype``, in order."""
    shards, size = [[]], 0
    for name, tensor in items:
        nbytes = tensor.numel() * dtype.itemsize
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def stream_safetensors(items: list[tuple[str, torch.Tensor]], out: Path | None,
                       dtype: torch.dtype, shard_bytes: int = SHARD_BYTES) -> None:
    """Gather ``items`` (name, possibly sharded tensor) one at a time and write them as
    ``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index. Every rank calls
    it (the gathers are collective); only the one with ``out`` set writes."""
    from safetensors.torch import save_file

    plan = _shard_plan(items, dtype, shard_bytes)
    tensors = dict(items)
    weight_map, total = {}, 0
    for i, names in enumerate(plan):
        file = "model.safetensors" if len(plan) == 1 else \
            f"model-{i + 1:05d}-of-{len(plan):05d}.safetensors"
        shard = {}
        for name in names:
            full = _full(tensors[name]).detach()
            if out is not None:
                shard[name] = full.to(device="cpu", dtype=dtype).contiguous()
                total += shard[name].numel() * dtype.itemsize
                weight_map[name] = file
            del full
        if out is not None:
            save_file(shard, str(out / file), metadata={"format": "pt"})
        del shard
    if out is not None and len(plan) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _config(config, dtype: torch.dtype, architecture: str):
    config = copy.deepcopy(config)
    config.architectures = [architecture]
    config.dtype = dtype
    return config


def _policy_items(root: nn.Module) -> list[tuple[str, torch.Tensor]]:
    model = root.model
    items = merged_items(model, [(k.removeprefix("model."), v)
                                 for k, v in root.state_dict().items()])
    if getattr(model.config, "tie_word_embeddings", False):
        items = [(k, v) for k, v in items if k != "lm_head.weight"]  # as save_pretrained does
    return items


def write_policy(root: nn.Module, tokenizer, out: Path | None, dtype: torch.dtype,
                 adapters_only: bool = False) -> None:
    """The policy (a ``PolicyWithLoss`` root) as a causal-LM folder (LoRA merged into it),
    or with ``adapters_only`` and LoRA as peft's adapter folder for the policy's base."""
    model = root.model
    if adapters_only and has_lora(model):
        write_adapter(model, out, dtype, task_type="CAUSAL_LM")
        if out is not None:
            tokenizer.save_pretrained(str(out))
        return
    stream_safetensors(_policy_items(root), out, dtype)
    if out is not None:
        _config(model.config, dtype, type(model).__name__).save_pretrained(str(out))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(str(out))
        tokenizer.save_pretrained(str(out))


def write_value(root: nn.Module, tokenizer, out: Path | None, dtype: torch.dtype,
                adapters_only: bool = False) -> None:
    """The value model (a ``Values`` root) in ``ValueModel.save_pretrained``'s format: the
    backbone folder (LoRA merged into it) + ``value_head.safetensors`` + the value key in
    config.json; with ``adapters_only`` and LoRA, peft's adapter folder for the backbone's
    base + ``value_head.safetensors``."""
    from safetensors.torch import save_file

    value = root.value_model
    backbone = value.backbone
    prefix = "value_model.backbone."
    state = root.state_dict()
    adapters = adapters_only and has_lora(backbone)
    if adapters:
        write_adapter(backbone, out, dtype, task_type=None)
    else:
        stream_safetensors(merged_items(backbone, [(k[len(prefix):], v) for k, v in state.items()
                                                   if k.startswith(prefix)]), out, dtype)
    head = _full(state["value_model.value_head.weight"]).detach()
    if out is None:
        return
    save_file({"weight": head.to(device="cpu", dtype=dtype).contiguous()},
              str(out / VALUE_HEAD_FILE))
    if adapters:
        tokenizer.save_pretrained(str(out))
        return
    _config(backbone.config, dtype, type(backbone).__name__).save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text(encoding="utf-8"))
    config[VALUE_CONFIG_KEY] = {"head": VALUE_HEAD_FILE, "format_version": 1, **value.base_info}
    config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    tokenizer.save_pretrained(str(out))


def _link(target: str, path: Path) -> None:
    """Point the symlink ``path`` at ``target`` atomically (a new link renamed over it)."""
    tmp = path.with_name(f".{path.name}.link.{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(target, tmp)
    if path.exists() and not path.is_symlink():  # a real folder from an older release
        old = path.with_name(f".{path.name}.old.{os.getpid()}")
        os.replace(path, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, path)


def export_models(trained: list[nn.Module], tokenizer, out_dir: Path, step: int,
                  dtype: torch.dtype, is_main: bool, adapters_only: bool = False) -> Path | None:
    """Write ``out_dir/exports/step-N/{policy,value}`` and make ``out_dir/policy`` and
    ``out_dir/value`` show it, both at once. Every rank calls it; rank 0 writes.
    ``adapters_only``: a LoRA-adapted model as its adapter folder, not merged."""
    writers = (write_policy, write_value)[:len(trained)]
    names = ("policy", "value")[:len(trained)]
    if not is_main:
        for writer, module in zip(writers, trained):
            writer(module, tokenizer, None, dtype, adapters_only=adapters_only)
        return None
    exports = out_dir / EXPORTS
    folder = exports / f"step-{step}"
    with atomic_dir(folder) as tmp:
        for name, writer, module in zip(names, writers, trained):
            (tmp / name).mkdir()
            writer(module, tokenizer, tmp / name, dtype, adapters_only=adapters_only)
    for name in names:  # fixed links, dangling until the first ``current`` exists
        link = out_dir / name
        if not link.is_symlink():
            _link(f"{CURRENT}/{name}", link)
    _link(f"{EXPORTS}/{folder.name}", out_dir / CURRENT)
    fsync_dir(out_dir)
    for old in exports.iterdir():  # earlier exports (and leftovers of failed ones)
        if old.name != folder.name:
            shutil.rmtree(old, ignore_errors=True)
    return folder
