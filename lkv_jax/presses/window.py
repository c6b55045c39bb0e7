"""The observation-window glimpse shared by the query-aware presses (SnapKV, PyramidKV, TOVA, SpecKV, LAQ),
and the SnapKV-style pooling of its scores.

A window press prefills the prompt MINUS its last `window` slots, then runs the window (optionally
followed by a scoring suffix: draft tokens) through `append_pure`, so the window's
keys and values land in the cache at their own slots and its queries' attention comes out of the
glimpse. Prompts are left-padded, so the window is the last `window` slots of every row; each row
must hold MORE than `window` real tokens (kvpress asserts the same), otherwise it is an error.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lkv_jax.inference import KVHeadScores, Prompt, QueryHeadScores, append_pure, prefill_pure
from lkv_jax.suffix_scoring import pool_scores

POOLINGS = ("avg", "max")
REDUCTIONS = ("mean", "max")


def check_window_rows(prompt: Prompt, window: int, press_name: str) -> None:
    """Raise unless every row of the prompt batch has more than `window` real tokens."""
    n = np.asarray(prompt.valid).sum(1)
    if (n <= window).any():
        raise ValueError(f"{press_name} needs prompts longer than its window ({window} tokens); the shortest "
                         f"row has {int(n.min())}. Use a smaller window_size or skip compression for it")


def check_pooling(kernel_size: int, pooling: str) -> None:
    """Raise unless the pooling is "avg" or "max" with a positive odd kernel (torch's padding k // 2
    keeps the length only for odd kernels)."""
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


def prefill_with_window(model, ids, valid, positions, *, chunk: int, window: int,
                        scoring: QueryHeadScores | KVHeadScores, suffix=None, suffix_valid=None,
                        extra_capacity: int = 0, prefix=None):
    """Prefill all but the last `window` slots, then glimpse the window (and `suffix`) appended to the cache.

    ids/valid/positions [B, T] (left padded, T a multiple of chunk). suffix: optional int [B, L] tokens
    placed after the prompt (they need `extra_capacity >= L` slots); suffix_valid bool [B, L] says which
    suffix queries the scores reduce over (the window's always count). Returns (cache, logits, scores):
    the cache holds the full prompt (and the suffix at slots [T, T + L)), logits float32 [B, V] are the
    last prompt token's, scores per layer as `scoring` says (`inference.QueryHeadScores` [B, N, S],
    `inference.KVHeadScores` [B, K, S]).
    """
    B, T = ids.shape
    w = window
    head_valid = valid & (jnp.arange(T) < T - w)[None, :]
    cache, _ = prefill_pure(model, ids, head_valid, positions, chunk=chunk, capacity=T + extra_capacity,
                            prefix=prefix)
    # the window's slots were computed as padding; the glimpse overwrites them at their true positions
    cache = dataclasses.replace(cache, cursor=jnp.full_like(cache.cursor, T - w), next_position=positions[:, T - w])
    tokens = ids[:, T - w:]
    score_mask = None
    if suffix is not None:
        L = suffix.shape[1]
        tokens = jnp.concatenate([tokens, suffix.astype(tokens.dtype)], axis=1)
        sv = jnp.ones((B, L), bool) if suffix_valid is None else suffix_valid
        score_mask = jnp.concatenate([jnp.ones((B, w), bool), sv], axis=1)
    g = append_pure(model, cache, model.embed_tokens(tokens), scoring, score_mask=score_mask, logits=False)
    logits = model.logits(g.hidden[:, w - 1:w])[:, 0]
    return g.cache, logits, g.scores


def pool_before_window(scores, valid, window: int, kernel_size: int, pooling: str):
    """SnapKV's pooling of scores [B, N or K, S] over the prompt's real slots before its last `window` (valid
    [B, T], T <= S): the other slots (padding, the window, a suffix) count as zeros, as kvpress cuts the
    window off before pooling; scores are non-negative, so zero padding and -inf padding agree for max."""
    B, T = valid.shape
    S = scores.shape[-1]
    before = jnp.pad(valid, ((0, 0), (0, S - T))) & (jnp.arange(S) < T - window)[None]
    return pool_scores(jnp.where(before[:, None, :], scores, 0.0), pooling, kernel_size)
