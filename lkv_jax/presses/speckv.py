"""SpecKV (Galim et al., "Draft-based Approximate Inference for LLMs", 2025): a small draft model
generates a surrogate response; the target scores the prompt with the draft tokens' queries.

`SpecKVPress(draft_model, n_draft_tokens=32, window_size=32, kernel_size=7, pooling="max",
reduction="max")`, following the reference code (furiosa-ai/draft-based-approx-llm, `compress_kv`):
the scoring queries are the last `window_size` prompt tokens followed by the draft tokens; each prompt
key scores the MAX of their softmax probabilities over those queries and the KV head's query heads,
then a kernel-7 max-pool; the window is kept. In our design this is one glimpse: prefill the prompt
minus its window, then glimpse [window; draft] appended to the cache (the draft's own slots sit after
the prompt and are never selected). Draft tokens after the draft's EOS do not score.

The draft must share the target's vocabulary (an error otherwise). The draft runs greedily through
`lkv_jax.generate` before compressing (`SpecKVPress.prepare`); the scoring that follows is one pure function
(`DraftScoring`, the draft tokens as array leaves). The number of draft
tokens is not fixed by the LookaheadKV paper; 32 is our choice (a config field).

`draft_model="self"` drafts with the compressed model itself: with `window_size=1, kernel_size=1,
reduction="mean"` the prompt is then scored by the attention of the model's own full-cache greedy answer,
the response-attention oracle that LookaheadKV learns to predict (a reference, not a practical press: the
answer is generated twice).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from lkv_jax.decoding import greedy_generate
from lkv_jax.presses.base import BasePress, Scored, register_press
from lkv_jax.presses.window import (
    REDUCTIONS,
    check_pooling,
    check_window_rows,
    pool_before_window,
    prefill_with_window,
)


def check_same_vocab(draft_model, model) -> None:
    """Raise unless the draft's token ids mean the target's (same vocabulary size, our only check)."""
    v_d, v_t = draft_model.config.vocab_size, model.config.vocab_size
    if v_d != v_t:
        raise ValueError(f"the draft model's vocabulary ({v_d} tokens) differs from the target's ({v_t}); "
                         "SpecKV needs a draft that shares the target's tokenizer")


def draft_tokens(draft_model, prompt, n_tokens: int):
    """Greedy draft continuation of a prepared prompt: (ids int32 [B, n_tokens], valid bool [B, n_tokens]);
    tokens after a row's first EOS (and the padding of rows that stopped early) are invalid."""
    toks = greedy_generate(draft_model, prompt.ids, n_tokens, attention_mask=prompt.valid, chunk_size=prompt.chunk)
    eos = np.asarray(draft_model.config.eos_token_id or (-1,))
    is_eos = np.isin(toks, eos)
    valid = (np.cumsum(is_eos, axis=1) - is_eos) == 0  # up to and including the first EOS
    pad = n_tokens - toks.shape[1]
    toks = np.pad(toks, ((0, 0), (0, pad)))
    valid = np.pad(valid, ((0, 0), (0, pad)))
    return jnp.asarray(toks, jnp.int32), jnp.asarray(valid)


@register_press
@dataclasses.dataclass(frozen=True)
class SpecKVPress(BasePress):
    draft_model: object = None
    n_draft_tokens: int = 32
    window_size: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    reduction: str = "max"

    def __post_init__(self):
        if not (_is_self(self.draft_model) or hasattr(self.draft_model, "config")):
            raise TypeError('SpecKVPress needs a draft model (a lkv_jax Transformer, or "self" for the '
                            "compressed model itself)")
        if self.n_draft_tokens < 1 or self.window_size < 1:
            raise ValueError("n_draft_tokens and window_size must be >= 1")
        check_pooling(self.kernel_size, self.pooling)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
        super().__post_init__()

    @property
    def n_protected(self) -> int:
        return self.window_size

    @property
    def suffix_slots(self) -> int:
        return self.n_draft_tokens

    @property
    def window(self) -> int:
        return self.window_size

    def check_prompt(self, model, prompt) -> None:
        check_same_vocab(model if _is_self(self.draft_model) else self.draft_model, model)
        check_window_rows(prompt, self.window_size, type(self).__name__)

    def prepare(self, model, prompt) -> DraftScoring:
        """The draft's tokens for this batch, in the jittable scoring."""
        ids, valid = draft_tokens(model if _is_self(self.draft_model) else self.draft_model, prompt,
                                  self.n_draft_tokens)
        # the draft has done its part: the scoring's static settings must not hold (and hash) a model
        return DraftScoring(dataclasses.replace(self, draft_model="self"), ids, valid)


def _is_self(draft_model) -> bool:
    return isinstance(draft_model, str) and draft_model == "self"


@register_press
@dataclasses.dataclass(frozen=True)
class DraftScoring:
    """The scoring half of SpecKV, given the draft tokens (int [B, L], bool [B, L] array leaves, so it jits
    like a press); `press` (static) holds the window, pooling and reduction settings."""

    press: SpecKVPress
    draft_ids: jax.Array
    draft_valid: jax.Array

    array_fields: ClassVar[tuple[str, ...]] = ("draft_ids", "draft_valid")

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        p = self.press
        B, T = prompt_ids.shape
        w = p.window_size
        K = model.config.num_key_value_heads
        L = self.draft_ids.shape[1]
        cache, logits, raw = prefill_with_window(model, prompt_ids, valid, positions, chunk=chunk, window=w,
                                                 prefix=prefix, suffix=self.draft_ids, suffix_valid=self.draft_valid,
                                                 extra_capacity=L, scoring=p.scoring(kv_heads=True, reduce=p.reduction))
        # decoding continues right after the prompt: the draft tokens only scored
        cache = dataclasses.replace(cache, next_position=positions[:, -1] + 1)
        S = T + L
        # the op reduces over draft queries and the GQA group at once (max of max, or mean of mean)
        scores = tuple(pool_before_window(s, valid, w, p.kernel_size, p.pooling) for s in raw)
        window = jnp.broadcast_to(((jnp.arange(S) >= T - w) & (jnp.arange(S) < T))[None, None], (B, K, S))
        return Scored(cache=cache, logits=logits, scores=scores, protected=(window,) * len(scores))
