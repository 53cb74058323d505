"""Beam-search benchmark (pytest-benchmark): the cached searcher with cascade KV sharing and with
copied prefixes vs the naive searcher at B = K = 4 and 7, wall time, tokens processed by each
model and peak memory; all three must return the same answers.
See benchmarks/search_bench.py and benchmarks/README.md.

Environment: OREO_BENCH_DEVICE, OREO_BENCH_THREADS, OREO_BENCH_RESULTS_DIR as for the op suite;
OREO_BENCH_SEARCH_SHAPE (cpu, small, gpu; default by device); OREO_BENCH_SEARCH_ROUNDS (timed
rounds of each cached searcher, default 3; the naive searcher runs once: it is the slow one).
On CPU run it with MALLOC_MMAP_THRESHOLD_=65536 (glibc): large tensors are then mmapped and
returned to the system when freed, so one search's peak is not hidden by memory an earlier
search left in the heap.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch

from benchmarks import report as ops_report
from benchmarks import search_bench as sb
from benchmarks.memory import peak_memory
from benchmarks.providers import configure_threads

RESULTS: dict[str, dict] = {}
OUTPUTS: dict[str, list] = {}
_STATE: dict = {}


@pytest.fixture(scope="module")
def search_setup(request):
    configure_threads()
    device = sb.bench_device()
    shape_name, shape = sb.bench_shape(device)
    policy, value = sb.build_models(shape, device)
    prompts = sb.make_prompts(shape)
    for searcher in ("cascade", "copy"):  # one-time costs (lazy inits) before any measurement
        sb.run(searcher, policy, value, prompts, shape, 2, 2)
    yield device, shape, policy, value, prompts
    if any("median_s" in e for e in RESULTS.values()):
        built = sb.build_report(RESULTS, device, shape_name, shape)
        directory = Path(os.environ.get("OREO_BENCH_RESULTS_DIR", ops_report.RESULTS_DIR))
        _STATE["report"], _STATE["path"] = built, sb.write_report(built, directory)
        request.config.pluginmanager.register(ops_report.TableSummary(
            "oreo_fast beam-search benchmark", sb.format_table(built), _STATE["path"]), "oreo_search_summary")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@pytest.mark.parametrize("bk", [4, 7])
@pytest.mark.parametrize("searcher", sb.SEARCHERS)
def test_search(benchmark, search_setup, searcher, bk):
    device, shape, policy, value, prompts = search_setup
    key = f"{searcher}_B{bk}_K{bk}"

    def once():
        out = sb.run(searcher, policy, value, prompts, shape, bk, bk)
        _sync(device)
        return out

    (results, counts, child_kv), memory = peak_memory(once, device)  # also the warm-up
    budget = sb.token_budget(prompts, shape, bk, bk)
    needed = budget["prompt_tokens"] + budget["generated_tokens"]
    entry = {"policy_tokens": counts.policy, "value_tokens": counts.value,
             "padded_slots": counts.padded_slots, **budget,
             "tokens_total": counts.policy + counts.value,
             "tokens_per_model_ratio": max(counts.policy, counts.value) / needed,
             "tokens_both_models_ratio": (counts.policy + counts.value) / needed,
             "extra_peak_mib": memory["extra_peak_mb"], "peak_mib": memory["peak_mb"],
             "child_kv_max_step_mib": child_kv["max_step_mib"],
             "child_kv_total_mib": child_kv["total_mib"],
             "memory_method": memory["method"]}
    OUTPUTS[key] = [(r.tokens, r.value) for r in results]
    for name in sb.SEARCHERS:  # same seed: the same answers and values from every searcher
        other = OUTPUTS.get(f"{name}_B{bk}_K{bk}")
        if name != searcher and other is not None:
            assert [t for t, _ in other] == [t for t, _ in OUTPUTS[key]]
            assert all(abs(a - b) < 1e-3 for (_, a), (_, b) in zip(other, OUTPUTS[key]))
    if searcher != "naive":
        assert entry["tokens_per_model_ratio"] <= 1.2
    rounds = int(os.environ.get("OREO_BENCH_SEARCH_ROUNDS", 3)) if searcher != "naive" else 1
    t0 = time.process_time()
    benchmark.pedantic(once, rounds=rounds, iterations=1)
    if benchmark.stats is not None:  # None under --benchmark-disable
        entry.update(median_s=benchmark.stats.stats.median, rounds=rounds,
                     cpu_time_s=(time.process_time() - t0) / rounds)
    RESULTS[key] = entry
