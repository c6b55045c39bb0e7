"""Key-norm eviction (Devoto et al., "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", 2024). kvpress `KnormPress()`: score = -||key||_2, so keys with the SMALLEST norm are kept."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.inference import prefill_pure
from lkv_jax.presses.base import BasePress, Scored, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class KnormPress(BasePress):
    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        T = prompt_ids.shape[1]
        cache, logits = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=T, prefix=prefix)
        scores = tuple(-jnp.linalg.norm(k.astype(jnp.float32), axis=-1) for k in cache.keys)
        protected = tuple(jnp.zeros_like(v) for v in cache.valid)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)

    def decoding_scores(self, model, cache, recent_ids, n_slots):
        scores = tuple(-jnp.linalg.norm(k.astype(jnp.float32), axis=-1) for k in cache.keys)
        return scores, tuple(jnp.zeros_like(v) for v in cache.valid)
