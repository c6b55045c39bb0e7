"""The lookahead glimpse: the adapter's L embeddings, LoRA on, attending to a prefilled prompt cache.

Its per-layer attention mass on the prompt is LookaheadKV's importance score (used by the press) and
its prediction of the response's attention (used by the training loss). Pure functions, jittable and
differentiable with respect to the adapter.
"""

from __future__ import annotations

import jax.numpy as jnp

from lkv_jax.cache import KVCache
from lkv_jax.inference import GlimpseOutput, KVHeadScores, QueryHeadScores, SuffixLora, append_pure, glimpse_pure
from lkv_jax.lookahead.adapter import LookaheadAdapter


def lookahead_suffix(model, adapter: LookaheadAdapter, batch: int) -> tuple[jnp.ndarray, SuffixLora]:
    """The lookahead suffix of a batch: embeddings [B, L, D] (the adapter's [L, D] broadcast) and the LoRA,
    on at every suffix position."""
    # every tensor's shape against the model (static: also under jit), before a mismatch surfaces as a
    # broadcasting error deep inside the glimpse
    adapter.check_model(model.config)
    L, D = adapter.embeddings.shape
    x = jnp.broadcast_to(adapter.embeddings.astype(model.dtype)[None], (batch, L, D))
    return x, SuffixLora(adapter.layers, jnp.ones((batch, L), bool), adapter.scale)


def lookahead_glimpse(model, cache: KVCache, adapter: LookaheadAdapter) -> GlimpseOutput:
    """Glimpse with the lookahead suffix, the cache left as it is (training): `scores[l]` is float32
    [B, N, S_l], the mean over the L lookahead queries of each query head's attention on every cache slot."""
    x, lora = lookahead_suffix(model, adapter, cache.next_position.shape[0])
    return glimpse_pure(model, cache, x, lora=lora, logits=False)


def lookahead_append(model, cache: KVCache, adapter: LookaheadAdapter,
                     scoring: QueryHeadScores | KVHeadScores) -> GlimpseOutput:
    """The lookahead suffix written into the cache's spare slots and scored as `scoring` says (the press:
    `KVHeadScores` averages over each KV head's group in the score-and-evict op)."""
    x, lora = lookahead_suffix(model, adapter, cache.next_position.shape[0])
    return append_pure(model, cache, x, scoring, lora=lora, logits=False)


def normalise(mass, valid):
    """Mass [..., S] restricted to `valid` [..., S] (broadcastable) and scaled to sum 1 over S."""
    m = jnp.where(valid, mass.astype(jnp.float32), 0.0)
    return m / jnp.maximum(m.sum(-1, keepdims=True), 1e-30)
