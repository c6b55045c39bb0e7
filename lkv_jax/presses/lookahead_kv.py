"""LookaheadKV (Ahn et al., ICLR 2026): learned lookahead tokens with a selective LoRA glimpse at the
prompt's cache; their mean attention on each prompt position predicts what the response will attend to.

One prefill of the prompt (with `n_lookahead` spare slots), one glimpse of the lookahead embeddings with
the LoRA switched on for them only; their KV lands in the spare slots, which selection never keeps, so
the compressed cache is the plain base model's and decoding costs nothing extra.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax.numpy as jnp

from lkv_jax.inference import prefill_pure
from lkv_jax.lookahead.adapter import LookaheadAdapter
from lkv_jax.lookahead.scoring import lookahead_append
from lkv_jax.presses.base import BasePress, Scored, register_press
from lkv_jax.presses.window import check_pooling
from lkv_jax.suffix_scoring import pool_within


@register_press
@dataclasses.dataclass(frozen=True, kw_only=True)
class LookaheadKVPress(BasePress):
    """`LookaheadKVPress(adapter, compression_ratio=0.9)` or `LookaheadKVPress(adapter, budget=128)`.

    gqa_reduction: "mean" (as kvpress) or "max" over the query heads of a KV head.
    pooling: None (the paper's default as far as known), "avg" or "max" 1-D pooling of the scores over
    prompt positions with `kernel_size`, as SnapKV does.
    """

    adapter: LookaheadAdapter | None = None
    gqa_reduction: str = "mean"
    pooling: str | None = None
    kernel_size: int = 5

    array_fields: ClassVar[tuple[str, ...]] = ("adapter",)
    positional_fields: ClassVar[tuple[str, ...]] = ("adapter", "compression_ratio")

    def __post_init__(self):
        if not isinstance(self.adapter, LookaheadAdapter):
            raise ValueError("LookaheadKVPress needs an adapter: LookaheadKVPress(adapter, budget=...) with "
                             "lkv_jax.lookahead.load_adapter(path) or init_adapter(config, key); got "
                             f"{type(self.adapter).__name__}")
        super().__post_init__()
        if self.gqa_reduction not in ("mean", "max"):
            raise ValueError(f"gqa_reduction must be 'mean' or 'max', got {self.gqa_reduction!r}")
        if self.pooling is not None:
            check_pooling(int(self.kernel_size), self.pooling)

    @property
    def suffix_slots(self) -> int:
        return self.adapter.n_lookahead

    def check_prompt(self, model, prompt) -> None:
        """An adapter for another model is one AdapterMismatchError naming the tensor."""
        self.adapter.check_model(model.config)

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        adapter = self.adapter
        T = prompt_ids.shape[1]
        cache, logits = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, prefix=prefix,
                                     capacity=T + adapter.n_lookahead)
        kv = self._kv_scoring
        g = lookahead_append(model, cache, adapter, self.scoring(kv_heads=kv))
        # only prompt tokens compete: the padding and the lookahead's own slots count as zeros in the pooling
        masks = [v[:, :1] & (jnp.arange(v.shape[-1]) < T) for v in cache.valid]
        scores = self._reduce(model, g.scores, masks)
        protected = tuple(jnp.zeros(s.shape, bool) for s in scores)
        # decoding continues right after the prompt (the paper: the lookahead tokens are dropped), not after
        # the lookahead suffix the glimpse appended: otherwise every generated token sits n_lookahead
        # positions too far
        cache = dataclasses.replace(g.cache, next_position=cache.next_position)
        return Scored(cache=cache, logits=logits, scores=scores, protected=protected)

    def decoding_scores(self, model, cache, recent_ids, n_slots):
        # the lookahead suffix goes into the scratch slots past the cache's entries, its positions right
        # after the last token: the same glimpse as after a prompt, over whatever the cache holds now
        kv = self._kv_scoring
        g = lookahead_append(model, dataclasses.replace(cache, cursor=jnp.full_like(cache.cursor, n_slots)),
                             self.adapter, self.scoring(kv_heads=kv))
        masks = [v & (jnp.arange(v.shape[-1]) < n_slots) for v in cache.valid]
        scores = self._reduce(model, g.scores, masks)
        return scores, tuple(jnp.zeros(s.shape, bool) for s in scores)

    @property
    def _kv_scoring(self) -> bool:
        """The GQA mean commutes with no pooling and with average pooling, so then the score-and-evict op (Pallas
        on GPU/TPU) reduces over the group itself; max reductions / max pooling stay per query head."""
        return self.gqa_reduction == "mean" and self.pooling in (None, "avg")

    def _reduce(self, model, raw, masks) -> tuple:
        K = model.config.num_key_value_heads
        return tuple(pool_within(s, m, self.pooling, int(self.kernel_size), K, self.gqa_reduction)
                     for s, m in zip(raw, masks, strict=True))
