"""Trainer checkpoints without pickle: model folders in Hugging Face format (safetensors),
optimizer tensors in safetensors, everything else (step, schedulers, optimizer hyper-parameters,
RNG states) in JSON. A checkpoint folder is written under a temporary name and renamed when
complete, so a crash mid-save leaves the previous checkpoints loadable."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch

STATE_DIR = "trainer_state"
_CHECKPOINT = re.compile(r"^step-(\d+)$")


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a full (FQN-keyed) optimizer state dict into tensors and JSON-able metadata."""
    tensors, scalars = {}, {}
    for fqn, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{fqn}::{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{fqn}::{name}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()}
              for g in state["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        fqn, name = key.rsplit("::", 1)
        state.setdefault(fqn, {})[name] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
              for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under root (a folder step-N holding trainer_state/state.json),
    oldest first."""
    found = []
    if root.is_dir():
        for path in root.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match and (path / STATE_DIR / "state.json").is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def prune_checkpoints(root: Path, keep: int) -> None:
    for _, path in list_checkpoints(root)[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


def write_state(folder: Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "tensors.safetensors"))
    (folder / "state.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")


def read_state(folder: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    meta = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    return meta, load_file(str(folder / "tensors.safetensors"))
