"""Checks that keep a run from losing work: model folders, the output location, non-finite
values; and the fault-injection hooks the reliability tests use.

Errors a user can fix are raised as :class:`ModelDirError` / :class:`OutputError` (both
:class:`~oreo_fast.jsonl.DataError`, so they name the folder) or :class:`NonFiniteError`;
``oreo-fast train`` prints them in one line and exits with status 2.

Test hooks (environment variables, read only by the trainer; never set them in real runs):

- ``OREO_FAULT_EXIT_AT_STEP=RANK:STEP``: process RANK raises after optimizer step STEP (a rank
  that dies in the middle of training);
- ``OREO_FAULT_HANG_AT_STEP=RANK:STEP``: process RANK stops responding after step STEP (a
  stuck rank: the others fail after ``collective_timeout_s``);
- ``OREO_FAULT_STEP_DELAY_S=SECONDS``: sleep after every step (a window for kill -9 tests).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import struct
import time
from pathlib import Path

from oreo_fast.jsonl import DataError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class ModelDirError(DataError):
    """A model folder that cannot be used: missing, no config, no safetensors weights, or
    inconsistent with the other models of the run."""


class OutputError(DataError):
    """The output location cannot hold the run's results."""


class NonFiniteError(RuntimeError):
    """Training produced NaN or Inf values that it could not skip past."""


# ------------------------------------------------------------------ model folders


def check_model_dir(path, what: str = "model") -> Path:
    """A Hugging Face model folder with a config.json and safetensors weights, or a
    :class:`ModelDirError` naming the folder and what is missing."""
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError(f"{what} folder does not exist", path)
    config = path / "config.json"
    if not config.is_file():
        raise ModelDirError(f"{what} folder has no config.json (not a Hugging Face model "
                            "folder)", path)
    try:
        parsed = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ModelDirError(f"{what} config.json is not valid JSON ({e})", path) from None
    if not isinstance(parsed, dict):
        raise ModelDirError(f"{what} config.json is not a JSON object", path)
    if not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.iterdir() if p.suffix in PICKLED_WEIGHTS)
        if pickled:
            raise ModelDirError(f"{what} weights are pickled ({pickled[0]}); weights are "
                                "loaded only from safetensors files (convert them with "
                                "save_pretrained(safe_serialization=True))", path)
        raise ModelDirError(f"{what} folder has no weights (*.safetensors)", path)
    return path


def check_tokenizer_dir(path) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ModelDirError("tokenizer folder does not exist", path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelDirError(f"no tokenizer files ({', '.join(TOKENIZER_FILES)})", path)
    return path


def check_same_vocabulary(configs: dict[str, tuple[Path, object]]) -> None:
    """``configs``: role -> (folder, loaded HF config). Every model must have the policy's
    vocabulary size, and every folder that ships a tokenizer the policy's tokenizer."""
    (first, (first_dir, first_cfg)), *others = configs.items()
    for role, (folder, cfg) in others:
        if cfg.vocab_size != first_cfg.vocab_size:
            raise ModelDirError(f"vocabulary mismatch: {role} model {folder} has "
                                f"{cfg.vocab_size} tokens, {first} model {first_dir} has "
                                f"{first_cfg.vocab_size}")
    base = _tokenizer_signature(first_dir)
    if base is None:
        return
    for role, (folder, _) in others:
        other = _tokenizer_signature(folder)
        if other is not None and other != base:
            what = "special tokens" if other[0] == base[0] else "vocabulary"
            raise ModelDirError(f"tokenizer mismatch ({what}): {role} folder {folder} and "
                                f"{first} folder {first_dir} tokenize differently")


def _tokenizer_signature(folder: Path):
    if not any((Path(folder) / name).is_file() for name in TOKENIZER_FILES):
        return None
    from oreo_fast.tokenizer import load_tokenizer

    tok = load_tokenizer(folder)
    vocab = tuple(sorted(tok.get_vocab().items()))
    return vocab, (tok.eos_token_id, tok.bos_token_id, tok.pad_token_id)


def check_train_inputs(cfg, output_dir) -> None:
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


# ------------------------------------------------------------------ the output location


def safetensors_numel(folder) -> int:
    """Number of parameters in a folder's safetensors files (read from their headers)."""
    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def check_output_dir(path, need_bytes: int = 0) -> Path:
    """Create ``path``, write and delete a probe file, and check that about ``need_bytes``
    are free: an unwritable or full output location is reported before training starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder ({e.strerror or e})", path) from None
    probe = path / f".oreo-write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"the output folder is not writable ({e.strerror or e})", path) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OutputError(f"only {free / 2**20:.1f} MiB free; the run's checkpoints and "
                          f"results need about {need_bytes / 2**20:.1f} MiB", path)
    return path


# ------------------------------------------------------------------ non-finite values


def local_all_finite(tensors):
    """One 0-dim bool tensor on the tensors' device: all of them finite (this rank's shards of
    DTensors); no host synchronisation."""
    import torch

    flags = []
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel():
            flags.append(torch.isfinite(t).all())
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def bad_step(step: int, in_row: int, skipped: int, max_bad_steps: int, warn: bool) -> None:
    """After a skipped step: a warning, or the :class:`NonFiniteError` that stops training."""
    if in_row >= max_bad_steps:
        raise NonFiniteError(
            f"stopping at step {step}: {in_row} consecutive steps had a non-finite loss or "
            f"gradient (max_bad_steps={max_bad_steps}); {skipped} skipped in all. Nothing "
            "non-finite was saved; lower the learning rate or check the data, then resume=true")
    if warn:
        logging.getLogger("oreo_fast").warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row)", step, in_row)


# ------------------------------------------------------------------ test hooks


def inject(step: int, rank: int) -> None:
    """The fault-injection test hooks (see the module docstring); no-ops unless set."""
    delay = os.environ.get("OREO_FAULT_STEP_DELAY_S")
    if delay:
        time.sleep(float(delay))
    for hook in ("OREO_FAULT_EXIT_AT_STEP", "OREO_FAULT_HANG_AT_STEP"):
        target = os.environ.get(hook)
        if not target or [int(x) for x in target.split(":")] != [rank, step]:
            continue
        if hook == "OREO_FAULT_HANG_AT_STEP":
            print(f"{hook}: rank {rank} hangs after step {step} (injected fault)", flush=True)
            time.sleep(24 * 3600)
        raise RuntimeError(f"{hook}: rank {rank} fails after step {step} (injected fault)")
