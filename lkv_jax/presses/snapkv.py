"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024).

kvpress `SnapKVPress(window_size=64, kernel_size=5)`: the last `window_size` prompt queries attend
(softmax over ALL keys, causal inside the window); their probabilities on the earlier keys are averaged
over the window, 1-D average-pooled (kernel_size), averaged over each KV head's query heads, and the
window itself is always kept (it counts inside the budget). `pooling="max"` and `SnapKVPress.paper()`
(window 32, kernel 7, max-pool) give the settings the LookaheadKV paper's baselines used.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from lkv_jax.inference import replay_pure
from lkv_jax.presses.base import BasePress, Scored, register_press
from lkv_jax.presses.window import check_pooling, check_window_rows, pool_before_window, prefill_with_window
from lkv_jax.suffix_scoring import pool_within, reduce_gqa


@register_press
@dataclasses.dataclass(frozen=True)
class SnapKVPress(BasePress):
    """Prompts must be longer than `window_size` tokens (an error otherwise, as kvpress asserts).

    window_outside=True keeps the window ON TOP of the budget (budget + window_size entries), the
    convention of some papers' tables; the default counts it inside, as kvpress does.
    """

    window_size: int = 64
    kernel_size: int = 5
    pooling: str = "avg"
    window_outside: bool = False

    def __post_init__(self):
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {self.window_size}")
        check_pooling(self.kernel_size, self.pooling)
        super().__post_init__()

    @classmethod
    def paper(cls, **kwargs) -> SnapKVPress:
        """The SnapKV baseline as the LookaheadKV paper ran it: window 32, kernel 7, max-pool."""
        return cls(**{"window_size": 32, "kernel_size": 7, "pooling": "max", **kwargs})

    @property
    def n_protected(self) -> int:
        return self.window_size

    @property
    def extra_kept(self) -> int:
        return self.window_size if self.window_outside else 0

    @property
    def window(self) -> int:
        return self.window_size

    def check_prompt(self, model, prompt) -> None:
        """Raise for prompt rows too short for the window."""
        check_window_rows(prompt, self.window_size, type(self).__name__)

    def window_scores(self, model, ids, valid, positions, chunk, prefix=None):
        """(cache, logits, per-layer float32 [B, K, S] scores, per-layer protected [B, K, S])."""
        T = ids.shape[1]
        w = self.window_size
        # average pooling is linear, so it commutes with the GQA mean: the score-and-evict op can reduce
        # over the group first. Max pooling cannot, and stays per query head.
        kv = self.pooling == "avg"
        cache, logits, raw = prefill_with_window(model, ids, valid, positions, chunk=chunk, window=w, prefix=prefix,
                                                 scoring=self.scoring(kv_heads=kv))
        K = model.config.num_key_value_heads
        pooled = (pool_before_window(s, valid, w, self.kernel_size, self.pooling) for s in raw)
        scores = tuple(p if kv else reduce_gqa(p, K) for p in pooled)
        window = jnp.broadcast_to((jnp.arange(T) >= T - w)[None, None], (ids.shape[0], K, T))
        return cache, logits, scores, (window,) * len(scores)

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        cache, logits, scores, protected = self.window_scores(model, prompt_ids, valid, positions, chunk, prefix)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)

    def decoding_scores(self, model, cache, recent_ids, n_slots):
        """The window is the last `window_size` generated tokens, re-run to recover their queries; the other
        entries are pooled in slot order (position order) as the prompt's are."""
        w = self.window_size
        first = cache.next_position[:, None] - w
        raw = replay_pure(model, cache, recent_ids[:, -w:], first + jnp.arange(w)[None],
                          self.scoring(kv_heads=self.pooling == "avg"))
        K = model.config.num_key_value_heads
        window = tuple(v & (p >= first[:, :, None]) for v, p in zip(cache.valid, cache.positions, strict=True))
        before = [v & ~win & (jnp.arange(v.shape[-1]) < n_slots) for v, win in zip(cache.valid, window, strict=True)]
        scores = tuple(pool_within(s, m, self.pooling, self.kernel_size, K) for s, m in zip(raw, before, strict=True))
        return scores, window
