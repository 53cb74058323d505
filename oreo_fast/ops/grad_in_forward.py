"""The OREO loss with its gradient computed in the forward pass ("grad in forward").

Same maths, arguments and outputs as ``oreo_fast.oreo_loss_fused_linear`` / ``oreo_loss``
(conventions: ``oreo_fast.reference``). With r_t = V_t - R + beta A_t (the value and the
policy residual have the same value; they differ only in what carries the gradient), n_S and
n_A the state and action counts of t's sequence and D = num_sequences (default B):

    d value_loss  / d V_s      = 2 r_s / (n_S D)                        at every state s
    d policy_loss / d logits_t = c_t (onehot(a_t) - p_t) + w_t p_t (log p_t - log q_t - KL_t)
        c_t = 2 beta r_{s(t)} / (n_S D)   (s(t): the last state <= t; 0 if there is none)
        w_t = kl_coef m_t / (n_A D)
    kl_estimator "k3": KL_t = exp(d_t) - d_t - 1, d_t = ref_logp_t - logp_t, so the KL term
        moves into the row coefficient: c_t += w_t (1 - exp(d_t)), and there is no p-term.

Both d/dlogits are known as soon as r_{s(t)} is, i.e. once A_{s(t)} = sum_{i >= s(t)} lr_i is.
Walking every sequence backwards in time, the later part of that sum is a carry (one per
sequence) and the rest lies in the chunk, provided the chunk holds t's whole step: the rows
are ordered per sequence from the last action backwards and chunks end only after a state
(or after an action with no state before it). Each chunk then does everything at once:
policy and reference logits (2 matmuls), log-softmaxes, log-probs, KL, log-ratios, the
carried reverse cumsum, the row coefficients, dlogits, and the hidden-state rows and the
float32 weight-gradient accumulation (2 matmuls): 4 matmuls per step instead of 6. The
backward only scales the stored gradients by the two grad_outputs (value and policy loss).

Host syncs per call: 2 (the token-input validation of ``oreo_fast.ops``, then one transfer of
the masks and the remaining checks, from which the chunk plan is built on the host); none in
backward. Today's path makes 3. Level "response" whose longest response exceeds the chunk
budget falls back to the two-pass path (``fused_linear.two_pass_loss``, its own syncs).

Implementations (``impl``): "torch" (CPU), "triton" (kernels of
``oreo_fast.kernels.oreo_grad_in_forward``; on CPU only under TRITON_INTERPRET=1), "auto"
(triton on CUDA, torch elsewhere). bf16/fp16 inputs are computed in float32, float64 stays
float64; the weight gradient accumulates in float32 (float64) and is stored in the weight's
dtype.
"""
from __future__ import annotations

import torch

from oreo_fast.ops import reference
from oreo_fast.ops.chunk_plan import budget_rows, prepare_walk
from oreo_fast.ops.dispatch import resolve_impl
from oreo_fast.ops.fused_linear import accumulate_weight_grad, two_pass_loss
from oreo_fast.ops.logits import rows_grad_torch, rows_stats_torch
from oreo_fast.ops.reference import OreoLossOutput
from oreo_fast.ops.validation import validate_fused_inputs, validate_logits_inputs

IMPLS = ("auto", "torch", "triton")  # no materialised reference: that is the two-pass path


# ---------------------------------------------------------------- dense terms ([B, T])


def _dense_terms(logp, ref_logp, kl, values, rewards, m, S, beta, kl_coef, kl_estimator,
                 denominator):
    """Losses, diagnostics and d value_loss / d values from the per-token log-probs and KL
    (zeros where m is false), exactly as reference.bellman_losses."""
    dtype = logp.dtype
    zero = torch.zeros((), dtype=dtype, device=logp.device)
    lr = torch.where(m, logp - ref_logp, zero)
    A = reference.reverse_cumsum(lr)
    V, R = values.detach().to(dtype), rewards.detach().to(dtype).unsqueeze(1)
    residual = V - R + beta * A  # value and policy residual alike
    n_states = S.sum(1, keepdim=True).clamp(min=1).to(dtype)
    squared = reference.masked_sequence_mean(residual.square(), S).sum() / denominator
    per_token_kl = reference.k3_kl(logp, ref_logp) if kl_estimator == "k3" else kl
    sequence_kl = reference.masked_sequence_mean(per_token_kl, m)
    policy_loss = squared + kl_coef * sequence_kl.sum() / denominator

    first_value, first_adv, residual_abs = reference.state_diagnostics(V, A, residual, S)

    grad_values = torch.where(S, 2 * residual / (n_states * denominator), zero)
    diagnostics = (sequence_kl.mean(), residual_abs, first_value, first_adv)
    return squared, policy_loss, diagnostics, grad_values


# ---------------------------------------------------------------- one chunk of rows (torch)


def _chunk_coefficients(logp, ref_logp, rows, carry, values_cd, rewards_cd, inv_states,
                        inv_actions, beta, kl_coef, kl_estimator, start):
    """Row coefficients (c, w) of one chunk: A by a reverse cumsum inside the chunk plus the
    per-sequence carry of the rows already walked (later in time), then the carry update."""
    b, _, state_t, state_row, seg_first = rows
    lr = logp - ref_logp
    within = torch.cumsum(lr, 0)
    shifted = torch.cat([within.new_zeros(1), within])
    local_first = (seg_first - start).clamp(min=0)
    A = within - shifted[local_first] + carry[b]
    _update_carry(carry, b, lr)
    has_state = state_row >= 0
    A_state = A[(state_row - start).clamp(min=0)]
    residual = values_cd[b, state_t.clamp(min=0)] - rewards_cd[b] + beta * A_state
    zero = lr.new_zeros(())
    c = torch.where(has_state, 2 * beta * residual * inv_states[b], zero)
    w = kl_coef * inv_actions[b]
    if kl_estimator == "k3":
        c = c + w * (-torch.expm1(ref_logp - logp))
    return c, w


def _update_carry(carry, b, lr):
    """carry[b] += the chunk's log-ratios of sequence b (module-level: tests break it)."""
    carry.index_add_(0, b, lr)


class _Walk:
    """What every chunk of one call shares: the plan's rows on the device, the carry, the
    per-sequence factors and the per-row outputs (log-probs and KL in walk order)."""

    def __init__(self, plan, device, dtype, values, rewards, m, S, beta, kl_coef, kl_estimator,
                 denominator, impl, block_v):
        B = m.shape[0]
        self.plan, self.impl, self.block_v = plan, impl, block_v
        self.rows = plan.device_rows(device)
        self.carry = torch.zeros(B, dtype=dtype, device=device)
        self.values = values.detach().to(dtype)
        self.rewards = rewards.detach().to(dtype)
        self.inv_states = 1.0 / (S.sum(1).clamp(min=1).to(dtype) * denominator)
        self.inv_actions = 1.0 / (m.sum(1).clamp(min=1).to(dtype) * denominator)
        self.beta, self.kl_coef, self.kl_estimator = beta, kl_coef, kl_estimator
        self.full_kl = kl_estimator == "full"
        self.out = [torch.empty(plan.n, dtype=dtype, device=device) for _ in range(3)]

    def chunk_rows(self, start, stop):
        return tuple(x[start:stop] for x in self.rows)

    def step(self, start, stop, rows, logits: list, actions, z_rows=None, r_rows=None,
             out=None, out_rows=None):
        """One chunk of ``logits = [z, r]``: statistics, coefficients and dlogits (into
        ``out`` at ``out_rows`` for triton, default z itself; a new tensor for torch, which
        empties ``logits`` to free each buffer early: rows_stats_torch)."""
        z_dtype = logits[0].dtype
        if self.impl == "triton":
            from oreo_fast.kernels.oreo_grad_in_forward import row_grad_, row_stats

            z, r = logits
            logp, ref_logp, lse, ref_lse, kl = row_stats(z, r, actions, self.full_kl,
                                                         self.block_v, z_rows, r_rows)
        else:
            logp, ref_logp, kl, buffers = rows_stats_torch(logits, actions, self.full_kl)
        c, w = _chunk_coefficients(logp, ref_logp, rows, self.carry, self.values,
                                   self.rewards, self.inv_states, self.inv_actions, self.beta,
                                   self.kl_coef, self.kl_estimator, start)
        for buffer, x in zip(self.out, (logp, ref_logp, kl)):
            buffer[start:stop] = x
        if self.impl == "triton":
            return row_grad_(z, r, actions, lse, ref_lse, kl, c, w, self.full_kl, self.block_v,
                             z_rows, r_rows, out, out_rows)
        return rows_grad_torch(buffers, actions, kl, c, w).to(z_dtype)

    def dense(self, B, T):
        """The per-row outputs scattered back to [B, T] (zeros where masked out)."""
        b, t = self.rows[0], self.rows[1]
        result = []
        for x in self.out:
            d = torch.zeros(B, T, dtype=x.dtype, device=x.device)
            d[b, t] = x
            result.append(d)
        return result


def _finish(ctx, walk, values, rewards, m, S, denominator, grad_values_to):
    """Losses and diagnostics from the walked rows; saves d value_loss / d values."""
    B, T = m.shape
    logp, ref_logp, kl = walk.dense(B, T)
    value_loss, policy_loss, diagnostics, grad_values = _dense_terms(
        logp, ref_logp, kl, values, rewards, m, S, walk.beta, walk.kl_coef, walk.kl_estimator,
        denominator)
    ctx.grad_values = grad_values.to(grad_values_to) if grad_values_to is not None else None
    for x in diagnostics:
        ctx.mark_non_differentiable(x)
    ctx.set_materialize_grads(False)  # an unused loss's gradient stays None
    ctx.backward_done = False
    return (value_loss, policy_loss, *diagnostics)


def _scaled(stored, grad_output):
    """The stored gradient times grad_output, in place (it is used once)."""
    if grad_output is None or stored is None:
        return None
    return stored.mul_(grad_output)


def _once(ctx):
    if ctx.backward_done:
        raise RuntimeError("the grad-in-forward OREO loss supports one backward per forward "
                           "(its stored gradients are scaled in place)")
    ctx.backward_done = True


class _HiddenGradInForward(torch.autograd.Function):
    """Forward: the whole loss and its gradients w.r.t. hidden, weight and values, chunk by
    chunk (4 matmuls of rows x V x H per chunk). Backward: scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, values, ref_hidden, ref_weight, actions, rewards, m, S,
                plan, beta, kl_coef, kl_estimator, denominator, impl, block_v):
        B, T, _ = hidden.shape
        dtype = reference.compute_dtype(hidden.dtype)
        walk = _Walk(plan, hidden.device, dtype, values, rewards, m, S, beta, kl_coef,
                     kl_estimator, denominator, impl, block_v)
        ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
        grad_hidden = torch.zeros_like(hidden)
        # the weight gradient accumulates in float32 (float64 stays float64) across chunks;
        # a frozen LM head (LoRA) needs none: one matmul per chunk and a V x H buffer saved
        grad_weight = None
        if ctx.needs_input_grad[1]:
            acc_dtype = reference.compute_dtype(weight.dtype)
            grad_weight = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device)
        for start, stop in plan.chunks:
            rows = walk.chunk_rows(start, stop)
            b, t = rows[0], rows[1]
            h = hidden[b, t]
            # the list is the logits' only holder: the torch path frees each buffer early
            grad_z = walk.step(start, stop, rows, [h @ weight.t(), ref_hidden[b, t] @
                                                   ref_weight.t()], actions[b, t])
            grad_hidden[b, t] = grad_z @ weight
            if grad_weight is not None:
                accumulate_weight_grad(grad_weight, grad_z, h)
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return _finish(ctx, walk, values, rewards, m, S, denominator,
                       values.dtype if ctx.needs_input_grad[2] else None)

    @staticmethod
    def backward(ctx, grad_value_loss, grad_policy_loss, *_diagnostics):
        _once(ctx)
        grad_hidden = _scaled(ctx.grad_hidden, grad_policy_loss)
        grad_weight = _scaled(ctx.grad_weight, grad_policy_loss)
        grad_values = _scaled(ctx.grad_values, grad_value_loss)
        ctx.grad_hidden = ctx.grad_weight = ctx.grad_values = None
        return (grad_hidden, grad_weight, grad_values) + (None,) * 13


class _LogitsGradInForward(torch.autograd.Function):
    """The same from [B, T, V] logits; ``inplace`` writes the gradient into the logits."""

    @staticmethod
    def forward(ctx, logits, values, ref_logits, actions, rewards, m, S, plan, beta, kl_coef,
                kl_estimator, denominator, impl, block_v, inplace):
        B, T, _ = logits.shape
        dtype = reference.compute_dtype(logits.dtype)
        walk = _Walk(plan, logits.device, dtype, values, rewards, m, S, beta, kl_coef,
                     kl_estimator, denominator, impl, block_v)
        ref_logits = ref_logits.detach()
        if inplace:
            grad = logits.detach().masked_fill_(~m.unsqueeze(-1), 0)  # masked rows: zero
        else:
            grad = torch.zeros_like(logits)
        for start, stop in plan.chunks:
            rows = walk.chunk_rows(start, stop)
            b, t = rows[0], rows[1]
            if impl == "triton":  # the kernels read and write the rows where they lie
                walk.step(start, stop, rows, [logits, ref_logits], actions[b, t],
                          _row_offsets(logits, b, t), _row_offsets(ref_logits, b, t),
                          grad, _row_offsets(grad, b, t))
            else:  # the rows are gathered (copied) before the gradient is written back
                grad[b, t] = walk.step(start, stop, rows, [logits[b, t], ref_logits[b, t]],
                                       actions[b, t])
        ctx.grad_logits = grad
        return _finish(ctx, walk, values, rewards, m, S, denominator,
                       values.dtype if ctx.needs_input_grad[1] else None)

    @staticmethod
    def backward(ctx, grad_value_loss, grad_policy_loss, *_diagnostics):
        _once(ctx)
        grad_logits = _scaled(ctx.grad_logits, grad_policy_loss)
        grad_values = _scaled(ctx.grad_values, grad_value_loss)
        ctx.grad_logits = ctx.grad_values = None
        return (grad_logits, grad_values) + (None,) * 13


def _row_offsets(x, b, t):
    return b * x.stride(0) + t * x.stride(1)


def _output(value_loss, policy_loss, kl, residual_abs, first_value, first_adv):
    return OreoLossOutput(loss=value_loss + policy_loss, value_loss=value_loss,
                          policy_loss=policy_loss, kl=kl, residual_abs=residual_abs,
                          first_value=first_value, first_advantage=first_adv)


def _denominator(num_sequences, B):
    if num_sequences is None:
        return float(B)
    if not isinstance(num_sequences, int) or num_sequences < 1:
        raise ValueError(f"num_sequences must be an int >= 1, got {num_sequences!r}")
    return float(num_sequences)


# ---------------------------------------------------------------- public entry points


def oreo_loss_fused_linear_gif(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    actions: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    kl_coef: float = 0.01,
    level: str = "token",
    kl_estimator: str = "full",
    num_sequences: int | None = None,
    chunk_budget_bytes: int | None = None,
    impl: str = "auto",
    block_v: int | None = None,
) -> OreoLossOutput:
    """OREO losses from final-norm hidden states [B, T, H] and LM-head weights [V, H] of the
    policy and the reference, gradients computed in the forward (4 matmuls per chunk).

    Semantics and validation of ``oreo_fast.oreo_loss_fused_linear``. Gradients flow to
    ``hidden`` and ``weight`` (policy loss) and ``values`` (value loss); the weight's arrives
    through autograd like any parameter's, so FSDP2 needs nothing special. At most
    ``chunk_budget_bytes`` of policy logits (compute dtype) exist per chunk, rounded up to
    the longest step at level "step"; at level "response" a response longer than that falls
    back to the two-pass path. One backward per forward. ``block_v``
    overrides the Triton kernels' vocabulary block (tests use it to cross block boundaries).
    """
    actions, mask = validate_fused_inputs(hidden, weight, ref_hidden, ref_weight, actions,
                                          action_mask)
    impl = resolve_impl(impl, hidden.device, IMPLS)
    denominator = _denominator(num_sequences, hidden.shape[0])
    rows = budget_rows(chunk_budget_bytes, weight.shape[0], hidden.dtype, hidden.device)
    S, plan = prepare_walk(values, rewards, mask, state_mask, level, beta, kl_coef,
                           kl_estimator, rows)
    if level == "response" and plan.longest_unit > rows:
        # a response is one step: it cannot be split, and it does not fit one chunk
        return two_pass_loss(hidden, weight, ref_hidden, ref_weight, actions, mask, values,
                             rewards, S, beta=beta, kl_coef=kl_coef, kl_estimator=kl_estimator,
                             impl=impl, num_sequences=num_sequences, chunk_rows=rows)
    return _output(*_HiddenGradInForward.apply(
        hidden, weight, values, ref_hidden, ref_weight, actions, rewards, mask, S, plan, beta,
        kl_coef, kl_estimator, denominator, impl, block_v))


def oreo_loss_gif(
    logits: torch.Tensor,
    ref_logits: torch.Tensor,
    actions: torch.Tensor,
    values: torch.Tensor,
    rewards: torch.Tensor,
    action_mask: torch.Tensor,
    state_mask: torch.Tensor,
    *,
    beta: float = 0.03,
    kl_coef: float = 0.01,
    level: str = "token",
    kl_estimator: str = "full",
    num_sequences: int | None = None,
    chunk_budget_bytes: int | None = None,
    impl: str = "auto",
    inplace: bool = False,
    block_v: int | None = None,
) -> OreoLossOutput:
    """OREO losses from policy and reference logits [B, T, V], gradients computed in the
    forward (semantics and validation of ``oreo_fast.oreo_loss``).

    ``inplace=True`` writes d loss / d logits into the logits' own buffer (the gradient at
    masked-out rows is 0, so those rows are zeroed too): no [B, T, V] gradient is allocated,
    and THE CALLER'S LOGITS ARE DESTROYED by this call. Nothing else may need them afterwards
    (another loss on the same logits, or an autograd node that saved them). The torch path
    reads one chunk of rows at a time (at most ``chunk_budget_bytes`` of them, whole steps);
    triton reads and writes the rows where they lie. One backward per forward.
    """
    actions, mask = validate_logits_inputs(logits, ref_logits, actions, action_mask)
    impl = resolve_impl(impl, logits.device, IMPLS)
    if impl == "triton":
        logits = logits if logits.stride(-1) == 1 else logits.contiguous()
        ref_logits = ref_logits if ref_logits.stride(-1) == 1 else ref_logits.contiguous()
    denominator = _denominator(num_sequences, logits.shape[0])
    rows = budget_rows(chunk_budget_bytes, logits.shape[-1], logits.dtype, logits.device)
    # triton needs no row buffers: one chunk of every row
    S, plan = prepare_walk(values, rewards, mask, state_mask, level, beta, kl_coef,
                           kl_estimator,
                           logits.shape[0] * logits.shape[1] if impl == "triton" else rows)
    return _output(*_LogitsGradInForward.apply(
        logits, values, ref_logits, actions, rewards, mask, S, plan, beta, kl_coef,
        kl_estimator, denominator, impl, block_v, bool(inplace)))
