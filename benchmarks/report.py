"""The results JSON of a benchmark run: environment, shape, per-provider numbers, ratios
against the paper recipe (a) of the same group, and the issue's targets.

    python -m benchmarks.report benchmarks/results/<file>.json   # print the table again
"""
from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import providers

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parent.parent


# glibc keeps freed blocks below its (adaptive) mmap threshold resident; a fixed threshold
# makes every large tensor its own mapping, returned on free, so RSS follows the live tensors
MEMORY_SUBPROCESS_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}


def measure_in_subprocess(module: str, args: list[str], timeout: float) -> dict:
    """Run ``python -m module *args`` in a fresh process (peak memory of one provider alone)
    and return the JSON object on its last stdout line, or a failed status with the reason."""
    command = [sys.executable, "-m", module, *args]
    try:
        done = subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True,
                              env={**os.environ, **MEMORY_SUBPROCESS_ENV}, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "failed", "reason": "memory subprocess timed out"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        return {"status": "failed",
                "reason": f"memory subprocess exit {done.returncode}: {done.stderr[-1500:]}"}
    return json.loads(lines[-1])


def table_cell(entry: dict, key: str, fmt: str) -> str:
    value = entry.get(key)
    return format(value, fmt) if value is not None else "-"


def status_cell(entry: dict) -> str:
    status = entry.get("status", "?")
    return status if status == "ok" else f"{status}: {entry.get('reason', '')}"[:120]



class TableSummary:
    """A pytest plugin that prints a benchmark's table at the end of the run; a suite
    registers it once its report is written."""

    def __init__(self, title: str, table: str, path):
        self.title, self.table, self.path = title, table, path

    def pytest_terminal_summary(self, terminalreporter):
        terminalreporter.write_sep("-", self.title)
        terminalreporter.write_line(self.table)
        terminalreporter.write_line(f"results written to {self.path}")

def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None


def _code_state() -> dict:
    """The commit measured, and whether the library code differed from it (a benchmark of
    uncommitted code is identified by the hash of its diff)."""
    commit = _git("rev-parse", "HEAD")
    diff = _git("diff", "HEAD", "--", "oreo_fast", "kernels") or ""
    return {
        "git_commit": commit.strip() if commit else None,
        "library_uncommitted_changes": bool(diff),
        "library_diff_sha256": hashlib.sha256(diff.encode()).hexdigest() if diff else None,
    }


def environment(device: torch.device) -> dict:
    usable_cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    env = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else _cpu_model(),
        "cpu_model": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable_cores,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in (
            "torch", "triton", "liger-kernel", "pytest-benchmark", "oreo_fast")},
        **_code_state(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    return env


def _ratios(results: dict):
    """speedup = (a)'s time / this time; memory_reduction = (a)'s extra peak / this one."""
    for name, entry in results.items():
        base_name = providers.BASELINE.get(entry.get("level"))
        base = results.get(base_name, {})
        if entry.get("status") != "ok" or base.get("status") != "ok":
            continue
        entry["baseline"] = base_name
        if entry.get("median_ms") and base.get("median_ms"):
            entry["speedup_vs_baseline"] = base["median_ms"] / entry["median_ms"]
        mine, theirs = entry.get("extra_peak_mib"), base.get("extra_peak_mib")
        if mine and theirs:
            entry["memory_reduction_vs_baseline"] = theirs / mine
            entry["extra_peak_fraction_of_baseline"] = mine / theirs


def _targets(results: dict, device: torch.device, shape_name: str) -> dict:
    """The issue's targets that this run can judge (None: not measured in this run)."""
    def get(name, key):
        entry = results.get(name, {})
        return entry.get(key) if entry.get("status") == "ok" else None

    def check(value, predicate):
        return None if value is None else bool(predicate(value))

    fused_ms = get("ours_fused", "median_ms")
    fused_mem = get("ours_fused", "extra_peak_mib")
    if device.type == "cpu" and shape_name == "cpu":
        fraction = get("ours_fused", "extra_peak_fraction_of_baseline")
        speedup = get("ours_fused", "speedup_vs_baseline")
        return {
            "cpu_fused_extra_peak_at_most_quarter_of_paper": check(fraction, lambda f: f <= 0.25),
            "cpu_fused_not_slower_than_paper": check(speedup, lambda s: s >= 1.0),
        }
    if device.type == "cuda" and shape_name == "gpu":
        liger_ms = get("liger", "median_ms")
        targets = {
            "gpu_fused_at_most_35_ms": check(fused_ms, lambda ms: ms <= 35.0),
            "gpu_fused_extra_peak_at_most_1.5_GB": check(
                fused_mem, lambda mib: mib * 2**20 <= 1.5e9),
            "gpu_logits_at_most_5.2_ms": check(get("ours_logits", "median_ms"),
                                               lambda ms: ms <= 5.2),
            "gpu_fused_faster_than_liger": (None if fused_ms is None or liger_ms is None
                                            else fused_ms < liger_ms),
        }
        for name in ("ours_fused", "ours_logits"):
            targets[f"gpu_{name}_4x_faster_than_paper"] = check(
                get(name, "speedup_vs_baseline"), lambda s: s >= 4.0)
            targets[f"gpu_{name}_5x_less_memory_than_paper"] = check(
                get(name, "memory_reduction_vs_baseline"), lambda r: r >= 5.0)
        del paper_ms
        return targets
    return {}


def build_report(results: dict, device: torch.device, shape_name: str, rounds: int,
                 warmup_rounds: int) -> dict:
    shape = providers.SHAPES[shape_name]
    results = {name: dict(entry) for name, entry in results.items()}
    _ratios(results)
    return {
        "benchmark": "oreo_fast ops: per-token logp, ref logp and full-vocab KL, forward+backward",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "environment": environment(device),
        "shape_name": shape_name,
        "shape": {"tokens": shape.tokens, "batch": shape.batch, "seq": shape.seq,
                  "vocab": shape.vocab, "hidden": shape.hidden, "dtype": shape.dtype},
        "timing": {"what": "median of pytest-benchmark rounds of one forward+backward, ms",
                   "rounds": rounds,
                   "warmup_rounds": warmup_rounds, "note": "plus the untimed checked step"},
        "memory": {"what": "extra peak in MiB: peak during one forward+backward minus what was "
                           "allocated/resident just before it (inputs, warm-up done), measured "
                           "in a fresh subprocess; see benchmarks/runner.py"},
        "loss": "sum_t revcumsum(logp - ref_logp)_t * g1_t + g2 * sum_t KL_t, g1 ~ N(0,1), "
                f"g2 = {providers.KL_WEIGHT}",
        "providers": results,
        "targets": _targets(results, device, shape_name),
    }


def write_report(report: dict, directory: Path = RESULTS_DIR) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    env = report["environment"]
    kind = "cuda" if env["device"].startswith("cuda") else f"cpu{env['torch_threads']}t"
    shape = providers.SHAPES[report["shape_name"]].slug
    day = report["date"][:10]
    path = directory / f"ops_{kind}_{shape}_{day}.json"
    path.write_text(json.dumps(report, indent=2, sort_keys=False) + "\n")
    return path


def format_table(report: dict) -> str:
    env, shape = report["environment"], report["shape"]
    lines = [
        f"{env['device_name']} ({env['device']}), N={shape['tokens']} V={shape['vocab']} "
        f"H={shape['hidden']} {shape['dtype']}",
        "| provider | fwd+bwd ms (median) | extra peak MiB | speedup vs (a) | extra peak / (a) | status |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for name, entry in report["providers"].items():
        def num(key, fmt):
            return table_cell(entry, key, fmt)

        lines.append(
            f"| {name} | {num('median_ms', '.1f')} | {num('extra_peak_mib', '.0f')} | "
            f"{num('speedup_vs_baseline', '.2f')}x | "
            f"{num('extra_peak_fraction_of_baseline', '.3f')} | {status_cell(entry)} |"
        )
    for target, met in report.get("targets", {}).items():
        lines.append(f"target {target}: {'met' if met else 'NOT met' if met is False else 'n/a'}")
    return "\n".join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    for path in argv:
        print(path)
        print(format_table(json.loads(Path(path).read_text())))


if __name__ == "__main__":
    main()
