"""The grad-in-forward OREO loss on a GPU (issue 15's GPU targets), for ``make gpu-check``:
forward + backward of the whole loss at N = 8192, V = 151,936, H = 1536 in bf16, against the
paper recipe, its ``torch.compile``, the two-pass fused path, the gif path's own four matmuls
(the floor) and Liger-Kernel's fused-linear JSD with beta = 1 (the full-vocabulary
KL(pi || pi_ref) of the same hidden states and heads: the nearest fused-linear loss a peer
ships, a reference point, not the same loss). Providers: benchmarks/gif_providers.py.

    python -m benchmarks.gif_gpu                                  # CUDA, shape "gpu", bf16
    python -m benchmarks.gif_gpu --device cpu --shape small --dtype float32 --rounds 1  # smoke

Times are CUDA-event medians after warm-up rounds (wall clock on CPU); memory is the
provider's extra peak (``torch.cuda.max_memory_allocated`` above what was allocated before
its step; not measured on CPU). Targets: gif <= 1.2x the floor, extra peak <= 1.5 GB. Every
provider but the floor and Liger is checked against the paper recipe first. The JSON goes
to ``OREO_BENCH_RESULTS_DIR`` (default benchmarks/results/).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import time
from pathlib import Path

import torch

from benchmarks import gif_providers as gp
from benchmarks import report

ORDER = ("paper", "paper_compiled", "two_pass", "gif", "floor", "liger_kl")


def make_liger_kl(x, budget=None):
    """Liger's fused-linear JSD at beta = 1 (KL(student || teacher)), mean over tokens, with
    the gradient into the policy's hidden states and head."""
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    jsd = LigerFusedLinearJSD(jsd_beta=1.0)
    B, T, H = x["hidden"].shape

    def step():
        loss = jsd(x["hidden"].reshape(B * T, H), x["weight"],
                   x["ref_hidden"].reshape(B * T, H), x["ref_weight"], None)
        loss.backward()
        return None

    return step


def _timer(device: torch.device):
    """A function running ``step`` once and returning its seconds (CUDA events on a GPU)."""
    def timed(step):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            end.record()
            torch.cuda.synchronize(device)
            return start.elapsed_time(end) / 1e3
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    return timed


def run(device: torch.device, shape_name: str, dtype: torch.dtype, rounds: int,
        warmup: int, names=ORDER) -> dict:
    x = gp.make_inputs(gp.SHAPES[shape_name], device, dtype)
    providers = {**gp.PROVIDERS, "liger_kl": make_liger_kl}
    timed, results = _timer(device), {}
    expected = None
    for name in names:
        try:
            step = providers[name](x)
            gp.clear_grads(x)
            out = step()  # first step: compiles, and is checked
            got = None if out is None else (torch.stack([f.detach().float() for f in out]),
                                            [t.grad.float().clone() for t in gp.trainable(x)])
            verdict = "not checked (computes no OREO loss)"
            if name == "paper":
                expected, verdict = got, "the reference"
            elif name in gp.CHECKED:
                try:  # a mismatch is reported beside the timing, which still runs
                    check(name, got, expected, dtype)
                    verdict = "matches the paper recipe"
                except AssertionError as mismatch:
                    verdict = f"MISMATCH: {mismatch}"[:300]
            for _ in range(warmup):
                gp.clear_grads(x)
                step()
            seconds = []
            for _ in range(rounds):
                gp.clear_grads(x)
                seconds.append(timed(step))
            gp.clear_grads(x)
            entry = {"status": "ok", "check": verdict, "median_s": statistics.median(seconds),
                     "rounds_s": seconds}
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                before = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                step()
                torch.cuda.synchronize(device)
                entry["extra_peak_mb"] = (torch.cuda.max_memory_allocated(device) - before) / 2**20
                gp.clear_grads(x)
            results[name] = entry
        except Exception as error:  # a provider that cannot run here is recorded, not fatal
            results[name] = {"status": f"unavailable: {type(error).__name__}: {error}"[:300]}
        print(f"{name}: {results[name].get('median_s', results[name]['status'])}", flush=True)
    return results


def check(name: str, got, expected, dtype: torch.dtype) -> None:
    """Against the paper recipe: float32 at gif_providers.check's defaults, bf16 within
    rounding."""
    if dtype == torch.float32:
        gp.check(name, got, expected)
    else:
        gp.check(name, got, expected, rtol=2e-2, atol=2e-3, grad_rel=5e-2)


def summarize(results: dict) -> dict:
    med = {k: v["median_s"] for k, v in results.items() if "median_s" in v}
    out = {}
    if "gif" in med and "floor" in med:
        out["gif_over_floor"] = med["gif"] / med["floor"]
        out["target_gif_at_most_1.2x_floor"] = out["gif_over_floor"] <= 1.2
    for other in ("paper", "paper_compiled", "two_pass", "liger_kl"):
        if "gif" in med and other in med:
            out[f"{other}_over_gif"] = med[other] / med["gif"]
    gif = results.get("gif", {})
    if "extra_peak_mb" in gif:
        out["target_gif_extra_peak_at_most_1.5GB"] = gif["extra_peak_mb"] <= 1.5 * 1024
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape", default="gpu", choices=sorted(gp.SHAPES))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--providers", default=",".join(ORDER),
                        help=f"comma-separated, from {','.join(ORDER)}")
    args = parser.parse_args(argv)
    names = args.providers.split(",")
    unknown = sorted(set(names) - set(ORDER))
    if unknown or "paper" not in names:
        parser.error(f"--providers: unknown {unknown}" if unknown else
                     "--providers: paper is needed (the others are checked against it)")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = run(device, args.shape, dtype, args.rounds, args.warmup,
                  [n for n in ORDER if n in names])
    shape = gp.SHAPES[args.shape]
    built = {"benchmark": "grad-in-forward OREO loss on a GPU (benchmarks/gif_gpu.py)",
             "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
             "environment": report.environment(device),
             "shape": {"tokens": shape.batch * shape.seq, "vocab": shape.vocab,
                       "hidden": shape.hidden, "dtype": args.dtype},
             "rounds": args.rounds, "warmup": args.warmup,
             "providers": results, "summary": summarize(results)}
    directory = Path(os.environ.get("OREO_BENCH_RESULTS_DIR", report.RESULTS_DIR))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / (f"grad_in_forward_{device.type}_n{shape.batch * shape.seq}-"
                        f"v{shape.vocab}-h{shape.hidden}-{args.dtype}_{built['date'][:10]}.json")
    path.write_text(json.dumps(built, indent=2) + "\n")
    print(json.dumps(built["summary"], indent=1))
    print(f"written {path}")
    failed = [k for k in ("paper", "gif", "floor") if k in results and
              (results[k]["status"] != "ok" or results[k]["check"].startswith("MISMATCH"))]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
