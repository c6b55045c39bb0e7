"""Selection shared by every press: top-`n_kept` cache entries per layer and KV head, then a gather into a
compact cache that keeps every entry's ORIGINAL position.

Scores are float32 [B, K, S] per layer over cache slots. Invalid slots (padding, slots past the prompt)
are never chosen; protected slots (windows, sinks) are always chosen and count inside the budget.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lkv_jax.cache import KVCache

# Top-n per row and KV head (`select_slots`): lax.top_k, or the Pallas threshold-select with the same
# kept sets; protected slots score PROTECT, unselectable ones EXCLUDE. It lives beside its kernel.
from pallas_kernels.topk_select.op import EXCLUDE, PROTECT, select_slots  # noqa: F401


def gather_layer(keys, values, positions, slots, kept):
    """Gather one layer's entries: keys/values [B, K, S, H], positions [B, K, S], slots/kept [B, K, n]."""
    k = jnp.take_along_axis(keys, slots[..., None], axis=2)
    v = jnp.take_along_axis(values, slots[..., None], axis=2)
    p = jnp.where(kept, jnp.take_along_axis(positions, slots, axis=2), -1)
    return k, v, p


def compact_cache(cache: KVCache, layer_slots, layer_kept) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """Build the compressed cache from per-layer (slots, kept); returns it and the kept positions."""
    keys, values, positions = [], [], []
    for l in range(cache.n_layers):
        k, v, p = gather_layer(cache.keys[l], cache.values[l], cache.positions[l], layer_slots[l], layer_kept[l])
        keys.append(k)
        values.append(v)
        positions.append(p)
    cursor = jnp.asarray([s.shape[-1] for s in layer_slots], jnp.int32)
    out = dataclasses.replace(cache, keys=tuple(keys), values=tuple(values), positions=tuple(positions),
                              valid=tuple(layer_kept), cursor=cursor)
    return out, tuple(positions)
