"""Random eviction, the floor every method should beat. kvpress `RandomPress(seed=None)`.

Scores are uniform draws from `jax.random` keyed by `seed` (and the layer), so the press stays a pure
function: seed=None means seed 0 (kvpress would use torch's global generator instead).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from lkv_jax.inference import prefill_pure
from lkv_jax.presses.base import BasePress, Scored, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class RandomPress(BasePress):
    seed: int | None = None

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        T = prompt_ids.shape[1]
        cache, logits = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=T, prefix=prefix)
        key = jax.random.key(0 if self.seed is None else self.seed)
        shape = cache.valid[0].shape
        scores = tuple(jax.random.uniform(jax.random.fold_in(key, l), shape, jnp.float32)
                       for l in range(cache.n_layers))
        protected = tuple(jnp.zeros_like(v) for v in cache.valid)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)
