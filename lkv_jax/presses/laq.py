"""LAQ, Lookahead Q-Cache (Wang et al., "Lookahead Q-Cache: Achieving More Consistent KV Cache Eviction
via Pseudo Query", 2025): pseudo response queries from the target itself replace the observation window.

`LAQPress(n_pseudo_tokens=8, window_size=32, kernel_size=7, pooling="max")`:
1. SnapKV-compress the prompt (the same window, kernel and pooling, the same budget);
2. greedily generate `n_pseudo_tokens` tokens with the target on that compressed cache (the first one
   from the prompt's own logits, so n - 1 decoding steps);
3. glimpse those tokens over the FULL prompt cache (not appended) and score every prompt key with the
   mean of their attention probabilities, pooled and averaged over the GQA group as SnapKV does;
4. re-select from the full cache. The prompt's last `window_size` tokens stay protected (our choice:
   the paper's LAQ uses the pseudo queries as the observation window; LAQ++ adds the local window).
Everything is one pure function of the model, so the press jits like SnapKV.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.eviction import Scored, evict, select
from lkv_jax.inference import append_pure, glimpse_pure
from lkv_jax.presses.base import register_press
from lkv_jax.presses.snapkv import SnapKVPress
from lkv_jax.presses.window import pool_before_window
from lkv_jax.suffix_scoring import reduce_gqa


def greedy_pseudo_tokens(model, cache, first_logits, n_tokens: int):
    """Greedy tokens from a cache with room for n_tokens - 1 more entries: int32 [B, n_tokens], the
    first one being argmax(first_logits)."""
    tok = jnp.argmax(first_logits, -1).astype(jnp.int32)
    out = [tok]
    for _ in range(n_tokens - 1):
        g = append_pure(model, cache, model.embed_tokens(tok[:, None]))
        cache = g.cache
        tok = jnp.argmax(g.logits[:, 0], -1).astype(jnp.int32)
        out.append(tok)
    return jnp.stack(out, axis=1)


@register_press
@dataclasses.dataclass(frozen=True)
class LAQPress(SnapKVPress):
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    n_pseudo_tokens: int = 8

    def __post_init__(self):
        if self.n_pseudo_tokens < 1:
            raise ValueError(f"n_pseudo_tokens must be >= 1, got {self.n_pseudo_tokens}")
        super().__post_init__()

    def pseudo_tokens(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        """(full prompt cache, last-token logits, window mask, pseudo tokens int32 [B, n])."""
        T = prompt_ids.shape[1]
        cache, logits, snap_scores, protected = self.window_scores(model, prompt_ids, valid, positions, chunk, prefix)
        # the SnapKV stage keeps the press's own count per row, at the capacity of a full-length row
        first = Scored(cache=cache, logits=logits, scores=snap_scores, protected=protected)
        budgets = (max(int(self.keep_count(T)), 1),) * cache.n_layers
        counts = self.keep_count(valid.sum(1)).astype(jnp.int32)
        small = evict(first, select(first, T, budgets, counts, self.selection)).cache
        tokens = greedy_pseudo_tokens(model, small.grow(self.n_pseudo_tokens - 1), logits, self.n_pseudo_tokens)
        return cache, logits, protected, tokens

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        K = model.config.num_key_value_heads
        cache, logits, protected, tokens = self.pseudo_tokens(model, prompt_ids, valid, positions, chunk, prefix)
        g = glimpse_pure(model, cache, model.embed_tokens(tokens), logits=False)
        scores = tuple(reduce_gqa(pool_before_window(s, valid, self.window_size, self.kernel_size, self.pooling), K)
                       for s in g.scores)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)
