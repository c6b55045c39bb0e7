"""The observation-window glimpse shared by the query-aware presses (SnapKV, PyramidKV, TOVA, SpecKV, LAQ),
and the SnapKV-style score pooling.

A window press prefills the prompt MINUS its last `window` slots, then runs the window (optionally
followed by a scoring suffix: draft tokens) through `glimpse_pure(..., append=True)`, so the window's
keys and values land in the cache at their own slots and its queries' attention comes out of the
glimpse. Prompts are left-padded, so the window is the last `window` slots of every row; each row
must hold MORE than `window` real tokens (kvpress asserts the same), otherwise it is an error.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from lkv_jax.inference import Prompt, glimpse_pure, prefill_pure

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


def prefill_with_window(model, ids, valid, positions, *, chunk: int, window: int, suffix=None, suffix_valid=None,
                        extra_capacity: int = 0, prefix=None, reduce: str | None = "mean", score_heads: str = "query",
                        implementation: str | None = None, interpret=False):
    """Prefill all but the last `window` slots, then glimpse the window (and `suffix`) appended to the cache.

    ids/valid/positions [B, T] (left padded, T a multiple of chunk). suffix: optional int [B, L] tokens
    placed after the prompt (they need `extra_capacity >= L` slots); suffix_valid bool [B, L] says which
    suffix queries the scores reduce over (the window's always count). Returns (cache, logits, scores):
    the cache holds the full prompt (and the suffix at slots [T, T + L)), logits float32 [B, V] are the
    last prompt token's, scores per layer float32 [B, N, S] (or [B, N, w + L, S] with reduce=None), or
    [B, K, S] from the score-and-evict op with score_heads="kv" (see `glimpse_pure`).
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
    g = glimpse_pure(model, cache, model.embed_tokens(tokens), score_mask=score_mask, reduce=reduce, append=True,
                     logits=False, score_heads=score_heads, implementation=implementation, interpret=interpret)
    logits = model.logits(g.hidden[:, w - 1:w])[:, 0]
    return g.cache, logits, g.scores


def pool_scores(scores, keep_mask, kernel_size: int, pooling: str):
    """SnapKV's 1-D pooling along the slot axis, zero-padded at both ends (torch avg_pool1d / max_pool1d
    with padding kernel_size // 2, stride 1; scores are non-negative so zero padding equals -inf for max).

    scores float32 [..., S]; keep_mask bool broadcastable to it: slots outside it (padding, the window,
    a suffix) count as zeros, as the window is cut off before pooling in kvpress.
    """
    s = jnp.where(keep_mask, scores, 0.0)
    if kernel_size == 1:
        return s
    dims = (1,) * (s.ndim - 1) + (kernel_size,)
    pad = ((0, 0),) * (s.ndim - 1) + ((kernel_size // 2, kernel_size // 2),)
    if pooling == "avg":
        return jax.lax.reduce_window(s, 0.0, jax.lax.add, dims, (1,) * s.ndim, pad) / kernel_size
    return jax.lax.reduce_window(s, 0.0, jax.lax.max, dims, (1,) * s.ndim, pad)


def reduce_group(scores, n_kv_heads: int, reduction: str = "mean"):
    """float32 [B, N, S] -> [B, K, S]: mean (kvpress) or max over each KV head's query heads."""
    B, N, S = scores.shape
    g = scores.reshape(B, n_kv_heads, N // n_kv_heads, S)
    return g.mean(2) if reduction == "mean" else g.max(2)
