"""Peak memory of one step, for the subprocess runners: CUDA's allocator peak, or on CPU the
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) minus VmRSS."""
from __future__ import annotations

import resource

import torch

MIB = 2**20


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def peak_memory(step, device: torch.device):
    """Run ``step()`` once; return (its output, {"method", "peak_mb", "before_mb",
    "extra_peak_mb"})."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        output = step()
        torch.cuda.synchronize(device)
        peak, method = torch.cuda.max_memory_allocated(device), "torch.cuda.max_memory_allocated"
    else:
        before = _status_kib("VmRSS") * 1024
        reset = _reset_rss_peak()
        output = step()
        if reset:
            peak, method = _status_kib("VmHWM") * 1024, "VmHWM after clear_refs reset"
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            method = "ru_maxrss (includes warm-up; clear_refs not permitted)"
    return output, {"method": method, "peak_mb": peak / MIB, "before_mb": before / MIB,
                    "extra_peak_mb": (peak - before) / MIB}
