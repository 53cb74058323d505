"""Triton kernels: per-token log-probs of the taken action under the policy and the reference,
and the full-vocabulary KL(pi || pi_ref), forward and backward, one row of logits per program.

Forward: a single pass over each row that reads the policy and reference logits together,
keeping online log-sum-exps of both and the running sum of exp(z - m) * (z - r), so that
    KL = sum_v p_v (z_v - r_v) - lse(z) + lse(r).
Backward: a single pass writing
    dlogits = g_logp * (onehot(a) - p) + g_kl * p * (log p - log q - KL)
optionally into the logits buffer itself. Rows whose action is masked produce zeros and get a
zero gradient. Accumulation is in float32 (float64 for float64 inputs); offsets are int64.

Logits are [B, T, V] with any batch and time strides (a ``logits[:, :-1]`` slice needs no
copy) and unit stride along the vocabulary. ``actions``, ``mask`` and the per-token outputs are
contiguous [B * T].
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from oreo_fast.kernels import compute_dtype


@triton.jit
def row_lse_kl(z_row, r_row, n_cols, V, COMPUTE_KL: tl.constexpr, DTYPE: tl.constexpr,
               BLOCK_V: tl.constexpr):
    """One pass over the first ``n_cols`` of a row's V policy logits ``z_row`` and reference
    logits ``r_row`` with online log-sum-exps: (lse, ref_lse, KL(p || q)), the KL 0 unless
    COMPUTE_KL (KL = sum p (z - r) - lse + ref_lse). Also the grad-in-forward loss's row pass."""
    max_z = tl.full([], float("-inf"), DTYPE)
    sum_z = tl.full([], 0.0, DTYPE)
    max_r = tl.full([], float("-inf"), DTYPE)
    sum_r = tl.full([], 0.0, DTYPE)
    weighted_diff = tl.full([], 0.0, DTYPE)  # sum exp(z - max_z) * (z - r)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(z_row + cols, mask=in_row, other=float("-inf")).to(DTYPE)
        r = tl.load(r_row + cols, mask=in_row, other=float("-inf")).to(DTYPE)

        new_max_z = tl.maximum(max_z, tl.max(z, axis=0))
        # while every logit seen is -inf, shift by 0 instead of -inf to avoid inf - inf
        shift_z = tl.where(new_max_z == float("-inf"), 0.0, new_max_z)
        rescale = tl.exp(max_z - shift_z)
        exp_z = tl.exp(z - shift_z)
        sum_z = sum_z * rescale + tl.sum(exp_z, axis=0)
        if COMPUTE_KL:
            # exp_z == 0 where z = -inf: skip it rather than form 0 * inf
            contrib = tl.where(exp_z > 0, exp_z * (z - r), 0.0)
            weighted_diff = weighted_diff * rescale + tl.sum(contrib, axis=0)
        max_z = new_max_z

        new_max_r = tl.maximum(max_r, tl.max(r, axis=0))
        shift_r = tl.where(new_max_r == float("-inf"), 0.0, new_max_r)
        sum_r = sum_r * tl.exp(max_r - shift_r) + tl.sum(tl.exp(r - shift_r), axis=0)
        max_r = new_max_r

    lse = max_z + tl.log(sum_z)
    ref_lse = max_r + tl.log(sum_r)
    kl = tl.zeros([], DTYPE)
    if COMPUTE_KL:
        kl = weighted_diff / sum_z - lse + ref_lse
    return lse, ref_lse, kl


@triton.jit
def _logprobs_kl_forward_kernel(
    logits_ptr, ref_ptr, actions_ptr, mask_ptr,
    logp_ptr, ref_logp_ptr, lse_ptr, ref_lse_ptr, kl_ptr,
    T, V,
    stride_lb, stride_lt, stride_rb, stride_rt,
    COMPUTE_KL: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    active = tl.load(mask_ptr + row) != 0
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    ref_row = ref_ptr + b * stride_rb + t * stride_rt
    # A masked row does no work: its loop is empty and it stores zeros.
    n_cols = tl.where(active, V, 0)

    lse, ref_lse, kl = row_lse_kl(logits_row, ref_row, n_cols, V, COMPUTE_KL, DTYPE, BLOCK_V)
    action = tl.load(actions_ptr + row)
    action = tl.where(active, action, 0)
    z_a = tl.load(logits_row + action).to(DTYPE)
    r_a = tl.load(ref_row + action).to(DTYPE)
    tl.store(logp_ptr + row, tl.where(active, z_a - lse, 0.0))
    tl.store(ref_logp_ptr + row, tl.where(active, r_a - ref_lse, 0.0))
    tl.store(lse_ptr + row, tl.where(active, lse, 0.0))
    tl.store(ref_lse_ptr + row, tl.where(active, ref_lse, 0.0))
    if COMPUTE_KL:
        tl.store(kl_ptr + row, tl.where(active, kl, 0.0))


@triton.jit
def _logprobs_kl_backward_kernel(
    logits_ptr, ref_ptr, actions_ptr, mask_ptr,
    lse_ptr, ref_lse_ptr, kl_ptr, grad_logp_ptr, grad_kl_ptr, grad_logits_ptr,
    T, V,
    stride_lb, stride_lt, stride_rb, stride_rt, stride_gb, stride_gt,
    HAS_KL_GRAD: tl.constexpr, DTYPE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    b = row // T
    t = row % T
    active = tl.load(mask_ptr + row) != 0
    logits_row = logits_ptr + b * stride_lb + t * stride_lt
    ref_row = ref_ptr + b * stride_rb + t * stride_rt
    grad_row = grad_logits_ptr + b * stride_gb + t * stride_gt

    action = tl.load(actions_ptr + row)
    lse = tl.load(lse_ptr + row).to(DTYPE)
    # a masked row gets a zero gradient: both scales vanish
    g_logp = tl.where(active, tl.load(grad_logp_ptr + row).to(DTYPE), 0.0)
    if HAS_KL_GRAD:
        ref_lse = tl.load(ref_lse_ptr + row).to(DTYPE)
        kl = tl.load(kl_ptr + row).to(DTYPE)
        g_kl = tl.where(active, tl.load(grad_kl_ptr + row).to(DTYPE), 0.0)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        in_row = cols < V
        z = tl.load(logits_row + cols, mask=in_row, other=float("-inf")).to(DTYPE)
        log_p = z - lse
        p = tl.where(active, tl.exp(log_p), 0.0)
        grad = tl.where(cols == action, g_logp, 0.0) - g_logp * p
        if HAS_KL_GRAD:
            r = tl.load(ref_row + cols, mask=in_row, other=0.0).to(DTYPE)
            log_q = r - ref_lse
            grad += tl.where(p > 0, g_kl * p * (log_p - log_q - kl), 0.0)
        # the loads of this block precede its store, so grad_logits may alias logits
        tl.store(grad_row + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=in_row)


def _compute_tl_dtype(dtype: torch.dtype):
    return tl.float64 if compute_dtype(dtype) == torch.float64 else tl.float32


def launch_config(V: int, block_v: int | None = None, on_gpu: bool | None = None):
    """(BLOCK_V, num_warps) of both kernels for a vocabulary of V: the one place the launchers
    and ``aot_specs`` take them from. ``block_v`` overrides the block (tests cross block
    boundaries with it); ``on_gpu`` defaults to whether CUDA is available (the interpreter
    on CPU runs smaller blocks faster)."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if not block_v:
        block_v = min(4096 if on_gpu else 1024, triton.next_power_of_2(V))
    num_warps = 4 if block_v <= 1024 else 8 if block_v <= 4096 else 16
    return block_v, num_warps


def default_block_v(V: int) -> int:
    return launch_config(V)[0]


def logprobs_kl_forward(logits, ref_logits, actions, mask, compute_kl=True, block_v=None):
    """Launch the forward kernel on [B, T, V] logits.

    Returns (logp, ref_logp, lse, ref_lse, kl), each [B, T] in the compute dtype (float32,
    or float64 for float64 logits); kl is zeros when ``compute_kl`` is false.
    """
    B, T, V = logits.shape
    assert logits.stride(-1) == 1 and ref_logits.stride(-1) == 1, "vocabulary stride must be 1"
    dtype = compute_dtype(logits.dtype)
    outputs = [torch.zeros(B, T, dtype=dtype, device=logits.device) for _ in range(5)]
    logp, ref_logp, lse, ref_lse, kl = outputs
    if B * T == 0:
        return tuple(outputs)
    block_v, num_warps = launch_config(V, block_v)
    _logprobs_kl_forward_kernel[(B * T,)](
        logits, ref_logits, actions.contiguous(), mask.contiguous(),
        logp, ref_logp, lse, ref_lse, kl,
        T, V,
        logits.stride(0), logits.stride(1), ref_logits.stride(0), ref_logits.stride(1),
        COMPUTE_KL=compute_kl, DTYPE=_compute_tl_dtype(logits.dtype), BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return logp, ref_logp, lse, ref_lse, kl


def logprobs_kl_backward(
    logits, ref_logits, actions, mask, lse, ref_lse, kl, grad_logp, grad_kl,
    out=None, block_v=None,
):
    """Launch the backward kernel; returns d loss / d logits ([B, T, V], logits' dtype).

    ``grad_kl`` may be None (no KL gradient: the reference logits are then not read).
    ``out`` may be ``logits`` itself for an in-place backward.
    """
    B, T, V = logits.shape
    grad_logits = torch.empty_like(logits) if out is None else out
    if B * T == 0:
        return grad_logits
    block_v, num_warps = launch_config(V, block_v)
    has_kl_grad = grad_kl is not None
    grad_logp = grad_logp.contiguous()
    grad_kl = grad_kl.contiguous() if has_kl_grad else grad_logp
    _logprobs_kl_backward_kernel[(B * T,)](
        logits, ref_logits, actions.contiguous(), mask.contiguous(),
        lse, ref_lse, kl, grad_logp, grad_kl, grad_logits,
        T, V,
        logits.stride(0), logits.stride(1), ref_logits.stride(0), ref_logits.stride(1),
        grad_logits.stride(0), grad_logits.stride(1),
        HAS_KL_GRAD=has_kl_grad, DTYPE=_compute_tl_dtype(logits.dtype), BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return grad_logits


# Vocabularies the trainer meets (Llama 2, Llama 3, Qwen 2.5); each is a multiple of 16.
AOT_VOCABS = (32000, 128256, 151936)


def aot_specs():
    """Every program the two launchers compile on a GPU (see ``oreo_fast.kernels.aot``): each
    float dtype of the logits, both values of COMPUTE_KL / HAS_KL_GRAD, and the BLOCK_V and
    warps ``launch_config`` picks for the vocabularies above; batch strides that fit in int32
    and ones that do not (B * T * V past 2**31 elements)."""
    from . import aot

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        compute = compute_dtype(dtype)
        for V in AOT_VOCABS:
            block_v, num_warps = launch_config(V, on_gpu=True)
            for T, big in ((2048, False), (16384, True)):  # a long context: T * V > 2**31
                batch_stride = aot.int_type(T * V)
                if big != (batch_stride == "i64"):
                    continue
                ints = {"T": aot.int_type(T), "V": aot.int_type(V)}
                row_strides = {"stride_lb": batch_stride, "stride_lt": aot.int_type(V),
                               "stride_rb": batch_stride, "stride_rt": aot.int_type(V)}
                aligned = ["V", "stride_lb", "stride_lt", "stride_rb", "stride_rt"]
                common = {"logits_ptr": aot.pointer(dtype), "ref_ptr": aot.pointer(dtype),
                          "actions_ptr": aot.pointer(torch.int64),
                          "mask_ptr": aot.pointer(torch.bool), **ints, **row_strides}
                name = f"{str(dtype)[6:]} V={V} strides={batch_stride}"
                for compute_kl in (True, False):
                    outputs = ("logp_ptr", "ref_logp_ptr", "lse_ptr", "ref_lse_ptr", "kl_ptr")
                    specs.append({
                        "kernel": _logprobs_kl_forward_kernel,
                        "signature": {**common, **{o: aot.pointer(compute) for o in outputs}},
                        "constexprs": {"COMPUTE_KL": compute_kl,
                                       "DTYPE": _compute_tl_dtype(dtype), "BLOCK_V": block_v},
                        "num_warps": num_warps, "aligned": aligned,
                        "label": f"forward {name} COMPUTE_KL={compute_kl}",
                    })
                for has_kl_grad in (True, False):
                    saved = ("lse_ptr", "ref_lse_ptr", "kl_ptr", "grad_logp_ptr", "grad_kl_ptr")
                    specs.append({
                        "kernel": _logprobs_kl_backward_kernel,
                        "signature": {**common, **{s: aot.pointer(compute) for s in saved},
                                      "grad_logits_ptr": aot.pointer(dtype),
                                      "stride_gb": batch_stride, "stride_gt": aot.int_type(V)},
                        "constexprs": {"HAS_KL_GRAD": has_kl_grad,
                                       "DTYPE": _compute_tl_dtype(dtype), "BLOCK_V": block_v},
                        "num_warps": num_warps, "aligned": aligned + ["stride_gb", "stride_gt"],
                        "label": f"backward {name} HAS_KL_GRAD={has_kl_grad}",
                    })
    return aot.unique_specs(specs)
