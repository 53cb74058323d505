"""Peak memory of one trainer-benchmark step in a fresh process; prints one JSON line.

    python -m benchmarks.train_step_runner --provider ours [--shape cpu] [--device cpu]
    python -m benchmarks.train_step_runner --provider paper --time-rounds 3   # + timing by hand

Models and batch are built, one warm-up step runs and its gradients are dropped, then one step
is measured: ``peak_mb`` is the peak during it (weights, batch, activations, gradients), and
``extra_peak_mb`` that minus what was in use just before it.
- CUDA: torch.cuda.max_memory_allocated() (after reset_peak_memory_stats) and memory_allocated().
- CPU: VmHWM after a clear_refs reset and VmRSS (as benchmarks/runner.py); the parent sets
  MALLOC_MMAP_THRESHOLD_ so that freed large tensors leave the resident set.
An out-of-memory error is reported as ``"status": "oom"``, not raised.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time

import torch

from benchmarks import train_step as ts
from benchmarks.memory import peak_memory


def _is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def measure(provider: str, shape: ts.ModelShape, device: torch.device,
            checkpointing: bool, time_rounds: int = 0) -> dict:
    setup = ts.build_setup(shape, device, checkpointing)
    step = ts.make_step(provider, setup)
    step()  # warm-up at the measured shape: lazy init, allocator pools, cuBLAS heuristics
    setup.zero_grad()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    parts, memory = peak_memory(step, device)
    result = {"status": "ok", "memory": memory,
              "loss": {k: float(v) for k, v in parts.items()}, "tokens": setup.tokens}
    if time_rounds:
        times = []
        for _ in range(time_rounds):
            setup.zero_grad()
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        result["median_ms"] = statistics.median(times)
        result["tokens_per_s"] = setup.tokens / (result["median_ms"] / 1e3)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, choices=ts.PROVIDERS)
    parser.add_argument("--shape", default=None, choices=sorted(ts.SHAPES))
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--seq", type=int, default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--checkpointing", action="store_true", default=None)
    parser.add_argument("--time-rounds", type=int, default=0)
    args = parser.parse_args(argv)
    ts.configure_threads()
    device = torch.device(args.device) if args.device else ts.bench_device()
    name, shape = ts.bench_shape(device)
    if args.shape:
        name, shape = args.shape, ts.SHAPES[args.shape]
    shape = dataclasses.replace(shape, **{k: v for k, v in (("batch", args.batch),
                                                            ("seq", args.seq)) if v})
    checkpointing = ts.gradient_checkpointing() if args.checkpointing is None else True
    head = {"provider": args.provider, "shape": name, "slug": shape.slug, "device": str(device)}
    try:
        result = {**head, **measure(args.provider, shape, device, checkpointing,
                                    args.time_rounds)}
    except Exception as error:  # reported to the parent, which decides what it means
        status = "oom" if _is_oom(error) else "failed"
        result = {**head, "status": status, "reason": f"{type(error).__name__}: {error}"[:2000]}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
