"""Trainer checkpoints without pickle: model folders in Hugging Face format (safetensors),
optimizer tensors in safetensors, everything else (step, schedulers, optimizer hyper-parameters,
RNG states) in JSON. A checkpoint folder is written under a temporary name and renamed when
complete, so a crash mid-save leaves the previous checkpoints loadable."""
from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path

import torch

STATE_DIR = "trainer_state"
_CHECKPOINT = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.step-\d+\.")  # a save or a removal cut short by a crash


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
    """Keep the newest ``keep`` checkpoints. An old one is first renamed to a hidden name, so
    a crash while deleting it never leaves a half-deleted step-N that looks complete; hidden
    leftovers of earlier crashes are removed too (only rank 0 writes, never concurrently)."""
    for step, path in list_checkpoints(root)[:-keep]:
        hidden = path.with_name(f".step-{step}.deleting")
        path.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    for path in root.iterdir() if root.is_dir() else []:
        if _LEFTOVER.match(path.name):
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


def rng_tensors() -> dict[str, torch.Tensor]:
    """Torch (CPU and CUDA) and NumPy RNG states as tensors. The ranks' generators are seeded
    alike and advance alike, so rank 0's stand for all."""
    import numpy as np

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    out = {"rng::torch": torch.get_rng_state(),
           "rng::numpy": torch.from_numpy(keys.astype(np.int64)),
           "rng::numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64)}
    if torch.cuda.is_available():
        out["rng::cuda"] = torch.cuda.get_rng_state()
    return out


def python_rng_state() -> list:
    version, state, gauss = random.getstate()
    return [version, list(state), gauss]


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    import numpy as np

    torch.set_rng_state(tensors["rng::torch"])
    if "rng::cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng::cuda"])
    pos, has_gauss, gauss = tensors["rng::numpy_rest"].tolist()
    np.random.set_state(("MT19937", tensors["rng::numpy"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), gauss))
    version, state, gauss = meta["python_random"]
    random.setstate((version, tuple(state), gauss))
