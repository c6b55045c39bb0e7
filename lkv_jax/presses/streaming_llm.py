"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024):
keep the first `n_sink` tokens and the most recent ones. kvpress: `StreamingLLMPress(n_sink=4)`."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.inference import prefill_pure
from lkv_jax.presses.base import BasePress, Scored, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class StreamingLLMPress(BasePress):
    n_sink: int = 4

    @property
    def n_protected(self) -> int:
        return self.n_sink

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        T = prompt_ids.shape[1]
        cache, logits = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=T, prefix=prefix)
        pos = cache.positions[0].astype(jnp.float32)  # [B, K, S], -1 where padding
        scores = tuple(pos for _ in range(cache.n_layers))  # later is better
        protected = tuple((p >= 0) & (p < self.n_sink) for p in cache.positions)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)

    def decoding_scores(self, model, cache, recent_ids, n_slots):
        scores = tuple(p.astype(jnp.float32) for p in cache.positions)
        return scores, tuple(v & (p < self.n_sink) for v, p in zip(cache.valid, cache.positions, strict=True))
