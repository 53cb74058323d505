"""Beam-search benchmark: the cached searcher (``oreo_fast.search.beam.beam_search``) with its two
ways of sharing a parent's KV with its children -- ``cascade`` (the prefix read in place, merged
with each child's own step by log-sum-exp) and ``copy`` (``kv.expand_rows``: one prefix copy per
child) -- against the naive re-encoding one (``oreo_fast.search.naive``), same random-weight
models, prompts and seed: tokens processed by each model (counted by the searchers), wall
time, peak memory.

Steps have a fixed length: no token ends a step and the EOS id lies outside the vocabulary,
so every candidate step is exactly ``step_tokens`` long and every run has the same work.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from benchmarks import report as ops_report
from benchmarks.providers import bench_device  # noqa: F401 (re-exported)


@dataclass(frozen=True)
class SearchShape:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    prompt: int  # prompt tokens (problem i has prompt - 8 i: different lengths in a batch)
    problems: int
    steps: int
    step_tokens: int
    dtype: str

    @property
    def slug(self) -> str:
        return (f"h{self.hidden}-l{self.layers}-v{self.vocab}-p{self.prompt}x{self.problems}"
                f"-s{self.steps}x{self.step_tokens}-{self.dtype}")


SEARCHERS = ("cascade", "copy", "naive")  # the first two: beam_search's kv_sharing

SHAPES = {
    # the embedded default's model size (oreo_fast.models.TinyModelConfig)
    "cpu": SearchShape(128, 384, 4, 4, 2, 384, 256, 1, 6, 40, "fp32"),
    "small": SearchShape(64, 128, 2, 2, 1, 384, 64, 2, 3, 8, "fp32"),
    # Qwen2.5-1.5B's shape
    "gpu": SearchShape(1536, 8960, 28, 12, 2, 151_936, 512, 2, 10, 40, "bf16"),
}


def bench_shape(device: torch.device) -> tuple[str, SearchShape]:
    name = os.environ.get("OREO_BENCH_SEARCH_SHAPE", "gpu" if device.type == "cuda" else "cpu")
    return name, SHAPES[name]


def build_models(shape: SearchShape, device: torch.device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from oreo_fast.models import ValueModel

    dtype = torch.bfloat16 if shape.dtype == "bf16" else torch.float32
    config = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.hidden,
                         intermediate_size=shape.intermediate, num_hidden_layers=shape.layers,
                         num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         use_sliding_window=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).to(device, dtype).eval()
    torch.manual_seed(1)
    value = ValueModel(Qwen2ForCausalLM(config).model).to(device, dtype).eval()
    torch.nn.init.normal_(value.value_head.weight, std=1.0)  # values that differ
    return policy, value


def make_prompts(shape: SearchShape) -> list[list[int]]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randint(0, shape.vocab, (shape.prompt - 8 * i,), generator=gen).tolist()
            for i in range(shape.problems)]


def _kv_bytes(kv) -> int:
    """Bytes of the buffers a KV (kv.KV: copied prefixes) or CascadeKV (the children's own
    suffixes; the prefix is the parents', not allocated) holds for its children."""
    return sum(t.numel() * t.element_size() for layer in kv.cache.layers
               for t in (layer._kbuf, layer._vbuf))


@contextlib.contextmanager
def child_kv_recorder():
    """Records the bytes of KV allocated for the children at each step of beam_search (both
    models): the memory that copy-free sharing saves, independent of the allocator."""
    from oreo_fast.search import beam as search

    record = {"per_step_mib": [], "total_mib": 0.0}
    original = search.children_kv

    def recording(*args, **kwargs):
        kv = original(*args, **kwargs)
        record["per_step_mib"].append(_kv_bytes(kv) / 2**20)
        return kv

    search.children_kv = recording
    try:
        yield record
    finally:
        search.children_kv = original
        record["total_mib"] = sum(record["per_step_mib"])
        # the policy's and the value model's children at the same step are alive together
        pairs = record["per_step_mib"]
        record["max_step_mib"] = max((sum(pairs[i:i + 2]) for i in range(0, len(pairs), 2)),
                                     default=0.0)


def run(searcher: str, policy, value, prompts, shape: SearchShape, b: int, k: int):
    """One search; returns (results, TokenCounts, child KV record)."""
    from oreo_fast.search.beam import SearchConfig, TokenCounts, beam_search
    from oreo_fast.search.naive import naive_beam_search

    if searcher not in SEARCHERS:
        raise ValueError(f"searcher must be one of {SEARCHERS}, got {searcher!r}")
    cached = searcher != "naive"
    cfg = SearchConfig(beams=b, candidates=k, max_steps=shape.steps,
                       max_step_tokens=shape.step_tokens, temperature=1.0, seed=0,
                       kv_sharing=searcher if cached else "cascade")
    fn = beam_search if cached else naive_beam_search
    counts = TokenCounts()
    # EOS outside the vocabulary and no step-end token: fixed-length steps
    with child_kv_recorder() as record:
        results = fn(policy, value, prompts, cfg, [shape.vocab], set(), 0, counts=counts)
    return results, counts, record


def token_budget(prompts, shape: SearchShape, b: int, k: int) -> dict:
    """Prompt and generated (sampled) tokens of the search: what it must process at least."""
    candidates = b * k + (shape.steps - 1) * b * k  # B x K at the root, then K per beam
    generated = len(prompts) * candidates * shape.step_tokens
    return {"prompt_tokens": sum(len(p) for p in prompts), "generated_tokens": generated}


def build_report(results: dict, device: torch.device, shape_name: str,
                 shape: SearchShape) -> dict:
    ratios = {}
    for bk in sorted({key.split("_", 1)[1] for key in results}):
        timed = {s: results[f"{s}_{bk}"] for s in SEARCHERS
                 if "median_s" in results.get(f"{s}_{bk}", {})}
        entry = {}
        for cached in ("cascade", "copy"):
            if cached in timed and "naive" in timed:
                entry[f"speedup_wall_{cached}_vs_naive"] = \
                    timed["naive"]["median_s"] / timed[cached]["median_s"]
                entry[f"tokens_naive_over_{cached}"] = \
                    timed["naive"]["tokens_total"] / timed[cached]["tokens_total"]
        if "cascade" in timed and "copy" in timed:
            cascade, copy = timed["cascade"], timed["copy"]
            entry["wall_copy_over_cascade"] = copy["median_s"] / cascade["median_s"]
            # None when the cascade searcher's extra peak is under 1 MiB
            entry["extra_peak_copy_over_cascade"] = copy["extra_peak_mib"] / \
                cascade["extra_peak_mib"] if cascade["extra_peak_mib"] >= 1 else None
            entry["extra_peak_saved_mib"] = copy["extra_peak_mib"] - cascade["extra_peak_mib"]
            entry["child_kv_max_step_copy_over_cascade"] = \
                copy["child_kv_max_step_mib"] / cascade["child_kv_max_step_mib"]
        ratios[bk] = entry
    goals = {}
    for key, entry in results.items():
        if not key.startswith("naive_"):
            goals[f"{key}: tokens per model <= 1.2 x (prompt + generated)"] = \
                entry["tokens_per_model_ratio"] <= 1.2
    if "speedup_wall_cascade_vs_naive" in ratios.get("B4_K4", {}):
        goals["B4_K4: cascade wall time >= 5x faster than naive"] = \
            ratios["B4_K4"]["speedup_wall_cascade_vs_naive"] >= 5
    return {
        "benchmark": "oreo_fast value-guided beam search: cached with cascade KV sharing "
                     "(children read the parent's prefix in place), cached with copied "
                     "prefixes (expand_rows), naive re-encoding searcher",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": ops_report.environment(device),
        "shape_name": shape_name, "shape": asdict(shape),
        "tokens": "counted by the searchers: real tokens each model processed (padding "
                  "excluded; padded_slots counts padding positions run); tokens_total = "
                  "policy + value; ratios vs prompt + generated tokens (all candidates)",
        "timing": "wall seconds of one search of all problems (batched), median of rounds",
        "memory": "extra_peak_mib: peak during one search minus what was in use before it "
                  "(CPU: VmHWM after a clear_refs reset, in this process, with glibc's "
                  "MALLOC_MMAP_THRESHOLD_ fixed so that freed tensors leave the resident set "
                  "and earlier searches do not hide later ones' peaks; CUDA: "
                  "max_memory_allocated). child_kv_*_mib: bytes of the KV buffers allocated "
                  "for the children at each step (copy: the prefix copied per child plus room "
                  "for the step; cascade: only the children's own step), max over steps of "
                  "both models together, and the sum over steps",
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
        "searchers": results, "ratios": ratios, "goals": goals,
    }


def write_report(built: dict, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    env = built["environment"]
    kind = "cuda" if env["device"].startswith("cuda") else f"cpu{env['torch_threads']}t"
    shape = SearchShape(**built["shape"])
    searchers = "-".join(s for s in SEARCHERS
                         if any(key.startswith(s + "_") for key in built["searchers"]))
    path = directory / f"search_{kind}_{shape.slug}_{searchers}_{built['date'][:10]}.json"
    path.write_text(json.dumps(built, indent=2) + "\n")
    return path


def format_table(built: dict) -> str:
    rows = [("searcher", "B x K", "median s", "policy tok", "value tok", "tok/(p+g) per model",
             "extra peak MiB", "child KV MiB (max step)")]
    for key, e in built["searchers"].items():
        rows.append((key.split("_")[0], key.split("_", 1)[1], f"{e.get('median_s', 0):.2f}",
                     str(e["policy_tokens"]), str(e["value_tokens"]),
                     f"{e['tokens_per_model_ratio']:.2f}", f"{e['extra_peak_mib']:.0f}",
                     f"{e['child_kv_max_step_mib']:.1f}"))
    width = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, width)) for r in rows]
    for bk, r in built["ratios"].items():
        parts = [f"{name} {r[f'speedup_wall_{name}_vs_naive']:.1f}x faster than naive"
                 for name in ("cascade", "copy") if f"speedup_wall_{name}_vs_naive" in r]
        if "wall_copy_over_cascade" in r:
            parts.append(f"copy / cascade wall {r['wall_copy_over_cascade']:.2f}, extra peak "
                         f"saved by cascade {r['extra_peak_saved_mib']:.0f} MiB")
        lines.append(f"{bk}: " + ", ".join(parts))
    return "\n".join(lines)
