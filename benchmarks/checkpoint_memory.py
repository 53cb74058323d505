"""Host memory of one sharded checkpoint save (issue 16): a Qwen2.5-1.5B-like random model
(the real widths, vocabulary 151936 unless ``--vocab``, 2 decoder layers unless
``--layers``; config built here, nothing downloaded) as policy and value, FSDP2 over 2 gloo
processes, AdamW states initialised, then ``Checkpointer.save`` (synchronous, then
``async_save``). Before each save the heap is trimmed (malloc_trim), so the RSS before it
is the live state; each rank then measures its peak RSS (VmHWM after resetting it through
/proc/self/clear_refs) above that, until ``save`` returned (an async save has staged its
host copy by then) and until the files are written, and compares it with its shard of the
training state (parameters + Adam moments).

    python benchmarks/checkpoint_memory.py [--out DIR] [--layers 2] [--vocab 151936]
        [--modes sync,async]

writes benchmarks/results/checkpoint_memory_cpu_l<layers>[_v<vocab>]_<modes>_<date>.json.
The target: the save's extra peak <= 1.2x one rank's shard. An async save needs a host copy
of the shard by construction (training goes on changing the live one), so its extra is at
least 1x."""
from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc), so that the RSS before a save is the
    live state only: otherwise a save can reuse memory freed earlier (the set-up's gradients,
    an earlier save's buffers) and look cheaper than it is, or more expensive when the heap
    keeps what the save freed."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS


def qwen25_15b_like(layers: int, vocab: int = 151936):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, hidden_size=1536, intermediate_size=8960,
                       num_hidden_layers=layers, num_attention_heads=12, num_key_value_heads=2,
                       max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6,
                       tie_word_embeddings=True, use_sliding_window=False)


def worker(args) -> None:
    import torch.distributed as dist
    from transformers import Qwen2ForCausalLM, Qwen2Model

    from oreo_fast.models import ValueModel
    from oreo_fast.train.checkpoint import Checkpointer, Progress
    from oreo_fast.train.distributed import set_up
    from oreo_fast.train.parallelize import PolicyWithLoss, Values, mixed_precision, shard

    torch.set_num_threads(1)
    runtime = set_up("float32", 600)
    config = qwen25_15b_like(args.layers, args.vocab)
    with torch.device("meta"):  # only the shards are ever materialised
        policy = PolicyWithLoss(Qwen2ForCausalLM(config))
        value = Values(ValueModel(Qwen2Model(config)))
    fp32 = mixed_precision(torch.float32, trained=True)
    shard(policy, policy.model, fp32)
    shard(value, value.value_model.backbone, fp32)
    modules, optimizers = [policy, value], []
    gen = torch.Generator().manual_seed(runtime.rank)
    print(f"rank {runtime.rank}: sharded on meta, rss {_status('VmRSS') / 2**30:.2f} GiB", flush=True)
    for module in modules:
        module.to_empty(device="cpu")
        with torch.no_grad():
            for p in module.parameters():
                p.to_local().normal_(0, 0.02, generator=gen)
        optimizer = torch.optim.AdamW(module.parameters(), lr=1e-5)
        for p in module.parameters():
            p.grad = torch.zeros_like(p)
        optimizer.step()  # Adam moments exist, as after any training step
        optimizer.zero_grad(set_to_none=True)
        optimizers.append(optimizer)
    print(f"rank {runtime.rank}: state ready, rss {_status('VmRSS') / 2**30:.2f} GiB", flush=True)
    shard_bytes = sum(p.to_local().numel() * 4 for m in modules for p in m.parameters())
    shard_bytes += sum(v.to_local().numel() * v.element_size() if hasattr(v, "to_local")
                       else v.numel() * v.element_size()
                       for o in optimizers for s in o.state.values() for v in s.values())
    schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 1.0) for o in optimizers]
    results = {}
    for mode in args.modes.split(","):
        cfg = SimpleNamespace(resume=False, async_save=mode == "async", save_every=1,
                              keep_checkpoints=1, lora="none")
        checkpointer = Checkpointer(cfg, Path(args.out) / mode, runtime)
        _trim_heap()
        dist.barrier()
        before = _status("VmRSS")
        _reset_peak()
        t0 = time.time()
        checkpointer.save(modules, optimizers, schedulers, Progress(step=1))
        returned = time.time() - t0
        # split the peak: until save() returned (an async save has staged its copy by then)
        # and afterwards (the write)
        peak_until_returned, rss_returned = _status("VmHWM"), _status("VmRSS")
        _reset_peak()
        checkpointer.close()
        seconds = time.time() - t0
        peak = max(_status("VmHWM"), peak_until_returned)
        results[mode] = {"rss_before_bytes": before, "peak_bytes": peak,
                         "extra_peak_bytes": peak - before,
                         "extra_peak_over_shard": (peak - before) / shard_bytes,
                         "extra_peak_until_returned_over_shard":
                             (peak_until_returned - before) / shard_bytes,
                         "extra_rss_when_returned_over_shard": (rss_returned - before) / shard_bytes,
                         "save_returned_after_s": returned, "written_after_s": seconds}
        dist.barrier()
    out = {"rank": runtime.rank, "world_size": runtime.world_size,
           "shard_bytes": shard_bytes, **results}
    Path(args.out, f"rank{runtime.rank}.json").write_text(json.dumps(out))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=151936,
                        help="vocabulary size (151936 as Qwen2.5; lower it to fit a small host)")
    parser.add_argument("--out", default=None, help="scratch folder for the checkpoints")
    parser.add_argument("--modes", default="sync,async",
                        help="sync, async or both (async stages a host copy of the shard: ~1x more)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from benchmarks.report import environment

    with tempfile.TemporaryDirectory(dir=args.out) as scratch:
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
               f"--master_port={_free_port()}", __file__, "--worker", "--out", scratch,
               "--layers", str(args.layers), "--vocab", str(args.vocab), "--modes", args.modes]
        subprocess.run(cmd, env=env, check=True, cwd=ROOT)
        ranks = [json.loads(Path(scratch, f"rank{r}.json").read_text())
                 for r in range(args.nproc)]
    modes = args.modes.split(",")
    worst = {m: max(r[m]["extra_peak_over_shard"] for r in ranks) for m in modes}
    result = {
        "benchmark": "checkpoint_memory",
        "date": datetime.date.today().isoformat(),
        "model": {"like": "Qwen2.5-1.5B (random weights)", "layers": args.layers,
                  **{k: getattr(qwen25_15b_like(args.layers, args.vocab), k) for k in (
                      "vocab_size", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads", "tie_word_embeddings")}},
        "trained": "policy + value (FSDP2, fp32 master weights) with AdamW states",
        "processes": args.nproc, "ranks": ranks,
        "worst_extra_peak_over_shard": worst,
        "target_extra_peak_at_most_1.2x_shard": {m: w <= 1.2 for m, w in worst.items()},
        "command": "python benchmarks/checkpoint_memory.py " + " ".join(sys.argv[1:]),
        "environment": environment(torch.device("cpu")),
    }
    vocab_tag = "" if args.vocab == 151936 else f"_v{args.vocab}"
    path = ROOT / "benchmarks" / "results" / f"checkpoint_memory_cpu_l{args.layers}{vocab_tag}_{'-'.join(modes)}_{result['date']}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({"worst_extra_peak_over_shard": worst,
                      "shard_gib": [r["shard_bytes"] / 2**30 for r in ranks]}, indent=1))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
