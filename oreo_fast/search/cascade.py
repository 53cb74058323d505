"""Cascade attention for the beam search: K children share their parent's prefix KV without
copying it.

Attention of a child's query over [parent prefix; child suffix] splits into two softmaxes
that are merged by their log-sum-exps (the cascade / split-KV idea of FlashInfer and
FlashAttention's split-K):

    out = (e^lse_p * out_p + e^lse_s * out_s) / (e^lse_p + e^lse_s),

where out_p, lse_p attend to the parent's prefix (read once for all of its children) and
out_s, lse_s to the child's own suffix (causal within the suffix, small). On CUDA two Triton
kernels (``oreo_fast.kernels.cascade_attention``) do both halves, the suffix kernel going on
from the prefix's softmax state so that the merge is part of it; on CPU grouped matmuls (or
PyTorch's fused CPU attention) and ``merge_attention`` below.

The model-level use (a transformers model attending through this) is
``oreo_fast.search.shared_prefix``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from oreo_fast.ops import compute_dtype, resolve_impl

IMPLS = ("auto", "torch", "triton")  # no materialised reference: the torch path is plain

# ------------------------------------------------------------------------- child groups


@dataclass
class ChildGroups:
    """Which parent each child (query row) belongs to. Children of one parent are
    consecutive: ``child_start[p] .. child_start[p + 1]``; ``per_parent`` is their common
    count when every parent has the same number (the search's case), else None."""

    parent: torch.Tensor  # [N] int64
    child_start: torch.Tensor  # [P + 1] int64
    per_parent: int | None

    @classmethod
    def from_parent(cls, parent: torch.Tensor, n_parents: int) -> "ChildGroups":
        if parent.dim() != 1:
            raise ValueError(f"parent must be 1-D [children], got shape {tuple(parent.shape)}")
        parent = parent.to(torch.int64)
        if len(parent) and (int(parent.min()) < 0 or int(parent.max()) >= n_parents):
            raise ValueError(f"parent holds an index outside [0, {n_parents})")
        if len(parent) > 1 and bool((parent[1:] < parent[:-1]).any()):
            raise ValueError("parent must be sorted: the children of a parent are consecutive")
        counts = torch.bincount(parent, minlength=n_parents)
        child_start = torch.zeros(n_parents + 1, dtype=torch.int64, device=parent.device)
        child_start[1:] = counts.cumsum(0)
        uniform = n_parents > 0 and bool((counts == counts[0]).all())
        return cls(parent, child_start, int(counts[0]) if uniform else None)

    @classmethod
    def repeated(cls, n_parents: int, per_parent: int, device) -> "ChildGroups":
        parent = torch.arange(n_parents, device=device).repeat_interleave(per_parent)
        child_start = torch.arange(n_parents + 1, device=device) * per_parent
        return cls(parent, child_start, per_parent)


# ------------------------------------------------------------------ the PyTorch path


# PyTorch's fused CPU attention also returns the log-sum-exp (private op: used when present,
# the matmul path below otherwise and on other devices)
_CPU_FUSED_ATTENTION = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu",
                               None)


def _masked_softmax_attention(q, k, v, allowed, scale):
    """q [B, H, M, D], k / v [B, H, S, D], allowed (bool) broadcastable to [B, H, M, S]:
    (out, lse), a row with no allowed key giving 0 and -inf."""
    if _CPU_FUSED_ATTENTION is not None and q.device.type == "cpu" and \
            q.dtype in (torch.float32, torch.float64):
        bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
        bias.masked_fill_(~allowed, float("-inf"))
        out, lse = _CPU_FUSED_ATTENTION(q, k, v, attn_mask=bias, scale=scale)
        # the fused op reports lse 0 for a row without keys: it must weigh nothing
        return out, torch.where(allowed.any(-1), lse, float("-inf"))
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    return torch.matmul(probs, v), lse


def prefix_attention_torch(query, prefix_keys, prefix_values, prefix_mask,
                           groups: ChildGroups, scale: float):
    """Attention of every child's queries [N, H, T, D] over its parent's prefix
    [P, KVH, L, D] with key mask [P, L]: (out [N, H, T, D], lse [N, H, T]) in float32
    (float64 for float64). With equal groups the queries of a parent's children and of the
    query heads of one KV head are stacked, so each prefix is read once per parent."""
    n, heads, tokens, dim = query.shape
    parents, kv_heads, length, _ = prefix_keys.shape
    group = heads // kv_heads
    dtype = compute_dtype(query.dtype)
    k, v = prefix_keys.to(dtype), prefix_values.to(dtype)
    key_ok = prefix_mask.bool()
    if groups.per_parent is not None:
        per = groups.per_parent
        # [P, K, KVH, G, T, D] -> [P, KVH, K * G * T, D]
        q = query.to(dtype).view(parents, per, kv_heads, group, tokens, dim)
        q = q.permute(0, 2, 1, 3, 4, 5).reshape(parents, kv_heads, per * group * tokens, dim)
        out, lse = _masked_softmax_attention(q, k, v, key_ok[:, None, None, :], scale)
        out = out.reshape(parents, kv_heads, per, group, tokens, dim).permute(0, 2, 1, 3, 4, 5)
        lse = lse.reshape(parents, kv_heads, per, group, tokens).permute(0, 2, 1, 3, 4)
        return (out.reshape(n, heads, tokens, dim), lse.reshape(n, heads, tokens))
    # uneven groups (not the search's layout): index the prefix per child
    q = query.to(dtype).reshape(n, kv_heads, group * tokens, dim)
    out, lse = _masked_softmax_attention(q, k[groups.parent], v[groups.parent],
                                         key_ok[groups.parent][:, None, None, :], scale)
    return out.reshape(n, heads, tokens, dim), lse.reshape(n, heads, tokens)


def suffix_attention_torch(query, suffix_keys, suffix_values, suffix_mask, scale: float):
    """Attention of each child's T newest tokens [N, H, T, D] over its own suffix
    [N, KVH, S, D] (the queries are its last T columns): causal within the suffix, keys
    masked by ``suffix_mask`` [N, S]. Returns (out, lse) as ``prefix_attention_torch``."""
    n, heads, tokens, dim = query.shape
    kv_heads, length = suffix_keys.shape[1], suffix_keys.shape[2]
    dtype = compute_dtype(query.dtype)
    q = query.to(dtype).reshape(n, kv_heads, heads // kv_heads * tokens, dim)
    column = torch.arange(length, device=query.device)
    own_column = length - tokens + torch.arange(tokens, device=query.device)
    causal = column[None, :] <= own_column[:, None]
    allowed = causal[None] & suffix_mask.bool()[:, None, :]  # [N, T, S]
    allowed = allowed[:, None].expand(n, heads // kv_heads, tokens, length)
    out, lse = _masked_softmax_attention(q, suffix_keys.to(dtype), suffix_values.to(dtype),
                                         allowed.reshape(n, 1, -1, length), scale)
    return out.reshape(n, heads, tokens, dim), lse.reshape(n, heads, tokens)


def merge_attention(out_a, lse_a, out_b, lse_b):
    """Attention over the union of two disjoint key sets from each one's (out, lse)."""
    top = torch.maximum(lse_a, lse_b)
    top = torch.where(torch.isinf(top), 0.0, top)  # both empty: weights 0, not NaN
    weight_a, weight_b = torch.exp(lse_a - top), torch.exp(lse_b - top)
    total = weight_a + weight_b
    out = (weight_a[..., None] * out_a + weight_b[..., None] * out_b) / \
        torch.where(total > 0, total, 1.0)[..., None]
    return out, top + torch.log(total)


def use_triton(impl: str, device: torch.device) -> bool:
    return resolve_impl(impl, device, IMPLS, name="attention impl") == "triton"


def cascade_attention(query, prefix_keys, prefix_values, prefix_mask, groups: ChildGroups,
                      suffix_keys, suffix_values, suffix_mask, scale: float,
                      impl: str = "auto"):
    """Attention of children's newest tokens over [parent prefix; own suffix].

    ``query`` [N, H, T, D]; ``prefix_keys`` / ``prefix_values`` [P, KVH, L, D];
    ``prefix_mask`` [P, L]; ``groups`` maps children to parents; ``suffix_keys`` /
    ``suffix_values`` [N, KVH, S, D] whose last T columns are the queries' own tokens;
    ``suffix_mask`` [N, S]. ``impl``: "triton" (the prefix kernel, then the suffix kernel that
    continues its softmax; on CPU only under TRITON_INTERPRET=1), "torch", or "auto" (Triton
    on CUDA). Returns (out [N, H, T, D] in the query's dtype, lse [N, H, T] in float32 /
    float64).
    """
    _check_shapes(query, prefix_keys, prefix_values, prefix_mask, groups, suffix_keys,
                  suffix_values, suffix_mask)
    if use_triton(impl, query.device):
        from oreo_fast.kernels.cascade_attention import (prefix_attention_forward,
                                                         suffix_merge_forward)

        out_p, lse_p = prefix_attention_forward(query, prefix_keys, prefix_values, prefix_mask,
                                                groups.child_start, scale,
                                                max_children=groups.per_parent)
        out, lse = suffix_merge_forward(query, suffix_keys, suffix_values, suffix_mask, out_p,
                                        lse_p, scale)
        return out.to(query.dtype), lse
    out_p, lse_p = prefix_attention_torch(query, prefix_keys, prefix_values, prefix_mask,
                                          groups, scale)
    out_s, lse_s = suffix_attention_torch(query, suffix_keys, suffix_values, suffix_mask, scale)
    out, lse = merge_attention(out_p, lse_p, out_s, lse_s)
    return out.to(query.dtype), lse


def _check_shapes(query, prefix_keys, prefix_values, prefix_mask, groups, suffix_keys,
                  suffix_values, suffix_mask):
    if query.dim() != 4:
        raise ValueError(f"query must be [N, H, T, D], got shape {tuple(query.shape)}")
    n, heads, tokens, dim = query.shape
    if prefix_keys.dim() != 4 or prefix_keys.shape[-1] != dim:
        raise ValueError(f"prefix_keys must be [P, KVH, L, {dim}], got {tuple(prefix_keys.shape)}")
    parents, kv_heads, length, _ = prefix_keys.shape
    if prefix_values.shape != prefix_keys.shape:
        raise ValueError(f"prefix_values shape {tuple(prefix_values.shape)} differs from "
                         f"prefix_keys {tuple(prefix_keys.shape)}")
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of KV heads ({kv_heads})")
    if tuple(prefix_mask.shape) != (parents, length):
        raise ValueError(f"prefix_mask must be [{parents}, {length}], got "
                         f"{tuple(prefix_mask.shape)}")
    if len(groups.parent) != n or len(groups.child_start) != parents + 1:
        raise ValueError(f"groups must map {n} children to {parents} parents")
    if suffix_keys.dim() != 4 or tuple(suffix_keys.shape[:2]) != (n, kv_heads) or \
            suffix_keys.shape[-1] != dim or suffix_keys.shape[2] < tokens:
        raise ValueError(f"suffix_keys must be [{n}, {kv_heads}, S >= {tokens}, {dim}], got "
                         f"{tuple(suffix_keys.shape)}")
    if suffix_values.shape != suffix_keys.shape:
        raise ValueError(f"suffix_values shape {tuple(suffix_values.shape)} differs from "
                         f"suffix_keys {tuple(suffix_keys.shape)}")
    if tuple(suffix_mask.shape) != (n, suffix_keys.shape[2]):
        raise ValueError(f"suffix_mask must be [{n}, {suffix_keys.shape[2]}], got "
                         f"{tuple(suffix_mask.shape)}")
