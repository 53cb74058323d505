"""Sharded trainer checkpoints with torch.distributed.checkpoint (DCP).

``output_dir/checkpoints/step-N`` holds one DCP folder: each rank writes its own shards of the
policy, the value model, both AdamW states and its RNG states (``__<rank>_0.distcp``, tensor
data only, read back with ``torch.load(weights_only=True)``), DCP's index ``.metadata``, and
``manifest.json``, written last by rank 0 once every rank's files are on disk: the
schedulers, the optimizers' hyper-parameters, the data position and metrics so far (Progress),
the world size and every file's size. A folder without a manifest is an interrupted save:
ignored (and reported) on resume, removed by the next save's pruning. DCP reshards on load, so
a run saved with N processes resumes with M.

Nothing is gathered to one rank and no model is reloaded from disk to save; the gathered
Hugging Face folders are ``export.py``'s job. Only the tensors go through DCP; everything
else is JSON, so DCP pickles nothing but its own index (``.metadata``)."""
from __future__ import annotations

import json
import logging
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from oreo_fast.errors import CheckpointError, NonFiniteError
from oreo_fast.io import fsync_dir, write_json
from oreo_fast.models import check_model_dir
from oreo_fast.preflight import check_output_dir, safetensors_numel
from oreo_fast.tokenizer import check_tokenizer_dir
from oreo_fast.train.guard import local_all_finite
from oreo_fast.train.lora import lora_settings

MANIFEST = "manifest.json"
FORMAT = "oreo_fast.dcp/1"
MODEL_NAMES = ("policy", "value")
_CHECKPOINT = re.compile(r"^step-(\d+)$")
_LEFTOVER = re.compile(r"^\.step-\d+\.")  # a removal cut short by a crash
log = logging.getLogger("oreo_fast")


def _trained_state(module: nn.Module, model_state: dict) -> dict:
    """``model_state`` less its frozen tensors (LoRA's base weights, embeddings and LM head,
    under every name a tied weight has): they are the init folders', loaded again on
    resume, so a checkpoint holds only what training changes."""
    frozen = {name for name, p in module.named_parameters(remove_duplicate=False)
              if not p.requires_grad}
    return {k: v for k, v in model_state.items() if k not in frozen}


# ------------------------------------------------------------------ finding and pruning


def scan_checkpoints(root: Path) -> tuple[list[tuple[int, Path]], list[Path]]:
    """(complete checkpoints oldest first, step folders without a manifest)."""
    complete, incomplete = [], []
    if root.is_dir():
        for path in root.iterdir():
            match = _CHECKPOINT.match(path.name)
            if match:
                if (path / MANIFEST).is_file():
                    complete.append((int(match.group(1)), path))
                else:
                    incomplete.append(path)
    return sorted(complete), sorted(incomplete)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    return scan_checkpoints(root)[0]


def prune_checkpoints(root: Path, keep: int, current: Path | None = None) -> None:
    """Keep the newest ``keep`` complete checkpoints; remove folders without a manifest
    (interrupted saves) except ``current``. The newest complete one is never removed. An old
    one is first renamed to a hidden name, so a crash while deleting it never leaves a
    half-deleted step-N; hidden leftovers of earlier crashes are removed too."""
    complete, incomplete = scan_checkpoints(root)
    doomed = [path for _, path in complete[:-max(keep, 1)]]
    doomed += [p for p in incomplete if current is None or p.resolve() != current.resolve()]
    for path in doomed:
        hidden = path.with_name(f".{path.name}.deleting")
        path.rename(hidden)
        shutil.rmtree(hidden, ignore_errors=True)
    for path in root.iterdir() if root.is_dir() else []:
        if _LEFTOVER.match(path.name):
            shutil.rmtree(path, ignore_errors=True)
    fsync_dir(root)


# ------------------------------------------------------------------ RNG states as tensors


def rng_tensors() -> dict[str, torch.Tensor]:
    """This process's torch (CPU, CUDA), NumPy and Python RNG states as tensors."""
    import numpy as np

    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, state, py_gauss = random.getstate()
    out = {"torch": torch.get_rng_state(),
           "numpy": torch.from_numpy(keys.astype(np.int64)),
           "numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
           "python": torch.tensor(state, dtype=torch.int64),
           "python_rest": torch.tensor([version, py_gauss is not None,
                                        py_gauss or 0.0], dtype=torch.float64)}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    import numpy as np

    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    pos, has_gauss, gauss = tensors["numpy_rest"].tolist()
    np.random.set_state(("MT19937", tensors["numpy"].numpy().astype(np.uint32), int(pos),
                         int(has_gauss), gauss))
    version, has_py_gauss, py_gauss = tensors["python_rest"].tolist()
    random.setstate((int(version), tuple(tensors["python"].tolist()),
                     py_gauss if has_py_gauss else None))


# ------------------------------------------------------------------ async staging


def stage_on_host(state):
    """A host copy of a DCP state dict, one tensor at a time, for an async save.

    Each tensor (a DTensor's local shard) gets exactly its own bytes in a fresh contiguous
    CPU tensor. DCP's default staging (``_create_cpu_state_dict``, torch 2.13) first
    deep-copies a CPU DTensor whole, then replaces its local tensor with an empty one: a
    second copy of every tensor's storage on the way (FSDP2's local shards are views of a
    padded buffer, which the deep copy duplicates too)."""
    from torch.distributed.tensor import DTensor

    if isinstance(state, dict):
        return {k: stage_on_host(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(stage_on_host(v) for v in state)
    if isinstance(state, DTensor):
        return DTensor.from_local(stage_on_host(state.to_local()), state.device_mesh,
                                  state.placements, run_check=False, shape=state.shape,
                                  stride=state.stride())
    if isinstance(state, torch.Tensor):
        return torch.empty(state.shape, dtype=state.dtype, device="cpu").copy_(state)
    return state


class AlreadyStaged:
    """DCP's AsyncStager protocol for a state dict ``stage_on_host`` has already copied."""

    should_synchronize_after_execute = False

    def stage(self, state_dict):
        return state_dict

    def synchronize_staging(self) -> None:
        pass

    def close(self) -> None:
        pass


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
    copies = 2 + (3 * (cfg.keep_checkpoints + 1) if cfg.save_every else 0)
    check_output_dir(output_dir, need_bytes=4 * models * copies)


@dataclass
class Progress:
    """What the loop has done: optimizer steps (= global batches consumed, the data
    position), skipped (non-finite) steps in all and in a row, and every step's metrics."""

    step: int = 0
    skipped_steps: int = 0
    bad_in_row: int = 0
    history: list[dict] = field(default_factory=list)


def _json_groups(groups: list[dict]) -> list[dict]:
    return [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in groups]


def _scheduler_state(scheduler) -> dict:
    return {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}


class Checkpointer:
    """Saves and resumes one run's sharded checkpoints under ``output_dir/checkpoints``.
    Every rank calls every method (DCP's planning is collective); rank 0 writes the manifest
    and prunes. With ``async_save`` the shards are staged to host memory and written by a
    background thread over a gloo group of their own while training goes on; the previous
    save is waited for before the next one and at the end."""

    def __init__(self, cfg, output_dir: Path, runtime):
        self.cfg, self.root, self.runtime = cfg, output_dir / "checkpoints", runtime
        self.resume_from: Path | None = None
        self._pending = None  # (future, step folder, manifest) of an async save
        self._group = None
        if cfg.resume:
            complete, incomplete = scan_checkpoints(self.root)
            for path in incomplete:
                if runtime.is_main:
                    log.warning("%s: no %s (a save cut short); ignored", path, MANIFEST)
            if complete:
                self.resume_from = complete[-1][1]
        if getattr(cfg, "async_save", False) and runtime.distributed:
            # the background writer's collectives must not share the training's group
            self._group = dist.new_group(backend="gloo")

    def model_inits(self) -> tuple[Path | str, Path | str]:
        """(policy, value) folders to load: always the config's; a resumed checkpoint's
        shards are loaded into them afterwards (``restore``)."""
        return self.cfg.policy, self.cfg.value or self.cfg.policy

    def due(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    # ------------------------------------------------------------------ state

    def _state(self, modules, optimizers, rng_rank: int) -> tuple[dict, list[list[dict]]]:
        """The DCP state dict (this rank's shards, no copies: views of the live tensors) and
        the optimizers' param groups (JSON, kept out of DCP so that it pickles nothing)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        state, groups = {}, []
        for name, module, optimizer in zip(MODEL_NAMES, modules, optimizers):
            model_state, optim_state = get_state_dict(module, optimizer)
            state[name] = _trained_state(module, model_state)
            state[f"{name}_optimizer"] = optim_state["state"]
            groups.append(_json_groups(optim_state["param_groups"]))
        state["rng"] = {f"rank{rng_rank}": rng_tensors()}
        return state, groups

    def check_finite(self, modules, optimizers, step: int, what: str) -> None:
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

    def _dcp_kwargs(self) -> dict:
        if dist.is_initialized():
            return {"process_group": self._group}
        return {"no_dist": True}

    # ------------------------------------------------------------------ saving

    def save(self, modules: list[nn.Module], optimizers, schedulers, progress: Progress) -> None:
        """``checkpoints/step-N``: every rank's shards, then the manifest; the newest
        ``keep_checkpoints`` kept."""
        import torch.distributed.checkpoint as dcp

        self.wait()
        self.check_finite(modules, optimizers, progress.step, f"checkpoint step-{progress.step}")
        folder = self.root / f"step-{progress.step}"
        if self.runtime.is_main:
            if folder.exists():  # a save of this step cut short (or superseded): start over
                shutil.rmtree(folder)
            folder.mkdir(parents=True)
        self._barrier()
        state, groups = self._state(modules, optimizers, self.runtime.rank)
        manifest = {"format": FORMAT, "step": progress.step,
                    "world_size": self.runtime.world_size, "optimizer_param_groups": groups,
                    "schedulers": [_scheduler_state(s) for s in schedulers],
                    "progress": asdict(progress), "lora": lora_settings(self.cfg)}
        writer = dcp.FileSystemWriter(str(folder), sync_files=True)
        if getattr(self.cfg, "async_save", False):
            future = dcp.async_save(stage_on_host(state), storage_writer=writer,
                                    async_stager=AlreadyStaged(), **self._dcp_kwargs())
            self._pending = (future, folder, manifest)
        else:
            dcp.save(state, storage_writer=writer, **self._dcp_kwargs())
            self._finish(folder, manifest)

    @property
    def pending(self) -> bool:
        """An async save is in flight (its files may still be being written)."""
        return self._pending is not None

    def wait(self) -> None:
        """Block until an async save in flight is on disk, then commit it (its manifest)."""
        if self._pending is None:
            return
        future, folder, manifest = self._pending
        self._pending = None
        future = getattr(future, "upload_completion", future)
        future.result()
        self._finish(folder, manifest)

    def _finish(self, folder: Path, manifest: dict) -> None:
        """Rank 0, once DCP has returned (every rank's files and the index are written and
        fsynced): the manifest listing the files, then pruning."""
        if self.runtime.is_main:
            manifest["files"] = {p.name: p.stat().st_size for p in sorted(folder.iterdir())
                                 if p.name != MANIFEST}
            write_json(folder / MANIFEST, manifest)
            prune_checkpoints(self.root, self.cfg.keep_checkpoints, current=folder)

    def _barrier(self) -> None:
        if self.runtime.distributed:
            dist.barrier()

    # ------------------------------------------------------------------ resuming

    def read_manifest(self, folder: Path) -> dict:
        path = folder / MANIFEST
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the manifest ({e})", path) from None
        if not isinstance(manifest, dict):
            raise CheckpointError("the manifest is not a JSON object", path)
        for key in ("format", "step", "world_size", "optimizer_param_groups", "schedulers",
                    "progress", "files"):
            if key not in manifest:
                raise CheckpointError("missing", path, field=key)
        if manifest["format"] != FORMAT:
            raise CheckpointError(f"{manifest['format']!r}, expected {FORMAT!r}", path,
                                  field="format")
        for name, size in manifest["files"].items():
            file = folder / name
            actual = file.stat().st_size if file.is_file() else None
            if actual != size:
                found = "missing" if actual is None else f"{actual} bytes"
                raise CheckpointError(f"{name} is {found}, expected {size} bytes", path,
                                      field="files")
        return manifest

    def restore(self, modules: list[nn.Module], optimizers, schedulers) -> Progress:
        """Load the resumed checkpoint's shards into the (already sharded) models and
        optimizers, resharding when its world size differs; schedulers, RNG and progress.
        A fresh ``Progress`` when there is none."""
        if self.resume_from is None:
            return Progress()
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        manifest = self.read_manifest(self.resume_from)
        saved_lora = manifest.get("lora", {"lora": "none"})  # older manifests: no LoRA
        if saved_lora != lora_settings(self.cfg):
            raise CheckpointError(f"saved with {saved_lora}, resumed with "
                                  f"{lora_settings(self.cfg)}: resume with the same LoRA "
                                  "settings", self.resume_from / MANIFEST, field="lora")
        rank = self.runtime.rank
        # RNG: this rank's own state when it existed, else rank 0's (ranks are seeded alike)
        state, _ = self._state(modules, optimizers,
                               rank if rank < manifest["world_size"] else 0)
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.resume_from)),
                 **self._dcp_kwargs())
        for i, (name, module, optimizer) in enumerate(zip(MODEL_NAMES, modules, optimizers)):
            groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()}
                      for g in manifest["optimizer_param_groups"][i]]
            set_state_dict(module, optimizer, model_state_dict=state[name],
                           optim_state_dict={"state": state[f"{name}_optimizer"],
                                             "param_groups": groups},
                           # the frozen tensors are missing on purpose (_trained_state);
                           # dcp.load has already failed on any trained one missing
                           options=StateDictOptions(strict=False))
        for scheduler, saved in zip(schedulers, manifest["schedulers"]):
            scheduler.load_state_dict({**scheduler.state_dict(), **saved})
        restore_rng(next(iter(state["rng"].values())))
        return Progress(**manifest["progress"])

    def close(self) -> None:
        self.wait()
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None



def read_checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, whole, by its flattened name (``policy.model...``,
    ``policy_optimizer...``, ``rng.rank0.torch``): for inspection and tests, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    state = {name: torch.empty(meta.size, dtype=meta.properties.dtype)
             for name, meta in reader.read_metadata().state_dict_metadata.items()
             if isinstance(meta, TensorStorageMetadata)}
    dcp.load(state, storage_reader=reader, no_dist=True)
    return state
