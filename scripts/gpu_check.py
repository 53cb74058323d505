"""``make gpu-check``: everything this project has never run on a GPU, in one pass of at most
9 minutes on one H100/H200 (install included), for the day a GPU is lent.

    python scripts/gpu_check.py             # on a CUDA machine: run; elsewhere: dry run, exit 0
    python scripts/gpu_check.py --dry-run   # list the steps, their commands and budgets only

Steps, each a subprocess under its own timeout (a failed or timed-out step is recorded and
the next one runs; the whole pass stops starting steps once the 9-minute budget is spent):

1. install: the CUDA torch (``TORCH_SPEC``; skipped when the installed torch already sees
   CUDA), liger-kernel, and flash-attn only where a prebuilt wheel exists (no source build);
2. gpu tests: ``pytest -m gpu`` (Triton kernels against the torch reference per dtype,
   flash-attn against SDPA, Liger-patched against unpatched) and the device tests;
3. train: one FSDP2 step over NCCL (bf16 mixed precision) on a Qwen2.5-1.5B-width model of
   2 layers with the real 151,936-token vocabulary, through torchrun on every local GPU;
4. pipeline: SFT, sampling, evaluation and value-guided beam search on CUDA, embedded default;
5. benchmarks at GPU shapes: the ops, the grad-in-forward OREO loss against the recipe, its
   four matmuls and Liger (benchmarks/gif_gpu.py), one trainer step and the search.

With ``--with-vllm`` (``make gpu-check VLLM=1``) one more step runs after the nine minutes:
it installs vLLM (which pins its own torch build, so it comes last) and samples the same
problems with ``--engine vllm``, then compares with the HF engine's trajectories from step 4
(``--compare-samples``): the same record fields, one record per (problem, sample), and reward
and truncation rates within sampling noise.

It writes ``gpu_check.json`` (per step: command, status, seconds, output tail) to ``--out``
and prints one summary table.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOTAL_BUDGET_S = 540  # 9 minutes, install included
VLLM_BUDGET_S = 300  # --with-vllm: after the nine minutes (its wheel alone is large)
PY = sys.executable


@dataclass
class Step:
    name: str
    budget_s: int
    commands: list[list[str]]
    env: dict = field(default_factory=dict)
    optional: bool = False  # a failure is recorded as "unavailable", not a failed check
    status: str = "not run"
    seconds: float = 0.0
    tail: str = ""


def steps(out: Path, torch_spec: str) -> list[Step]:
    work = out / "work"
    train = [f"policy={work / 'qwen' / 'policy'}", f"train_file={work / 'qwen' / 'traj.jsonl'}",
             f"output_dir={work / 'train'}", "global_batch_size=8", "micro_batch_size=4",
             "max_steps=1", "progress=false", "device=cuda", "dtype=bfloat16"]
    default, cli = work / "default", [PY, "-m", "oreo_fast.cli", "-q"]
    bench_env = {"OREO_BENCH_DEVICE": "cuda", "OREO_BENCH_ROUNDS": "5",
                 "OREO_BENCH_RESULTS_DIR": str(out / "benchmarks")}
    return [
        Step("install torch (CUDA)", 120, [[PY, "scripts/gpu_check.py", "--install-torch",
                                             torch_spec]]),
        Step("install liger-kernel", 30, [[PY, "-m", "pip", "install", "-q", "liger-kernel"]],
             optional=True),
        Step("install flash-attn (wheel only)", 30, [
            [PY, "-m", "pip", "install", "-q", "--only-binary=:all:", "flash-attn"]],
             optional=True),
        Step("gpu tests", 85, [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                 "tests/test_gpu.py", "tests/pipeline/test_devices.py",
                                 "-m", "gpu or not gpu"]]),
        Step("train: FSDP2 nccl step", 70, [
            [PY, "-c", "import sys; sys.argv=['x']; from benchmarks.fsdp_memory import "
             f"build_inputs; from pathlib import Path; build_inputs(Path('{work / 'qwen'}'), "
             "'qwen2.5-1.5b', 151936, 2)"],
            [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=gpu", "-m",
             "oreo_fast.train", *train]]),
        Step("pipeline on cuda: sft, sample, eval, search", 70, [
            [*cli, "init", "--out", str(default), "--n-train", "64", "--n-test", "16"],
            [*cli, "sft", "--model", str(default / "model"), "--train",
             str(default / "train.jsonl"), "--out", str(work / "sft"), "--epochs", "2",
             "--device", "cuda"],
            [*cli, "sample", "--model", str(work / "sft"), "--problems",
             str(default / "train.jsonl"), "--out", str(work / "traj.jsonl"), "--k", "4",
             "--device", "cuda"],
            [*cli, "eval", "--model", str(work / "sft"), "--problems",
             str(default / "test.jsonl"), "--out", str(work / "eval.json"), "--n-samples", "2",
             "--value", str(work / "sft"), "--beams", "3", "--candidates", "2",
             "--device", "cuda"]]),
        Step("benchmark: ops", 40, [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                     "benchmarks/test_ops.py", "--benchmark-only"]],
             env=bench_env),
        # torch.compile of the recipe left out: its compilation alone would take the budget
        Step("benchmark: grad-in-forward loss (bf16, N 8192)", 25, [
            [PY, "-m", "benchmarks.gif_gpu", "--rounds", "5", "--providers",
             "paper,two_pass,gif,floor,liger_kl"]], env=bench_env),
        Step("benchmark: trainer step", 40, [[PY, "-m", "pytest", "-q", "-p",
                                              "no:cacheprovider", "benchmarks/test_train_step.py",
                                              "--benchmark-only"]], env=bench_env),
        Step("benchmark: search", 30, [[PY, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                        "benchmarks/test_search.py", "--benchmark-only"]],
             env=bench_env),
    ]


def vllm_step(out: Path) -> Step:
    """vLLM against the HF engine on the pipeline step's problems and model (run after it)."""
    work, cli = out / "work", [PY, "-m", "oreo_fast.cli", "-q"]
    sample = [*cli, "sample", "--model", str(work / "sft"), "--problems",
              str(work / "default" / "train.jsonl"), "--k", "4", "--device", "cuda"]
    return Step("vllm engine against hf", VLLM_BUDGET_S, [
        [PY, "-m", "pip", "install", "-q", "vllm"],
        [*sample, "--engine", "vllm", "--out", str(work / "traj_vllm.jsonl")],
        [PY, "scripts/gpu_check.py", "--compare-samples", str(work / "traj.jsonl"),
         str(work / "traj_vllm.jsonl")]])


def compare_samples(hf_path: str, vllm_path: str) -> int:
    """The two engines' trajectory files agree in format (the same fields in every record,
    the same (problem, count) coverage) and in reward and truncation rates, within four
    binomial standard errors of their difference. Prints the figures; 0 when they agree."""
    from collections import Counter

    from oreo_fast.io import read_jsonl

    hf = [r for _, r in read_jsonl(hf_path)]
    vl = [r for _, r in read_jsonl(vllm_path)]
    for name, rows in (("hf", hf), ("vllm", vl)):
        if not rows:
            print(f"{name}: no trajectories")
            return 1
    problems = []
    hf_keys, vl_keys = {frozenset(r) for r in hf}, {frozenset(r) for r in vl}
    if hf_keys != vl_keys or len(hf_keys) != 1:
        problems.append(f"record fields differ: hf {sorted(map(sorted, hf_keys))} "
                        f"vllm {sorted(map(sorted, vl_keys))}")
    if Counter(r["problem_id"] for r in hf) != Counter(r["problem_id"] for r in vl):
        problems.append("the engines cover different (problem, sample) counts")
    for field_name in ("reward", "truncated"):
        a = sum(float(r.get(field_name, 0)) for r in hf) / len(hf)  # absent: flagged above
        b = sum(float(r.get(field_name, 0)) for r in vl) / len(vl)
        se = (a * (1 - a) / len(hf) + b * (1 - b) / len(vl)) ** 0.5
        print(f"{field_name} rate: hf {a:.3f} vllm {b:.3f} (n {len(hf)} / {len(vl)})")
        if abs(a - b) > 4 * se + 1e-9:
            problems.append(f"{field_name} rates differ beyond 4 standard errors")
    for line in problems:
        print("mismatch: " + line)
    return 1 if problems else 0


def install_torch(spec: str) -> int:
    """Install ``spec`` unless the installed torch already sees a CUDA device."""
    import importlib

    try:
        torch = importlib.import_module("torch")
        if torch.cuda.is_available():
            print(f"torch {torch.__version__} already sees CUDA; not reinstalled")
            return 0
    except ImportError:
        pass
    return subprocess.call([PY, "-m", "pip", "install", "-q", "--upgrade", spec])


def run_step(step: Step, remaining: float) -> None:
    limit = min(step.budget_s, remaining)
    t0, tails = time.time(), []
    env = {**os.environ, **step.env}
    step.status = "ok"
    for cmd in step.commands:
        left = limit - (time.time() - t0)
        if left <= 1:
            step.status = "timeout"
            break
        try:
            done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                                  timeout=left)
        except subprocess.TimeoutExpired as e:
            tails.append(f"$ {' '.join(cmd)}\n(timed out after {left:.0f}s)\n"
                         f"{(e.stdout or '')[-800:] if isinstance(e.stdout, str) else ''}")
            step.status = "timeout"
            break
        tails.append(f"$ {' '.join(cmd)}\n{(done.stdout + done.stderr)[-1500:]}")
        if done.returncode != 0:
            step.status = "unavailable" if step.optional else f"failed (exit {done.returncode})"
            break
    step.seconds = round(time.time() - t0, 1)
    step.tail = "\n".join(tails)[-4000:]


def summary_table(rows: list[Step]) -> str:
    lines = [f"{'step':<46} {'budget s':>8} {'seconds':>8}  status", "-" * 80]
    lines += [f"{s.name:<46} {s.budget_s:>8} {s.seconds:>8.1f}  {s.status}" for s in rows]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="list the steps only")
    parser.add_argument("--out", default="runs/gpu_check", help="folder for gpu_check.json")
    parser.add_argument("--with-vllm", action="store_true",
                        help="after the nine minutes: vLLM sampling against the HF engine")
    parser.add_argument("--install-torch", metavar="SPEC", help=argparse.SUPPRESS)
    parser.add_argument("--compare-samples", nargs=2, metavar=("HF", "VLLM"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.install_torch:
        return install_torch(args.install_torch)
    if args.compare_samples:
        return compare_samples(*args.compare_samples)
    out = (ROOT / args.out).resolve()
    plan = steps(out, os.environ.get("TORCH_SPEC", "torch==2.13.0"))
    assert sum(s.budget_s for s in plan) <= TOTAL_BUDGET_S, "step budgets exceed 9 minutes"
    budget = TOTAL_BUDGET_S
    if args.with_vllm:
        plan.append(vllm_step(out))
        budget += VLLM_BUDGET_S
    has_cuda = _cuda_present()
    if not has_cuda or args.dry_run:
        if not has_cuda:
            print("gpu-check: no CUDA device is present; dry run of the steps, exit 0")
        for i, s in enumerate(plan, 1):
            print(f"[{i}/{len(plan)}] {s.name} (budget {s.budget_s}s"
                  f"{', optional' if s.optional else ''})")
            for cmd in s.commands:
                print("    $ " + " ".join(cmd))
        print(f"total budget {sum(s.budget_s for s in plan)}s of {budget}s")
        return 0
    shutil.rmtree(out / "work", ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    start = time.time()
    for s in plan:
        remaining = budget - (time.time() - start)
        if remaining <= 5:
            s.status = "skipped (budget spent)"
            continue
        print(f"gpu-check: {s.name} ...", flush=True)
        run_step(s, remaining)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": _device_name(),
              "seconds": round(time.time() - start, 1), "steps": [asdict(s) for s in plan]}
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    print(summary_table(plan))
    print(f"written {out / 'gpu_check.json'} ({report['seconds']}s on {report['device']})")
    required = [s for s in plan if not s.optional]
    return 0 if all(s.status == "ok" for s in required) else 1


def _cuda_present() -> bool:
    """A CUDA device seen by the driver (nvidia-smi) or by the installed torch."""
    if shutil.which("nvidia-smi"):
        done = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True)
        if done.returncode == 0 and "GPU" in done.stdout:
            return True
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def _device_name() -> str:
    done = subprocess.run([PY, "-c", "import torch; print(torch.cuda.get_device_name())"],
                          capture_output=True, text=True)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
