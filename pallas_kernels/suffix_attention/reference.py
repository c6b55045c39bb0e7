"""The spec of the suffix-attention op, in plain jnp: a short suffix of queries attends to a long
cache and reports, besides its attention output, how much attention mass each cached key received.

This dense version materialises the float32 probabilities [B, K, G, L, S]; it is what runs on CPU,
what the Pallas kernel is tested against, and (being plain jnp) what training differentiates.
"""

from __future__ import annotations

import jax.numpy as jnp

NEG = -1e30  # finite "minus infinity": rows that see no key give zeros, never NaN
REDUCES = ("mean", "max")


def visible(q_pos, key_pos, key_valid):
    """Which keys each query may see: bool [B, K, 1, L, S] from q_pos [B, L], key_pos/key_valid [B, K, S].

    A key is visible iff it is valid and its original position is <= the query's position: causality
    inside a suffix already written into the cache, and caches with non-contiguous (evicted) positions.
    """
    return key_valid[:, :, None, None, :] & (key_pos[:, :, None, None, :] <= q_pos[:, None, None, :, None])


def score_weights(score_mask, n_groups: int, reduce: str):
    """Per-query weight of the score reduction, float32 [B, L]: for "mean" each counted query gets
    1 / (G * n_counted) (so summing weight * probability over G heads and L queries is the mean);
    for "max" counted queries get 1 and the others 0 (a 0/1 mask applied before the max)."""
    w = score_mask.astype(jnp.float32)
    if reduce == "mean":
        return w / (n_groups * jnp.maximum(w.sum(-1, keepdims=True), 1.0))
    return w


def suffix_attention_reference(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce: str = "mean"):
    """Dense reference of `pallas_kernels.suffix_attention.suffix_attention` (see there for the contract).

    q [B, L, N, H]; q_pos int32 [B, L]; keys/values [B, K, S, H]; key_pos int32 [B, K, S];
    key_valid bool [B, K, S]; score_mask bool [B, L]. Returns out [B, L, N, H] (q.dtype) and scores
    float32 [B, K, S].
    """
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    B, L, N, H = q.shape
    K = keys.shape[1]
    G = N // K
    qg = q.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, L, H]
    s = jnp.einsum("bkglh,bksh->bkgls", qg, keys, preferred_element_type=jnp.float32) * (H ** -0.5)
    mask = visible(q_pos, key_pos, key_valid)
    s = jnp.where(mask, s, NEG)
    m = s.max(-1, keepdims=True)
    p = jnp.where(mask, jnp.exp(s - m), 0.0)
    p = p / jnp.maximum(p.sum(-1, keepdims=True), 1e-30)
    out = jnp.einsum("bkgls,bksh->bkglh", p.astype(values.dtype), values, preferred_element_type=jnp.float32)
    out = out.transpose(0, 3, 1, 2, 4).reshape(B, L, N, H).astype(q.dtype)
    w = score_weights(score_mask, G, reduce)[:, None, None, :, None]
    scores = (p * w).sum((2, 3)) if reduce == "mean" else (p * w).max((2, 3))
    return out, scores

