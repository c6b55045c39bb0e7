"""TOVA (Oren et al., "Transformers are Multi-State RNNs", 2024).

kvpress `TOVAPress()`: the last prompt token's attention probabilities, averaged over ALL query heads
(not per KV head) and shared by every KV head; the last token itself is always kept. Computed as a
one-token window glimpse. Prompts need at least two tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

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
