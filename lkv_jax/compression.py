"""`lkv_jax.compress`: prefill a prompt batch and evict its KV cache with a press.

Comparing many presses on the same batch (the evaluation grid) need not prefill it once per press:
`shared_prefix` computes the batch's first slots once and `compress_prompt(..., prefix=)` starts every
press's prefill from them (ObservedAttention and ExpectedAttention, which observe every query, still
prefill in full).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from lkv_jax.inference import DEFAULT_CHUNK, Prompt, PromptPrefix, prepare_prompt, prompt_prefix_pure
from lkv_jax.models.transformer import Transformer
from lkv_jax.presses.base import BasePress, CompressOutput, accepts_prefix


def compress(model: Transformer, input_ids, press: BasePress, *, attention_mask=None,
             chunk_size: int = DEFAULT_CHUNK) -> CompressOutput:
    """Prefill `input_ids` (int [B, T], left-padded per `attention_mask`) and evict with `press`.

    Returns a `CompressOutput`: the compressed cache (ready to decode from after `.grow(n)`),
    `kept_positions` per layer (int [B, K, n_kept], original positions, ascending), the scores and
    the last prompt token's logits.
    """
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    return compress_prompt(model, prompt, press)


def compress_prompt(model: Transformer, prompt: Prompt, press: BasePress, *,
                    prefix: PromptPrefix | None = None) -> CompressOutput:
    """`compress` of a prepared prompt batch (`inference.prepare_prompt`), optionally starting from a
    `shared_prefix` of the same batch: the same result up to float rounding, without prefilling the
    prefix again."""
    if not isinstance(press, BasePress):
        raise TypeError(f"press must be a lkv_jax press, got {type(press).__name__}")
    model.config.check_length(int(np.asarray(prompt.valid).sum(1).max()) + press.suffix_slots)
    if prefix is not None:
        B, T = prompt.ids.shape
        if not accepts_prefix(press):
            raise TypeError(f"{type(press).__name__}.prefill_and_score takes no shared prefix")
        if prefix.keys[0].shape[0] != B or not 0 < prefix.length < T:
            raise ValueError(f"the prefix ({prefix.keys[0].shape[0]} rows, {prefix.length} slots) is not one of "
                             f"this {B} x {T} prompt batch")
    return press.compress(model, prompt, prefix)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "length"))
def _prefix_jit(graphdef, params, ids, valid, positions, *, chunk, length):
    return prompt_prefix_pure(nnx.merge(graphdef, params), ids, valid, positions, chunk=chunk, length=length)


def shared_prefix(model: Transformer, prompt: Prompt, tail: int) -> PromptPrefix:
    """The keys and values of every slot of a prepared batch but the last `tail` ([B, K, T - tail, H] per
    layer), for `compress_prompt(..., prefix=)`. Each press then prefills only the last `tail` slots; a
    window press whose window exceeds `tail` recomputes the overlap, correct but slower."""
    T = prompt.ids.shape[1]
    if not 0 < tail < T:
        raise ValueError(f"tail must lie in (0, {T}) for a {T}-slot prompt, got {tail}")
    graphdef, params = nnx.split(model)
    return _prefix_jit(graphdef, params, prompt.ids, prompt.valid, prompt.positions, chunk=prompt.chunk,
                       length=T - tail)
