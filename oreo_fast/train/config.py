"""The trainer's typed configuration (``TrainConfig``): loaded from a JSON or TOML file,
overridden by ``key=value`` arguments, validated on construction (unknown keys, wrong types
and bad values rejected with the key named), saved resolved as ``output_dir/config.json``."""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, field

from oreo_fast.config import load_config, reject, save_config
from oreo_fast.ops import KL_ESTIMATORS, LEVELS

__all__ = ["TrainConfig", "load_train_config", "save_config"]

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# kept dense: the fused loss reads the LM head whole, tied to the input embedding
DENSE_ONLY = ("lm_head", "embed_tokens", "value_head")


@dataclass
class TrainConfig:
    # models and data
    policy: str = ""  # HF checkpoint folder: the starting policy (the SFT model)
    reference: str = ""  # frozen reference; empty = the policy folder
    value: str = ""  # value model init: a saved value model or any causal LM; empty = policy
    train_file: str = ""  # trajectories JSONL: {"prompt", "response" | "turns", "reward"}
    output_dir: str = "runs/oreo"
    max_length: int = 1024  # prompt + response + EOS, in tokens
    # a step starts after each delimiter; "\n" is the paper's (one line = one step). For MATH
    # solutions with display maths over several lines, "\n\n" (paragraphs) is the usual choice
    step_delimiters: list[str] = field(default_factory=lambda: ["\n"])
    strict: bool = False  # over-long prompts: error instead of a counted warning
    prompt_format: str = "auto"  # plain | chat | auto: which EOS ends a trajectory and the
    # markup of multi-turn records (chat: the template's); must match how the file was sampled
    keep_truncated: bool = False  # truncated responses: reward 0 without an EOS action (else left out)

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

    # LoRA (peft): adapters on the policy, the value model or both; the LM head, embeddings and
    # base weights stay dense and frozen (the value head always trains). Needs oreo-fast[lora]
    lora: str = "none"  # none | policy | value | both: the models trained through adapters
    lora_rank: int = 16  # r, the adapters' rank
    lora_alpha: float = 32.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input (0: none)
    # the adapted Linear layers, by name suffix (peft's target_modules): attention and MLP
    lora_targets: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    # what policy/ and value/ hold: "merged" (dense Hugging Face folders, adapters merged
    # into the weights) or "adapter" (peft's adapter_config.json + adapter weights only)
    lora_export: str = "merged"

    # runtime
    threads: int = 0  # torch CPU threads per process (0: torch's default, or OMP_NUM_THREADS)
    device: str = "auto"  # "auto": CUDA device LOCAL_RANK when present, else cpu; "cpu"; "cuda"
    dtype: str = "auto"  # "auto": bf16 compute with fp32 master weights on CUDA, fp32 on CPU
    impl: str = "auto"  # loss implementation (see oreo_fast.ops)
    # the fused loss computes its gradient in the forward (4 LM-head matmuls a step instead
    # of 6; oreo_fast.ops.grad_in_forward); false: the two-pass path
    grad_in_forward: bool = True
    gradient_checkpointing: bool = False
    # FSDP2: gradients reduce-scattered after every micro-batch and accumulated sharded (the
    # default), or held unsharded until the step's last micro-batch (true: fewer collectives,
    # a whole model's gradients per rank)
    accumulate_unsharded: bool = False
    liger: bool = False  # Liger-Kernel patches (RMSNorm, RoPE, SwiGLU) when installed
    attn_implementation: str = "auto"  # "auto": flash_attention_2 when installed, else sdpa
    save_every: int = 0  # optimizer steps between checkpoints (output_dir/checkpoints); 0 = none
    keep_checkpoints: int = 2  # the newest N checkpoints are kept
    dp_replicate: int = 1  # HSDP: replica groups (e.g. nodes), each sharding over its ranks
    async_save: bool = False  # write checkpoint shards in the background while training goes on
    export_every: int = 0  # optimizer steps between policy/ and value/ exports (0: at the end only)
    export_dtype: str = "auto"  # dtype of the exported folders; "auto": the compute dtype
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    max_bad_steps: int = 5  # stop after this many consecutive steps with NaN/Inf loss or grads
    collective_timeout_s: float = 600.0  # a dead or stuck rank fails the others after this
    progress: bool = True
    tensorboard: bool = False
    wandb: bool = False
    trust_remote_code: bool = False

    def __post_init__(self):
        bad = functools.partial(reject, self)
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
        for key in ("epochs", "global_batch_size", "micro_batch_size"):
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
        if self.dp_replicate < 1:
            bad("dp_replicate", "must be >= 1")
        if self.export_every < 0:
            bad("export_every", "must be >= 0")
        if self.export_dtype not in ("auto", "float32", "bfloat16"):
            bad("export_dtype", "must be auto, float32 or bfloat16")
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
        if self.device not in ("auto", "cpu", "cuda"):
            bad("device", "must be auto, cpu or cuda")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            bad("dtype", "must be auto, float32 or bfloat16")
        if self.prompt_format not in ("auto", "plain", "chat"):
            bad("prompt_format", "must be auto, plain or chat")
        if not self.step_delimiters or not all(self.step_delimiters):
            bad("step_delimiters", "must be a non-empty list of non-empty strings")
        self._check_lora(bad)

    def _check_lora(self, bad):
        if self.lora not in ("none", "policy", "value", "both"):
            bad("lora", "must be none, policy, value or both")
        if self.algorithm == "rft" and self.lora in ("value", "both"):
            bad("lora", "rft trains no value model: use lora=policy")
        if self.lora_rank < 1:
            bad("lora_rank", "must be >= 1")
        if not math.isfinite(self.lora_alpha) or self.lora_alpha <= 0:
            bad("lora_alpha", "must be a finite number > 0")
        if not 0 <= self.lora_dropout < 1:
            bad("lora_dropout", "must be in [0, 1)")
        if not self.lora_targets or not all(isinstance(t, str) and t.strip()
                                            for t in self.lora_targets):
            bad("lora_targets", "must be a non-empty list of module names")
        if any(t.strip().split(".")[-1] in DENSE_ONLY for t in self.lora_targets):
            bad("lora_targets", f"{', '.join(DENSE_ONLY)} stay dense (the fused loss reads "
                "the LM head whole)")
        if self.lora_export not in ("merged", "adapter"):
            bad("lora_export", "must be merged or adapter")
        if self.lora == "none" and self.lora_export != "merged":
            bad("lora_export", "an adapter export needs lora=policy, value or both")


def load_train_config(path: str | os.PathLike | None = None,
                      overrides: list[str] | None = None) -> TrainConfig:
    """``TrainConfig`` from an optional JSON/TOML file and ``key=value`` overrides."""
    return load_config(TrainConfig, path, overrides)
