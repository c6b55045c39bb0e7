"""The scoring step as lkv_jax calls it: `pallas_kernels.suffix_attention` (attention of a short suffix
over the cache plus the per-KV-head attention mass), placed inside `jax.shard_map` over batch and KV
heads when a mesh is set (`jax.set_mesh`), since eviction is per KV head and needs no communication.
"""

from __future__ import annotations

import functools

import jax
from jax.sharding import PartitionSpec as P

from pallas_kernels.suffix_attention import suffix_attention
from pallas_kernels.suffix_attention.op import default_implementation


def kv_head_scores(q, q_pos, keys, values, key_pos, key_valid, score_mask, *, reduce: str = "mean",
                   implementation: str | None = None, interpret=False):
    """out [B, L, N, H] and scores float32 [B, K, S] (reduced over the suffix queries in score_mask and
    the G query heads of each KV head); see `pallas_kernels.suffix_attention` for the shapes.

    implementation: None = Pallas on GPU/TPU, the jnp reference on CPU; "xla"; "pallas".
    """
    impl = default_implementation() if implementation is None else implementation
    op = functools.partial(suffix_attention, reduce=reduce, implementation=impl, interpret=interpret)
    mesh = jax.sharding.get_abstract_mesh()
    if impl != "pallas" or mesh.empty or mesh.size == 1:
        return op(q, q_pos, keys, values, key_pos, key_valid, score_mask=score_mask)
    # a pallas_call cannot be partitioned by the compiler: run it per (batch, KV-head) shard.
    # Query heads split over "tensor" in contiguous blocks, which keeps each GQA group with its KV head.
    bq, bkv, bkv3, b2 = P("data", None, "tensor", None), P("data", "tensor", None, None), P("data", "tensor", None), \
        P("data", None)
    sharded = jax.shard_map(lambda *a: op(*a[:6], score_mask=a[6]), mesh=mesh,
                            in_specs=(bq, b2, bkv, bkv, bkv3, bkv3, b2), out_specs=(bq, bkv3), check_vma=False)
    return sharded(q, q_pos, keys, values, key_pos, key_valid, score_mask)
