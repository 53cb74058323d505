"""Models at the widths of real checkpoints, built locally: the configs of Qwen2.5-1.5B,
Llama-3.2-1B and TinyLlama-1.1B (untied) with few decoder layers, random weights and a small
BPE vocabulary trained here (no downloads). Shared by the tests that run the search, sampling,
saving and training on them (tests/test_real_widths.py)."""
import torch

from oreo_fast.models import ValueModel
from oreo_fast.tokenizer import build_tokenizer

# What each checkpoint's config.json says, minus the vocabulary (ours is trained on TEXTS)
# and the depth (set per test). The Qwen config keeps its disabled sliding window, which a
# model-support check must not mistake for sliding-window attention.
REAL_CONFIGS = {
    "qwen2.5-1.5b": dict(
        model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
        num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1_000_000.0,
        rms_norm_eps=1e-6, max_position_embeddings=131072, sliding_window=131072,
        use_sliding_window=False, max_window_layers=21,
        # Qwen's embedding has more rows than its tokenizer has tokens (151,936 vs 151,665)
        pad_vocabulary_to=128),
    "llama-3.2-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, tie_word_embeddings=True, rope_theta=500_000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        rms_norm_eps=1e-5, max_position_embeddings=131072, pad_vocabulary_to=1),
    "tinyllama-1.1b-untied": dict(
        model_type="llama", hidden_size=2048, intermediate_size=5632, num_attention_heads=32,
        num_key_value_heads=4, tie_word_embeddings=False, rope_theta=10_000.0,
        rms_norm_eps=1e-5, max_position_embeddings=2048, pad_vocabulary_to=1),
}

PROMPT = "Question: start at {a}, multiply by {b}, add {c}.\nAnswer:\n"


def records(n: int = 8) -> list[dict]:
    """Trajectories of the synthetic arithmetic task, every third one wrong (reward 0)."""
    out = []
    for i in range(n):
        a, b, c = 3 + i, 2 + i % 5, i % 7
        good = i % 3 != 0
        total = a * b + c + (0 if good else 1)
        out.append({"prompt": PROMPT.format(a=a, b=b, c=c),
                    "response": f"{a} * {b} = {a * b}\n{a * b} + {c} = {total}\n#### {total}",
                    "reward": int(good), "problem_id": i})
    return out


def real_tokenizer():
    rows = records(24)
    return build_tokenizer([r["prompt"] + r["response"] for r in rows], vocab_size=400)


def real_config(name: str, tokenizer, layers: int):
    """The transformers config of ``name`` with ``layers`` decoder layers, sized for
    ``tokenizer`` (rounded up as the checkpoint pads its vocabulary)."""
    from transformers import AutoConfig

    spec = dict(REAL_CONFIGS[name])
    model_type, multiple = spec.pop("model_type"), spec.pop("pad_vocabulary_to")
    vocab = -(-len(tokenizer) // multiple) * multiple
    return AutoConfig.for_model(
        model_type, vocab_size=vocab, num_hidden_layers=layers,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, **spec)


def real_policy(name: str, tokenizer, layers: int, seed: int = 0):
    """A randomly initialised causal LM of ``name``'s architecture and widths."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(real_config(name, tokenizer, layers),
                                             attn_implementation="sdpa")
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model.eval()


def real_value_model(name: str, tokenizer, layers: int, seed: int = 1):
    """A value model on a fresh backbone of ``name``, its head random (a zero head would
    rate every state 0 and make the search's choice a tie) and scaled so values are O(1)."""
    policy = real_policy(name, tokenizer, layers, seed)
    model = ValueModel(policy.model, {"base_model_type": policy.config.model_type,
                                      "base_architectures": [type(policy).__name__]})
    generator = torch.Generator().manual_seed(seed)
    hidden = policy.config.hidden_size
    with torch.no_grad():
        model.value_head.weight.copy_(torch.randn(1, hidden, generator=generator) / hidden ** 0.5)
    return model.eval()
