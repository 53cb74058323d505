"""Trainer-step benchmark: tokens/s (pytest-benchmark, in this process) and peak memory (a fresh
subprocess per provider, benchmarks/train_step_runner.py) of our OREO micro-step against a
paper-equivalent step on the same random-weight Qwen2 and batch, after checking once, outside
the timed region, that both give the same loss and gradients. See benchmarks/train_step.py.

Environment: OREO_BENCH_DEVICE, OREO_BENCH_THREADS, OREO_BENCH_ROUNDS (default 7 on CPU, 10 on
CUDA), OREO_BENCH_RESULTS_DIR as for the op suite; OREO_BENCH_TRAIN_SHAPE (cpu, small, gpu;
default by device), OREO_BENCH_TRAIN_BATCH / OREO_BENCH_TRAIN_SEQ (override the shape's),
OREO_BENCH_TRAIN_CHECKPOINTING=1 (gradient checkpointing of policy and value),
OREO_BENCH_TRAIN_ATTN (default sdpa).
"""
from __future__ import annotations

import gc
import os
import statistics
import time
from pathlib import Path

import pytest
import torch

from benchmarks import report as ops_report
from benchmarks import train_step as ts

RESULTS: dict[str, dict] = {}
_STATE: dict = {}


@pytest.fixture(scope="module")
def train_setup(request):
    ts.configure_threads()
    device = ts.bench_device()
    shape_name, shape = ts.bench_shape(device)
    setup = ts.build_setup(shape, device)
    _STATE.update(device=device, shape_name=shape_name, shape=shape,
                  setup_info={"gradient_checkpointing": setup.checkpointing,
                              "parameters": ts.model_parameters(setup)})
    yield setup
    del setup
    if any("median_ms" in entry for entry in RESULTS.values()):
        built = ts.build_report(RESULTS, device, shape_name, shape, _STATE["setup_info"])
        if "check" in _STATE:
            built["check"] = _STATE["check"]
        directory = Path(os.environ.get("OREO_BENCH_RESULTS_DIR", ops_report.RESULTS_DIR))
        _STATE["report"], _STATE["path"] = built, ts.write_report(built, directory)
        request.config.pluginmanager.register(ops_report.TableSummary(
            "oreo_fast trainer-step benchmark", ts.format_table(built), _STATE["path"]), "oreo_train_step_summary")


@pytest.fixture(scope="module")
def expected(train_setup):
    """The paper-equivalent step's loss parts and gradients on the check batch."""
    batch = ts.check_batch(train_setup)
    return batch, ts.run_for_check("paper", train_setup, batch)


def _measure_memory(name: str, device: torch.device) -> dict:
    return ops_report.measure_in_subprocess(
        "benchmarks.train_step_runner", ["--provider", name, "--device", str(device)],
        timeout=1800)


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


@pytest.mark.parametrize("name", ts.PROVIDERS)
def test_train_step(benchmark, name, train_setup, expected):
    setup, device = train_setup, train_setup.device
    RESULTS.setdefault(name, {}).update(label=ts.LABELS[name])

    check_batch, reference_result = expected
    got = ts.run_for_check(name, setup, check_batch)
    summary = ts.compare(reference_result, got, setup.shape.torch_dtype)
    _STATE.setdefault("check", {"batch": list(check_batch["input_ids"].shape)}).update(
        {k: v for k, v in summary.items() if name == "ours" or k == "loss_parts_paper"})
    del got
    _free(device)

    step = ts.make_step(name, setup)
    cpu_seconds = []  # process CPU time per call: robust to a shared CPU's descheduling

    def timed_step():
        start = time.process_time()
        out = step()
        cpu_seconds.append(time.process_time() - start)
        return out

    benchmark.group = f"train step, {setup.shape.slug}, {device.type}"
    benchmark.extra_info.update(label=ts.LABELS[name], tokens=setup.tokens)
    try:
        benchmark.pedantic(timed_step, setup=setup.zero_grad, rounds=ts.rounds(device),
                           warmup_rounds=ts.warmup_rounds(device), iterations=1)
    except torch.OutOfMemoryError as error:
        setup.zero_grad()
        _free(device)
        RESULTS[name].update(status="oom", reason=f"{type(error).__name__}: {error}"[:500])
        pytest.skip(f"{name}: out of memory at {setup.shape.slug}")
    setup.zero_grad()
    _free(device)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return  # correctness-only run (--benchmark-disable)

    stats = benchmark.stats.stats
    RESULTS[name].update(status="ok", median_ms=stats.median * 1e3, mean_ms=stats.mean * 1e3,
                         min_ms=stats.min * 1e3, stddev_ms=stats.stddev * 1e3,
                         rounds=stats.rounds, tokens=setup.tokens,
                         tokens_per_s=setup.tokens / stats.median)
    timed = cpu_seconds[ts.warmup_rounds(device):]
    if device.type == "cpu" and timed:
        cpu_median = statistics.median(timed)
        RESULTS[name].update(cpu_time_median_ms=cpu_median * 1e3,
                             tokens_per_cpu_s=setup.tokens / cpu_median)

    measured = _measure_memory(name, device)
    if measured.get("status") != "ok":
        RESULTS[name].update(memory_status=measured.get("status"),
                             memory_error=measured.get("reason", "unknown"))
        if measured.get("status") == "oom":
            return
        pytest.fail(f"{name}: memory measurement failed: {measured.get('reason')}")
    memory = measured["memory"]
    RESULTS[name].update(peak_mib=memory["peak_mb"], extra_peak_mib=memory["extra_peak_mb"],
                         before_mib=memory["before_mb"], memory_method=memory["method"])
    benchmark.extra_info.update(peak_mib=round(memory["peak_mb"], 1))
