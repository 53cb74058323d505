"""Checks run before a job writes anything: the output location exists, is writable and has
room for the job's files. Problems are :class:`~oreo_fast.errors.OutputError` naming the
folder."""
from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

from oreo_fast.errors import OutputError


def safetensors_numel(folder) -> int:
    """Number of parameters in a folder's safetensors files (read from their headers)."""
    total = 0
    for file in Path(folder).glob("*.safetensors"):
        with open(file, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        for name, info in header.items():
            if name != "__metadata__":
                n = 1
                for d in info["shape"]:
                    n *= d
                total += n
    return total


def check_output_dir(path, need_bytes: int = 0) -> Path:
    """Create ``path``, write and delete a probe file, and check that about ``need_bytes``
    are free: an unwritable or full output location is reported before training starts."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create the output folder ({e.strerror or e})", path) from None
    probe = path / f".oreo-write-probe.{os.getpid()}"
    try:
        with open(probe, "wb") as f:
            f.write(b"\0" * 4096)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        raise OutputError(f"the output folder is not writable ({e.strerror or e})", path) from None
    finally:
        try:
            probe.unlink()
        except OSError:
            pass
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise OutputError(f"only {free / 2**20:.1f} MiB free; the run's checkpoints and "
                          f"results need about {need_bytes / 2**20:.1f} MiB", path)
    return path
