"""Triton kernels of the grad-in-forward OREO loss (``oreo_fast.grad_in_forward``): two row
passes over logits that lie anywhere in memory, one program per row.

Rows are given by element offsets (``z_rows[i]``: where row i of the policy logits starts),
so a chunk of fresh logits ([n, V], offsets i * V) and the rows of [B, T, V] logits with any
batch and time strides (offsets b * stride_b + t * stride_t) take the same kernels, and the
gradient can be written where the logits are.

- stats: online log-sum-exps of policy (z) and reference (r) logits in one read of both, and
  with FULL_KL the running sum of exp(z - max) (z - r), so that
      KL = sum_v p_v (z_v - r_v) - lse(z) + lse(r);
  stores logp = z_a - lse(z), ref_logp = r_a - lse(r), both lse and KL.
- grad: dlogits = c (onehot(a) - p) + w p (log p - log q - KL) (the w-term only with FULL_KL;
  the reference logits are then not read), stored in the output's dtype, in place of the
  logits when the output is the logits buffer (each block is read before it is written).
Accumulation is in float32 (float64 for float64 logits); offsets are int64.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from oreo_fast.kernels import compute_dtype
from oreo_fast.kernels.token_logprobs_kl import row_lse_kl


@triton.jit
def _oreo_row_stats_kernel(
    z_ptr, r_ptr, z_rows_ptr, r_rows_ptr, actions_ptr,
    logp_ptr, ref_logp_ptr, lse_ptr, ref_lse_ptr, kl_ptr,
    V,
    FULL_KL: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + tl.load(z_rows_ptr + row)
    r_row = r_ptr + tl.load(r_rows_ptr + row)
    # the per-token op's row pass: online log-sum-exps of both rows and the KL
    lse, ref_lse, kl = row_lse_kl(z_row, r_row, V, V, FULL_KL, DTYPE, BLOCK_V)
    action = tl.load(actions_ptr + row)
    tl.store(logp_ptr + row, tl.load(z_row + action).to(DTYPE) - lse)
    tl.store(ref_logp_ptr + row, tl.load(r_row + action).to(DTYPE) - ref_lse)
    tl.store(lse_ptr + row, lse)
    tl.store(ref_lse_ptr + row, ref_lse)
    tl.store(kl_ptr + row, kl)


@triton.jit
def _oreo_row_grad_kernel(
    z_ptr, r_ptr, out_ptr, z_rows_ptr, r_rows_ptr, out_rows_ptr, actions_ptr,
    lse_ptr, ref_lse_ptr, kl_ptr, c_ptr, w_ptr,
    V,
    FULL_KL: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + tl.load(z_rows_ptr + row)
    out_row = out_ptr + tl.load(out_rows_ptr + row)
    action = tl.load(actions_ptr + row)
    lse = tl.load(lse_ptr + row).to(DTYPE)
    c = tl.load(c_ptr + row).to(DTYPE)
    if FULL_KL:
        r_row = r_ptr + tl.load(r_rows_ptr + row)
        ref_lse = tl.load(ref_lse_ptr + row).to(DTYPE)
        kl = tl.load(kl_ptr + row).to(DTYPE)
        w = tl.load(w_ptr + row).to(DTYPE)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        inside = cols < V
        log_p = tl.load(z_row + cols, mask=inside, other=float("-inf")).to(DTYPE) - lse
        p = tl.exp(log_p)
        grad = tl.where(cols == action, c, 0.0) - c * p
        if FULL_KL:
            log_q = tl.load(r_row + cols, mask=inside, other=0.0).to(DTYPE) - ref_lse
            grad += tl.where(p > 0, w * p * (log_p - log_q - kl), 0.0)
        tl.store(out_row + cols, grad.to(out_ptr.dtype.element_ty), mask=inside)


# ---------------------------------------------------------------- launchers


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def default_block_v(V: int) -> int:
    return min(4096 if torch.cuda.is_available() else 1024, triton.next_power_of_2(V))


def num_warps(block_v: int) -> int:
    return 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16


def _contiguous_rows(x: torch.Tensor, rows):
    """Offsets of a [n, V] tensor's rows when none are given."""
    if rows is not None:
        return rows.contiguous()
    return torch.arange(x.shape[0], device=x.device, dtype=torch.int64) * x.stride(0)


def row_stats(z, r, actions, full_kl=True, block_v=None, z_rows=None, r_rows=None):
    """Launch the stats pass over n rows (offsets ``z_rows``/``r_rows``, default the rows of
    [n, V] tensors). Returns (logp, ref_logp, lse, ref_lse, kl), each [n] in the compute
    dtype (float32, float64 for float64 logits); kl is zeros without ``full_kl``."""
    V = z.shape[-1]
    assert z.stride(-1) == 1 and r.stride(-1) == 1, "vocabulary stride must be 1"
    z_rows, r_rows = _contiguous_rows(z, z_rows), _contiguous_rows(r, r_rows)
    n = z_rows.numel()
    dtype = compute_dtype(z.dtype)
    outputs = [torch.empty(n, dtype=dtype, device=z.device) for _ in range(5)]
    if n == 0:
        return tuple(outputs)
    block_v = block_v or default_block_v(V)
    logp, ref_logp, lse, ref_lse, kl = outputs
    _oreo_row_stats_kernel[(n,)](
        z, r, z_rows, r_rows, actions.contiguous(), logp, ref_logp, lse, ref_lse, kl, V,
        FULL_KL=full_kl, DTYPE=_compute_dtype(z.dtype), BLOCK_V=block_v,
        num_warps=num_warps(block_v),
    )
    return logp, ref_logp, lse, ref_lse, kl


def row_grad_(z, r, actions, lse, ref_lse, kl, c, w, full_kl=True, block_v=None, z_rows=None,
              r_rows=None, out=None, out_rows=None):
    """Launch the grad pass; writes dlogits into ``out`` at ``out_rows`` (default: z itself,
    in place) and returns ``out``. ``r``, ``ref_lse``, ``kl`` and ``w`` are read only with
    ``full_kl``."""
    V = z.shape[-1]
    z_rows = _contiguous_rows(z, z_rows)
    out = z if out is None else out
    out_rows = z_rows if out_rows is None else out_rows.contiguous()
    r_rows = _contiguous_rows(r, r_rows) if full_kl else z_rows
    n = z_rows.numel()
    if n == 0:
        return out
    block_v = block_v or default_block_v(V)
    _oreo_row_grad_kernel[(n,)](
        z, r, out, z_rows, r_rows, out_rows, actions.contiguous(),
        lse, ref_lse, kl, c.contiguous(), w.contiguous(), V,
        FULL_KL=full_kl, DTYPE=_compute_dtype(z.dtype), BLOCK_V=block_v,
        num_warps=num_warps(block_v),
    )
    return out


# ---------------------------------------------------------------- ahead-of-time compile specs

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32",
                 torch.float64: "fp64"}
AOT_VOCABS = (32000, 128256, 151936)


def aot_specs() -> list[dict]:
    """Every constexpr and dtype combination the launchers produce on CUDA: logits in bf16,
    fp16, fp32 or fp64 (the compute dtype follows), with and without the full KL, at the
    default vocabulary block of V in AOT_VOCABS (all 4096 on CUDA) and of V = 37."""
    specs = []
    blocks = sorted({min(4096, triton.next_power_of_2(V)) for V in AOT_VOCABS + (37,)})
    for dtype, name in _TRITON_TYPES.items():
        compute = "fp64" if compute_dtype(dtype) == torch.float64 else "fp32"
        for full_kl in (True, False):
            for block_v in blocks:
                constexprs = {"FULL_KL": full_kl, "DTYPE": _compute_dtype(dtype),
                              "BLOCK_V": block_v}
                meta = {"FULL_KL": "constexpr", "DTYPE": "constexpr", "BLOCK_V": "constexpr"}
                stats = {"z_ptr": f"*{name}", "r_ptr": f"*{name}", "z_rows_ptr": "*i64",
                         "r_rows_ptr": "*i64", "actions_ptr": "*i64",
                         **{k: f"*{compute}" for k in ("logp_ptr", "ref_logp_ptr", "lse_ptr",
                                                       "ref_lse_ptr", "kl_ptr")},
                         "V": "i32", **meta}
                grad = {"z_ptr": f"*{name}", "r_ptr": f"*{name}", "out_ptr": f"*{name}",
                        "z_rows_ptr": "*i64", "r_rows_ptr": "*i64", "out_rows_ptr": "*i64",
                        "actions_ptr": "*i64",
                        **{k: f"*{compute}" for k in ("lse_ptr", "ref_lse_ptr", "kl_ptr",
                                                      "c_ptr", "w_ptr")},
                        "V": "i32", **meta}
                tag = f"{name}-{'full' if full_kl else 'k3'}-bv{block_v}"
                specs.append({"kernel": _oreo_row_stats_kernel, "signature": stats,
                              "constexprs": constexprs, "num_warps": num_warps(block_v),
                              "label": f"oreo_row_stats-{tag}"})
                specs.append({"kernel": _oreo_row_grad_kernel, "signature": grad,
                              "constexprs": constexprs, "num_warps": num_warps(block_v),
                              "label": f"oreo_row_grad-{tag}"})
    return specs
