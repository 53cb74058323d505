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
                 "sft, sample, eval, search", "benchmark: ops", "grad-in-forward loss",
                 "benchmark: trainer step",
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


def _gpu_check_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up there
    spec.loader.exec_module(module)
    return module


def test_gpu_check_train_inputs_command_runs(tmp_path):
    """The train step's input-building command (a python -c line the dry run cannot execute)
    matches benchmarks.fsdp_memory.build_inputs: run it at a small vocabulary."""
    gc = _gpu_check_module()
    step = next(s for s in gc.steps(tmp_path, "torch") if "FSDP2 nccl" in s.name)
    code = step.commands[0][2].replace("151936", "512")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "work" / "qwen" / "policy" / "config.json").is_file()
    assert (tmp_path / "work" / "qwen" / "traj.jsonl").is_file()


def _write(path, rows):
    import json

    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(rewards, truncated=None):
    truncated = truncated or [False] * len(rewards)
    return [{"prompt": "p", "response": "r", "reward": r, "problem_id": i // 2,
             "truncated": t, "prompt_format": "plain"} for i, (r, t) in
            enumerate(zip(rewards, truncated))]


def test_compare_samples_agreement_and_mismatches(tmp_path, capsys):
    gc = _gpu_check_module()
    hf = _write(tmp_path / "hf.jsonl", _rows([1, 0] * 20))
    assert gc.compare_samples(hf, _write(tmp_path / "a.jsonl", _rows([0, 1] * 20))) == 0
    # reward rates 0.5 against 0.0 over 40 each: far beyond 4 standard errors
    assert gc.compare_samples(hf, _write(tmp_path / "b.jsonl", _rows([0] * 40))) == 1
    missing = [{k: v for k, v in r.items() if k != "truncated"} for r in _rows([1, 0] * 20)]
    assert gc.compare_samples(hf, _write(tmp_path / "c.jsonl", missing)) == 1
    fewer = _rows([1, 0] * 19)
    assert gc.compare_samples(hf, _write(tmp_path / "d.jsonl", fewer)) == 1
    assert "mismatch" in capsys.readouterr().out


def test_gpu_check_with_vllm_adds_the_step_after_the_nine_minutes():
    done = subprocess.run([sys.executable, "scripts/gpu_check.py", "--with-vllm"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "vllm engine against hf" in done.stdout and "--engine vllm" in done.stdout
    assert done.stdout.splitlines()[-1] == "total budget 840s of 840s"


def test_gif_gpu_benchmark_smoke_on_cpu(tmp_path):
    """The GPU benchmark of the grad-in-forward loss (gpu-check runs it on CUDA) at a small
    shape on the CPU: every provider asked for runs, is checked against the paper recipe,
    and the JSON carries the ratios its targets read; a broken provider would show."""
    import json

    env = dict(__import__("os").environ, OREO_BENCH_RESULTS_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-m", "benchmarks.gif_gpu", "--device", "cpu",
                           "--shape", "small", "--dtype", "float32", "--rounds", "1",
                           "--warmup", "0", "--providers", "paper,two_pass,gif,floor"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    (path,) = tmp_path.glob("grad_in_forward_cpu_n512-v4000-h64-float32_*.json")
    report = json.loads(path.read_text())
    providers = report["providers"]
    assert set(providers) == {"paper", "two_pass", "gif", "floor"}
    assert providers["gif"]["check"] == "matches the paper recipe"
    assert providers["two_pass"]["check"] == "matches the paper recipe"
    assert {"gif_over_floor", "paper_over_gif", "two_pass_over_gif"} <= set(report["summary"])
