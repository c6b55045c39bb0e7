"""Attention kernels in plain jnp: blockwise causal attention for prefill, and attention over a cache
that also returns the float32 attention probabilities (for glimpses and decoding).

Layout: queries [B, T, N, H]; cached keys/values [B, K, S, H]; query head n = k * G + g belongs to
KV head k (the HF `repeat_kv` convention).
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

_NEG = -1e30  # finite "minus infinity": fully masked rows give zeros, never NaN


def _check_cache_layout(q, keys, values) -> None:
    """q [B, T, N, H] and keys = values [B, K, S, H] with N a multiple of K (checked while tracing)."""
    chex.assert_rank([q, keys, values], 4)
    chex.assert_equal_shape([keys, values])
    chex.assert_equal_shape([q, keys], dims=(0, 3))
    if q.shape[2] % keys.shape[1]:
        raise ValueError(f"query heads N={q.shape[2]} must be a multiple of KV heads K={keys.shape[1]}")


def _group(q: jax.Array, n_kv: int) -> jax.Array:
    """[B, T, N, H] -> [B, K, G, T, H]."""
    B, T, N, H = q.shape
    return q.reshape(B, T, n_kv, N // n_kv, H).transpose(0, 2, 3, 1, 4)


def _ungroup(o: jax.Array) -> jax.Array:
    """[B, K, G, T, H] -> [B, T, N, H]."""
    B, K, G, T, H = o.shape
    return o.transpose(0, 3, 1, 2, 4).reshape(B, T, K * G, H)


@jax.named_scope("attention")  # labels its ops in profiles (experiments/bench_prefill.py --breakdown)
def blockwise_causal_attention(q, keys, values, key_valid, q_start, block: int, *, return_stats: bool = False):
    """Causal attention of a query chunk over the filled part of a cache, one key block at a time.

    q [B, T, N, H] sits at cache slots [q_start, q_start + T); keys/values [B, K, S, H];
    key_valid bool [B, S]. Visits key blocks 0 .. (q_start + T - 1) // block with an online softmax
    (float32 statistics), so memory is O(T * block), never O(T * S). Returns [B, T, N, H], and with
    return_stats also the final softmax statistics (row max m, normaliser l), float32 [B, K, G, T]
    each, for `blockwise_attention_mass`.
    """
    _check_cache_layout(q, keys, values)
    chex.assert_shape(key_valid, (q.shape[0], keys.shape[2]))
    B, T, N, H = q.shape
    K = keys.shape[1]
    qg = _group(q, K) * jnp.asarray(H ** -0.5, q.dtype)
    q_slots = q_start + jnp.arange(T)
    n_blocks = (q_start + T - 1) // block + 1

    def body(j, carry):
        m, l, acc = carry
        kb = jax.lax.dynamic_slice_in_dim(keys, j * block, block, axis=2)
        vb = jax.lax.dynamic_slice_in_dim(values, j * block, block, axis=2)
        ok = jax.lax.dynamic_slice_in_dim(key_valid, j * block, block, axis=1)
        k_slots = j * block + jnp.arange(block)
        mask = ok[:, None, None, None, :] & (k_slots[None, :] <= q_slots[:, None])
        s = jnp.einsum("bkgth,bksh->bkgts", qg, kb, preferred_element_type=jnp.float32)
        s = jnp.where(mask, s, _NEG)
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        pv = jnp.einsum("bkgts,bksh->bkgth", p.astype(values.dtype), vb, preferred_element_type=jnp.float32)
        return m_new, l, acc * corr[..., None] + pv

    G = N // K
    init = (jnp.full((B, K, G, T), _NEG, jnp.float32), jnp.zeros((B, K, G, T), jnp.float32),
            jnp.zeros((B, K, G, T, H), jnp.float32))
    m, l, acc = jax.lax.fori_loop(0, n_blocks, body, init)
    out = acc / jnp.maximum(l, 1e-30)[..., None]
    if return_stats:
        return _ungroup(out).astype(q.dtype), (m, l)
    return _ungroup(out).astype(q.dtype)


def blockwise_attention_mass(q, keys, key_valid, q_start, block: int, stats, q_weight):
    """Attention mass each cache slot receives from a query chunk (the H2O / observed-attention rule).

    A second pass over the key blocks of `blockwise_causal_attention`, reusing its final softmax
    statistics `stats` = (m, l), so the probabilities are exact and memory stays O(T * block).
    q [B, T, N, H] at slots [q_start, q_start + T); keys [B, K, S, H]; key_valid bool [B, S];
    q_weight float32 [B, T] (0 for padding queries). Returns float32 [B, N, S]: sum over the chunk's
    queries of weight * probability (slots the chunk cannot see get 0).
    """
    B, T, N, H = q.shape
    K, S = keys.shape[1], keys.shape[2]
    m, l = stats
    qg = _group(q, K) * jnp.asarray(H ** -0.5, q.dtype)
    q_slots = q_start + jnp.arange(T)
    n_blocks = (q_start + T - 1) // block + 1
    # fold the query weights into 1 / l so one einsum gives the weighted sum over queries
    inv_l = q_weight[:, None, None, :] / jnp.maximum(l, 1e-30)

    def body(j, mass):
        kb = jax.lax.dynamic_slice_in_dim(keys, j * block, block, axis=2)
        ok = jax.lax.dynamic_slice_in_dim(key_valid, j * block, block, axis=1)
        k_slots = j * block + jnp.arange(block)
        mask = ok[:, None, None, None, :] & (k_slots[None, :] <= q_slots[:, None])
        s = jnp.einsum("bkgth,bksh->bkgts", qg, kb, preferred_element_type=jnp.float32)
        p = jnp.where(mask, jnp.exp(s - m[..., None]), 0.0)
        part = jnp.einsum("bkgts,bkgt->bkgs", p, inv_l)
        return jax.lax.dynamic_update_slice_in_dim(mass, part, j * block, axis=3)

    mass = jax.lax.fori_loop(0, n_blocks, body, jnp.zeros((B, K, N // K, S), jnp.float32))
    return mass.reshape(B, N, S)


def attention_with_probs(q, keys, values, mask, extra=None):
    """Attention of a few queries over a cache, returning float32 probabilities too.

    q [B, T, N, H]; keys/values [B, K, S, H]; mask bool broadcastable to [B, K, 1, T, S].
    `extra`, optional (k_self [B, T, K, H], v_self, self_mask [T, T] or [B, 1, 1, T, T]): keys the
    queries also attend to (a suffix not written into the cache); the softmax is joint.
    Returns out [B, T, N, H] and probs over the cache part, float32 [B, K, G, T, S].
    """
    _check_cache_layout(q, keys, values)
    K = keys.shape[1]
    H = q.shape[-1]
    qg = _group(q, K) * jnp.asarray(H ** -0.5, q.dtype)
    s = jnp.einsum("bkgth,bksh->bkgts", qg, keys, preferred_element_type=jnp.float32)
    s = jnp.where(mask, s, _NEG)
    if extra is not None:
        k_self, v_self, self_mask = extra
        ks = jnp.swapaxes(k_self, 1, 2)
        s2 = jnp.einsum("bkgth,bksh->bkgts", qg, ks, preferred_element_type=jnp.float32)
        s2 = jnp.where(self_mask, s2, _NEG)
        m = jnp.maximum(s.max(-1), s2.max(-1))[..., None]
        p, p2 = jnp.where(mask, jnp.exp(s - m), 0.0), jnp.where(self_mask, jnp.exp(s2 - m), 0.0)
        z = jnp.maximum(p.sum(-1) + p2.sum(-1), 1e-30)[..., None]
        p, p2 = p / z, p2 / z
        out = (jnp.einsum("bkgts,bksh->bkgth", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
               + jnp.einsum("bkgts,bksh->bkgth", p2.astype(values.dtype), jnp.swapaxes(v_self, 1, 2),
                            preferred_element_type=jnp.float32))
        return _ungroup(out).astype(q.dtype), p
    m = s.max(-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bkgts,bksh->bkgth", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    return _ungroup(out).astype(q.dtype), p


def cache_attention(q, keys, values, mask):
    """Attention of a few queries over a cache, without the probabilities (decoding, appending).

    q [B, T, N, H]; keys/values [B, K, S, H]; mask bool broadcastable to [B, K, 1, T, S]. Returns
    [B, T, N, H]: `attention_with_probs(q, keys, values, mask)[0]` up to float rounding.
    """
    _check_cache_layout(q, keys, values)
    B, T, N, H = q.shape
    if B * T == 1 and jax.default_backend() == "cpu":
        # XLA:CPU canonicalises a dot whose batch dim is 1 so that, inside the decode loop, it transposes
        # the whole key cache and copies the value cache (several times) every step. As multiply + reduce
        # the cache is read once, in place: about 100 -> 55 ms a token on SmolLM2-135M at 4K (2 CPU cores).
        # With B > 1 the dots read the cache in place and are faster than these reductions, so they stay.
        K = keys.shape[1]
        qg = (_group(q, K) * jnp.asarray(H ** -0.5, q.dtype)).astype(jnp.float32)
        s = (qg[:, :, :, :, None, :] * keys[:, :, None, None].astype(jnp.float32)).sum(-1)
        s = jnp.where(mask, s, _NEG)
        p = jnp.where(mask, jnp.exp(s - s.max(-1, keepdims=True)), 0.0)
        p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
        out = (p[..., None] * values[:, :, None, None].astype(jnp.float32)).sum(-2)
        return _ungroup(out).astype(q.dtype)
    return attention_with_probs(q, keys, values, mask)[0]


def dense_causal_attention(q, k, v, valid, block: int = 128):
    """Differentiable full causal attention for training: q [B, T, N, H], k/v [B, T, K, H],
    valid bool [B, T] (padding). Returns [B, T, N, H].

    Queries go in blocks of `block`; block i attends only to keys [0, end of block i), so the masked
    upper triangle is never computed (its probabilities are zero anyway): the same result as one
    [B, N, T, T] softmax with about half the work for T >> block (training at 1,024 tokens on a CPU ran
    1.9x faster with 128). Materialises at most [B, N, block, T]; use only for short sequences.
    """
    chex.assert_equal_shape([k, v])  # and attention_with_probs checks the rest
    chex.assert_shape(valid, q.shape[:2])
    T = q.shape[1]
    kk, vv = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    outs = []
    for start in range(0, T, block):
        end = min(start + block, T)
        causal = jnp.arange(end)[None, :] <= jnp.arange(start, end)[:, None]
        mask = causal[None, None, None] & valid[:, None, None, None, :end]
        out, _ = attention_with_probs(q[:, start:end], kk[:, :, :end], vv[:, :, :end], mask)
        outs.append(out)
    return jnp.concatenate(outs, axis=1)
