"""Session state of the op benchmarks: device and shape, the inputs of the current group with
their reference results, and the results JSON written at the end of a benchmarking run.

Environment: OREO_BENCH_DEVICE (cpu, cuda, cuda:1; default cuda when present),
OREO_BENCH_SHAPE (cpu, small, gpu; default by device), OREO_BENCH_ROUNDS (timed rounds per
provider; default 3 on CPU, 20 on CUDA), OREO_BENCH_THREADS (torch CPU threads; default
torch's), OREO_BENCH_RESULTS_DIR (default benchmarks/results).
"""
from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

from benchmarks import providers, report

# provider name -> what the tests measured; the JSON is built from it at the end
RESULTS: dict[str, dict] = {}
_SESSION: dict = {}


@pytest.fixture(scope="session")
def bench_setup():
    providers.configure_threads()
    device = providers.bench_device()
    shape_name = providers.bench_shape_name(device)
    rounds = int(os.environ.get("OREO_BENCH_ROUNDS", 20 if device.type == "cuda" else 3))
    _SESSION.update(device=device, shape_name=shape_name, rounds=rounds)
    return device, shape_name, rounds


class GroupCache:
    """Inputs and reference results of one group at a time (the logits group alone is
    gigabytes at the GPU shape, so the previous group is dropped when the next starts)."""

    def __init__(self):
        self.level = None
        self.inputs = None
        self.expected = None

    def get(self, level, shape, device):
        if level != self.level:
            self.level = self.inputs = self.expected = None
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            self.inputs = providers.make_inputs(shape, device, level)
            self.expected = providers.reference_results(self.inputs, level)
            self.level = level
        return self.inputs, self.expected


@pytest.fixture(scope="session")
def group_cache():
    return GroupCache()


@pytest.fixture
def record():
    def record(name: str, **fields):
        RESULTS.setdefault(name, {}).update(fields)

    return record


def pytest_sessionfinish(session, exitstatus):
    if not any("median_ms" in entry for entry in RESULTS.values()):
        return  # a correctness-only run (--benchmark-disable) or nothing ran: no JSON
    directory = Path(os.environ.get("OREO_BENCH_RESULTS_DIR", report.RESULTS_DIR))
    built = report.build_report(RESULTS, _SESSION["device"], _SESSION["shape_name"],
                                _SESSION["rounds"],
                                providers.warmup_rounds(_SESSION["device"]))
    _SESSION["report"] = built
    _SESSION["path"] = report.write_report(built, directory)


def pytest_terminal_summary(terminalreporter):
    if "report" in _SESSION:
        terminalreporter.write_sep("-", "oreo_fast op benchmarks")
        terminalreporter.write_line(report.format_table(_SESSION["report"]))
        terminalreporter.write_line(f"results written to {_SESSION['path']}")
