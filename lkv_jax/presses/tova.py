"""TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024).

kvpress `TOVAPress()`: the last prompt token's attention probabilities, averaged over ALL query heads
(not per KV head) and shared by every KV head; the last token itself is always kept. Computed as a
one-token window glimpse. Prompts need at least two tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.inference import replay_pure
from lkv_jax.presses.base import BasePress, Scored, register_press
from lkv_jax.presses.window import check_window_rows, prefill_with_window


@register_press
@dataclasses.dataclass(frozen=True)
class TOVAPress(BasePress):
    @property
    def n_protected(self) -> int:
        return 1

    @property
    def window(self) -> int:
        return 1

    def check_prompt(self, model, prompt) -> None:
        """Raise for prompts of fewer than two tokens."""
        check_window_rows(prompt, 1, type(self).__name__)

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        B, T = prompt_ids.shape
        K = model.config.num_key_value_heads
        # per-KV-head means from the score-and-evict op; their mean is the mean over all query heads
        cache, logits, raw = prefill_with_window(model, prompt_ids, valid, positions, chunk=chunk, window=1,
                                                 prefix=prefix, scoring=self.scoring(kv_heads=True))
        scores = tuple(jnp.broadcast_to(s.mean(1, keepdims=True), (B, K, T)) for s in raw)
        last = jnp.broadcast_to((jnp.arange(T) == T - 1)[None, None], (B, K, T))
        return Scored(cache=cache, logits=logits, scores=scores, protected=(last,) * len(scores))

    def decoding_scores(self, model, cache, recent_ids, n_slots):
        """The last generated token re-run; a token's score is the mean over all query heads of its attention,
        shared by every KV head that holds it (after per-head eviction a slot may hold different tokens in
        different heads, so the mean is taken per position)."""
        last = cache.next_position - 1
        raw = replay_pure(model, cache, recent_ids[:, -1:], last[:, None], self.scoring(kv_heads=True))
        scores = tuple(mean_by_position(s, p, v, model.config.max_length)
                       for s, p, v in zip(raw, cache.positions, cache.valid, strict=True))
        protected = tuple(v & (p == last[:, None, None]) for v, p in zip(cache.valid, cache.positions, strict=True))
        return scores, protected


def mean_by_position(scores, positions, valid, n_positions: int):
    """Per KV head scores [B, K, S] -> the mean over the K heads of each position's score (a head that
    does not hold the position adds 0), at every slot holding it. positions int32 [B, K, S] < n_positions."""
    rows = jnp.arange(scores.shape[0])[:, None, None]
    idx = jnp.where(valid, positions, n_positions)  # empty slots add to a spare bin
    total = jnp.zeros((scores.shape[0], n_positions + 1), jnp.float32).at[rows, idx].add(jnp.where(valid, scores, 0.0))
    return total[rows, idx] / scores.shape[1]
