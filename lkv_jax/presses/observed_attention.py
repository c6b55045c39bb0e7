"""Observed attention, the H2O prefill rule (Zhang et al., "H2O: Heavy-Hitter Oracle", NeurIPS 2023).

kvpress `ObservedAttentionPress()`: the attention mass each key receives from ALL prompt queries,
divided by the number of queries that can see it (n - j for the key at position j of an n-token
prompt), averaged over each KV head's query heads. kvpress needs eager attention to get the full
attention matrix; here the mass is accumulated DURING the chunked prefill by a second pass over each
chunk's key blocks with the final softmax statistics (`blockwise_attention_mass`), so memory stays
O(chunk * block). `output_attentions` is kept for kvpress compatibility and does nothing here.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.attention import blockwise_attention_mass
from lkv_jax.inference import PrefillObserver, prefill_pure
from lkv_jax.presses.base import BasePress, Scored, register_press
from lkv_jax.suffix_scoring import reduce_gqa


class AttentionMassObserver(PrefillObserver):
    """Per layer float32 [B, N, S]: summed attention probability each slot gets from the valid queries."""

    def init(self, model, batch, capacity):
        return jnp.zeros((batch, model.config.num_attention_heads, capacity), jnp.float32)

    def update(self, layer, state, chunk):
        return state + blockwise_attention_mass(chunk.q, chunk.keys, chunk.key_valid, chunk.q_start, chunk.block,
                                                chunk.stats, chunk.valid.astype(jnp.float32))


@register_press
@dataclasses.dataclass(frozen=True)
class ObservedAttentionPress(BasePress):
    output_attentions: bool = False

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        # observers need every query's attention: a shared prefix is ignored, the prompt prefilled in full
        T = prompt_ids.shape[1]
        cache, logits, mass = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=T,
                                           observe=AttentionMassObserver())
        n = valid.sum(1)  # [B] real tokens per row
        seen_by = jnp.where(valid, n[:, None] - positions, 1).astype(jnp.float32)  # queries that see each key
        K = model.config.num_key_value_heads
        scores = tuple(reduce_gqa(m / seen_by[:, None, :], K) for m in mass)
        protected = tuple(jnp.zeros_like(v) for v in cache.valid)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)
