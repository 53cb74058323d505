"""The walk of the grad-in-forward loss (``grad_in_forward``): rows (masked-in tokens) in
walk order, per sequence from the last action backwards, cut into chunks that never split a
step, planned on the host from one transfer of the masks."""
from __future__ import annotations

import numpy as np
import torch

from oreo_fast.kernels import compute_dtype
from oreo_fast.ops.validation import check_bellman_arguments, check_bellman_masks, masks_on_host

# bytes of one chunk's policy logits in the compute dtype (the torch path's working set is
# about three times that: reference log-softmax, log p - log q, p; rows_stats_torch frees the
# logits as it goes). By default a chunk also has at least DEFAULT_MIN_ROWS rows, so that the
# matmuls stay efficient when the vocabulary is large: each chunk re-reads the LM head and
# adds its rows into the V x H weight gradient, a pass over both that is memory-bound when
# the chunk is short. 128 rows, measured on the 2-core AMD EPYC, quiet, forward + backward
# (2026-11-29): at the Qwen2.5-1.5B head (N=2048, V=151936, H=1536), 2 threads, 64 / 96 /
# 128 / 160 / 256 rows took 29.3 / 28.4 / 25.0 / 24.8 / 23.1 s against the paper recipe's
# 24.5-25.3 s, with an extra peak of 1,061 MB at 64 rows and 1,209 MB at 128 (0.145x the
# recipe's 8,319 MB; the target is 0.15x); at N=4096, V=32000, H=256, 65 / 128 / 256 rows
# took 3.52 / 3.35 / 3.43 s at 1 thread and 2.17 / 2.02 / 2.15 s at 2. On GPU 256 MiB as
# ops.default_chunk_rows.
DEFAULT_BUDGET_BYTES = {"cpu": 8 * 2**20, "cuda": 256 * 2**20}
DEFAULT_MIN_ROWS = 128


class ChunkPlan:
    """Rows (masked-in tokens) in walk order, per sequence from the last action backwards, cut
    into chunks that each hold whole steps. Built on the host from one transfer of the masks.

    Per row: ``b``, ``t``; ``state_t`` the time of its state s(t) (-1: none); ``state_row``
    the row of that state (-1: none); ``seg_first`` the first row of its sequence. ``chunks``
    is a list of (start, stop) row ranges; ``longest_unit`` the most rows one chunk must hold.
    """

    def __init__(self, m: np.ndarray, S: np.ndarray, budget_rows: int):
        B, T = m.shape
        # walk order: sequence-major, time descending
        b, t_rev = np.nonzero(m[:, ::-1])
        t = T - 1 - t_rev
        self.n = n = b.size
        positions = np.where(S, np.arange(T), -1)
        last_state = np.maximum.accumulate(positions, axis=1)  # s(t) per [b, t]
        row_of = np.full((B, T), -1, dtype=np.int64)
        row_of[b, t] = np.arange(n)
        self.b, self.t = b.astype(np.int64), t.astype(np.int64)
        self.state_t = last_state[b, t].astype(np.int64)
        self.state_row = np.where(self.state_t >= 0, row_of[b, np.maximum(self.state_t, 0)], -1)
        counts = m.sum(1)
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        self.seg_first = starts[b].astype(np.int64)
        # a chunk may end after row i iff i closes its unit: it is a state, or no state precedes
        # it (its log-ratio reaches no residual the chunk could not finish)
        can_cut = S[b, t] | (self.state_t < 0)
        self.cuts = np.nonzero(can_cut)[0] + 1  # row counts after which a cut is allowed
        units = np.diff(np.concatenate([[0], self.cuts]))
        self.longest_unit = int(units.max()) if units.size else 0
        self.chunks = pack_chunks(self.cuts, budget_rows)

    def device_rows(self, device):
        """(b, t, state_t, state_row, seg_first) as int64 tensors on ``device`` (one copy)."""
        packed = torch.from_numpy(np.stack([self.b, self.t, self.state_t, self.state_row,
                                            self.seg_first]).astype(np.int64))
        if device.type == "cuda":
            packed = packed.pin_memory()  # a pinned copy does not wait for the device
        return packed.to(device, non_blocking=True).unbind(0)


def pack_chunks(cuts: np.ndarray, budget_rows: int) -> list[tuple[int, int]]:
    """Greedy: each chunk ends at the last allowed cut within ``budget_rows`` of its start, or
    at the first allowed cut after it when one unit alone is larger (a chunk never splits a
    step). Module-level so that tests can swap in a broken packer and see the tests fail."""
    chunks, start = [], 0
    total = int(cuts[-1]) if cuts.size else 0
    while start < total:
        i = np.searchsorted(cuts, start + budget_rows, side="right") - 1
        if i < 0 or cuts[i] <= start:  # the next unit alone exceeds the budget
            i = np.searchsorted(cuts, start, side="right")
        stop = int(cuts[i])
        chunks.append((start, stop))
        start = stop
    return chunks


def prepare_walk(values, rewards, mask, state_mask, level, beta, kl_coef, kl_estimator,
                 budget_rows: int):
    """The Bellman argument checks and the chunk plan, from one device-to-host transfer."""
    check_bellman_arguments(values, rewards, tuple(mask.shape), state_mask, level, beta, kl_coef,
                            kl_estimator)
    m, S, rewards_finite = masks_on_host(mask, state_mask, rewards)
    check_bellman_masks(m, S, rewards_finite, level)
    return state_mask.bool(), ChunkPlan(m, S, budget_rows)


def budget_rows(chunk_budget_bytes, vocab_size: int, dtype: torch.dtype, device) -> int:
    """Rows per chunk: the budget over the bytes of one row of logits in the compute dtype
    (default: DEFAULT_BUDGET_BYTES, and at least DEFAULT_MIN_ROWS rows)."""
    row = max(1, vocab_size) * compute_dtype(dtype).itemsize
    if chunk_budget_bytes is None:
        budget = DEFAULT_BUDGET_BYTES["cuda" if device.type == "cuda" else "cpu"]
        return max(DEFAULT_MIN_ROWS, budget // row)
    if not isinstance(chunk_budget_bytes, int) or chunk_budget_bytes < 1:
        raise ValueError(f"chunk_budget_bytes must be an int >= 1, got {chunk_budget_bytes!r}")
    return max(1, chunk_budget_bytes // row)
