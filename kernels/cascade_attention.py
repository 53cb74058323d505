"""Triton kernels for cascade attention: children's queries against their parent's shared
prefix KV, then against each child's own suffix, forward only.

In the beam search every parent beam has K children that all attend to the same prefix (the
prompt and the steps so far). Instead of copying that prefix once per child, the prefix kernel
takes the queries of all children of one parent, for all query heads that share one KV head
(GQA), and streams the parent's prefix keys and values once for all of them, with an online
softmax over key blocks. It returns the normalised output and the log-sum-exp of every
(child, head, token) row. The suffix kernel then goes on with each row's online softmax over
the child's own suffix keys (its step so far, causal), starting from the prefix's state
(running max = lse_p, running sum = 1, accumulator = out_p), so the merge

    out = (e^lse_p * out_p + e^lse_s * out_s) / (e^lse_p + e^lse_s)

falls out of the same recurrence, with no separate suffix output or merge pass.

Layout: queries [N, H, T, D] (N children, H query heads, T tokens), prefix keys and values
[P, KVH, L, D] (P parents), key mask [P, L] (0 = left padding or a hole), ``child_start``
[P + 1] int64: the children of parent p are query rows child_start[p] .. child_start[p+1] - 1;
suffix keys and values [N, KVH, S, D] whose last T columns are the queries' own tokens, key
mask [N, S]. Any strides; offsets are int64. A row with no visible key gets output 0 and lse
-inf. Accumulation is in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from oreo_fast.kernels import compute_dtype as kernel_compute_dtype


@triton.jit
def _block_scores(q, k, scale):
    """Scaled scores [M, N] of the queries [M, D] against one block of keys [N, D], in the
    accumulation dtype. q and k stay in the inputs' dtype: a half-precision dot runs on
    tensor cores and accumulates in float32, a float64 one on float64 ones."""
    return tl.dot(q, tl.trans(k), input_precision="ieee") * scale


@triton.jit
def _online_softmax_step(row_max, row_sum, acc, scores, v):
    """Fold one block of (masked: -inf) scores and its values [N, D] into the running max,
    sum and accumulator of every row."""
    new_max = tl.maximum(row_max, tl.max(scores, axis=1))
    # while a row has seen only masked keys, shift by 0 rather than form -inf - -inf
    shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    probs = tl.exp(scores - shift[:, None])
    rescale = tl.exp(row_max - shift)
    row_sum = row_sum * rescale + tl.sum(probs, axis=1)
    # probabilities in v's dtype (half precision: as flash attention does)
    update = tl.dot(probs.to(v.dtype), v, input_precision="ieee")
    return new_max, row_sum, acc * rescale[:, None] + update


@triton.jit
def _load_key_block(k_base, v_base, mask_base, start, n_keys, stride_m, stride_kl, stride_kd,
                    stride_vl, stride_vd, dims, dim_ok, BLOCK_N: tl.constexpr):
    """Keys ``start .. start + BLOCK_N`` of one KV row: (their indices, which are real keys,
    K and V blocks in the inputs' dtype); keys at or past ``n_keys`` read as masked zeros."""
    keys = start + tl.arange(0, BLOCK_N).to(tl.int64)
    key_in = keys < n_keys
    key_ok = tl.load(mask_base + keys * stride_m, mask=key_in, other=0) != 0
    kv_mask = key_in[:, None] & dim_ok[None, :]
    k = tl.load(k_base + keys[:, None] * stride_kl + dims[None, :] * stride_kd,
                mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vl + dims[None, :] * stride_vd,
                mask=kv_mask, other=0.0)
    return keys, key_ok, k, v


@triton.jit
def _online_softmax_result(row_max, row_sum, acc):
    """(normalised output, log-sum-exp); a row that saw no key gives 0 and -inf."""
    seen = row_sum > 0
    out = acc / tl.where(seen, row_sum, 1.0)[:, None]
    lse = tl.where(seen, row_max + tl.log(tl.where(seen, row_sum, 1.0)), float("-inf"))
    return out, lse


@triton.jit
def _prefix_attention_kernel(
    q_ptr, k_ptr, v_ptr, key_ok_ptr, child_start_ptr, out_ptr, lse_ptr,
    T, L, D, G, scale,
    stride_qn, stride_qh, stride_qt, stride_qd,
    stride_kp, stride_kh, stride_kl, stride_kd,
    stride_vp, stride_vh, stride_vl, stride_vd,
    stride_mp, stride_ml,
    stride_on, stride_oh, stride_ot, stride_od,
    stride_ln, stride_lh, stride_lt,
    DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    parent = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    row_block = tl.program_id(2).to(tl.int64)
    first_child = tl.load(child_start_ptr + parent).to(tl.int64)
    n_rows = (tl.load(child_start_ptr + parent + 1).to(tl.int64) - first_child) * T * G

    # one row per (child, token, query head of this KV head); the query head varies fastest
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < n_rows
    group_head = rows % G
    token = (rows // G) % T
    child = first_child + rows // (G * T)
    head = kv_head * G + group_head
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dim_ok = dims < D

    q_offsets = (child[:, None] * stride_qn + head[:, None] * stride_qh
                 + token[:, None] * stride_qt + dims[None, :] * stride_qd)
    q = tl.load(q_ptr + q_offsets, mask=row_ok[:, None] & dim_ok[None, :], other=0.0)

    k_base = k_ptr + parent * stride_kp + kv_head * stride_kh
    v_base = v_ptr + parent * stride_vp + kv_head * stride_vh
    mask_base = key_ok_ptr + parent * stride_mp

    row_max = tl.full([BLOCK_M], float("-inf"), DTYPE)
    row_sum = tl.zeros([BLOCK_M], DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], DTYPE)
    # a block past this parent's rows reads nothing (parents may have fewer children)
    n_keys = tl.where(row_block * BLOCK_M < n_rows, L, 0)
    for start in range(0, n_keys, BLOCK_N):
        _, key_ok, k, v = _load_key_block(k_base, v_base, mask_base, start, L, stride_ml,
                                          stride_kl, stride_kd, stride_vl, stride_vd, dims,
                                          dim_ok, BLOCK_N)
        scores = tl.where(key_ok[None, :], _block_scores(q, k, scale), float("-inf"))
        row_max, row_sum, acc = _online_softmax_step(row_max, row_sum, acc, scores, v)

    out, lse = _online_softmax_result(row_max, row_sum, acc)
    o_offsets = (child[:, None] * stride_on + head[:, None] * stride_oh
                 + token[:, None] * stride_ot + dims[None, :] * stride_od)
    tl.store(out_ptr + o_offsets, out, mask=row_ok[:, None] & dim_ok[None, :])
    tl.store(lse_ptr + child * stride_ln + head * stride_lh + token * stride_lt, lse,
             mask=row_ok)


@triton.jit
def _suffix_merge_kernel(
    q_ptr, k_ptr, v_ptr, key_ok_ptr, prefix_out_ptr, prefix_lse_ptr, out_ptr, lse_ptr,
    T, S, D, G, scale,
    stride_qn, stride_qh, stride_qt, stride_qd,
    stride_kn, stride_kh, stride_ks, stride_kd,
    stride_vn, stride_vh, stride_vs, stride_vd,
    stride_mn, stride_ms,
    stride_pn, stride_ph, stride_pt, stride_pd,
    stride_pln, stride_plh, stride_plt,
    stride_on, stride_oh, stride_ot, stride_od,
    stride_ln, stride_lh, stride_lt,
    DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    child = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1).to(tl.int64)
    row_block = tl.program_id(2).to(tl.int64)

    # one row per (token, query head of this KV head) of this child
    rows = row_block * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = rows < T * G
    token = rows // G
    head = kv_head * G + rows % G
    dims = tl.arange(0, BLOCK_D).to(tl.int64)
    dim_ok = dims < D
    row_dim_ok = row_ok[:, None] & dim_ok[None, :]

    q = tl.load(q_ptr + child * stride_qn + head[:, None] * stride_qh
                + token[:, None] * stride_qt + dims[None, :] * stride_qd,
                mask=row_dim_ok, other=0.0)
    # the prefix's softmax as an online-softmax state: max lse_p, sum 1, accumulator out_p
    prefix_lse = tl.load(prefix_lse_ptr + child * stride_pln + head * stride_plh
                         + token * stride_plt, mask=row_ok, other=float("-inf")).to(DTYPE)
    prefix_out = tl.load(prefix_out_ptr + child * stride_pn + head[:, None] * stride_ph
                         + token[:, None] * stride_pt + dims[None, :] * stride_pd,
                         mask=row_dim_ok, other=0.0).to(DTYPE)
    had_prefix = prefix_lse > float("-inf")
    row_max = prefix_lse
    row_sum = tl.where(had_prefix, 1.0, 0.0).to(DTYPE)
    acc = tl.where(had_prefix[:, None], prefix_out, 0.0)

    k_base = k_ptr + child * stride_kn + kv_head * stride_kh
    v_base = v_ptr + child * stride_vn + kv_head * stride_vh
    mask_base = key_ok_ptr + child * stride_mn
    own_column = S - T + token  # causal: a token sees its suffix up to itself
    for start in range(0, S, BLOCK_N):
        keys, key_ok, k, v = _load_key_block(k_base, v_base, mask_base, start, S, stride_ms,
                                             stride_ks, stride_kd, stride_vs, stride_vd, dims,
                                             dim_ok, BLOCK_N)
        visible = key_ok[None, :] & (keys[None, :] <= own_column[:, None])
        scores = tl.where(visible, _block_scores(q, k, scale), float("-inf"))
        row_max, row_sum, acc = _online_softmax_step(row_max, row_sum, acc, scores, v)

    out, lse = _online_softmax_result(row_max, row_sum, acc)
    tl.store(out_ptr + child * stride_on + head[:, None] * stride_oh
             + token[:, None] * stride_ot + dims[None, :] * stride_od, out, mask=row_dim_ok)
    tl.store(lse_ptr + child * stride_ln + head * stride_lh + token * stride_lt, lse,
             mask=row_ok)


def launch_config(rows: int, head_dim: int, dtype: torch.dtype, block_m: int | None = None,
                  block_n: int | None = None, on_gpu: bool | None = None):
    """(DTYPE, BLOCK_M, BLOCK_N, BLOCK_D, num_warps) of both kernels for ``rows`` query rows
    per program group (a parent's children x tokens x group heads, or a child's tokens x group
    heads) and inputs of ``dtype``: the one place the launchers and ``aot_specs`` take them
    from. ``block_m`` / ``block_n`` override (tests); ``on_gpu`` defaults to whether CUDA is
    available.

    On a GPU, float32 and float64 inputs take blocks of at most 32 rows and 16 keys, half
    precision up to 64 and 64: a float32 (FMA) or float64 dot holds far more per thread than
    a tensor-core one; with 64 x 64 blocks ptxas spills kilobytes of registers and asks more
    shared memory than an A100 has, with 64 x 16 still a few bytes (tests/test_aot_compile.py,
    benchmarks/results/aot_compile_*.json)."""
    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    half = dtype in (torch.bfloat16, torch.float16)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if block_m is None:
        block_m = min(64 if half or not on_gpu else 32, max(16, triton.next_power_of_2(rows)))
    if block_n is None:
        block_n = (64 if half else 16) if on_gpu else 32
    compute_dtype = tl.float64 if kernel_compute_dtype(dtype) == torch.float64 else tl.float32
    return compute_dtype, block_m, block_n, block_d, 4 if block_m * block_d <= 4096 else 8


def _check_same_dtype(query, keys, values):
    # q, k and v meet in tl.dot, which needs one operand dtype
    if not query.dtype == keys.dtype == values.dtype:
        raise ValueError(f"query, keys and values must share a dtype, got {query.dtype}, "
                         f"{keys.dtype} and {values.dtype}")


def prefix_attention_forward(query, prefix_keys, prefix_values, prefix_mask, child_start,
                             scale: float, max_children: int | None = None,
                             block_m: int | None = None, block_n: int | None = None):
    """Launch the kernel. ``query`` [N, H, T, D]; ``prefix_keys`` / ``prefix_values``
    [P, KVH, L, D]; ``prefix_mask`` [P, L] (nonzero = a real key); ``child_start`` [P + 1]
    int64, non-decreasing, child_start[0] = 0 and child_start[P] = N; ``max_children``: the
    most children of one parent when the caller knows it (else read from ``child_start``, a
    device sync).

    Returns (out [N, H, T, D], lse [N, H, T]) in the compute dtype (float32, or float64 for
    float64 inputs). The caller validates shapes (``oreo_fast.cascade``).
    """
    n, heads, tokens, head_dim = query.shape
    parents, kv_heads, length, _ = prefix_keys.shape
    _check_same_dtype(query, prefix_keys, prefix_values)
    group = heads // kv_heads
    dtype = kernel_compute_dtype(query.dtype)
    out = torch.zeros(n, heads, tokens, head_dim, dtype=dtype, device=query.device)
    lse = torch.full((n, heads, tokens), float("-inf"), dtype=dtype, device=query.device)
    if n * tokens == 0 or parents == 0:
        return out, lse
    if prefix_mask.dtype == torch.bool:
        prefix_mask = prefix_mask.to(torch.int8)
    child_start = child_start.to(device=query.device, dtype=torch.int64).contiguous()
    most_children = max_children if max_children is not None else \
        int((child_start[1:] - child_start[:-1]).max())
    rows_per_parent = most_children * tokens * group
    compute_dtype, block_m, block_n, block_d, num_warps = launch_config(
        rows_per_parent, head_dim, query.dtype, block_m, block_n)
    grid = (parents, kv_heads, triton.cdiv(max(rows_per_parent, 1), block_m))
    _prefix_attention_kernel[grid](
        query, prefix_keys, prefix_values, prefix_mask, child_start, out, lse,
        tokens, length, head_dim, group, scale,
        *query.stride(), *prefix_keys.stride(), *prefix_values.stride(), *prefix_mask.stride(),
        *out.stride(), *lse.stride(),
        DTYPE=compute_dtype, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out, lse


def suffix_merge_forward(query, suffix_keys, suffix_values, suffix_mask, prefix_out,
                         prefix_lse, scale: float, block_m: int | None = None,
                         block_n: int | None = None):
    """Launch the suffix kernel: each child's queries [N, H, T, D] over its own suffix
    ``suffix_keys`` / ``suffix_values`` [N, KVH, S, D] (key mask [N, S]; the queries are its
    last T columns), continuing the prefix's (``prefix_out`` [N, H, T, D], ``prefix_lse``
    [N, H, T]) from ``prefix_attention_forward``. Returns (out, lse) over [prefix; suffix]
    in the compute dtype."""
    n, heads, tokens, head_dim = query.shape
    kv_heads, length = suffix_keys.shape[1], suffix_keys.shape[2]
    _check_same_dtype(query, suffix_keys, suffix_values)
    group = heads // kv_heads
    dtype = prefix_out.dtype
    out = torch.zeros(n, heads, tokens, head_dim, dtype=dtype, device=query.device)
    lse = torch.full((n, heads, tokens), float("-inf"), dtype=dtype, device=query.device)
    if n * tokens == 0:
        return out, lse
    if suffix_mask.dtype == torch.bool:
        suffix_mask = suffix_mask.to(torch.int8)
    compute_dtype, block_m, block_n, block_d, num_warps = launch_config(
        tokens * group, head_dim, query.dtype, block_m, block_n)
    grid = (n, kv_heads, triton.cdiv(tokens * group, block_m))
    _suffix_merge_kernel[grid](
        query, suffix_keys, suffix_values, suffix_mask, prefix_out, prefix_lse, out, lse,
        tokens, length, head_dim, group, scale,
        *query.stride(), *suffix_keys.stride(), *suffix_values.stride(), *suffix_mask.stride(),
        *prefix_out.stride(), *prefix_lse.stride(), *out.stride(), *lse.stride(),
        DTYPE=compute_dtype, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out, lse


# Head dims the trainer meets (Llama / Qwen 2.5 families).
AOT_HEAD_DIMS = (64, 128)


def _aot_layouts(children: int, tokens: int, group: int, head_dim: int):
    """Argument values of both launches for one beam-search shape, as the model hands them
    over: queries [N, T, H, D] seen as [N, H, T, D], keys and values and masks contiguous,
    int64 masks, a prefix of 300 keys and a suffix of 45 earlier keys."""
    kv_heads, parents, length = 2, 3, 300
    n, heads, suffix = parents * children, kv_heads * group, 45 + tokens
    meta = {"device": "meta"}
    query = torch.empty(n, tokens, heads, head_dim, **meta).transpose(1, 2)
    prefix_kv = torch.empty(parents, kv_heads, length, head_dim, **meta)
    suffix_kv = torch.empty(n, kv_heads, suffix, head_dim, **meta)
    out = torch.empty(n, heads, tokens, head_dim, **meta)
    lse = torch.empty(n, heads, tokens, **meta)
    prefix_mask = torch.empty(parents, length, **meta)
    suffix_mask = torch.empty(n, suffix, **meta)

    def strides(prefix, tensor):
        names = [f"stride_{prefix}{axis}" for axis in "nhtd"[-tensor.dim():]]
        return dict(zip(names, tensor.stride()))

    prefix_args = {"T": tokens, "L": length, "D": head_dim, "G": group,
                   **dict(zip(("stride_qn", "stride_qh", "stride_qt", "stride_qd"),
                              query.stride())),
                   **dict(zip(("stride_kp", "stride_kh", "stride_kl", "stride_kd"),
                              prefix_kv.stride())),
                   **dict(zip(("stride_vp", "stride_vh", "stride_vl", "stride_vd"),
                              prefix_kv.stride())),
                   **dict(zip(("stride_mp", "stride_ml"), prefix_mask.stride())),
                   **strides("o", out), **dict(zip(("stride_ln", "stride_lh", "stride_lt"),
                                                   lse.stride()))}
    suffix_args = {"T": tokens, "S": suffix, "D": head_dim, "G": group,
                   **{k: v for k, v in prefix_args.items() if k.startswith("stride_q")},
                   **dict(zip(("stride_kn", "stride_kh", "stride_ks", "stride_kd"),
                              suffix_kv.stride())),
                   **dict(zip(("stride_vn", "stride_vh", "stride_vs", "stride_vd"),
                              suffix_kv.stride())),
                   **dict(zip(("stride_mn", "stride_ms"), suffix_mask.stride())),
                   **strides("p", out),
                   **dict(zip(("stride_pln", "stride_plh", "stride_plt"), lse.stride())),
                   **strides("o", out), **dict(zip(("stride_ln", "stride_lh", "stride_lt"),
                                                   lse.stride()))}
    return prefix_args, suffix_args


# (tokens per child, GQA group, children per parent, mask dtype) of the shapes aot_specs
# compiles: decoding and 32-token steps, MHA and GQA, one to 64 children (best-of-64), bool
# masks (converted to int8) and the search's int64 ones. Between them they reach every
# BLOCK_M both launchers pick (16, 32, 64) and the JIT's constants for T = 1 and G = 1.
AOT_SHAPES = ((1, 1, 1, torch.int8), (1, 6, 4, torch.int64), (1, 8, 64, torch.int64),
              (32, 1, 1, torch.int64), (32, 8, 4, torch.int64))


def aot_specs():
    """Every program the two launchers compile on a GPU (see ``oreo_fast.kernels.aot``): each
    input dtype, head dims 64 and 128, and the shapes above: the DTYPE, BLOCK sizes and warps
    ``launch_config`` picks, and the integer specialisations (1 -> constant, multiples of 16)
    the JIT makes for those shapes."""
    from . import aot

    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        compute = kernel_compute_dtype(dtype)
        for head_dim in AOT_HEAD_DIMS:
            for tokens, group, children, mask_dtype in AOT_SHAPES:
                prefix_args, suffix_args = _aot_layouts(children, tokens, group, head_dim)
                shape = (f"{str(dtype)[6:]} D={head_dim} G={group} T={tokens} "
                         f"K={children} mask={str(mask_dtype)[6:]}")
                for kernel, rows, args, pointers in (
                    (_prefix_attention_kernel, children * tokens * group,
                     prefix_args,
                     {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype,
                      "key_ok_ptr": mask_dtype, "child_start_ptr": torch.int64,
                      "out_ptr": compute, "lse_ptr": compute}),
                    (_suffix_merge_kernel, tokens * group, suffix_args,
                     {"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype,
                      "key_ok_ptr": mask_dtype, "prefix_out_ptr": compute,
                      "prefix_lse_ptr": compute, "out_ptr": compute,
                      "lse_ptr": compute}),
                ):
                    compute_dtype, block_m, block_n, block_d, num_warps = \
                        launch_config(rows, head_dim, dtype, on_gpu=True)
                    ints, constants, aligned = aot.int_args(**args)
                    specs.append({
                        "kernel": kernel,
                        "signature": {**{k: aot.pointer(v)
                                         for k, v in pointers.items()},
                                      **ints, "scale": "fp32"},
                        "constexprs": {**constants, "DTYPE": compute_dtype,
                                       "BLOCK_M": block_m, "BLOCK_N": block_n,
                                       "BLOCK_D": block_d},
                        "num_warps": num_warps, "aligned": aligned,
                        "label": f"{kernel.fn.__name__.split('_')[1]} {shape}",
                    })
    return aot.unique_specs(specs)
