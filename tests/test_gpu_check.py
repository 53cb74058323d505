"""``make gpu-check`` on a machine without CUDA: one line saying so, the dry run of every
step with its command and budget, exit 0; the budgets fit the 9 minutes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA the check runs for real")
def test_gpu_check_dry_run_without_cuda():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "gpu-check: no CUDA device is present; dry run of the steps, exit 0"
    steps = [l for l in lines if l.startswith("[")]
    names = " ".join(steps)
    for step in ("install torch", "liger-kernel", "flash-attn", "gpu tests", "FSDP2 nccl",
                 "sft, sample, eval, search", "benchmark: ops", "benchmark: trainer step",
                 "benchmark: search"):
        assert step in names, step
    budgets = [int(l.split("budget ")[1].split("s")[0]) for l in steps]
    assert sum(budgets) <= 540 and lines[-1] == f"total budget {sum(budgets)}s of 540s"


def test_gpu_check_dry_run_flag_lists_commands():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--dry-run"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "torch.distributed.run" in done.stdout and "-m gpu or not gpu" in done.stdout
    assert "--device cuda" in done.stdout
