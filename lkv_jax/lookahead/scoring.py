"""The lookahead glimpse: the adapter's L embeddings, LoRA on, attending to a prefilled prompt cache.

Its per-layer attention mass on the prompt is LookaheadKV's importance score (used by the press) and
its prediction of the response's attention (used by the training loss). Pure functions, jittable and
differentiable with respect to the adapter.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lkv_jax.cache import KVCache
from lkv_jax.inference import GlimpseOutput, glimpse_pure
from lkv_jax.lookahead.adapter import LookaheadAdapter


def lookahead_glimpse(model, cache: KVCache, adapter: LookaheadAdapter, *, append: bool = False,
                      score_heads: str = "query", implementation: str | None = None, interpret=False) -> GlimpseOutput:
    """Glimpse with the lookahead suffix: embeddings [L, D] broadcast to the cache's batch, LoRA on
    every suffix position. Returns the `GlimpseOutput`; `scores[l]` is float32 [B, N, S_l], the mean
    over the L lookahead queries of each query head's attention on every cache slot (score_heads="kv":
    [B, K, S_l], also averaged over each KV head's group, by the score-and-evict op; inference only).
    """
    # every tensor's shape against the model (static: also under jit), before a mismatch surfaces as a
    # broadcasting error deep inside the glimpse
    adapter.check_model(model.config)
    B = cache.next_position.shape[0]
    L, D = adapter.embeddings.shape
    x = jnp.broadcast_to(adapter.embeddings.astype(model.dtype)[None], (B, L, D))
    return glimpse_pure(model, cache, x, lora=adapter.layers, lora_scale=adapter.scale,
                        lora_mask=jnp.ones((B, L), bool), reduce="mean", append=append, logits=False,
                        score_heads=score_heads, implementation=implementation, interpret=interpret)


def reduce_gqa(scores, n_kv_heads: int, how: str = "mean"):
    """Per query head [B, N, S] -> per KV head [B, K, S] (query head n belongs to KV head n // G)."""
    B, N, S = scores.shape
    g = scores.reshape(B, n_kv_heads, N // n_kv_heads, S)
    if how == "mean":
        return g.mean(2)
    if how == "max":
        return g.max(2)
    raise ValueError(f"gqa_reduction must be 'mean' or 'max', got {how!r}")


def pool_scores(scores, pooling: str | None, kernel_size: int):
    """SnapKV-style 1-D pooling along the last (slot) axis, same length out.

    "avg": zero padding counted in the average (torch avg_pool1d defaults, as kvpress); "max": padding
    never wins. Callers zero the slots that are not prompt tokens first.
    """
    if pooling is None:
        return scores
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    pad = [(0, 0)] * (scores.ndim - 1) + [(kernel_size // 2, kernel_size // 2)]
    window = (1,) * (scores.ndim - 1) + (kernel_size,)
    strides = (1,) * scores.ndim
    if pooling == "avg":
        return jax.lax.reduce_window(scores, 0.0, jax.lax.add, window, strides, pad) / kernel_size
    if pooling == "max":
        return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, window, strides, pad)
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")


def normalise(mass, valid):
    """Mass [..., S] restricted to `valid` [..., S] (broadcastable) and scaled to sum 1 over S."""
    m = jnp.where(valid, mass.astype(jnp.float32), 0.0)
    return m / jnp.maximum(m.sum(-1, keepdims=True), 1e-30)
