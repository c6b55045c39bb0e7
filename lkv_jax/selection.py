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

PROTECT = 1e30  # score given to protected slots (finite so arithmetic on scores stays NaN-free)
EXCLUDE = -jnp.inf


def select_slots(scores, selectable, protected, n_kept: int, keep_count):
    """Top slots per row and KV head.

    scores float32 [B, K, S]; selectable/protected bool [B, K, S]; n_kept static int (the compact
    capacity); keep_count int [B] (entries row b keeps, <= n_kept). Returns slots int32 [B, K, n_kept]
    ascending among kept entries, with dropped ones (rank >= keep_count) placed last, and kept bool
    [B, K, n_kept].
    """
    s = jnp.where(protected, PROTECT, scores.astype(jnp.float32))
    s = jnp.where(selectable, s, EXCLUDE)
    _, idx = jax.lax.top_k(s, n_kept)
    rank = jnp.arange(n_kept)
    kept = (rank[None, None, :] < keep_count[:, None, None]) & jnp.take_along_axis(selectable, idx, axis=-1)
    # sort by (dropped, slot): kept entries ascending in slot (= in position), dropped ones after
    S = scores.shape[-1]
    order = jnp.argsort(jnp.where(kept, idx, idx + S), axis=-1)
    return jnp.take_along_axis(idx, order, -1).astype(jnp.int32), jnp.take_along_axis(kept, order, -1)


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
