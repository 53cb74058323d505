"""Which implementation runs an op: ``impl`` names it, ``resolve_impl`` turns "auto" into the
one for the device and refuses a combination that cannot run. One rule for every op family
(the losses here and the cascade attention of the search), each passing the names it has."""
from __future__ import annotations

import os

import torch

from oreo_fast.kernels import TRITON_AVAILABLE

IMPLS = ("auto", "triton", "torch", "reference")


def resolve_impl(impl: str, device: torch.device, choices: tuple[str, ...] = IMPLS,
                 name: str = "impl") -> str:
    """``impl`` checked against ``choices``; "auto" becomes "triton" on CUDA (when Triton is
    installed) and "torch" elsewhere. "triton" on a CPU tensor needs the interpreter."""
    if impl not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and TRITON_AVAILABLE else "torch"
    if impl == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError(f"{name}='triton' needs the triton package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"{name}='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before import"
            )
    return impl
