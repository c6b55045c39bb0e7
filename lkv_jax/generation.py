"""`forward` and greedy `generate`, with or without a press that compresses the prompt's KV cache."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from lkv_jax.compression import compress
from lkv_jax.decoding import check_generation_length, generate_from_cache, greedy_generate
from lkv_jax.decoding_press import DecodingPress, decode_evicting
from lkv_jax.inference import DEFAULT_CHUNK, prefill
from lkv_jax.models.transformer import Transformer


def forward(model: Transformer, input_ids, attention_mask=None, *, chunk_size: int = DEFAULT_CHUNK) -> jax.Array:
    """Logits of every position: int [B, T] -> float32 [B, T, V].

    Padding (attention_mask 0, on the left) is masked out and real tokens are numbered from 0 in
    each row, so a padded row's logits equal the unpadded sequence's. Runs the chunked prefill.
    """
    _, logits = prefill(model, input_ids, attention_mask, chunk_size=chunk_size, all_logits=True)
    return logits


def generate(model: Transformer, input_ids, max_new_tokens: int, press=None, *, attention_mask=None,
             eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
             chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None,
             decoding_press: DecodingPress | None = None) -> np.ndarray:
    """Greedy decoding of a left-padded batch, from the full cache (press=None) or a compressed one.

    input_ids int [B, T]; returns the new tokens int [B, n] with n <= max_new_tokens: the loop stops
    when every row has produced an EOS, and rows that finished earlier are filled with the pad id
    (pad_token_id, else the first EOS id), as transformers' `generate` does. With a `mesh` (B divisible
    by its data axis) every step runs over it; the tokens come back to every process.
    decoding_press: also evict while decoding (`lkv_jax.decoding_press.DecodingPress`): the cache never
    holds more than its budget + interval entries; the prompt's cache (after `press`) must hold at most
    its budget.
    """
    if decoding_press is not None:
        suffix = decoding_press.scorer.suffix_slots  # a lookahead glimpse sits after the last token
        check_generation_length(model, input_ids, attention_mask, max_new_tokens + suffix)
        if press is None:
            cache, logits = prefill(model, input_ids, attention_mask, chunk_size=chunk_size, mesh=mesh)
        else:
            out = compress(model, input_ids, press, attention_mask=attention_mask, chunk_size=chunk_size, mesh=mesh)
            cache, logits = out.cache, out.logits
        return decode_evicting(model, cache, logits, max_new_tokens, decoding_press, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id, mesh=mesh)[0]
    if press is None:
        return greedy_generate(model, input_ids, max_new_tokens, attention_mask=attention_mask,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, chunk_size=chunk_size,
                               mesh=mesh)
    check_generation_length(model, input_ids, attention_mask, max_new_tokens)
    out = compress(model, input_ids, press, attention_mask=attention_mask, chunk_size=chunk_size, mesh=mesh)
    # the compressed cache is this call's own: grown for the n - 1 decoded tokens, decoded into in place
    return generate_from_cache(model, out.cache.grow(max_new_tokens - 1), out.logits, max_new_tokens,
                               eos_token_id=eos_token_id, pad_token_id=pad_token_id, donate_cache=True, mesh=mesh)
