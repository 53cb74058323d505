"""Children sharing their parent's prefix KV inside a transformers model: the cascade attention
(``oreo_fast.search.cascade``) as the model's attention function.

``share_prefix`` wraps a parent ``kv.KV`` into a ``CascadeKV`` whose cache holds, per layer,
the parents' prefix KV [P, KVH, L, D] (the parent cache's own tensors, not copied) and each
child's suffix KV [N, KVH, S, D] that grows as tokens are fed. ``materialize_rows`` turns
selected children into ordinary KV rows (prefix + suffix) for the next step.

How the model reaches the cascade: ``cascade_attention_routed`` puts the model on the
attention function registered through transformers' ``AttentionInterface`` as
``ATTENTION_NAME`` (public ``set_attn_implementation``, once per search). That function is
plain sdpa attention (with sdpa's mask builder registered under the same name) except while
``CascadeKV.forward_tokens`` runs the model: the feed sets a ``CascadeBatch`` (where the
prefix and the masks are) in a context variable, and the function reads it there. The batch
therefore never passes through the model's mask code, which differs between architectures
(Qwen2 passes a dict of masks through, Llama rebuilds its mask and drops unknown objects), so
every decoder whose attention layers call the interface works the same way. Models that do
not (other attention kinds, sliding windows, soft-capping) are named by
``cascade_unsupported_reason`` and searched with copied KV (``usable_kv_sharing``).
Positions are explicit, as in ``kv.KV``.
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import weakref
from dataclasses import dataclass

import torch

from oreo_fast.search.cascade import ChildGroups, cascade_attention, use_triton
from oreo_fast.search.kv import KV, compact_rows, feed_tokens, reserved_layer

log = logging.getLogger("oreo_fast")

ATTENTION_NAME = "oreo_cascade"


@dataclass
class CascadeBatch:
    """What the registered attention function needs besides the suffix keys and values that
    the model's cache update returns; set for the duration of one ``CascadeKV`` feed."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [P, KVH, L, D]
    prefix_mask: torch.Tensor  # [P, L]
    groups: ChildGroups
    suffix_mask: torch.Tensor  # [N, S], this call's tokens included
    impl: str
    layers_run: int = 0  # attention calls that took the cascade path during this feed


# The batch travels beside the model call, not as its attention mask: every decoder builds
# its own mask from the 2D mask it is handed (Llama's create_causal_mask drops anything it
# does not know), so a mask-borne batch reaches the attention only in some architectures.
_ACTIVE_BATCH: contextvars.ContextVar[CascadeBatch | None] = contextvars.ContextVar(
    "oreo_cascade_batch", default=None)


def cascade_attention_forward(module, query, key, value, attention_mask, scaling=None,
                              dropout: float = 0.0, sliding_window=None, **kwargs):
    """The attention function registered as ``ATTENTION_NAME``. Inside a ``CascadeKV`` feed,
    ``key`` / ``value`` are the children's suffixes (the cascade cache's update returned them)
    and the active ``CascadeBatch`` says where the prefix is; anywhere else (the prompt
    prefill, copied KV rows) this is transformers' sdpa attention with the mask that
    ``sdpa_mask`` built. Returns ([N, T, H, D], None) like transformers' attention functions."""
    batch = _ACTIVE_BATCH.get()
    if batch is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling,
                                      dropout=dropout, sliding_window=sliding_window, **kwargs)
    if sliding_window is not None or dropout or kwargs.get("softcap") or \
            kwargs.get("s_aux") is not None:
        raise ValueError("cascade attention supports neither sliding windows, dropout, logit "
                         "soft-capping nor attention sinks (use kv_sharing='copy')")
    if module.layer_idx >= len(batch.prefix):
        raise ValueError(f"cascade batch holds {len(batch.prefix)} layers, the model's attention "
                         f"layer {module.layer_idx} asked for one more")
    batch.layers_run += 1
    prefix_keys, prefix_values = batch.prefix[module.layer_idx]
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    out, _ = cascade_attention(query, prefix_keys, prefix_values, batch.prefix_mask,
                               batch.groups, key, value, batch.suffix_mask, scale, batch.impl)
    return out.transpose(1, 2), None


@functools.lru_cache(maxsize=None)
def _register_attention() -> None:
    """Register the attention function and, under the same name, sdpa's mask builder (the
    delegate's mask: without one transformers hands a registered attention no mask at all)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, cascade_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _transformers_model(model):
    """The transformers model that owns ``model``'s attention layers: the model itself, or
    the first one inside a wrapper such as ``ValueModel`` (its backbone); None if none."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)


def cascade_unsupported_reason(model) -> str | None:
    """Why ``model`` cannot run the cascade path (None when it can): its attention must go
    through transformers' ``AttentionInterface`` and every layer must attend to all
    previous tokens with plain softmax attention."""
    pretrained = _transformers_model(model)
    if pretrained is None:
        return f"{type(model).__name__} is not a transformers model"
    name = type(pretrained).__name__
    if not pretrained.is_backend_compatible():
        return f"{name} does not route its attention through transformers' AttentionInterface"
    config = pretrained.config
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        if any(kind != "full_attention" for kind in layer_types):
            return f"{name} has layers other than full attention ({sorted(set(layer_types))})"
    elif getattr(config, "sliding_window", None) is not None and \
            getattr(config, "use_sliding_window", True):
        return f"{name} uses sliding-window attention"
    if getattr(config, "attn_logit_softcapping", None):
        return f"{name} soft-caps its attention logits"
    return None


# models already named in a fall-back notice: a search over many batches says it once
_NOTIFIED: weakref.WeakSet = weakref.WeakSet()


def usable_kv_sharing(kv_sharing: str, models) -> str:
    """``kv_sharing``, or "copy" (with a one-line notice, once per model) when it is
    "cascade" and one of ``models`` cannot take the cascade path."""
    if kv_sharing != "cascade":
        return kv_sharing
    for model in models:
        reason = cascade_unsupported_reason(model)
        if reason is not None:
            if model not in _NOTIFIED:
                _NOTIFIED.add(model)
                log.warning("kv_sharing=cascade: %s; the search copies the prefix KV instead "
                            "(kv_sharing=copy)", reason)
            return "copy"
    return "cascade"


@contextlib.contextmanager
def cascade_attention_routed(models):
    """Run ``models`` on the registered attention for the block (set once, not per forward:
    switching walks every submodule), then give each its own back. Already routed models
    are left as they are, so the search can route once and each feed check cheaply."""
    _register_attention()
    switched = []
    try:
        for model in models:
            reason = cascade_unsupported_reason(model)
            if reason is not None:
                raise ValueError(f"cascade attention: {reason} (use kv_sharing='copy')")
            pretrained = _transformers_model(model)
            before = pretrained.config._attn_implementation
            if before == ATTENTION_NAME:
                continue
            pretrained.set_attn_implementation(ATTENTION_NAME)
            switched.append((pretrained, before))
            if pretrained.config._attn_implementation != ATTENTION_NAME:
                raise ValueError(f"cascade attention: {type(pretrained).__name__} did not "
                                 "accept a registered attention function (use "
                                 "kv_sharing='copy')")
        yield
    finally:
        for pretrained, before in reversed(switched):
            pretrained.set_attn_implementation(before)


def routed_for(kv_sharing: str, models):
    """``cascade_attention_routed(models)`` for the cascade path, nothing for copied KV."""
    return cascade_attention_routed(models) if kv_sharing == "cascade" else contextlib.nullcontext()


@dataclass
class CascadeKV:
    """Children sharing their parents' prefix KV: ``forward_tokens`` as ``kv.KV``'s, but the
    prefix exists once per parent and only the children's own tokens are cached per child."""

    prefix: list[tuple[torch.Tensor, torch.Tensor]]  # per layer [P, KVH, L, D], not copied
    prefix_mask: torch.Tensor  # [P, L] 1 = a real token
    groups: ChildGroups
    cache: object  # DynamicCache of the suffixes, [N, KVH, S, D] per layer
    suffix_mask: torch.Tensor  # [N, S]
    next_pos: torch.Tensor  # [N] position of each child's next real token
    impl: str = "auto"

    def forward_tokens(self, model, ids: torch.Tensor, mask: torch.Tensor, counts,
                       which: str) -> torch.Tensor:
        """Feed ``ids`` [N, T] (``mask`` 1 = real; real tokens first, then padding) after
        each child's cached suffix; returns the policy's logits or the value model's values
        for every fed position and updates the suffix cache, mask and positions."""
        if ids.dim() != 2 or ids.shape[0] != len(self.next_pos):
            raise ValueError(f"ids must be [{len(self.next_pos)}, T], got {tuple(ids.shape)}")
        if mask.shape != ids.shape:
            raise ValueError(f"mask shape {tuple(mask.shape)} differs from ids {tuple(ids.shape)}")
        suffix_mask = torch.cat([self.suffix_mask, mask], dim=1)
        batch = CascadeBatch(self.prefix, self.prefix_mask, self.groups, suffix_mask, self.impl)
        with cascade_attention_routed([model]):
            active = _ACTIVE_BATCH.set(batch)
            try:
                # no 2D mask: the model's own mask would span only the suffix columns and
                # the cascade attention does not read it
                out, next_pos = feed_tokens(model, ids, mask, self.next_pos, self.cache, None,
                                            counts, which)
            finally:
                _ACTIVE_BATCH.reset(active)
        if batch.layers_run != len(self.prefix):
            # a layer attended without the prefix: its output would be silently wrong
            raise RuntimeError(f"{type(model).__name__}: {batch.layers_run} of "
                               f"{len(self.prefix)} attention layers took the cascade path")
        self.next_pos, self.suffix_mask = next_pos, suffix_mask
        return out


def share_prefix(kv: KV, n_children: int, reserve: int = 0, impl: str = "auto") -> CascadeKV:
    """``n_children`` children per row of ``kv`` (children of a row next to each other), all
    reading that row's cache as their shared prefix: nothing is copied. ``reserve``: suffix
    columns to allocate up front (the suffix grows past it if needed)."""
    from transformers import DynamicCache

    if not isinstance(kv, KV):
        raise ValueError(f"kv must be a kv.KV, got {type(kv).__name__}")
    if n_children < 1:
        raise ValueError(f"n_children must be >= 1, got {n_children}")
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    use_triton(impl, kv.mask.device)  # validates impl
    prefix = [(layer.keys, layer.values) for layer in kv.cache.layers]
    parents = kv.mask.shape[0]
    cache = DynamicCache()
    cache.layers = []
    for keys, _ in prefix:
        shape = (parents * n_children, keys.shape[1], 0, keys.shape[3])
        cache.layers.append(reserved_layer(shape, keys.dtype, keys.device, max(reserve, 1)))
    device = kv.mask.device
    return CascadeKV(prefix, kv.mask, ChildGroups.repeated(parents, n_children, device), cache,
                     torch.zeros(parents * n_children, 0, dtype=kv.mask.dtype, device=device),
                     kv.next_pos.repeat_interleave(n_children), impl)


def materialize_rows(ckv: CascadeKV, rows: torch.Tensor) -> KV:
    """The given children as ordinary ``kv.KV`` rows: parent prefix + own suffix, real
    columns moved right (what the next step uses as its prefix)."""
    if rows.dim() != 1:
        raise ValueError(f"rows must be 1-D, got shape {tuple(rows.shape)}")
    parents = ckv.groups.parent[rows]
    mask = torch.cat([ckv.prefix_mask[parents], ckv.suffix_mask[rows]], dim=1)
    layers = []
    for (prefix_k, prefix_v), layer in zip(ckv.prefix, ckv.cache.layers):
        layers.append((torch.cat([prefix_k[parents], layer.keys[rows]], dim=2),
                       torch.cat([prefix_v[parents], layer.values[rows]], dim=2)))
    return compact_rows(layers, mask, ckv.next_pos[rows])
