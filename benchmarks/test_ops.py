"""Forward+backward time (pytest-benchmark, in this process) and extra peak memory (a fresh
subprocess per provider, benchmarks/runner.py) of every provider, after checking once, outside
the timed region, that its values and gradients match oreo_fast.ops.reference."""
from __future__ import annotations

import gc

import pytest
import torch

from benchmarks import providers, report


def _measure_memory(name: str, shape_name: str, device: torch.device) -> dict:
    return report.measure_in_subprocess(
        "benchmarks.runner", ["--provider", name, "--shape", shape_name, "--device", str(device)],
        timeout=1200)


@pytest.mark.parametrize("name", list(providers.PROVIDERS))
def test_forward_backward(benchmark, name, bench_setup, group_cache, record):
    device, shape_name, rounds = bench_setup
    shape = providers.SHAPES[shape_name]
    provider = providers.PROVIDERS[name]
    record(name, label=provider.label, level=provider.level)

    reason = provider.unavailable(device)
    if reason:
        record(name, status="skipped", reason=reason)
        pytest.skip(reason)

    inputs, expected = group_cache.get(provider.level, shape, device)
    providers.clear_grads(inputs)
    try:
        step = provider.make_step(inputs, device)
        output = step()  # also the compilation of the compiled providers
    except Exception as error:
        if not provider.compiles:
            raise
        reason = f"{type(error).__name__}: {error}"[:2000]
        record(name, status="failed", reason=reason)
        pytest.skip(f"{name} failed: {reason[:300]}")
    grads = [x.grad for x in providers.trainable(inputs)]
    providers.check_step(name, output, grads, expected, shape.torch_dtype)
    del output, grads

    benchmark.group = f"{provider.level}-level, {shape.slug}, {device.type}"
    benchmark.extra_info.update(label=provider.label, shape=shape.slug)
    # the checked step above was the warm-up on CPU, where a step takes seconds
    benchmark.pedantic(step, setup=lambda: providers.clear_grads(inputs), rounds=rounds,
                       warmup_rounds=providers.warmup_rounds(device), iterations=1)
    providers.clear_grads(inputs)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return  # correctness-only run

    stats = benchmark.stats.stats
    record(name, status="ok", median_ms=stats.median * 1e3, mean_ms=stats.mean * 1e3,
           min_ms=stats.min * 1e3, stddev_ms=stats.stddev * 1e3, rounds=stats.rounds)

    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    measured = _measure_memory(name, shape_name, device)
    if measured.get("status") != "ok":
        record(name, memory_error=measured.get("reason", "unknown"))
        pytest.fail(f"{name}: memory measurement failed: {measured.get('reason')}")
    memory = measured["memory"]
    record(name, extra_peak_mib=memory["extra_peak_mb"], peak_mib=memory["peak_mb"],
           before_mib=memory["before_mb"], inputs_mib=memory["inputs_mb"],
           memory_method=memory["method"])
    benchmark.extra_info.update(extra_peak_mib=round(memory["extra_peak_mb"], 1))
