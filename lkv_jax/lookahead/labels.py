"""Ground-truth importance labels: where the model's own response attends in the prompt.

For a prompt and the frozen model's greedy response, the label of layer l, query head n and prompt
position j is the mean over the response tokens' queries (on `[prompt; response]`, causal) of their
attention probability on key j, renormalised to sum 1 over the prompt's positions. It is computed as
one prefill of the prompt plus one glimpse of the response (no [T+R]^2 attention matrix).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkv_jax.cache import KVCache
from lkv_jax.decoding import greedy_generate
from lkv_jax.inference import DEFAULT_CHUNK, glimpse_pure, prefill_pure, prepare_prompt
from lkv_jax.lookahead.scoring import normalise
from lkv_jax.padding import pad_left, pad_right, trim_at_eos


def labels_from_cache(model, cache: KVCache, prompt_valid, response_ids, response_mask):
    """Labels from an already prefilled prompt cache (training computes them this way on the fly).

    cache: the prompt's cache with capacity exactly the prompt's T slots; prompt_valid bool [B, T];
    response_ids int [B, R] right-padded, response_mask bool [B, R] marks real response tokens.
    Returns float32 [B, n_layers, N, T], each row summing to 1 over the valid prompt slots.
    """
    x = model.embed_tokens(response_ids)
    g = glimpse_pure(model, cache, x, score_mask=response_mask, logits=False)
    return jnp.stack([normalise(s, prompt_valid[:, None, :]) for s in g.scores], axis=1)


def response_labels_pure(model, prompt_ids, valid, positions, response_ids, response_mask, *, chunk: int):
    """Prefill the left-padded prompt [B, T] and return `labels_from_cache` (float32 [B, n_layers, N, T])."""
    cache, _ = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=prompt_ids.shape[1])
    return labels_from_cache(model, cache, valid, response_ids, response_mask)


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _labels_jit(graphdef, params, ids, valid, positions, response_ids, response_mask, *, chunk):
    return response_labels_pure(nnx.merge(graphdef, params), ids, valid, positions, response_ids, response_mask,
                                chunk=chunk)


def compute_labels(model, prompts, responses, *, chunk_size: int = DEFAULT_CHUNK, prompt_length: int | None = None,
                   response_length: int | None = None) -> list[np.ndarray]:
    """Labels for a batch: prompts and responses are lists of token-id lists (responses non-empty).

    prompt_length / response_length: pad to these (static shapes: fewer compilations across batches).
    Returns one float32 array [n_layers, N, len(prompt)] per sample.
    """
    if len(prompts) != len(responses) or not prompts:
        raise ValueError(f"need as many responses as prompts (>0), got {len(prompts)} and {len(responses)}")
    if any(len(r) == 0 for r in responses):
        raise ValueError("every response needs at least one token to define a label")
    ids, mask = pad_left(prompts, prompt_length)
    prompt = prepare_prompt(ids, mask, chunk_size, model.config.vocab_size)
    r_ids, r_mask = pad_right(responses, response_length)
    # real lengths: the padding (left of the prompt, right of the response) takes no position
    model.config.check_length(max(len(p) + len(r) for p, r in zip(prompts, responses, strict=True)))
    graphdef, params = nnx.split(model)
    lab = np.asarray(_labels_jit(graphdef, params, prompt.ids, prompt.valid, prompt.positions,
                                 jnp.asarray(r_ids), jnp.asarray(r_mask), chunk=prompt.chunk))
    Tp = prompt.ids.shape[1]
    return [lab[i, :, :, Tp - len(p):] for i, p in enumerate(prompts)]


def generate_responses(model, prompts, *, max_new_tokens: int = 512, eos_token_id=None,
                       chunk_size: int = DEFAULT_CHUNK, prompt_length: int | None = None) -> list[list[int]]:
    """The model's own greedy responses to a batch of prompts (token-id lists), EOS included if reached.
    prompt_length: left-pad the batch to this length (static shapes across batches)."""
    ids, mask = pad_left(prompts, prompt_length)
    eos = model.config.eos_token_id if eos_token_id is None else (
        (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
    out = greedy_generate(model, ids, max_new_tokens, attention_mask=mask, eos_token_id=eos or None,
                          chunk_size=chunk_size)
    return [trim_at_eos(row, eos) for row in out]
