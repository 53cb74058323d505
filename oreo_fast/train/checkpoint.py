"""Trainer checkpoints without pickle: model folders in Hugging Face format (safetensors),
optimizer tensors in safetensors, everything else (step, schedulers, optimizer hyper-parameters,
RNG states) in JSON. A checkpoint folder is written under a temporary name and renamed when
complete, so a crash mid-save leaves the previous checkpoints loadable.

``Checkpointer`` owns all of it for the trainer: when to save (``save_every``), which
checkpoint to resume from, the final export of ``policy/`` and ``value/``, and the refusal to
write NaN/Inf."""
from __future__ import annotations

import json
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from oreo_fast.errors import NonFiniteError
from oreo_fast.io import atomic_dir
from oreo_fast.models import ValueModel, check_model_dir, load_policy, save_model
from oreo_fast.preflight import check_output_dir, safetensors_numel
from oreo_fast.tokenizer import check_tokenizer_dir
from oreo_fast.train.guard import local_all_finite

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


# ------------------------------------------------------------------ the trainer's checkpointer


def check_run_inputs(cfg, output_dir: Path) -> None:
    """Before the trainer loads anything: the model folders complete (config.json,
    safetensors weights, the policy's tokenizer) and the output location writable, with room
    for the run's files."""
    check_model_dir(cfg.policy, "policy")
    check_tokenizer_dir(cfg.policy)
    if cfg.algorithm == "oreo":
        check_model_dir(cfg.reference or cfg.policy, "reference")
        check_model_dir(cfg.value or cfg.policy, "value")
    models = safetensors_numel(cfg.policy) * (2 if cfg.algorithm == "oreo" else 1)
    # fp32 weights; a checkpoint adds Adam's two moments, keep + 1 exist while one is saved
    copies = 1 + (3 * (cfg.keep_checkpoints + 1) if cfg.save_every else 0)
    check_output_dir(output_dir, need_bytes=4 * models * copies)


@dataclass
class Progress:
    """What the loop has done: optimizer steps, skipped (non-finite) steps in all and in a
    row, and every step's metrics. Saved with each checkpoint."""

    step: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    history: list[dict] = field(default_factory=list)


class Checkpointer:
    """Saves, resumes and exports one run under ``output_dir`` (``checkpoints/step-N``,
    then ``policy/`` and ``value/``). Every rank calls every method: gathers are collective;
    only rank 0 writes."""

    def __init__(self, cfg, output_dir: Path, runtime, tokenizer):
        self.cfg, self.root, self.runtime, self.tokenizer = cfg, output_dir, runtime, tokenizer
        found = list_checkpoints(output_dir / "checkpoints") if cfg.resume else []
        self.resume_from: Path | None = found[-1][1] if found else None

    def model_inits(self) -> tuple[Path | str, Path | str]:
        """(policy, value) folders to load: the resumed checkpoint's, else the config's."""
        cfg = self.cfg
        if self.resume_from is not None:
            return self.resume_from / "policy", self.resume_from / "value"
        return cfg.policy, cfg.value or cfg.policy

    def due(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    # ------------------------------------------------------------------ gathering

    def _full_state(self, module: nn.Module) -> dict:
        if not self.runtime.use_fsdp:
            return {k: v.detach().cpu() for k, v in module.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_model_state_dict)

        return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True,
                                                                     cpu_offload=True))

    def _full_optimizer_state(self, module, optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             get_optimizer_state_dict)

        fsdp = self.runtime.use_fsdp
        options = StateDictOptions(full_state_dict=fsdp, cpu_offload=fsdp)
        return get_optimizer_state_dict(module, optimizer, options=options)

    def _check_finite(self, modules, optimizers, step: int, what: str) -> None:
        """Refuse to write NaN/Inf: parameters and optimizer states, every rank's shards (one
        all-reduce and one host sync per save)."""
        tensors = [p for m in modules for p in m.parameters()]
        tensors += [v for o in optimizers for state in o.state.values()
                    for v in state.values() if isinstance(v, torch.Tensor)]
        ok = local_all_finite(tensors).float().to(self.runtime.device)
        if self.runtime.distributed:
            dist.all_reduce(ok, op=dist.ReduceOp.MIN)
        if not ok.item():
            raise NonFiniteError(f"step {step}: the parameters or optimizer states hold "
                                 f"NaN/Inf values; {what} not written")

    def _write_models(self, out_dir: Path, policy_state: dict, value_state: dict | None):
        cfg = self.cfg
        policy = load_policy(cfg.policy, dtype=torch.float32,
                             trust_remote_code=cfg.trust_remote_code)
        policy.load_state_dict({k.removeprefix("model."): v for k, v in policy_state.items()})
        save_model(policy, self.tokenizer, out_dir / "policy")
        if value_state is not None:
            value = ValueModel.from_pretrained(cfg.value or cfg.policy, dtype=torch.float32,
                                               trust_remote_code=cfg.trust_remote_code)
            value.load_state_dict({k.removeprefix("value_model."): v
                                   for k, v in value_state.items()})
            value.save_pretrained(out_dir / "value", tokenizer=self.tokenizer)

    def _barrier(self) -> None:
        if self.runtime.use_fsdp:
            dist.barrier()

    # ------------------------------------------------------------------ saving

    def export(self, modules: list[nn.Module], optimizers, step: int,
               out_dir: Path | None = None) -> None:
        """Policy (and value) as Hugging Face folders (safetensors) in ``out_dir`` (default:
        ``output_dir``), each written atomically."""
        out_dir = self.root if out_dir is None else Path(out_dir)
        self._check_finite(modules, optimizers, step, f"the models in {out_dir}")
        states = [self._full_state(m) for m in modules]
        if self.runtime.is_main:
            self._write_models(out_dir, states[0], states[1] if len(states) > 1 else None)
        self._barrier()

    def save(self, modules: list[nn.Module], optimizers, schedulers, progress: Progress) -> None:
        """``checkpoints/step-N``: models, optimizer and scheduler states, RNG states and the
        progress; atomic, the newest ``keep_checkpoints`` kept."""
        self._check_finite(modules, optimizers, progress.step, f"checkpoint step-{progress.step}")
        states = [self._full_state(m) for m in modules]
        optimizer_states = [self._full_optimizer_state(m, o) for m, o in zip(modules, optimizers)]
        if self.runtime.is_main:
            root = self.root / "checkpoints"
            tensors, optimizer_meta = rng_tensors(), []
            for i, state in enumerate(optimizer_states):
                t, meta = flatten_optimizer_state(state)
                tensors.update({f"optimizer{i}::{k}": v for k, v in t.items()})
                optimizer_meta.append(meta)
            scheduler_states = [{k: v for k, v in s.state_dict().items() if k != "lr_lambdas"}
                                for s in schedulers]
            meta = {"step": progress.step, "optimizers": optimizer_meta,
                    "schedulers": scheduler_states, "history": progress.history,
                    "world_size": self.runtime.world_size,
                    "skipped_steps": progress.skipped_steps, "bad_in_row": progress.bad_in_row,
                    "python_random": python_rng_state()}
            with atomic_dir(root / f"step-{progress.step}") as tmp:
                self._write_models(tmp, states[0], states[1] if len(states) > 1 else None)
                write_state(tmp / STATE_DIR, meta, tensors)
            prune_checkpoints(root, self.cfg.keep_checkpoints)
        self._barrier()

    def restore(self, modules: list[nn.Module], optimizers, schedulers) -> Progress:
        """Optimizer, scheduler and RNG states of the resumed checkpoint (the models were
        loaded from its folders); a fresh ``Progress`` when there is none."""
        if self.resume_from is None:
            return Progress()
        from torch.distributed.checkpoint.state_dict import (StateDictOptions,
                                                             set_optimizer_state_dict)

        meta, tensors = read_state(self.resume_from / STATE_DIR)
        for i, (module, optimizer) in enumerate(zip(modules, optimizers)):
            prefix = f"optimizer{i}::"
            mine = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
            state = unflatten_optimizer_state(mine, meta["optimizers"][i])
            set_optimizer_state_dict(module, optimizer, state,
                                     options=StateDictOptions(full_state_dict=self.runtime.use_fsdp))
        for scheduler, state in zip(schedulers, meta["schedulers"]):
            scheduler.load_state_dict({**scheduler.state_dict(), **state})
        restore_rng(tensors, meta)
        return Progress(meta["step"], meta["skipped_steps"], meta["bad_in_row"], meta["history"])
