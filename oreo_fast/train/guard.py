"""The trainer's guard against lost work: non-finite steps are skipped, and a run that keeps
producing them stops with a :class:`~oreo_fast.errors.NonFiniteError` before anything
non-finite is saved. Also the fault-injection hooks the reliability tests use.

Test hooks (environment variables, read only by the trainer; never set them in real runs):

- ``OREO_FAULT_EXIT_AT_STEP=RANK:STEP``: process RANK raises after optimizer step STEP (a rank
  that dies in the middle of training);
- ``OREO_FAULT_HANG_AT_STEP=RANK:STEP``: process RANK stops responding after step STEP (a
  stuck rank: the others fail after ``collective_timeout_s``);
- ``OREO_FAULT_KILL_AT_STEP=RANK:STEP``: that rank sends itself SIGKILL after that step (what
  the kernel's out-of-memory killer does).
- ``OREO_FAULT_STEP_DELAY_S=SECONDS``: sleep after every step (a window for kill -9 tests).
"""
from __future__ import annotations

import logging
import os
import signal
import time

import torch

from oreo_fast.errors import NonFiniteError


def local_all_finite(tensors):
    """One 0-dim bool tensor on the tensors' device: all of them finite (this rank's shards of
    DTensors); no host synchronisation."""
    flags = []
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        if t.is_floating_point() and t.numel():
            flags.append(torch.isfinite(t).all())
    if not flags:
        return torch.tensor(True)
    return torch.stack([f.to(flags[0].device) for f in flags]).all()


def bad_step(step: int, in_row: int, skipped: int, max_bad_steps: int, warn: bool) -> None:
    """After a skipped step: a warning, or the :class:`NonFiniteError` that stops training."""
    if in_row >= max_bad_steps:
        raise NonFiniteError(
            f"stopping at step {step}: {in_row} consecutive steps had a non-finite loss or "
            f"gradient (max_bad_steps={max_bad_steps}); {skipped} skipped in all. Nothing "
            "non-finite was saved; lower the learning rate or check the data, then resume=true")
    if warn:
        logging.getLogger("oreo_fast").warning(
            "step %d: non-finite loss or gradient, step skipped (%d in a row)", step, in_row)


def inject(step: int, rank: int) -> None:
    """The fault-injection test hooks (see the module docstring); no-ops unless set."""
    delay = os.environ.get("OREO_FAULT_STEP_DELAY_S")
    if delay:
        time.sleep(float(delay))
    for hook in ("OREO_FAULT_EXIT_AT_STEP", "OREO_FAULT_HANG_AT_STEP", "OREO_FAULT_KILL_AT_STEP"):
        target = os.environ.get(hook)
        if not target or [int(x) for x in target.split(":")] != [rank, step]:
            continue
        if hook == "OREO_FAULT_KILL_AT_STEP":
            os.kill(os.getpid(), signal.SIGKILL)
        if hook == "OREO_FAULT_HANG_AT_STEP":
            print(f"{hook}: rank {rank} hangs after step {step} (injected fault)", flush=True)
            time.sleep(24 * 3600)
        raise RuntimeError(f"{hook}: rank {rank} fails after step {step} (injected fault)")
