"""Pallas threshold-select: per row of int32 order keys, the cut (t_key, t_idx) such that the row's
top-n elements (ties broken by lowest index, like `lax.top_k`) are exactly those with
key > t_key, or key == t_key and index <= t_idx.

Both cuts are found by bisection, bit by bit from the most significant one, with only compares and
row sums (no sort, no scatter): 32 count passes for t_key (the n-th largest key), then log2(S) for
t_idx (the index of the last tie that still fits). Each pass is a compare + sum over the row.

- "tpu": grid (2, R / 8): blocks of 8 rows x the whole padded row in VMEM (last two block dims
  (8, S) with S a multiple of 128), the two counts (n_kept, keep_count) on the leading grid axis.
- "gpu": grid (2, R), one program per row, each count pass a fori_loop over 1024-key chunks
  (Triton). Both drivers pass their lowering (Triton / Mosaic TPU) on CPU via cross-platform lowering;
  device compile and speed are unverified: no GPU or TPU was available.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

INT_MIN = -(2 ** 31)
GPU_CHUNK = 1024


def order_keys(x):
    """float32 -> int32 with the same order under signed integer comparison (-0.0 sorts below +0.0)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


def _bisect(count_ge, count_gt, count_tie_below, n, n_idx_bits: int):
    """The cut of the top-n: t = largest key with count(key >= t) >= n, then j = index of the
    (n - count(key > t))-th element equal to t. count_* map [rows, 1] int32 thresholds to counts."""
    one = jnp.int32(1)
    # sign bit first: in the offset order it is the top bit, in int32 the flip INT_MIN -> 0
    t = jnp.full(n.shape, INT_MIN, jnp.int32)
    t = jnp.where(count_ge(jnp.zeros_like(t)) >= n, jnp.zeros_like(t), t)

    def key_bit(i, t):
        cand = t | jax.lax.shift_left(one, 30 - i)
        return jnp.where(count_ge(cand) >= n, cand, t)

    t = jax.lax.fori_loop(0, 31, key_bit, t)
    need = n - count_gt(t)

    def idx_bit(i, j):
        cand = j | jax.lax.shift_left(one, n_idx_bits - 1 - i)
        return jnp.where(count_tie_below(t, cand) < need, cand, j)

    j = jax.lax.fori_loop(0, n_idx_bits, idx_bit, jnp.zeros(n.shape, jnp.int32))
    return t, j


def _tpu_kernel(key_ref, n_ref, t_ref, j_ref, *, n_idx_bits):
    key = key_ref[...]  # [8, Sp]
    idx = jax.lax.broadcasted_iota(jnp.int32, key.shape, 1)
    rsum = lambda m: jnp.sum(m.astype(jnp.int32), axis=1, keepdims=True)
    t, j = _bisect(lambda c: rsum(key >= c), lambda c: rsum(key > c),
                   lambda t, c: rsum((key == t) & (idx < c)), n_ref[...], n_idx_bits)
    t_ref[...] = t
    j_ref[...] = j


def _gpu_kernel(key_ref, n_ref, t_ref, j_ref, *, n_idx_bits, n_chunks):
    def rsum(pred):
        def body(i, acc):
            sl = pl.ds(i * GPU_CHUNK, GPU_CHUNK)
            idx = i * GPU_CHUNK + jnp.arange(GPU_CHUNK, dtype=jnp.int32)
            return acc + jnp.sum(pred(key_ref[sl][None, :], idx[None, :]).astype(jnp.int32), axis=1, keepdims=True)
        return jax.lax.fori_loop(0, n_chunks, body, jnp.zeros((1, 1), jnp.int32))

    t, j = _bisect(lambda c: rsum(lambda k, _: k >= c), lambda c: rsum(lambda k, _: k > c),
                   lambda t, c: rsum(lambda k, i: (k == t) & (i < c)), n_ref[...][:, None], n_idx_bits)
    t_ref[...] = t.reshape(1)  # Triton: reshape, not slicing, of values
    j_ref[...] = j.reshape(1)


def topn_cuts(keys, counts, *, target: str = "tpu", interpret=False):
    """keys int32 [R, S] (order keys); counts int32 [C, R] (C cut sizes per row, each <= S).
    Returns t_key, t_idx int32 [C, R]: the cut of each row's top-counts[c, r] elements."""
    R, S = keys.shape
    C = counts.shape[0]
    if target == "tpu":
        Sp, Rp = -(-S // 128) * 128, -(-R // 8) * 8
    else:
        Sp, Rp = -(-S // GPU_CHUNK) * GPU_CHUNK, R
    keys = jnp.pad(keys, ((0, Rp - R), (0, Sp - S)), constant_values=INT_MIN)  # pads: below every real key
    counts = jnp.pad(counts.astype(jnp.int32), ((0, 0), (0, Rp - R)), constant_values=1)
    n_idx_bits = max(1, (Sp - 1).bit_length())
    out_shape = [jax.ShapeDtypeStruct((C, Rp, 1) if target == "tpu" else (C, Rp), jnp.int32)] * 2
    if target == "tpu":
        cut_spec = pl.BlockSpec((None, 8, 1), lambda c, i: (c, i, 0))
        t, j = pl.pallas_call(
            functools.partial(_tpu_kernel, n_idx_bits=n_idx_bits), grid=(C, Rp // 8),
            in_specs=[pl.BlockSpec((8, Sp), lambda c, i: (i, 0)), cut_spec], out_specs=[cut_spec, cut_spec],
            out_shape=out_shape, interpret=interpret, name="topn_cuts",
            # a whole row block lives in VMEM (double-buffered, plus compare temporaries): 4 MiB at S = 128K
            compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel"),
                                                 vmem_limit_bytes=min(64 << 20, max(32 << 20, 8 * 8 * Sp * 4))),
        )(keys, counts[:, :, None])
        return t[:, :R, 0], j[:, :R, 0]
    cut_spec = pl.BlockSpec((None, 1), lambda c, r: (c, r))
    t, j = pl.pallas_call(
        functools.partial(_gpu_kernel, n_idx_bits=n_idx_bits, n_chunks=Sp // GPU_CHUNK), grid=(C, Rp),
        in_specs=[pl.BlockSpec((None, Sp), lambda c, r: (r, 0)), cut_spec], out_specs=[cut_spec, cut_spec],
        out_shape=out_shape, interpret=interpret, name="topn_cuts",
        compiler_params=pltriton.CompilerParams(num_warps=4, num_stages=1),
    )(keys, counts)
    return t, j
