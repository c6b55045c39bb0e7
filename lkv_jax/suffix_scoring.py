"""Scores of cache entries as lkv_jax computes them: the scoring op (`pallas_kernels.suffix_attention`:
attention of a short suffix over the cache plus the per-KV-head attention mass), and the two reductions
presses and training apply to per-query-head scores: GQA reduction and 1-D pooling over slots.

Pallas calls cannot be partitioned by the compiler, so under a mesh (`jax.set_mesh`) they run inside
`jax.shard_map` over batch and KV heads (`on_kv_head_shards`): scoring and eviction are per KV head and
need no communication.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from pallas_kernels.suffix_attention import suffix_attention
from pallas_kernels.suffix_attention.op import default_implementation


def on_kv_head_shards(op, in_specs, out_specs):
    """`op` run per (batch, KV-head) shard of the current mesh (`jax.set_mesh`), or as is without one.
    Specs name the mesh axes "data" (batch) and "tensor" (KV heads)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return op
    return jax.shard_map(op, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def kv_head_scores(q, q_pos, keys, values, key_pos, key_valid, score_mask, *, reduce: str = "mean",
                   implementation: str | None = None, interpret=False):
    """out [B, L, N, H] and scores float32 [B, K, S] (reduced over the suffix queries in score_mask and
    the G query heads of each KV head); see `pallas_kernels.suffix_attention` for the shapes.

    implementation: None = Pallas on GPU/TPU, the jnp reference on CPU; "xla"; "pallas".
    """
    impl = default_implementation() if implementation is None else implementation
    op = functools.partial(suffix_attention, reduce=reduce, implementation=impl, interpret=interpret)
    if impl != "pallas":
        return op(q, q_pos, keys, values, key_pos, key_valid, score_mask=score_mask)
    # query heads split over "tensor" in contiguous blocks, which keeps each GQA group with its KV head
    bq, bkv, bkv3, b2 = P("data", None, "tensor", None), P("data", "tensor", None, None), P("data", "tensor", None), \
        P("data", None)
    sharded = on_kv_head_shards(lambda *a: op(*a[:6], score_mask=a[6]), (bq, b2, bkv, bkv, bkv3, bkv3, b2),
                                (bq, bkv3))
    return sharded(q, q_pos, keys, values, key_pos, key_valid, score_mask)


def reduce_gqa(scores, n_kv_heads: int, how: str = "mean"):
    """Per query head [B, N, S] -> per KV head [B, K, S] (query head n belongs to KV head n // G): the
    mean (kvpress) or max over each group."""
    B, N, S = scores.shape
    g = scores.reshape(B, n_kv_heads, N // n_kv_heads, S)
    if how == "mean":
        return g.mean(2)
    if how == "max":
        return g.max(2)
    raise ValueError(f"gqa_reduction must be 'mean' or 'max', got {how!r}")


def pool_within(scores, mask, pooling: str | None, kernel_size: int, n_kv_heads: int, how: str = "mean"):
    """Scores [B, N or K, S] zeroed outside `mask` [B, 1 or K, S] (the slots that compete), pooled over slots
    (`pool_scores`), and reduced per KV head (`reduce_gqa`) if they were per query head: float32 [B, K, S]."""
    m = jnp.repeat(mask, scores.shape[1] // mask.shape[1], axis=1)
    pooled = pool_scores(jnp.where(m, scores, 0.0), pooling, kernel_size)
    return pooled if pooled.shape[1] == n_kv_heads else reduce_gqa(pooled, n_kv_heads, how)


def pool_scores(scores, pooling: str | None, kernel_size: int):
    """SnapKV's 1-D pooling along the last (slot) axis, same length out (torch avg_pool1d / max_pool1d with
    padding kernel_size // 2, stride 1). pooling None returns the scores.

    "avg": zero padding counted in the average (torch's defaults, as kvpress); "max": padding never wins.
    Callers zero the slots that are not prompt tokens first (kvpress cuts the window off before pooling).
    """
    if pooling is None:
        return scores
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    pad = [(0, 0)] * (scores.ndim - 1) + [(kernel_size // 2, kernel_size // 2)]
    window = (1,) * (scores.ndim - 1) + (kernel_size,)
    strides = (1,) * scores.ndim
    if pooling == "avg":
        return jax.lax.reduce_window(scores, 0.0, jax.lax.add, window, strides, pad) / kernel_size
    if pooling == "max":
        return jax.lax.reduce_window(scores, -jnp.inf, jax.lax.max, window, strides, pad)
    raise ValueError(f"pooling must be None, 'avg' or 'max', got {pooling!r}")
