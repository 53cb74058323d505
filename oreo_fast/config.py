"""Typed training configuration: a dataclass, loaded from a JSON or TOML file, overridden by
``key=value`` arguments, validated (unknown keys and wrong types rejected), saved resolved."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path

from oreo_fast.reference import KL_ESTIMATORS, LEVELS


class ConfigError(ValueError):
    """A configuration problem, naming the key (and the file) at fault."""


@dataclass
class TrainConfig:
    # models and data
    policy: str = ""  # HF checkpoint folder: the starting policy (the SFT model)
    reference: str = ""  # frozen reference; empty = the policy folder
    value: str = ""  # value model init: a saved value model or any causal LM; empty = policy
    train_file: str = ""  # trajectories JSONL: {"prompt", "response" | "turns", "reward"}
    output_dir: str = "runs/oreo"
    max_length: int = 1024  # prompt + response + EOS, in tokens
    step_delimiters: list[str] = field(default_factory=lambda: ["\n"])
    strict: bool = False  # over-long prompts: error instead of a counted warning

    # objective
    algorithm: str = "oreo"  # "oreo" or "rft" (SFT on the reward-1 trajectories)
    level: str = "token"
    beta: float = 0.03
    kl_coef: float = 0.01
    kl_estimator: str = "full"

    # optimisation
    epochs: int = 1
    max_steps: int = 0  # stop after this many optimizer steps (0: all); the schedule spans all
    global_batch_size: int = 128  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 8  # sequences per forward on one rank
    policy_lr: float = 5e-6
    value_lr: float = 5e-6
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.95)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to lr * min_lr_ratio
    grad_clip: float = 1.0
    seed: int = 0

    # runtime
    threads: int = 0  # torch CPU threads per process (0: torch's default, or OMP_NUM_THREADS)
    dtype: str = "auto"  # "auto": bf16 compute with fp32 master weights on CUDA, fp32 on CPU
    impl: str = "auto"  # loss implementation (see oreo_fast.ops)
    gradient_checkpointing: bool = False
    liger: bool = False  # Liger-Kernel patches (RMSNorm, RoPE, SwiGLU) when installed
    attn_implementation: str = "auto"  # "auto": flash_attention_2 when installed, else sdpa
    log_every: int = 1
    save_every: int = 0  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    max_bad_steps: int = 5  # stop after this many consecutive steps with NaN/Inf loss or grads
    collective_timeout_s: float = 600.0  # a dead or stuck rank fails the others after this
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    trust_remote_code: bool = False

    def validate(self) -> "TrainConfig":
        def bad(key, why):
            raise ConfigError(f"{key}: {why} (got {getattr(self, key)!r})")

        for key in ("policy", "train_file"):
            if not getattr(self, key):
                bad(key, "is required")
        if self.algorithm not in ("oreo", "rft"):
            bad("algorithm", "must be 'oreo' or 'rft'")
        if self.level not in LEVELS:
            bad("level", f"must be one of {LEVELS}")
        if self.kl_estimator not in KL_ESTIMATORS:
            bad("kl_estimator", f"must be one of {KL_ESTIMATORS}")
        for key in ("beta", "kl_coef", "weight_decay", "grad_clip", "min_lr_ratio"):
            value = getattr(self, key)
            if not math.isfinite(value) or value < 0:
                bad(key, "must be a finite number >= 0")
        for key in ("policy_lr", "value_lr"):
            if not math.isfinite(getattr(self, key)) or getattr(self, key) <= 0:
                bad(key, "must be > 0")
        for key in ("epochs", "global_batch_size", "micro_batch_size", "log_every"):
            if getattr(self, key) < 1:
                bad(key, "must be >= 1")
        if self.max_length < 2:
            bad("max_length", "must be >= 2")
        if self.threads < 0:
            bad("threads", "must be >= 0")
        if self.max_steps < 0:
            bad("max_steps", "must be >= 0")
        if self.save_every < 0:
            bad("save_every", "must be >= 0")
        if self.max_bad_steps < 1:
            bad("max_bad_steps", "must be >= 1")
        if not math.isfinite(self.collective_timeout_s) or self.collective_timeout_s <= 0:
            bad("collective_timeout_s", "must be a finite number > 0")
        if self.keep_checkpoints < 1:
            bad("keep_checkpoints", "must be >= 1")
        if not 0 <= self.warmup_ratio < 1:
            bad("warmup_ratio", "must be in [0, 1)")
        if not all(0 <= b < 1 for b in self.adam_betas):
            bad("adam_betas", "must be two numbers in [0, 1)")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad("dtype", "must be auto, float32 or bfloat16")
        if not self.step_delimiters or not all(self.step_delimiters):
            bad("step_delimiters", "must be a non-empty list of non-empty strings")
        return self


def _coerce(value, annotation, key: str):
    """Convert a parsed value (or a key=value string) to the field's type, strictly."""
    origin = typing.get_origin(annotation)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = json.loads(value) if value.strip().startswith("[") else value.split(",")
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = typing.get_args(annotation)
        if origin is tuple:
            if len(value) != len(args):
                raise ConfigError(f"{key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v, args[0], key) for v in value]
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        try:
            as_float = float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected an integer, got {value!r:.40}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if annotation is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            raise ConfigError(f"{key}: expected a number, got {value!r:.40}") from None
    if annotation is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {annotation}")  # pragma: no cover


def _field_types(cls) -> dict:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                cls=TrainConfig):
    """Build a config from an optional JSON/TOML file and ``key=value`` overrides."""
    types = _field_types(cls)
    values: dict = {}
    if path:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
            raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: not valid {path.suffix.lstrip('.') or 'JSON'}: {e}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the config must be an object of key: value")
        for key, value in raw.items():
            if key not in types:
                raise ConfigError(f"{path}: unknown key {key!r}; known keys: {', '.join(types)}")
            values[key] = _coerce(value, types[key], f"{path}: {key}")
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"override {item!r} is not key=value")
        key = key.strip()
        if key not in types:
            raise ConfigError(f"unknown key {key!r}; known keys: {', '.join(types)}")
        values[key] = _coerce(value, types[key], key)
    return cls(**values).validate()


def save_config(config, path: str | os.PathLike) -> None:
    from oreo_fast.jsonl import write_json

    write_json(path, dataclasses.asdict(config))
