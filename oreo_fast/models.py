"""Policy and value models: creation of the tiny default, loading and saving.

Every model is a local Hugging Face checkpoint folder (safetensors weights, config.json and
the tokenizer files), loaded through the Auto classes, so the embedded tiny Qwen2 and a real
Qwen2.5-Math-1.5B go through the same code. ``trust_remote_code`` is off unless asked for.

The value model is the policy's decoder without its LM head (``AutoModel``) plus a scalar
head ``Linear(hidden, 1, bias=False)``, zero-initialised, on the final-norm hidden state:
``values[b, t]`` is V of the prefix up to and including token t. A saved value model is the
backbone's own checkpoint plus ``value_head.safetensors``, and config.json gains an
``oreo_value_model`` entry naming the base architecture.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from oreo_fast.config import reject, require_at_least
from oreo_fast.errors import ConfigError, ModelDirError
from oreo_fast.io import atomic_dir
from oreo_fast.tokenizer import template_turn_end_id, tokenizer_signature

VALUE_HEAD_FILE = "value_head.safetensors"
VALUE_CONFIG_KEY = "oreo_value_model"
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


# ------------------------------------------------------------------ folder checks


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


def check_same_vocabulary(models: dict[str, tuple[object, int, tuple | None]]) -> None:
    """``models``: role -> (where: a folder or a name, vocabulary size, tokenizer signature
    or None). Every model must have the first's vocabulary size, and every tokenizer given
    the first's (``tokenizer_signature`` / ``loaded_tokenizer_signature``); a
    :class:`ModelDirError` names both."""
    (first, (first_at, first_size, base)), *others = models.items()
    for role, (at, size, _) in others:
        if size != first_size:
            raise ModelDirError(f"vocabulary mismatch: {role} model {at} has {size} tokens, "
                                f"{first} model {first_at} has {first_size}")
    for role, (at, _, other) in others:
        if base is not None and other is not None and other != base:
            what = "special tokens" if other[0] == base[0] else "vocabulary"
            raise ModelDirError(f"tokenizer mismatch ({what}): {role} folder {at} and "
                                f"{first} folder {first_at} tokenize differently")


def check_folders_same_vocabulary(configs: dict[str, tuple[Path, object]]) -> None:
    """``configs``: role -> (folder, loaded HF config); the folders' own tokenizers compared."""
    check_same_vocabulary({role: (folder, cfg.vocab_size, tokenizer_signature(folder))
                           for role, (folder, cfg) in configs.items()})


@dataclass
class TinyModelConfig:
    """Size of the embedded default's Qwen2 model."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    tie_word_embeddings: bool = True
    seed: int = 0

    def __post_init__(self):
        require_at_least(self, 1, "hidden_size", "intermediate_size", "num_hidden_layers",
                         "num_attention_heads", "num_key_value_heads", "max_position_embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            reject(self, "num_key_value_heads", "must divide num_attention_heads")
        if self.hidden_size % self.num_attention_heads:
            reject(self, "num_attention_heads", "must divide hidden_size")


DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype: must be auto or one of {sorted(DTYPES)} (got {dtype!r})")
    return DTYPES[dtype]


def build_tiny_model(tokenizer, cfg: TinyModelConfig | None = None):
    """A randomly initialised Qwen2 causal LM sized for ``tokenizer``."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = cfg or TinyModelConfig()
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
    )
    torch.manual_seed(cfg.seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


# ------------------------------------------------------------------ device and dtype


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the current CUDA device when CUDA is present, else the CPU. Any other
    value is a torch device string ("cpu", "cuda", "cuda:1", "meta"); asking for CUDA
    where there is none is a :class:`ConfigError`, not a crash deep inside a job."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ConfigError(f"device: not a torch device (got {device!r})") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {device!r} asked for but no CUDA device is present "
                          "(use device=cpu or auto)")
    return resolved


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """``"auto"`` (or None): bfloat16 on CUDA, float32 elsewhere; else the named dtype."""
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return _dtype(dtype)


def check_device_and_dtype(config) -> None:
    """Config check shared by the jobs: ``config.device`` and ``config.dtype`` valid."""
    if config.dtype != "auto" and config.dtype not in DTYPES:
        reject(config, "dtype", f"must be auto or one of {sorted(DTYPES)}")
    if config.device != "auto":
        resolve_device(config.device)


def place(model, device: torch.device):
    """Move a loaded model onto ``device`` (the one move every job's model goes through)."""
    return model.to(device)


def load_model(path: str | os.PathLike, *, value: bool = False,
               device: str | torch.device = "auto", dtype: str | torch.dtype | None = "auto",
               trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """The one loader of every job: a policy (``AutoModelForCausalLM``) or, with ``value``,
    a :class:`ValueModel`, read in ``dtype`` (resolved for the device: "auto" is bf16 on
    CUDA and fp32 on CPU) and moved onto ``device`` ("auto": CUDA when present)."""
    where = resolve_device(device)
    kind = resolve_dtype(dtype, where)
    if value:
        model = ValueModel.from_pretrained(path, kind, trust_remote_code, attn_implementation)
    else:
        model = load_policy(path, kind, trust_remote_code, attn_implementation)
    return place(model, where)


def model_device(model) -> torch.device:
    """The device a loaded model's parameters are on."""
    return next(model.parameters()).device


def load_policy(path: str | os.PathLike, dtype: str | torch.dtype | None = "float32",
                trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
    """Any local causal-LM checkpoint folder (the policy, or the frozen reference)."""
    from transformers import AutoModelForCausalLM

    check_model_dir(path)
    config = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
    if VALUE_CONFIG_KEY in config:
        # its backbone would load under a fresh, random LM head: a policy that writes noise
        raise ModelDirError(f"folder is a saved value model (config.json has "
                            f"'{VALUE_CONFIG_KEY}'), not a policy; pass the policy folder "
                            "(a training run's policy/, not value/)", path)
    model = AutoModelForCausalLM.from_pretrained(
        str(path), dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
        attn_implementation=attn_implementation, use_safetensors=True)
    return model.eval()


def save_model(model, tokenizer, out_dir: str | os.PathLike,
                    extra_files: dict[str, Any] | None = None) -> Path:
    """Save ``model`` (safetensors) and ``tokenizer`` as one folder, atomically: the folder
    appears complete or not at all. ``extra_files`` maps file names to JSON-able objects."""
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, obj in (extra_files or {}).items():
            (tmp / name).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
    return out_dir


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's EOS, every EOS the model's generation
    config lists (Llama 3 lists ``<|end_of_text|>`` and ``<|eot_id|>``), and the token the chat
    template closes an assistant turn with (``<|im_end|>``), which a trajectory ends with."""
    ids = {tokenizer.eos_token_id, template_turn_end_id(tokenizer)}
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if configured is not None:
        ids.update(configured if isinstance(configured, (list, tuple)) else [configured])
    return sorted(i for i in ids if i is not None)


@dataclass
class ValueOutput:
    values: torch.Tensor  # [B, L] float32, V of each prefix
    hidden_states: torch.Tensor  # [B, L, H] the final-norm hidden states
    cache: Any = None  # the backbone's cache when use_cache=True


class ValueModel(nn.Module):
    """Causal-LM backbone + zero-initialised scalar head on the final-norm hidden state."""

    def __init__(self, backbone: nn.Module, base_info: dict | None = None):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.value_head = nn.Linear(hidden, 1, bias=False, dtype=backbone.dtype)
        nn.init.zeros_(self.value_head.weight)
        self.base_info = dict(base_info or {})

    @property
    def config(self):
        return self.backbone.config

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, dtype: str | torch.dtype | None = "float32",
                        trust_remote_code: bool = False, attn_implementation: str = "sdpa"):
        """From a saved value model (head restored) or from any causal-LM checkpoint such as
        the policy (its decoder, a fresh zero head)."""
        from safetensors.torch import load_file
        from transformers import AutoModel

        path = check_model_dir(path, "value model")
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
        saved = config.get(VALUE_CONFIG_KEY)
        if saved is not None and not isinstance(saved, dict):
            raise ModelDirError(f"config.json: {VALUE_CONFIG_KEY} is not an object", path)
        if saved is not None and not (path / saved.get("head", VALUE_HEAD_FILE)).is_file():
            raise ModelDirError(f"value model without its head file "
                                f"{saved.get('head', VALUE_HEAD_FILE)}", path)
        backbone = AutoModel.from_pretrained(
            str(path), dtype=_dtype(dtype), trust_remote_code=trust_remote_code,
            attn_implementation=attn_implementation, use_safetensors=True)
        if saved is None:
            base_info = {"base_model_type": config.get("model_type"),
                         "base_architectures": config.get("architectures") or []}
        else:
            base_info = {k: saved[k] for k in ("base_model_type", "base_architectures")}
        model = cls(backbone, base_info)
        if saved is not None:
            head = load_file(str(path / saved.get("head", VALUE_HEAD_FILE)))
            model.value_head.load_state_dict(
                {"weight": head["weight"].to(model.value_head.weight.dtype)})
        return model.eval()

    def save_pretrained(self, out_dir: str | os.PathLike, tokenizer=None) -> Path:
        """Backbone checkpoint + ``value_head.safetensors`` + tokenizer, written atomically."""
        from safetensors.torch import save_file

        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            self.backbone.save_pretrained(str(tmp), safe_serialization=True)
            save_file({"weight": self.value_head.weight.detach().contiguous().cpu()},
                      str(tmp / VALUE_HEAD_FILE))
            config_path = tmp / "config.json"
            config = json.loads(config_path.read_text(encoding="utf-8"))
            config[VALUE_CONFIG_KEY] = {"head": VALUE_HEAD_FILE, "format_version": 1,
                                        **self.base_info}
            config_path.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
            if tokenizer is not None:
                tokenizer.save_pretrained(str(tmp))
        return out_dir

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, cache=None,
                use_cache: bool = False) -> ValueOutput:
        out = self.backbone(input_ids=input_ids, attention_mask=attention_mask,
                            position_ids=position_ids, use_cache=use_cache,
                            **cache_arg(self.backbone, cache))
        hidden = out.last_hidden_state
        values = self.value_head(hidden).squeeze(-1).float()
        if use_cache and cache is None:  # the backbone made one
            cache = getattr(out, "cache", None)
            cache = getattr(out, "past_key_values", None) if cache is None else cache
        return ValueOutput(values, hidden, cache if use_cache else None)


def cache_arg(model, cache) -> dict:
    """``{name: cache}`` for ``model``'s forward. transformers 5.24 renamed the KV-cache
    argument ``past_key_values`` to ``cache`` (the old name warns and goes in 5.40); releases
    before the rename know only ``past_key_values``. :class:`ValueModel` takes ``cache``."""
    return {} if cache is None else {_cache_arg_name(type(model)): cache}


@functools.lru_cache(maxsize=None)
def _cache_arg_name(cls) -> str:
    return "cache" if "cache" in inspect.signature(cls.forward).parameters else "past_key_values"


def left_pad(sequences: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor,
                                                               torch.Tensor]:
    """Left-pad token lists: (input_ids, attention_mask, position_ids), positions counting
    from 0 at each sequence's first real token."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, s in enumerate(sequences):
        if s:
            ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s):] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions
