"""The KV cache pytree: static capacity, per-layer keys/values, original positions and validity.

Eviction keeps different entries per KV head (and, with PyramidKV, a different number per layer), so
everything is stored per layer and per KV head. Each entry remembers its ORIGINAL position in the
sequence, so decoding after eviction continues with true positions.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Per layer l (tuples of length n_layers):

    keys[l], values[l]: [B, K, S_l, H]   activations dtype
    positions[l]:       int32 [B, K, S_l] original position of each entry (-1 where empty)
    valid[l]:           bool  [B, K, S_l] entry may be attended to
    cursor:             int32 [n_layers]  next slot to write, per layer
    next_position:      int32 [B]         position the next token of each row gets
    """

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    positions: tuple[jax.Array, ...]
    valid: tuple[jax.Array, ...]
    cursor: jax.Array
    next_position: jax.Array

    @property
    def n_layers(self) -> int:
        return len(self.keys)

    def capacity(self, layer: int = 0) -> int:
        return self.keys[layer].shape[2]

    @staticmethod
    def empty(n_layers: int, batch: int, n_kv_heads: int, capacity: int, head_dim: int, dtype) -> KVCache:
        kv = jnp.zeros((batch, n_kv_heads, capacity, head_dim), dtype)
        pos = jnp.full((batch, n_kv_heads, capacity), -1, jnp.int32)
        val = jnp.zeros((batch, n_kv_heads, capacity), bool)
        return KVCache(
            keys=(kv,) * n_layers, values=(kv,) * n_layers, positions=(pos,) * n_layers,
            valid=(val,) * n_layers, cursor=jnp.zeros((n_layers,), jnp.int32),
            next_position=jnp.zeros((batch,), jnp.int32),
        )

    def grow(self, extra: int) -> KVCache:
        """The same cache with `extra` more empty slots per layer (room to decode into)."""
        if extra <= 0:
            return self

        def pad(x, value):
            widths = [(0, 0)] * x.ndim
            widths[2] = (0, extra)
            return jnp.pad(x, widths, constant_values=value)

        return dataclasses.replace(
            self,
            keys=tuple(pad(k, 0) for k in self.keys),
            values=tuple(pad(v, 0) for v in self.values),
            positions=tuple(pad(p, -1) for p in self.positions),
            valid=tuple(pad(v, False) for v in self.valid),
        )


def write_entries(keys, values, positions, valid, at, k_new, v_new, pos_new, valid_new):
    """Write T new entries of one layer at slot `at`: a traced int (every row), or int32 [B] (each row at its
    own slot: decoding-time eviction leaves rows with different numbers of entries).

    keys/values [B, K, S, H], positions/valid [B, K, S]; k_new/v_new [B, T, K, H];
    pos_new int32 [B, T]; valid_new bool [B, T]. Returns the four updated arrays.
    """
    B, T, K, _ = k_new.shape
    if jnp.ndim(at) == 1:
        rows, slots = jnp.arange(B)[:, None], at[:, None] + jnp.arange(T)[None]  # [B, 1], [B, T]
        put = lambda buf, new: buf.at[rows, :, slots].set(new.astype(buf.dtype))  # new [B, T, K, ...]
        return (put(keys, k_new), put(values, v_new), put(positions, jnp.repeat(pos_new[..., None], K, -1)),
                put(valid, jnp.repeat(valid_new[..., None], K, -1)))
    k_new = jnp.swapaxes(k_new, 1, 2).astype(keys.dtype)
    v_new = jnp.swapaxes(v_new, 1, 2).astype(values.dtype)
    p_new = jnp.broadcast_to(pos_new[:, None, :], (B, K, T))
    m_new = jnp.broadcast_to(valid_new[:, None, :], p_new.shape)
    upd = jax.lax.dynamic_update_slice_in_dim
    return (upd(keys, k_new, at, axis=2), upd(values, v_new, at, axis=2),
            upd(positions, p_new.astype(jnp.int32), at, axis=2), upd(valid, m_new, at, axis=2))
