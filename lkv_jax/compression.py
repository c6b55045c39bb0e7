"""`lkv_jax.compress`: prefill a prompt batch and evict its KV cache with a press."""

from __future__ import annotations

import numpy as np

from lkv_jax.inference import DEFAULT_CHUNK, prepare_prompt
from lkv_jax.models.transformer import Transformer
from lkv_jax.presses.base import BasePress, CompressOutput


def compress(model: Transformer, input_ids, press: BasePress, *, attention_mask=None,
             chunk_size: int = DEFAULT_CHUNK) -> CompressOutput:
    """Prefill `input_ids` (int [B, T], left-padded per `attention_mask`) and evict with `press`.

    Returns a `CompressOutput`: the compressed cache (ready to decode from after `.grow(n)`),
    `kept_positions` per layer (int [B, K, n_kept], original positions, ascending), the scores and
    the last prompt token's logits.
    """
    if not isinstance(press, BasePress):
        raise TypeError(f"press must be a lkv_jax press, got {type(press).__name__}")
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    model.config.check_length(int(np.asarray(prompt.valid).sum(1).max()) + press.suffix_slots)
    return press.compress(model, prompt)
