"""Row-indexed KV caches for the beam search: prefill, expand a parent's rows to its children,
keep the selected rows with their holes squeezed out, feed tokens with explicit positions.

A ``KV`` is a transformers ``DynamicCache`` plus, per row, the 2D attention mask over its
columns (0 for left padding and for holes left by rows that stopped early) and the position
of the row's next real token. Positions never come from column indices: a row's columns may
hold padding, and a position counted from columns would silently shift RoPE.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from oreo_fast.models import cache_arg, left_pad


@dataclass
class KV:
    cache: object  # transformers DynamicCache, [rows, heads, columns, head_dim] per layer
    mask: torch.Tensor  # [rows, columns] 1 = a real token
    next_pos: torch.Tensor  # [rows] position of each row's next real token

    def forward_tokens(self, model, ids: torch.Tensor, mask: torch.Tensor, counts,
                       which: str) -> torch.Tensor:
        """Feed ``ids`` [R, T] (``mask`` 1 = real; real tokens first in each row, then
        padding) after the cached columns; returns the policy's logits or the value model's
        values for every fed position, and updates the cache, mask and positions."""
        full_mask = torch.cat([self.mask, mask], dim=1)
        out, self.next_pos = feed_tokens(model, ids, mask, self.next_pos, self.cache, full_mask,
                                         counts, which)
        self.mask = full_mask
        return out


def feed_tokens(model, ids: torch.Tensor, mask: torch.Tensor, next_pos: torch.Tensor, cache,
                attention_mask, counts, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``model`` on ``ids`` [R, T] after the columns ``cache`` holds, at explicit
    positions counted from ``next_pos`` over the real tokens of ``mask``; ``attention_mask``
    is the 2D mask over all columns (None on the cascade path, whose attention reads its
    masks elsewhere). Returns the logits (policy) or values (value model) of every fed
    position and the rows' next positions."""
    positions = next_pos[:, None] + (mask.cumsum(1) - 1).clamp(min=0)
    kwargs = {"logits_to_keep": 1} if ids.shape[1] == 1 and is_lm(model) else {}
    out = model(input_ids=ids, attention_mask=attention_mask, position_ids=positions,
                use_cache=True, **kwargs, **cache_arg(model, cache))
    count_tokens(counts, which, mask)
    return (out.logits if is_lm(model) else out.values), next_pos + mask.sum(1)


def is_lm(model) -> bool:
    """A policy (logits out), not a value model (values out)."""
    return not hasattr(model, "value_head")


def count_tokens(counts, which: str, mask: torch.Tensor) -> None:
    """Add the real tokens of ``mask`` to ``counts.<which>`` and its padding to
    ``counts.padded_slots`` (``counts`` may be None)."""
    if counts is None:
        return
    real = int(mask.sum())
    setattr(counts, which, getattr(counts, which) + real)
    counts.padded_slots += mask.numel() - real


@functools.lru_cache(maxsize=None)
def _reserved_layer_class():
    """A transformers cache layer with room reserved for more columns: ``DynamicLayer``
    concatenates, i.e. copies the whole cache for every decoded token, which dominates
    decoding hundreds of beam rows; this one writes the new columns in place. (Defined
    lazily: transformers is imported only when a model is used.)"""
    from transformers.cache_utils import DynamicLayer

    class ReservedLayer(DynamicLayer):
        def update(self, key_states, value_states, *args, **kwargs):
            n, new = self.keys.shape[-2], key_states.shape[-2]
            if n + new > self._kbuf.shape[-2]:  # out of room: grow to twice the need
                self._kbuf, self._vbuf = (self._grow(b, n, 2 * (n + new))
                                          for b in (self._kbuf, self._vbuf))
            self._kbuf[..., n:n + new, :] = key_states
            self._vbuf[..., n:n + new, :] = value_states
            self.keys, self.values = self._kbuf[..., :n + new, :], self._vbuf[..., :n + new, :]
            return self.keys, self.values

        @staticmethod
        def _grow(buf, used, capacity):
            out = buf.new_empty(*buf.shape[:2], capacity, buf.shape[3])
            out[..., :used, :] = buf[..., :used, :]
            return out

    return ReservedLayer


def reserved_layer(shape, dtype, device, reserve: int):
    """An empty-or-sized cache layer [rows, heads, length, dim] with room for ``reserve``
    more columns."""
    rows, heads, length, dim = shape
    layer = _reserved_layer_class()()
    layer.dtype, layer.device, layer.is_initialized = dtype, device, True
    layer._kbuf = torch.empty(rows, heads, length + reserve, dim, dtype=dtype, device=device)
    layer._vbuf = torch.empty_like(layer._kbuf)
    layer.keys, layer.values = layer._kbuf[..., :length, :], layer._vbuf[..., :length, :]
    return layer


def _new_cache(layers: list[tuple[torch.Tensor, torch.Tensor]], reserve: int = 0,
               repeat: int = 1):
    """A DynamicCache holding ``layers`` (each row repeated ``repeat`` times, children next
    to each other) with room for ``reserve`` more columns."""
    from transformers import DynamicCache

    cache = DynamicCache()
    cache.layers = []
    for k, v in layers:
        rows, heads, length, dim = k.shape
        layer = reserved_layer((rows * repeat, heads, length, dim), k.dtype, k.device, reserve)
        for buf, src in ((layer._kbuf, k), (layer._vbuf, v)):
            # one copy, broadcast over the children (no intermediate repeat_interleave)
            buf.view(rows, repeat, heads, -1, dim)[:, :, :, :length] = src[:, None]
        cache.layers.append(layer)
    return cache


def _layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def prefill(model, sequences: list[list[int]], pad_id: int, counts, which: str,
            values: bool = False):
    """Encode left-padded ``sequences`` once. Returns the KV (and, with ``values``, the
    value model's V at each sequence's last token)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask, positions = (t.to(device) for t in left_pad(sequences, pad_id))
    cache = DynamicCache(config=model.config)
    kwargs = {"logits_to_keep": 1} if is_lm(model) else {}
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                use_cache=True, **kwargs, **cache_arg(model, cache))
    count_tokens(counts, which, mask)
    kv = KV(cache, mask, mask.sum(1))
    return (kv, out.values[:, -1]) if values else kv


def expand_rows(kv: KV, n: int, reserve: int = 0) -> KV:
    """Each row repeated ``n`` times (children next to each other), with room for
    ``reserve`` more columns. This simple path copies the prefix once per child; the cost
    that matters, recomputing it, is avoided."""
    return KV(_new_cache(_layers(kv.cache), reserve, n), kv.mask.repeat_interleave(n, 0),
              kv.next_pos.repeat_interleave(n, 0))


def gather_compact(kv: KV, rows: torch.Tensor) -> KV:
    """The given rows, their real columns moved right (left padding only, no holes), so the
    cache does not grow by the padding of every step."""
    return compact_rows([(k[rows], v[rows]) for k, v in _layers(kv.cache)], kv.mask[rows],
                        kv.next_pos[rows])


def compact_rows(layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor,
                 next_pos: torch.Tensor) -> KV:
    """A KV of ``layers`` ([rows, heads, columns, dim] each) with ``mask`` [rows, columns],
    the real columns moved right (left padding only, no holes)."""
    real = mask.sum(1)
    width = int(real.max())
    # column order: real columns first, in order (stable sort of "is padding")
    order = torch.sort((mask == 0).long(), dim=1, stable=True).indices[:, :width]
    # left-pad: row r's real columns go to the right end; padding slots point at its first
    # real column (finite values, masked out)
    shift = width - real
    slot = torch.arange(width, device=mask.device)[None] - shift[:, None]
    idx = order.gather(1, slot.clamp(min=0))
    new_mask = (slot >= 0).long()
    compacted = []
    for k, v in layers:
        index = idx[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
        compacted.append((k.gather(2, index), v.gather(2, index)))
    return KV(_new_cache(compacted), new_mask, next_pos)
