"""Per-rank peak memory of OREO training steps with 1 and with 2 processes (FSDP2), at the
same micro-batch, on random models at the widths of real checkpoints (tests/real_widths.py:
Qwen2.5-1.5B, tied, GQA 12/2; Llama-3.2-1B, tied, GQA 32/8, llama3 rope; TinyLlama-1.1B,
untied) with few decoder layers.

    python -m benchmarks.fsdp_memory [--arch qwen2.5-1.5b] [--vocab 32768] [--steps 2]
                                     [--micro 2] [--global-batch 8]
    python -m benchmarks.fsdp_memory --vocab 151936     # Qwen's real vocabulary
    python -m benchmarks.fsdp_memory --arch llama-3.2-1b --vocab 128256 --dtype bfloat16

Each run is ``torchrun --nproc_per_node=N -m benchmarks.fsdp_memory worker ...``; every rank
builds the trainer (policy, value, frozen reference), runs ``--steps`` optimizer steps of
``--global-batch`` sequences in micro-batches of ``--micro`` and reports its own peak resident
set (VmHWM, which includes the Python interpreter and the libraries' own ~0.4 GB) after
loading and after the steps. On CUDA it reports ``torch.cuda.max_memory_allocated`` instead.
The results JSON (CPU model, versions, date) goes to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path



def architecture(arch: str, vocab: int, layers: int) -> dict:
    """The config fields of ``arch`` (tests/real_widths.py) with ``vocab`` embedding rows and
    ``layers`` decoder layers."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.real_widths import REAL_CONFIGS

    spec = {k: v for k, v in REAL_CONFIGS[arch].items() if k != "pad_vocabulary_to"}
    return {**spec, "vocab_size": vocab, "num_hidden_layers": layers}


def build_inputs(root: Path, arch: str, vocab: int, layers: int, n_records: int = 32) -> None:
    """A random model of ``arch``'s widths with ``layers`` layers and a ``vocab``-row embedding
    (the tokenizer is small; the extra rows are padding, as in real checkpoints' own padded
    vocabularies), and a trajectory file of ``n_records`` arithmetic responses of about 90
    tokens."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from oreo_fast.models import save_model
    from oreo_fast.tokenizer import build_tokenizer

    records = []
    for i in range(n_records):
        a, b = 3 + i, 2 + i % 5
        steps = "\n".join(f"{a + k} * {b} = {(a + k) * b}" for k in range(6))
        records.append({"prompt": f"Question: start at {a}, multiply by {b}, six times.\n"
                        "Answer:\n", "response": f"{steps}\n#### {a * b}", "reward": i % 2})
    tok = build_tokenizer([r["prompt"] + r["response"] for r in records], vocab_size=300)
    spec = architecture(arch, vocab, layers)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec, bos_token_id=tok.bos_token_id,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    save_model(AutoModelForCausalLM.from_config(config).eval(), tok, root / "policy")
    with open(root / "traj.jsonl", "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def _status_mb(field: str) -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(argv: list[str]) -> None:
    """One rank: build the trainer, run the steps, write this rank's peaks as JSON."""
    import torch

    from oreo_fast.train.config import load_train_config
    from oreo_fast.train.data import plan_global_batches
    from oreo_fast.train.trainer import Trainer

    out, steps, overrides = Path(argv[0]), int(argv[1]), argv[2:]
    trainer = Trainer(load_train_config(None, overrides))
    cuda = trainer.device.type == "cuda"
    after_load = (torch.cuda.max_memory_allocated(trainer.device) if cuda else 0) / 2**20 \
        or _status_mb("VmHWM")
    t0 = time.time()
    batches = plan_global_batches(len(trainer.examples), trainer.config.global_batch_size,
                                  trainer.config.seed, 0)
    losses = [trainer.train_step(b)["loss"] for b in batches[:steps]]
    peak = torch.cuda.max_memory_allocated(trainer.device) / 2**20 if cuda \
        else _status_mb("VmHWM")
    row = {"rank": trainer.rank, "world_size": trainer.world_size,
           "peak_after_load_mb": round(after_load, 1), "peak_mb": round(peak, 1),
           "method": "torch.cuda.max_memory_allocated" if cuda else "VmHWM (peak RSS)",
           "step_seconds": round((time.time() - t0) / max(len(losses), 1), 2),
           "losses": losses}
    (out / f"rank{trainer.rank}.json").write_text(json.dumps(row))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(nproc: int, root: Path, out: Path, args) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    overrides = [f"policy={root / 'policy'}", f"train_file={root / 'traj.jsonl'}",
                 f"output_dir={out}", f"global_batch_size={args.global_batch}",
                 f"micro_batch_size={args.micro}", "progress=false", "max_length=256",
                 f"dtype={args.dtype}", "policy_lr=1e-5", "value_lr=1e-5", *args.set]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", f"--master_port={_free_port()}", "-m",
           "benchmarks.fsdp_memory", "worker", str(out), str(args.steps), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MALLOC_MMAP_THRESHOLD_="131072")
    t0 = time.time()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    ranks = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")),
                   key=lambda r: r["rank"])
    return {"nproc": nproc, "returncode": done.returncode, "seconds": round(time.time() - t0),
            "ranks": ranks, "max_rank_peak_mb": max((r["peak_mb"] for r in ranks), default=None),
            **({"stderr_tail": done.stderr[-2000:]} if done.returncode else {})}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["worker"]:
        worker(argv[1:])
        return 0
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fsdp_memory",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="qwen2.5-1.5b",
                        choices=("qwen2.5-1.5b", "llama-3.2-1b", "tinyllama-1.1b-untied"))
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--micro", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--nproc", default="1,2")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--work", default="/tmp/oreo_fsdp_memory")
    parser.add_argument("--label", default="")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="further TrainConfig overrides, e.g. accumulate_unsharded=true")
    args = parser.parse_args(argv)

    import torch

    from benchmarks.report import RESULTS_DIR, environment

    work = Path(args.work) / f"{args.arch}-v{args.vocab}-l{args.layers}"
    if not (work / "policy" / "config.json").is_file():
        build_inputs(work, args.arch, args.vocab, args.layers)
    runs = [run(int(n), work, work / f"run{n}", args) for n in args.nproc.split(",")]
    report = {"benchmark": "fsdp_memory", "date": time.strftime("%Y-%m-%d %H:%M"),
              "model": {"width": args.arch,
                        **architecture(args.arch, args.vocab, args.layers)},
              "settings": {k: getattr(args, k) for k in ("steps", "micro", "global_batch",
                                                         "dtype", "threads", "set")},
              "environment": environment(torch.device("cpu")), "runs": runs}
    RESULTS_DIR.mkdir(exist_ok=True)
    arch = "" if args.arch == "qwen2.5-1.5b" else f"{args.arch}-"
    name = f"fsdp_memory_cpu_{arch}v{args.vocab}-l{args.layers}-mb{args.micro}-{args.dtype}" \
        f"{'_' + args.label if args.label else ''}_{time.strftime('%Y-%m-%d')}.json"
    (RESULTS_DIR / name).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'processes':>9}  {'rank':>4}  {'after load MB':>13}  {'peak MB':>8}  step s")
    for r in runs:
        for rank in r["ranks"]:
            print(f"{r['nproc']:>9}  {rank['rank']:>4}  {rank['peak_after_load_mb']:>13.0f}  "
                  f"{rank['peak_mb']:>8.0f}  {rank['step_seconds']}")
        if r["returncode"]:
            print(f"{r['nproc']} processes: exit {r['returncode']}\n{r.get('stderr_tail', '')}")
    print(f"written {RESULTS_DIR / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
