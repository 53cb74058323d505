"""Differentiable per-token ops: (logp, ref_logp, kl) at logits level and at hidden level.

Both return three [B, T] tensors in the compute dtype (float32, or float64 for float64 inputs):
log pi(a_t|s_t), log pi_ref(a_t|s_t) and KL(pi(.|s_t) || pi_ref(.|s_t)) over the full
vocabulary. Positions where ``action_mask`` is false are 0 and get no gradient. Gradients flow
to the policy side only (logits, or hidden and weight); ``ref_logp`` is not differentiable.

Implementations (``impl``):
- ``"triton"``: the kernels of ``oreo_fast.kernels`` (on CPU only under TRITON_INTERPRET=1);
- ``"torch"``: the same chunked algorithm in PyTorch (the CPU training path);
- ``"reference"``: the plain materialised recipe of ``oreo_fast.reference``;
- ``"auto"``: triton on CUDA, torch elsewhere.
At hidden level the logits of only ``chunk_rows`` tokens exist at any time; the backward
recomputes them (six matmuls in all: two forward, two recomputed, two for the gradients).
"""
from __future__ import annotations

import os

import torch

from oreo_fast import reference
from oreo_fast.kernels import TRITON_AVAILABLE

IMPLS = ("auto", "triton", "torch", "reference")


# ---------------------------------------------------------------- dispatch and validation


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and TRITON_AVAILABLE else "torch"
    if impl == "triton":
        if not TRITON_AVAILABLE:
            raise RuntimeError("impl='triton' needs the triton package")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "impl='triton' on a CPU tensor needs TRITON_INTERPRET=1 set before import"
            )
    return impl


def _check_float(name: str, x: torch.Tensor, ndim: int):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")
    if x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_index(name: str, x: torch.Tensor, shape: tuple, integer: bool):
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if integer and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
        raise ValueError(f"{name} must be an integer tensor of token ids, got {x.dtype}")
    if not integer and (x.is_floating_point() or x.is_complex()):
        raise ValueError(f"{name} must be a bool (or 0/1 integer) mask, got {x.dtype}")
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")


def validate_token_inputs(policy, ref, actions, action_mask, vocab_size: int, ref_vocab_size: int):
    """Shape and dtype checks shared by both levels; returns (actions int64, mask bool)."""
    B, T = policy.shape[:2]
    if ref.shape[:2] != (B, T):
        raise ValueError(
            f"policy and reference inputs disagree on [B, T]: {tuple(policy.shape[:2])} "
            f"vs {tuple(ref.shape[:2])}"
        )
    if vocab_size != ref_vocab_size:
        raise ValueError(
            f"policy and reference vocabularies differ: {vocab_size} vs {ref_vocab_size}"
        )
    if policy.device != ref.device:
        raise ValueError(f"policy on {policy.device} but reference on {ref.device}")
    _check_index("actions", actions, (B, T), integer=True)
    _check_index("action_mask", action_mask, (B, T), integer=False)
    actions, mask = actions.long(), action_mask.bool()
    bad = mask & ((actions < 0) | (actions >= vocab_size))
    if bool(bad.any()):
        b, t = (int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"actions out of range [0, {vocab_size}) at a masked-in position: "
            f"actions[{b}, {t}] = {int(actions[b, t])}"
        )
    return actions, mask


# ---------------------------------------------------------------- chunked PyTorch rows


def _log_ratio_(log_p, log_q):
    """log p - log q in place of log_p, with p = 0 entries set to 0 (they carry no KL mass)
    and q = 0 < p entries at the largest finite value (their KL term is unbounded)."""
    return log_p.sub_(log_q).nan_to_num_(nan=0.0, neginf=0.0)


def rows_forward_torch(z, r, actions, compute_kl: bool):
    """Per-row (logp, ref_logp, lse, ref_lse, kl) of [n, V] logits; kl is zeros if not asked.

    Built from PyTorch's fused softmax kernels: on CPU, exp and logsumexp are several times
    slower than log_softmax over the same row.
    """
    dtype = reference.compute_dtype(z.dtype)
    index = actions.unsqueeze(-1)
    log_p = torch.log_softmax(z, dim=-1, dtype=dtype)
    log_q = torch.log_softmax(r, dim=-1, dtype=dtype)
    logp = log_p.gather(-1, index).squeeze(-1)
    ref_logp = log_q.gather(-1, index).squeeze(-1)
    # the log-sum-exps are saved for the triton backward; the torch backward does not need them
    lse = z.gather(-1, index).squeeze(-1).to(dtype) - logp
    ref_lse = r.gather(-1, index).squeeze(-1).to(dtype) - ref_logp
    if compute_kl:
        p = torch.softmax(z, dim=-1, dtype=dtype)
        kl = torch.linalg.vecdot(p, _log_ratio_(log_p, log_q))
    else:
        kl = torch.zeros_like(logp)
    return logp, ref_logp, lse, ref_lse, kl


def rows_backward_torch(z, r, actions, lse, ref_lse, kl, grad_logp, grad_kl):
    """d loss / d z for [n, V] logits: g_logp (onehot - p) + g_kl p (log p - log q - KL)."""
    dtype = reference.compute_dtype(z.dtype)
    grad = torch.softmax(z, dim=-1, dtype=dtype)  # p, then scaled in place
    if grad_kl is None:
        grad.mul_(-grad_logp.unsqueeze(-1))
    else:
        scale = _log_ratio_(torch.log_softmax(z, dim=-1, dtype=dtype),
                            torch.log_softmax(r, dim=-1, dtype=dtype))
        # g_kl (log p - log q) - (g_kl KL + g_logp), one row coefficient each
        scale.mul_(grad_kl.unsqueeze(-1)).sub_((grad_kl * kl + grad_logp).unsqueeze(-1))
        grad.mul_(scale)
    grad.scatter_add_(-1, actions.unsqueeze(-1), grad_logp.unsqueeze(-1))
    return grad


def default_chunk_rows(vocab_size: int, element_size: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk of logits is about 256 MiB on GPU, 32 MiB on CPU."""
    budget = (256 if device.type == "cuda" else 32) * 2**20
    return max(1, budget // max(1, vocab_size * element_size))


def _active_rows(mask: torch.Tensor):
    """(batch index, time index) of the masked-in positions. One host sync."""
    b, t = mask.nonzero(as_tuple=True)
    return b, t


# ---------------------------------------------------------------- logits level


def _upstream(grad_logp, grad_kl, compute_kl: bool, like: torch.Tensor):
    """Upstream gradients in the compute dtype; grad_kl None when the KL was not computed or
    not used, so that the backward skips everything only the KL gradient needs (the
    reference logits)."""
    grad_logp = torch.zeros_like(like) if grad_logp is None else grad_logp.to(like.dtype)
    grad_kl = None if grad_kl is None or not compute_kl else grad_kl.to(like.dtype)
    return grad_logp, grad_kl


class _LogitsLevel(torch.autograd.Function):
    """Forward saves the log-sum-exps and the KL per token; backward re-reads the logits."""

    @staticmethod
    def forward(ctx, logits, ref_logits, actions, mask, compute_kl, impl, inplace_backward, block_v):
        ref_logits = ref_logits.detach()
        if impl == "triton":
            from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_forward

            logp, ref_logp, lse, ref_lse, kl = logprobs_kl_forward(
                logits, ref_logits, actions, mask, compute_kl, block_v
            )
        else:
            logp, ref_logp, lse, ref_lse, kl = _logits_forward_torch(
                logits, ref_logits, actions, mask, compute_kl
            )
        ctx.save_for_backward(logits, ref_logits, actions, mask, lse, ref_lse, kl)
        ctx.impl, ctx.inplace_backward, ctx.block_v = impl, inplace_backward, block_v
        ctx.compute_kl = compute_kl
        ctx.mark_non_differentiable(ref_logp)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return logp, ref_logp, kl

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        logits, ref_logits, actions, mask, lse, ref_lse, kl = ctx.saved_tensors
        grad_logp, grad_kl = _upstream(grad_logp, grad_kl, ctx.compute_kl, lse)
        if ctx.impl == "triton":
            from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_backward

            out = logits if ctx.inplace_backward else None
            grad = logprobs_kl_backward(
                logits, ref_logits, actions, mask, lse, ref_lse, kl, grad_logp, grad_kl,
                out=out, block_v=ctx.block_v,
            )
        else:
            grad = _logits_backward_torch(
                logits, ref_logits, actions, mask, lse, ref_lse, kl, grad_logp, grad_kl
            )
        return grad, None, None, None, None, None, None, None


def _logits_forward_torch(logits, ref_logits, actions, mask, compute_kl):
    B, T, V = logits.shape
    dtype = reference.compute_dtype(logits.dtype)
    outputs = [torch.zeros(B, T, dtype=dtype, device=logits.device) for _ in range(5)]
    b_idx, t_idx = _active_rows(mask)
    chunk = default_chunk_rows(V, 4, logits.device)
    for start in range(0, b_idx.numel(), chunk):
        b, t = b_idx[start:start + chunk], t_idx[start:start + chunk]
        results = rows_forward_torch(logits[b, t], ref_logits[b, t], actions[b, t], compute_kl)
        for out, value in zip(outputs, results):
            out[b, t] = value
    return tuple(outputs)


def _logits_backward_torch(logits, ref_logits, actions, mask, lse, ref_lse, kl, grad_logp, grad_kl):
    V = logits.shape[-1]
    grad_logits = torch.zeros_like(logits)
    b_idx, t_idx = _active_rows(mask)
    chunk = default_chunk_rows(V, 4, logits.device)
    for start in range(0, b_idx.numel(), chunk):
        b, t = b_idx[start:start + chunk], t_idx[start:start + chunk]
        g_kl = None if grad_kl is None else grad_kl[b, t]
        grad = rows_backward_torch(
            logits[b, t], ref_logits[b, t], actions[b, t],
            lse[b, t], ref_lse[b, t], kl[b, t], grad_logp[b, t], g_kl,
        )
        grad_logits[b, t] = grad.to(logits.dtype)
    return grad_logits


def validate_logits_inputs(logits, ref_logits, actions, action_mask):
    """Checks for the logits-level op; returns (actions int64, mask bool)."""
    _check_float("logits", logits, 3)
    _check_float("ref_logits", ref_logits, 3)
    return validate_token_inputs(
        logits, ref_logits, actions, action_mask, logits.shape[-1], ref_logits.shape[-1]
    )


def token_logprobs_kl(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    compute_kl: bool = True,
    impl: str = "auto",
    inplace_backward: bool = False,
    block_v: int | None = None,
):
    """(logp, ref_logp, kl) per token from [B, T, V] policy and reference logits.

    ``inplace_backward`` (triton only) writes the logits gradient into ``logits`` itself,
    saving one [B, T, V] buffer; the logits are destroyed by the backward. ``block_v``
    overrides the kernel's vocabulary block (tests use it to cross block boundaries).
    """
    actions, mask = validate_logits_inputs(logits, ref_logits, actions, action_mask)
    return _token_logprobs_kl(logits, ref_logits, actions, mask, compute_kl, impl,
                              inplace_backward, block_v)


def _token_logprobs_kl(logits, ref_logits, actions, mask, compute_kl=True, impl="auto",
                       inplace_backward=False, block_v=None):
    impl = resolve_impl(impl, logits.device)
    if impl == "reference":
        safe_actions = torch.where(mask, actions, torch.zeros_like(actions))
        logp, ref_logp, kl = reference.token_logprobs_and_kl(logits, ref_logits, safe_actions)
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        return tuple(torch.where(mask, x, zero) for x in (logp, ref_logp.detach(), kl))
    if impl == "triton":
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        ref_logits = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    return _LogitsLevel.apply(
        logits, ref_logits, actions, mask, compute_kl, impl, inplace_backward, block_v
    )


# ---------------------------------------------------------------- hidden level (fused LM head)


def _chunk_rows_forward(impl, z, r, actions, compute_kl, block_v):
    if impl == "triton":
        from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_forward

        ones = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
        out = logprobs_kl_forward(z[None], r[None], actions[None], ones, compute_kl, block_v)
        return tuple(x[0] for x in out)
    return rows_forward_torch(z, r, actions, compute_kl)


def _chunk_rows_backward(impl, z, r, actions, lse, ref_lse, kl, g_logp, g_kl, block_v):
    """Gradient of the chunk logits, in z's dtype (triton writes it into z itself)."""
    if impl == "triton":
        from oreo_fast.kernels.token_logprobs_kl import logprobs_kl_backward

        ones = torch.ones(1, z.shape[0], dtype=torch.bool, device=z.device)
        return logprobs_kl_backward(
            z[None], r[None], actions[None], ones, lse[None], ref_lse[None], kl[None],
            g_logp[None], None if g_kl is None else g_kl[None], out=z[None], block_v=block_v,
        )[0]
    return rows_backward_torch(z, r, actions, lse, ref_lse, kl, g_logp, g_kl).to(z.dtype)


def accumulate_weight_grad(acc: torch.Tensor, grad_z: torch.Tensor, h: torch.Tensor,
                           vocab_slice: int = 16384):
    """acc += grad_z.T @ h. A float32 accumulator of half-precision products goes through
    vocabulary slices, so the temporary is vocab_slice x H rather than a whole V x H."""
    if acc.dtype == grad_z.dtype:
        acc.addmm_(grad_z.t(), h)
        return
    for start in range(0, acc.shape[0], vocab_slice):
        stop = start + vocab_slice
        acc[start:stop] += (grad_z[:, start:stop].t() @ h).to(acc.dtype)


class _HiddenLevel(torch.autograd.Function):
    """Chunks over the masked-in tokens; only chunk_rows x V logits exist at a time."""

    @staticmethod
    def forward(ctx, hidden, weight, ref_hidden, ref_weight, actions, mask, compute_kl, impl,
                chunk_rows, block_v):
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        B, T, _ = hidden.shape
        dtype = reference.compute_dtype(hidden.dtype)
        outputs = [torch.zeros(B, T, dtype=dtype, device=hidden.device) for _ in range(5)]
        b_idx, t_idx = _active_rows(mask)
        for start in range(0, b_idx.numel(), chunk_rows):
            b, t = b_idx[start:start + chunk_rows], t_idx[start:start + chunk_rows]
            z = hidden[b, t] @ weight.t()
            r = ref_hidden[b, t] @ ref_weight.t()
            results = _chunk_rows_forward(impl, z, r, actions[b, t], compute_kl, block_v)
            for out, value in zip(outputs, results):
                out[b, t] = value
        logp, ref_logp, lse, ref_lse, kl = outputs
        ctx.save_for_backward(hidden, weight, ref_hidden, ref_weight, actions, lse, ref_lse, kl,
                              b_idx, t_idx)
        ctx.impl, ctx.chunk_rows, ctx.block_v = impl, chunk_rows, block_v
        ctx.compute_kl = compute_kl
        ctx.mark_non_differentiable(ref_logp)
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return logp, ref_logp, kl

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        (hidden, weight, ref_hidden, ref_weight, actions, lse, ref_lse, kl,
         b_idx, t_idx) = ctx.saved_tensors
        grad_logp, grad_kl = _upstream(grad_logp, grad_kl, ctx.compute_kl, lse)
        grad_hidden = torch.zeros_like(hidden)
        # the weight gradient accumulates in float32 (float64 stays float64) across chunks
        acc_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
        grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start in range(0, b_idx.numel(), ctx.chunk_rows):
            b, t = b_idx[start:start + ctx.chunk_rows], t_idx[start:start + ctx.chunk_rows]
            h = hidden[b, t]
            z = h @ weight.t()
            g_kl = None if grad_kl is None else grad_kl[b, t]
            # the reference logits are needed only for the KL gradient
            r = z if g_kl is None else ref_hidden[b, t] @ ref_weight.t()
            grad_z = _chunk_rows_backward(
                ctx.impl, z, r, actions[b, t], lse[b, t], ref_lse[b, t], kl[b, t],
                grad_logp[b, t], g_kl, ctx.block_v,
            )
            grad_hidden[b, t] = grad_z @ weight
            accumulate_weight_grad(grad_weight, grad_z, h)
        return (grad_hidden, grad_weight.to(weight.dtype),
                None, None, None, None, None, None, None, None)


def validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions, action_mask):
    """Checks for the hidden-level op; returns (actions int64, mask bool)."""
    _check_float("hidden", hidden, 3)
    _check_float("weight", weight, 2)
    _check_float("ref_hidden", ref_hidden, 3)
    _check_float("ref_weight", ref_weight, 2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight {tuple(weight.shape)} does not match hidden size {hidden.shape[-1]}")
    if ref_weight.shape[1] != ref_hidden.shape[-1]:
        raise ValueError(
            f"ref_weight {tuple(ref_weight.shape)} does not match ref_hidden size "
            f"{ref_hidden.shape[-1]}"
        )
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight ({weight.dtype}) and hidden ({hidden.dtype}) must share a dtype")
    if ref_weight.dtype != ref_hidden.dtype:
        raise ValueError(
            f"ref_weight ({ref_weight.dtype}) and ref_hidden ({ref_hidden.dtype}) must share a dtype"
        )
    return validate_token_inputs(
        hidden, ref_hidden, actions, action_mask, weight.shape[0], ref_weight.shape[0]
    )


def fused_linear_token_logprobs_kl(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    actions: torch.Tensor,
    action_mask: torch.Tensor,
    *,
    compute_kl: bool = True,
    impl: str = "auto",
    chunk_rows: int | None = None,
    block_v: int | None = None,
):
    """(logp, ref_logp, kl) per token from final-norm hidden states and LM-head weights.

    hidden [B, T, H] and weight [V, H] are the policy's; ref_hidden [B, T, H_ref] and
    ref_weight [V, H_ref] the reference's (no gradient). Differentiable w.r.t. hidden, weight.
    ``chunk_rows`` tokens' logits exist at a time (default: about 256 MiB of them on GPU).
    """
    actions, mask = validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions,
                                          action_mask)
    return _fused_linear_token_logprobs_kl(hidden, weight, ref_hidden, ref_weight, actions, mask,
                                           compute_kl, impl, chunk_rows, block_v)


def _fused_linear_token_logprobs_kl(hidden, weight, ref_hidden, ref_weight, actions, mask,
                                    compute_kl=True, impl="auto", chunk_rows=None, block_v=None):
    impl = resolve_impl(impl, hidden.device)
    if impl == "reference":
        logits = hidden @ weight.t()
        ref_logits = (ref_hidden @ ref_weight.t()).detach()
        return _token_logprobs_kl(logits, ref_logits, actions, mask, compute_kl, "reference")
    if chunk_rows is None:
        chunk_rows = default_chunk_rows(weight.shape[0], hidden.element_size(), hidden.device)
    if not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be an int >= 1, got {chunk_rows!r}")
    return _HiddenLevel.apply(
        hidden, weight, ref_hidden, ref_weight, actions, mask, compute_kl, impl, chunk_rows, block_v
    )
