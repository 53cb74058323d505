"""Measure one provider's peak memory in a fresh process; prints one JSON line.

    python -m benchmarks.runner --provider ours_fused [--shape cpu] [--device cpu]

"Extra peak" is the peak during one forward+backward minus what was resident just before it,
after the inputs exist and a warm-up step has run (so torch.compile's compilation, lazy
library loading and one-off caches are not counted; the gradients of the trainable inputs are).
On CPU eager providers warm up on the small shape; compiled ones, and all on CUDA, at the
measured shape.
- CUDA: torch.cuda.max_memory_allocated() minus torch.cuda.memory_allocated().
- CPU: the kernel's resident-set high-water mark (VmHWM) minus VmRSS, with the mark reset by
  writing 5 to /proc/self/clear_refs just before the step. Where that reset is not allowed the
  high-water mark includes the warm-up step and compilation (reported as the method).
  The parent starts this process with MALLOC_MMAP_THRESHOLD_ set so glibc returns freed large
  blocks to the system instead of keeping them resident, which would hide later peaks.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time

import torch

from benchmarks import providers
from benchmarks.memory import peak_memory


def measure(provider_name: str, shape_name: str, device: torch.device, time_rounds: int = 0) -> dict:
    provider = providers.PROVIDERS[provider_name]
    shape = providers.SHAPES[shape_name]
    result = {"provider": provider_name, "shape": shape_name, "device": str(device)}
    reason = provider.unavailable(device)
    if reason:
        return {**result, "status": "skipped", "reason": reason}

    warm_at_measured_shape = provider.compiles or device.type == "cuda"
    if not warm_at_measured_shape:
        # eager on CPU: warm up (lazy imports, library init, thread pools) on the small shape,
        # seconds cheaper than a step at the measured one
        small = providers.make_inputs(providers.SHAPES["small"], device, provider.level)
        provider.make_step(small, device)()
        del small
    inputs = providers.make_inputs(shape, device, provider.level)
    step = provider.make_step(inputs, device)
    if warm_at_measured_shape:
        step()  # compilation, Triton autotuning and cuBLAS heuristics are per shape
        providers.clear_grads(inputs)
    gc.collect()
    mib = 2**20
    if device.type == "cuda":
        torch.cuda.empty_cache()
    output, memory = peak_memory(step, device)
    del output
    memory["inputs_mb"] = providers.input_bytes(inputs) / mib
    result.update(status="ok", memory=memory)

    if time_rounds:  # standalone timing, for a quick look without pytest
        times = []
        for _ in range(time_rounds):
            providers.clear_grads(inputs)
            start = time.perf_counter()
            step()
            times.append((time.perf_counter() - start) * 1e3)
        result["median_ms"] = statistics.median(times)
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--provider", required=True, choices=sorted(providers.PROVIDERS))
    parser.add_argument("--shape", default=None, choices=sorted(providers.SHAPES))
    parser.add_argument("--device", default=None)
    parser.add_argument("--time-rounds", type=int, default=0)
    args = parser.parse_args(argv)
    providers.configure_threads()
    device = torch.device(args.device) if args.device else providers.bench_device()
    shape = args.shape or providers.bench_shape_name(device)
    try:
        result = measure(args.provider, shape, device, args.time_rounds)
    except Exception as error:  # reported to the parent, which decides what it means
        result = {"provider": args.provider, "shape": shape, "device": str(device),
                  "status": "failed", "reason": f"{type(error).__name__}: {error}"[:2000]}
    print(json.dumps(result))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
