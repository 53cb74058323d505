"""Process-group set-up for the trainer: the device, the backend, the ranks, and the watches
that keep workers from outliving their launcher."""
from __future__ import annotations

import datetime
import os
import sys
import threading
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist

from oreo_fast.errors import ConfigError


@dataclass
class Runtime:
    """Where this process trains: its device, rank and world size, the compute dtype, and
    whether the models go through FSDP2 (several processes, or bf16 mixed precision)."""

    device: torch.device
    rank: int
    world_size: int
    distributed: bool
    compute_dtype: torch.dtype
    use_fsdp: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def quiet_transformers_unless_main(rank: int) -> None:
    """On ranks other than 0, no transformers progress bars ("Loading weights", "Writing
    model shards") and only its errors: every rank loads the same folders, so each would
    repeat rank 0's bars and load reports; rank 0 keeps transformers' own settings."""
    if rank == 0:
        return
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def set_up(dtype: str, collective_timeout_s: float, device: str = "auto") -> Runtime:
    """The device (``device`` "auto" or "cuda": CUDA device LOCAL_RANK, "auto" falling back
    to the CPU without CUDA; "cpu": the CPU), the compute dtype (``dtype`` "auto": bf16 on
    CUDA, fp32 on CPU) and, when needed, the process group."""
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' asked for but no CUDA device is present "
                          "(use device=cpu or auto)")
    if device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    compute = torch.bfloat16 if (dtype == "bfloat16" or (
        dtype == "auto" and device.type == "cuda")) else torch.float32
    # bf16 compute always goes through FSDP2's mixed precision (fp32 master weights and
    # reductions), in a one-process group when not launched by torchrun
    use_fsdp = distributed or compute != torch.float32
    if use_fsdp and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # bounded: a dead or stuck rank makes the others fail instead of hanging
        timeout = datetime.timedelta(seconds=collective_timeout_s)
        if distributed:
            init_process_group_per_attempt(backend, timeout)
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                                    timeout=timeout)
    rank = dist.get_rank() if distributed else 0
    world_size = dist.get_world_size() if distributed else 1
    return Runtime(device, rank, world_size, distributed, compute, use_fsdp)


def init_process_group_per_attempt(backend: str, timeout: datetime.timedelta) -> None:
    """``init_process_group`` from torchrun's environment, each restart on keys of its own.

    torchrun keeps the workers' store across ``--max-restarts`` attempts (the static
    rendezvous' store, or the c10d rendezvous' shared TCPStore, created once by the first
    round's rank-0 agent), and ``env://`` adds no per-attempt prefix (torch 2.13), so a
    restarted rank can read a dead rank's gloo address or NCCL id from the previous attempt:
    "Connection refused". ``TORCHELASTIC_RESTART_COUNT`` cannot name the attempt on several
    nodes: it counts this node's failures only, and a node whose workers are restarted
    because another node rejoined counts none, so the nodes' prefixes differed and the new
    group never met. The prefix is an attempt number agreed through the store instead.
    """
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timeout))
    attempt = agree_on_attempt(store, rank, world_size, timeout)
    store = dist.PrefixStore(f"oreo_fast/attempt_{attempt}", store)
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size,
                            timeout=timeout)


def agree_on_attempt(store, rank: int, world_size: int, timeout: datetime.timedelta,
                     poll_s: float = 0.02) -> int:
    """A number every rank of this attempt returns and no earlier attempt on ``store`` used.

    Rank 0 draws it from a counter in the store. Any key with a fixed name may still hold
    an earlier attempt's value, so the others cannot simply read it: each rank posts a fresh
    random token under its rank, rank 0 answers every token it sees under a key named by
    the token (a stale token's answer is never read), and keeps answering until each rank
    has acknowledged under the new number's own keys. Every worker of the earlier attempt
    is dead before torchrun starts a new one, so nothing answers on its behalf.
    """
    deadline = time.monotonic() + timeout.total_seconds()
    if rank == 0:
        attempt = store.add("oreo_fast/attempts", 1)
        answered: dict[int, bytes] = {}
        waiting = set(range(1, world_size))
        while waiting:
            for r in sorted(waiting):
                if store.check([f"oreo_fast/attempt_{attempt}/ack_{r}"]):
                    waiting.discard(r)
                elif store.check([f"oreo_fast/token_{r}"]):
                    token = store.get(f"oreo_fast/token_{r}")
                    if answered.get(r) != token:
                        store.set(f"oreo_fast/answer_{token.decode()}", str(attempt))
                        answered[r] = token
            if waiting and time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(waiting)} did not join attempt {attempt} "
                                   f"within {timeout}")
            if waiting:
                time.sleep(poll_s)
        return attempt
    token = uuid.uuid4().hex
    store.set(f"oreo_fast/token_{rank}", token)
    store.wait([f"oreo_fast/answer_{token}"], timeout)
    attempt = int(store.get(f"oreo_fast/answer_{token}"))
    store.set(f"oreo_fast/attempt_{attempt}/ack_{rank}", "1")
    return attempt


def exit_with_launcher(poll_s: float = 0.1) -> None:
    """Under torchrun, end this worker as soon as its launcher is gone.

    torchrun starts each worker in a session of its own, so killing the launcher (``kill -9``,
    even of its whole process group) leaves the workers running: they would go on training,
    saving and pruning checkpoints next to a restarted run that resumes from them. A daemon
    thread watches the parent pid; once the worker is re-parented it exits at once, which
    the atomic checkpoint writes make safe at any point.
    """
    if "TORCHELASTIC_RUN_ID" not in os.environ:
        return
    launcher = os.getppid()

    def watch():
        while os.getppid() == launcher:
            time.sleep(poll_s)
        print(f"oreo-fast train: the launcher (pid {launcher}) is gone; exiting",
              file=sys.stderr, flush=True)
        os._exit(1)

    threading.Thread(target=watch, name="oreo-fast-launcher-watch", daemon=True).start()
