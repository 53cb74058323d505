"""The grad-in-forward OREO loss against the paper recipe, its torch.compile, today's two-pass
fused path and its own four matmuls (providers: benchmarks/gif_providers.py), forward +
backward of the whole loss, in ONE run with the providers interleaved round by round (so that
the load of a shared machine moves them alike), at 1 and 2 threads, at the op benchmark's CPU
shape (N=4096, V=32000, H=256) and at Qwen2.5-1.5B's LM head (N=2048, V=151936, H=1536),
float32; then the extra peak memory of each provider in a fresh process.

    OREO_BENCH_THREADS= .venv/bin/python -m pytest -p no:cacheprovider -q \
        benchmarks/test_grad_in_forward.py --benchmark-only        # ~30 min on 2 cores

| variable | default | meaning |
|---|---|---|
| `OREO_BENCH_GIF_SHAPES` | `cpu,qwen` | shapes of gif_providers.SHAPES (`small`: a smoke run) |
| `OREO_BENCH_GIF_ROUNDS` | `cpu:3,qwen:1` | timed rounds per shape (after one untimed, checked step) |
| `OREO_BENCH_GIF_THREAD_COUNTS` | `1,2` | torch threads, each a pass over all rounds; per shape: `cpu:1+2,qwen:2` |
| `OREO_BENCH_GIF_WARM` | `cpu,small` | shapes with an untimed warm-up step per provider (others: the timed step is checked after) |
| `OREO_BENCH_GIF_MEMORY` | `qwen:paper+gif` | per shape, the providers whose memory is measured (default: all) |
| `OREO_BENCH_RESULTS_DIR` | `benchmarks/results` | where `grad_in_forward_cpu_<date>.json` goes |

Ratios are of medians within this run. Targets (issue 15): gif <= 1.3x floor, two_pass >=
1.3x gif, paper >= gif, gif extra peak <= 0.15x paper's.
"""
from __future__ import annotations

import datetime
import gc
import json
import os
import statistics
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import gif_providers as gp
from benchmarks import report

SHAPE_NAMES = os.environ.get("OREO_BENCH_GIF_SHAPES", "cpu,qwen").split(",")
ROUNDS = {k: int(v) for k, v in (item.split(":") for item in os.environ.get(
    "OREO_BENCH_GIF_ROUNDS", "cpu:3,qwen:1,small:2").split(","))}
THREADS = [1, 2]


def _threads(shape):
    """OREO_BENCH_GIF_THREAD_COUNTS: "1,2" for every shape, or per shape "cpu:1+2,qwen:2"."""
    spec = os.environ.get("OREO_BENCH_GIF_THREAD_COUNTS", "1,2")
    if ":" not in spec:
        return [int(t) for t in spec.split(",")]
    for item in spec.split(","):
        name, _, counts = item.partition(":")
        if name == shape:
            return [int(t) for t in counts.split("+")]
    return THREADS
ORDER = ("paper", "two_pass", "gif", "paper_compiled", "floor")
# the Qwen head's recipe step takes minutes on a loaded 2-core machine: memory of the two
# providers the target compares only, unless OREO_BENCH_GIF_MEMORY says otherwise
DEFAULT_MEMORY = "qwen:paper+gif"
# shapes whose providers get an untimed warm-up step (the Qwen head's steps take minutes and
# are compute-bound: there the first timed step is checked instead)
WARM = os.environ.get("OREO_BENCH_GIF_WARM", "cpu,small").split(",")

TIMES: dict = {}  # (shape, threads, provider) -> [seconds]
CPU_TIMES: dict = {}  # the same, process CPU seconds
STATE: dict = {"load": [os.getloadavg()]}
MEMORY: dict = {}  # (shape, provider) -> memory dict


def _memory_providers(shape):
    for item in os.environ.get("OREO_BENCH_GIF_MEMORY", DEFAULT_MEMORY).split(","):
        name, _, providers = item.partition(":")
        if name == shape:
            return providers.split("+")
    return list(ORDER)


def _cases():
    """Per shape: for each thread count, round after round of every provider (interleaved);
    then each provider's extra peak memory in a fresh process."""
    for shape in SHAPE_NAMES:
        for threads in _threads(shape):
            for round_ in range(ROUNDS.get(shape, 1)):
                for provider in ORDER:
                    yield pytest.param("time", shape, threads, round_, provider,
                                       id=f"{shape}-{threads}t-r{round_}-{provider}")
        for provider in _memory_providers(shape):
            yield pytest.param("memory", shape, 0, 0, provider, id=f"{shape}-memory-{provider}")


class _Cache:
    """Inputs of one shape at a time, each provider's step (compiled once) and the paper's
    results for the check."""

    def __init__(self):
        self.shape = None

    def get(self, shape):
        if shape != self.shape:
            self.shape = self.inputs = self.expected = None
            self.steps, self.checked = {}, set()
            gc.collect()
            self.inputs = gp.make_inputs(gp.SHAPES[shape])
            self.shape = shape
        return self.inputs

    def step(self, provider, warm: bool):
        """The provider's step; ``warm``: one untimed step first, checked against the paper's
        (otherwise the timed step is checked afterwards, see ``check_after``)."""
        if provider not in self.steps:
            step = gp.PROVIDERS[provider](self.inputs)
            if warm or provider == "paper_compiled":  # compilation is never timed
                self.check_after(provider, step())
            self.steps[provider] = step
        return self.steps[provider]

    def check_after(self, provider, out):
        """Check a step's outputs and the gradients it left (the first time only)."""
        if provider in self.checked:
            return
        got = (torch.stack([f.detach().float() for f in out]),
               [t.grad.clone() for t in gp.trainable(self.inputs)]) if out is not None else None
        gp.clear_grads(self.inputs)
        if provider == "paper":
            self.expected = got
        elif provider in gp.CHECKED:
            gp.check(provider, got, self.expected)
        self.checked.add(provider)


_CACHE = _Cache()


@pytest.mark.parametrize("kind,shape,threads,round_,provider", list(_cases()))
def test_grad_in_forward(benchmark, kind, shape, threads, round_, provider):
    if kind == "memory":
        if getattr(benchmark, "disabled", False):
            pytest.skip("memory is measured in benchmarking runs only")
        _CACHE.shape = None  # free this process's inputs first
        gc.collect()
        result = report.measure_in_subprocess(
            "benchmarks.gif_providers", ["--provider", provider, "--shape", shape], timeout=3600)
        assert result.get("status") == "ok", result.get("reason")
        MEMORY[(shape, provider)] = result["memory"]
        _write_report()
        return
    torch.set_num_threads(threads)
    inputs = _CACHE.get(shape)
    step = _CACHE.step(provider, warm=shape in WARM)
    benchmark.group = f"grad-in-forward {gp.SHAPES[shape].slug} {threads}t"
    cpu_seconds = []

    def timed_step():  # also the process CPU time, which other processes' load moves less
        start = time.process_time()
        out = step()
        cpu_seconds.append(time.process_time() - start)
        return out

    out = benchmark.pedantic(timed_step, setup=lambda: gp.clear_grads(inputs), rounds=1,
                             iterations=1)
    _CACHE.check_after(provider, out)
    gp.clear_grads(inputs)
    if getattr(benchmark, "disabled", False) or benchmark.stats is None:
        return
    TIMES.setdefault((shape, threads, provider), []).append(benchmark.stats.stats.median)
    CPU_TIMES.setdefault((shape, threads, provider), []).extend(cpu_seconds)
    _write_report()  # after every case: a run cut short still leaves its results


def _lscpu() -> str:
    try:
        return subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return ""


def _ratios(med: dict) -> dict:
    pairs = {"gif_over_floor": ("gif", "floor"), "two_pass_over_gif": ("two_pass", "gif"),
             "paper_over_gif": ("paper", "gif"), "paper_compiled_over_gif": ("paper_compiled", "gif")}
    return {name: med[a] / med[b] for name, (a, b) in pairs.items() if a in med and b in med}


def _summary(shape: str, threads: int) -> dict:
    keys = [p for p in ORDER if (shape, threads, p) in TIMES]
    med = {p: statistics.median(TIMES[(shape, threads, p)]) for p in keys}
    cpu = {p: statistics.median(CPU_TIMES[(shape, threads, p)]) for p in keys}
    out = {"median_s": med, "rounds_s": {p: TIMES[(shape, threads, p)] for p in keys},
           "median_cpu_s": cpu, "ratios": _ratios(med), "ratios_cpu_time": _ratios(cpu)}
    targets = {"gif_at_most_1.3x_floor": ("gif_over_floor", lambda r: r <= 1.3),
               "gif_at_least_1.3x_faster_than_two_pass": ("two_pass_over_gif", lambda r: r >= 1.3),
               "gif_not_slower_than_paper": ("paper_over_gif", lambda r: r >= 1.0)}
    for kind in ("ratios", "ratios_cpu_time"):
        out[f"targets_{kind}"] = {name: check(out[kind][key])
                                  for name, (key, check) in targets.items() if key in out[kind]}
    return out


def _write_report():
    STATE["load"].append(os.getloadavg())
    shapes = {}
    for shape in SHAPE_NAMES:
        s = gp.SHAPES[shape]
        entry = {"shape": {"tokens": s.batch * s.seq, "batch": s.batch, "seq": s.seq,
                           "vocab": s.vocab, "hidden": s.hidden, "dtype": "float32"},
                 "threads": {str(t): _summary(shape, t) for t in _threads(shape)
                             if any(k[:2] == (shape, t) for k in TIMES)}}
        mem = {p: MEMORY[(shape, p)] for p in ORDER if (shape, p) in MEMORY}
        if mem:
            entry["memory"] = mem
            if "gif" in mem and "paper" in mem:
                fraction = mem["gif"]["extra_peak_mb"] / mem["paper"]["extra_peak_mb"]
                entry["gif_extra_peak_fraction_of_paper"] = fraction
                entry["target_gif_extra_peak_at_most_0.15x_paper"] = fraction <= 0.15
        shapes[shape] = entry
    env = report.environment(torch.device("cpu"))
    env["versions"]["transformers"] = report._version("transformers")
    env["lscpu"] = _lscpu()
    env["load_average_1_5_15min_after_each_case"] = STATE["load"]
    built = {
        "benchmark": "OREO loss forward+backward from hidden states: paper recipe, "
                     "torch.compile, two-pass fused, grad-in-forward, its four matmuls",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": env,
        "loss": f"token level, full KL, beta={gp.BETA}, kl_coef={gp.KL_COEF}, all tokens "
                "actions and states, out.loss.backward() into hidden, weight, values",
        "timing": "seconds of one forward+backward per round (wall, and process CPU time), "
                  "providers interleaved round by round; shapes in OREO_BENCH_GIF_WARM get "
                  "one untimed checked step first, the others are checked after their timed step",
        "memory": "extra peak MiB of one step in a fresh process after a warm-up step "
                  "(VmHWM after clear_refs minus VmRSS, MALLOC_MMAP_THRESHOLD_ fixed)",
        "shapes": shapes,
    }
    directory = Path(os.environ.get("OREO_BENCH_RESULTS_DIR", report.RESULTS_DIR))
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"grad_in_forward_cpu_{'-'.join(SHAPE_NAMES)}_{built['date'][:10]}.json"
    path.write_text(json.dumps(built, indent=2) + "\n")
    lines = [f"results written to {path}"]
    for shape, entry in shapes.items():
        for t, summary in entry["threads"].items():
            lines.append(f"{shape} {t}t: " + ", ".join(
                f"{p} {v:.2f}s" for p, v in summary["median_s"].items()) +
                "; wall " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios"].items()) +
                "; cpu-time " + ", ".join(f"{k} {v:.2f}" for k, v in summary["ratios_cpu_time"].items()))
        if "gif_extra_peak_fraction_of_paper" in entry:
            lines.append(f"{shape}: extra peak MiB " + ", ".join(
                f"{p} {m['extra_peak_mb']:.0f}" for p, m in entry["memory"].items()) +
                f"; gif/paper {entry['gif_extra_peak_fraction_of_paper']:.3f}")
    STATE["summary"] = "\n".join(lines)


def test_print_summary(benchmark):
    if "summary" not in STATE:
        pytest.skip("no results in this run")
    print(STATE["summary"])
