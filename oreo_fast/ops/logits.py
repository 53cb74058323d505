"""The logits-level op: (logp, ref_logp, kl) per token from [B, T, V] policy and reference
logits, and the PyTorch row functions that the hidden level reuses chunk by chunk.

Returns three [B, T] tensors in the compute dtype (float32, or float64 for float64 inputs):
log pi(a_t|s_t), log pi_ref(a_t|s_t) and KL(pi(.|s_t) || pi_ref(.|s_t)) over the full
vocabulary. Positions where ``action_mask`` is false are 0 and get no gradient. Gradients flow
to the policy logits only; ``ref_logp`` is not differentiable.

Implementations (``impl``, see ``oreo_fast.ops.dispatch``):
- ``"triton"``: the kernels of ``oreo_fast.kernels`` (on CPU only under TRITON_INTERPRET=1);
- ``"torch"``: the same chunked algorithm in PyTorch (the CPU training path);
- ``"reference"``: the plain materialised recipe of ``oreo_fast.ops.reference``;
- ``"auto"``: triton on CUDA, torch elsewhere.
"""
from __future__ import annotations

import torch

from oreo_fast.ops import reference
from oreo_fast.ops.dispatch import resolve_impl
from oreo_fast.ops.validation import validate_logits_inputs

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


def rows_stats_torch(logits: list, actions, full_kl: bool):
    """Per row: (logp, ref_logp, kl, state) of [n, V] logits ``logits = [z, r]``, and the
    [n, V] buffers the gradient needs: full KL (p, log p - log q), k3 (p, None). -inf logits
    are allowed.

    ``logits`` is emptied as it is read: once its log-softmax exists a logits buffer is not
    needed, so a caller that keeps no other reference frees each one then, and the chunk's
    working set peaks at three [n, V] buffers instead of five."""
    dtype = reference.compute_dtype(logits[0].dtype)
    index = actions.unsqueeze(-1)
    log_q = torch.log_softmax(logits.pop(), dim=-1, dtype=dtype)
    ref_logp = log_q.gather(-1, index).squeeze(-1)
    log_p = torch.log_softmax(logits.pop(), dim=-1, dtype=dtype)
    logp = log_p.gather(-1, index).squeeze(-1)
    if not full_kl:
        return logp, ref_logp, torch.zeros_like(logp), (log_p.exp_(), None)
    p = log_p.exp()
    diff = _log_ratio_(log_p, log_q)
    del log_q
    return logp, ref_logp, torch.linalg.vecdot(p, diff), (p, diff)


def rows_grad_torch(buffers, actions, kl, c, w):
    """dlogits = c (onehot - p) + w p (log p - log q - KL), written over the buffers."""
    p, diff = buffers
    if diff is None:
        grad = p.mul_(-c.unsqueeze(-1))
    else:
        # w (log p - log q) - (w KL + c), then times p
        grad = torch.addcmul(-(w * kl + c).unsqueeze(-1), diff, w.unsqueeze(-1), out=diff)
        grad.mul_(p)
    return grad.scatter_add_(-1, actions.unsqueeze(-1), c.unsqueeze(-1))


def default_chunk_rows(vocab_size: int, element_size: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk of logits is about 256 MiB on GPU, 32 MiB on CPU."""
    budget = (256 if device.type == "cuda" else 32) * 2**20
    return max(1, budget // max(1, vocab_size * element_size))


def active_rows(mask: torch.Tensor):
    """(batch index, time index) of the masked-in positions. One host sync."""
    b, t = mask.nonzero(as_tuple=True)
    return b, t


# ---------------------------------------------------------------- the autograd Function


def upstream_grads(grad_logp, grad_kl, compute_kl: bool, like: torch.Tensor):
    """Upstream gradients in the compute dtype; grad_kl None when the KL was not computed or
    not used, so that the backward skips everything only the KL gradient needs (the
    reference logits)."""
    grad_logp = torch.zeros_like(like) if grad_logp is None else grad_logp.to(like.dtype)
    grad_kl = None if grad_kl is None or not compute_kl else grad_kl.to(like.dtype)
    return grad_logp, grad_kl


def mark_outputs(ctx, compute_kl: bool, logp, ref_logp, kl):
    """What both per-token Functions tell autograd about their (logp, ref_logp, kl) outputs:
    ref_logp has no gradient, and an unused output's gradient stays None (so the backward
    skips what only it needs)."""
    ctx.compute_kl = compute_kl
    ctx.mark_non_differentiable(ref_logp)
    ctx.set_materialize_grads(False)
    return logp, ref_logp, kl


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
        return mark_outputs(ctx, compute_kl, logp, ref_logp, kl)

    @staticmethod
    def backward(ctx, grad_logp, _grad_ref_logp, grad_kl):
        logits, ref_logits, actions, mask, lse, ref_lse, kl = ctx.saved_tensors
        grad_logp, grad_kl = upstream_grads(grad_logp, grad_kl, ctx.compute_kl, lse)
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
    b_idx, t_idx = active_rows(mask)
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
    b_idx, t_idx = active_rows(mask)
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
    return token_logprobs_kl_unchecked(logits, ref_logits, actions, mask, compute_kl, impl,
                                       inplace_backward, block_v)


def token_logprobs_kl_unchecked(logits, ref_logits, actions, mask, compute_kl=True, impl="auto",
                                inplace_backward=False, block_v=None):
    """``token_logprobs_kl`` for inputs already validated (actions int64, mask bool)."""
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
