"""Pallas kernels of the suffix-attention op: the output of a short query suffix over a long cache and
the per-key attention mass, in two passes over S blocks, never materialising [B, N, L, S].

Layout. The G query heads of a KV group and the L suffix queries form the M = G * L rows of one
matmul per KV head (row r = g * L + l): [M, H] @ [H, block_s] feeds the MXU / tensor cores even for
short suffixes. Pass 1 computes each row's float32 softmax statistics (running max m and sum l);
pass 2 recomputes the logits, normalises them with the final statistics, accumulates the output and
reduces the probabilities of each key over the rows (mean or max). Keys are read twice, values once.

Masks are folded into two int32 vectors: a key's position (INT_MAX when invalid) must be <= the
row's query position (INT_MIN for padding rows). The kernels cover whole blocks read in place from
the unpadded cache (never a padded copy); the last S % block_s keys (GPU: the keys after the last
whole chunk of blocks) are merged in jnp with the same statistics. Two drivers share the block math:

- "tpu": grid (B, K, S / block_s), S innermost and sequential ("arbitrary"), accumulators live in the
  resident output blocks; block shapes obey Mosaic TPU's rule (last two dims multiples of (8, 128) or
  the full dims). Runs on CPU with interpret=True or interpret=pltpu.InterpretParams().
- "gpu": grid (B, K, M / 128, n_split) of independent programs (row blocks of at most 128 rows, so
  the float32 accumulator fits in registers; a flash-decoding style split over S, so a batch of 1
  with 8 KV heads still fills an H100/H200), each looping over its chunk with fori_loop; partial
  statistics, outputs and scores are combined in jnp. Lowered through Triton (`compiler_params=
  pallas.triton.CompilerParams`): power-of-two loads and stores, no bool refs, no slicing of values.
  It runs on CPU with interpret=True.

Both lower on CPU through cross-platform lowering (the Triton and Mosaic TPU lowerings, with their
block-shape checks, see the tests); the device compile (ptxas / libtpu) and speed are unverified
here: no GPU or TPU was available.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as pltriton

from pallas_kernels.suffix_attention.reference import NEG, REDUCES, score_weights

TARGETS = ("tpu", "gpu")
INT_MAX = 2 ** 31 - 1
INT_MIN = -(2 ** 31)
DEFAULT_BLOCK_S = {"tpu": 1024, "gpu": 64}
GPU_PROGRAMS = 264  # about two waves of programs on a 132-SM H100/H200
GPU_BLOCK_M = 128  # query rows per GPU program


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(int(x) - 1, 0).bit_length()


# ----------------------------------------------------------------------------------------------
# per-block math shared by both drivers (2-D values: rows [Mp, .], keys [., bs])


def _logits(q, kb, kp_row, rp_col, scale):
    """q [Mp, Hp], kb [bs, Hp], kp_row int32 [1, bs], rp_col int32 [Mp, 1] -> masked f32 logits, mask."""
    s = jax.lax.dot_general(q, kb, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
    mask = kp_row <= rp_col
    return jnp.where(mask, s, NEG), mask


def _stats_update(s, mask, m, l):
    """Online softmax statistics: m, l [Mp, 1] float32 updated with one block of logits."""
    m_new = jnp.maximum(m, s.max(axis=1, keepdims=True))
    p = jnp.where(mask, jnp.exp(s - m_new), 0.0)
    return m_new, l * jnp.exp(m - m_new) + p.sum(axis=1, keepdims=True)


def _probs(s, mask, m, inv_l, w_col, reduce, keepdims):
    """Final probabilities [Mp, bs] and the block's key scores ([1, bs] with keepdims, else [bs]):
    the weighted sum or the max over rows."""
    p = jnp.where(mask, jnp.exp(s - m), 0.0) * inv_l
    pw = p * w_col
    sc = pw.sum(axis=0, keepdims=keepdims) if reduce == "mean" else pw.max(axis=0, keepdims=keepdims)
    return p, sc


# ----------------------------------------------------------------------------------------------
# TPU driver: one S block per grid step, accumulate in the resident output blocks


def _tpu_stats_kernel(q_ref, k_ref, kp_ref, rp_ref, m_ref, l_ref, *, scale):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, NEG, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)

    s, mask = _logits(q_ref[...], k_ref[...], kp_ref[...], rp_ref[...], scale)
    m, l = _stats_update(s, mask, m_ref[...], l_ref[...])
    m_ref[...] = m
    l_ref[...] = l


def _tpu_probs_kernel(q_ref, k_ref, v_ref, kp_ref, rp_ref, w_ref, m_ref, il_ref, o_ref, sc_ref, *, scale, reduce):
    @pl.when(pl.program_id(2) == 0)
    def _init():
        o_ref[...] = jnp.zeros(o_ref.shape, jnp.float32)

    s, mask = _logits(q_ref[...], k_ref[...], kp_ref[...], rp_ref[...], scale)
    p, sc = _probs(s, mask, m_ref[...], il_ref[...], w_ref[...], reduce, keepdims=True)
    sc_ref[...] = sc
    v = v_ref[...]
    o_ref[...] += jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)


def _tpu_specs(Mp, Hp, block_s):
    return dict(
        q=pl.BlockSpec((None, None, Mp, Hp), lambda b, k, j: (b, k, 0, 0)),
        kv=pl.BlockSpec((None, None, block_s, Hp), lambda b, k, j: (b, k, j, 0)),
        kp=pl.BlockSpec((None, None, 1, block_s), lambda b, k, j: (b, k, 0, j)),
        row=pl.BlockSpec((None, Mp, 1), lambda b, k, j: (b, 0, 0)),
        stat=pl.BlockSpec((None, None, Mp, 1), lambda b, k, j: (b, k, 0, 0)))


_TPU_PARAMS = pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _tpu_stats(qg, keys, kp, rp, *, n_blocks, scale, block_s, interpret):
    """Pass 1 over the first n_blocks S blocks: (m, l) float32 [B, K, Mp]."""
    B, K, Mp, Hp = qg.shape
    sp = _tpu_specs(Mp, Hp, block_s)
    shape = jax.ShapeDtypeStruct((B, K, Mp, 1), jnp.float32)
    m, l = pl.pallas_call(
        functools.partial(_tpu_stats_kernel, scale=scale), grid=(B, K, n_blocks),
        in_specs=[sp["q"], sp["kv"], sp["kp"], sp["row"]], out_specs=[sp["stat"], sp["stat"]],
        out_shape=[shape, shape], compiler_params=_TPU_PARAMS, interpret=interpret,
        name="suffix_attention_stats")(qg, keys, kp[:, :, None, :], rp[:, :, None])
    return m[..., 0], l[..., 0]


def _tpu_probs(qg, keys, values, kp, rp, w, m, inv_l, *, n_blocks, scale, reduce, block_s, interpret):
    """Pass 2 over the first n_blocks S blocks: out float32 [B, K, Mp, Hp], scores [B, K, n_blocks * block_s]."""
    B, K, Mp, Hp = qg.shape
    sp = _tpu_specs(Mp, Hp, block_s)
    out, scores = pl.pallas_call(
        functools.partial(_tpu_probs_kernel, scale=scale, reduce=reduce), grid=(B, K, n_blocks),
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["kp"], sp["row"], sp["row"], sp["stat"], sp["stat"]],
        out_specs=[sp["q"], sp["kp"]],
        out_shape=[jax.ShapeDtypeStruct((B, K, Mp, Hp), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, 1, n_blocks * block_s), jnp.float32)],
        compiler_params=_TPU_PARAMS, interpret=interpret, name="suffix_attention_probs",
    )(qg, keys, values, kp[:, :, None, :], rp[:, :, None], w[:, :, None], m[..., None], inv_l[..., None])
    return out, scores[:, :, 0]


# ----------------------------------------------------------------------------------------------
# GPU driver: independent programs over (B, K, S chunk), a fori_loop over the chunk's blocks


def _gpu_stats_kernel(q_ref, k_ref, kp_ref, rp_ref, m_ref, l_ref, *, scale, block_s, n_inner):
    q = q_ref[...]
    rp = rp_ref[...][:, None]

    def body(i, carry):
        sl = pl.ds(i * block_s, block_s)
        s, mask = _logits(q, k_ref[sl, :], kp_ref[sl][None, :], rp, scale)
        return _stats_update(s, mask, *carry)

    Mp = q.shape[0]
    init = (jnp.full((Mp, 1), NEG, jnp.float32), jnp.zeros((Mp, 1), jnp.float32))
    m, l = jax.lax.fori_loop(0, n_inner, body, init)
    m_ref[...] = m.reshape(Mp)
    l_ref[...] = l.reshape(Mp)


def _gpu_probs_kernel(q_ref, k_ref, v_ref, kp_ref, rp_ref, w_ref, m_ref, il_ref, o_ref, sc_ref, *, scale, reduce,
                      block_s, n_inner):
    q = q_ref[...]
    rp = rp_ref[...][:, None]
    w = w_ref[...][:, None]
    m = m_ref[...][:, None]
    inv_l = il_ref[...][:, None]

    def body(i, acc):
        sl = pl.ds(i * block_s, block_s)
        s, mask = _logits(q, k_ref[sl, :], kp_ref[sl][None, :], rp, scale)
        p, sc = _probs(s, mask, m, inv_l, w, reduce, keepdims=False)  # Triton: no slicing of values
        sc_ref[sl] = sc
        v = v_ref[sl, :]
        return acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)

    o_ref[...] = jax.lax.fori_loop(0, n_inner, body, jnp.zeros(o_ref.shape, jnp.float32))


def gpu_split(n_blocks: int, programs: int) -> tuple[int, int]:
    """(n_split, n_inner) for n_blocks >= 1 whole S blocks: S chunks per (b, k, row block) and blocks per
    chunk, so that programs * n_split fills the GPU about twice; n_split * n_inner <= n_blocks, the
    chunk size chosen to leave the fewest blocks over (they go to the jnp tail)."""
    want = max(1, min(n_blocks, -(-GPU_PROGRAMS // programs)))
    base = -(-n_blocks // want)
    n_inner = min(range(base, 2 * base), key=lambda c: (n_blocks % c, c))
    return n_blocks // n_inner, n_inner


def _gpu_specs(bm, Hp, chunk):
    return dict(
        q=pl.BlockSpec((None, None, bm, Hp), lambda b, k, r, i: (b, k, r, 0)),
        kv=pl.BlockSpec((None, None, chunk, Hp), lambda b, k, r, i: (b, k, i, 0)),
        kp=pl.BlockSpec((None, None, chunk), lambda b, k, r, i: (b, k, i)),
        row=pl.BlockSpec((None, bm), lambda b, k, r, i: (b, r)),
        part=pl.BlockSpec((None, None, None, bm), lambda b, k, r, i: (b, k, i, r)),
        stat=pl.BlockSpec((None, None, bm), lambda b, k, r, i: (b, k, r)),
        out=pl.BlockSpec((None, None, None, bm, Hp), lambda b, k, r, i: (b, k, i, r, 0)),
        scores=pl.BlockSpec((None, None, None, chunk), lambda b, k, r, i: (b, k, r, i)))


def _gpu_params(bm, Hp):
    return pltriton.CompilerParams(num_warps=8 if bm * Hp >= 128 * 128 else 4, num_stages=2)


def _gpu_stats(qg, keys, kp, rp, *, n_split, n_inner, scale, block_s, interpret):
    """Pass 1 over the first n_split * n_inner S blocks: (m, l) float32 [B, K, Mp]."""
    B, K, Mp, Hp = qg.shape
    bm = min(Mp, GPU_BLOCK_M)  # rows per program: the [bm, Hp] float32 accumulator lives in registers
    sp = _gpu_specs(bm, Hp, n_inner * block_s)
    shape = jax.ShapeDtypeStruct((B, K, n_split, Mp), jnp.float32)
    m_part, l_part = pl.pallas_call(
        functools.partial(_gpu_stats_kernel, scale=scale, block_s=block_s, n_inner=n_inner),
        grid=(B, K, Mp // bm, n_split), in_specs=[sp["q"], sp["kv"], sp["kp"], sp["row"]],
        out_specs=[sp["part"], sp["part"]], out_shape=[shape, shape], compiler_params=_gpu_params(bm, Hp),
        interpret=interpret, name="suffix_attention_stats")(qg, keys, kp, rp)
    m = m_part.max(2)
    return m, (l_part * jnp.exp(m_part - m[:, :, None])).sum(2)


def _gpu_probs(qg, keys, values, kp, rp, w, m, inv_l, *, n_split, n_inner, scale, reduce, block_s, interpret):
    """Pass 2 over the first n_split * n_inner S blocks: out float32 [B, K, Mp, Hp], scores [B, K, S_main]."""
    B, K, Mp, Hp = qg.shape
    bm = min(Mp, GPU_BLOCK_M)
    chunk = n_inner * block_s
    sp = _gpu_specs(bm, Hp, chunk)
    acc, scores = pl.pallas_call(
        functools.partial(_gpu_probs_kernel, scale=scale, reduce=reduce, block_s=block_s, n_inner=n_inner),
        grid=(B, K, Mp // bm, n_split),
        in_specs=[sp["q"], sp["kv"], sp["kv"], sp["kp"], sp["row"], sp["row"], sp["stat"], sp["stat"]],
        out_specs=[sp["out"], sp["scores"]],
        out_shape=[jax.ShapeDtypeStruct((B, K, n_split, Mp, Hp), jnp.float32),
                   jax.ShapeDtypeStruct((B, K, Mp // bm, n_split * chunk), jnp.float32)],
        compiler_params=_gpu_params(bm, Hp), interpret=interpret, name="suffix_attention_probs",
    )(qg, keys, values, kp, rp, w, m, inv_l)
    # partial results over disjoint S chunks (outputs) and disjoint row blocks (scores)
    return acc.sum(2), (scores.sum(2) if reduce == "mean" else scores.max(2))


# ----------------------------------------------------------------------------------------------
# wrapper: layout, padding, masks


def check_block_s(block_s: int, target: str) -> None:
    """Hardware-legal S block sizes: multiples of 128 lanes on TPU, powers of two >= 16 for Triton."""
    if target == "tpu" and (block_s < 128 or block_s % 128):
        raise ValueError(f"block_s must be a positive multiple of 128 for the TPU kernel, got {block_s}")
    if target == "gpu" and (block_s < 16 or block_s & (block_s - 1)):
        raise ValueError(f"block_s must be a power of two >= 16 for the GPU kernel, got {block_s}")


def _tail_logits(qg, keys_t, kp_t, rp, scale):
    """Logits of the last S % unit keys (handled in jnp, so the big arrays are never padded = copied)."""
    s = jnp.einsum("bkmh,bksh->bkms", qg, keys_t, preferred_element_type=jnp.float32) * scale
    mask = kp_t[:, :, None, :] <= rp[:, None, :, None]
    return jnp.where(mask, s, NEG), mask


def suffix_attention_pallas(q, q_pos, keys, values, key_pos, key_valid, score_mask, *, reduce: str = "mean",
                            interpret=False, block_s: int | None = None, target: str = "tpu"):
    """Pallas suffix attention (same contract as the reference; inputs already validated).

    q [B, L, N, H]; q_pos int32 [B, L]; keys/values [B, K, S, H]; key_pos int32 [B, K, S];
    key_valid bool [B, K, S]; score_mask bool [B, L]. Returns out [B, L, N, H] in q.dtype and scores
    float32 [B, K, S]. `target` picks the driver ("tpu" or "gpu"), `interpret` runs it on CPU.
    The kernels cover the first S_main keys (whole blocks, or whole chunks of blocks on GPU), read in
    place from the unpadded cache; the remaining S - S_main keys are merged in jnp (exactly: same
    statistics, same normalisation), which is cheaper than copying the cache into a padded array.
    """
    if target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")
    block_s = DEFAULT_BLOCK_S[target] if block_s is None else int(block_s)
    check_block_s(block_s, target)
    B, L, N, H = q.shape
    K, S = keys.shape[1], keys.shape[2]
    G = N // K
    M = G * L
    if target == "gpu":  # Triton: power-of-two tiles, tl.dot needs >= 16
        Mp, Hp = max(16, _next_pow2(M)), max(16, _next_pow2(H))
    else:  # Mosaic TPU: rows a multiple of 8 sublanes; H is a full dim
        Mp, Hp = _round_up(M, 8), H
    n_blocks = S // block_s
    if target == "gpu":
        n_split, n_inner = gpu_split(n_blocks, B * K * max(1, Mp // GPU_BLOCK_M)) if n_blocks else (0, 1)
        s_main = n_split * n_inner * block_s
    else:
        s_main = n_blocks * block_s

    qg = q.reshape(B, L, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B, K, M, H)
    qg = jnp.pad(qg, ((0, 0), (0, 0), (0, Mp - M), (0, Hp - H)))
    if Hp != H:  # only for head dims that are not powers of two on GPU
        keys, values = (jnp.pad(a, ((0, 0), (0, 0), (0, 0), (0, Hp - H))) for a in (keys, values))
    kp = jnp.where(key_valid, key_pos.astype(jnp.int32), INT_MAX)
    row_l = jnp.arange(Mp) % L
    real = jnp.arange(Mp) < M
    rp = jnp.where(real, q_pos.astype(jnp.int32)[:, row_l], INT_MIN)  # [B, Mp]
    w = jnp.where(real, score_weights(score_mask, G, reduce)[:, row_l], 0.0)
    scale = float(H) ** -0.5
    if target == "tpu":
        kw = dict(n_blocks=n_blocks, scale=scale, block_s=block_s, interpret=interpret)
        stats, probs = _tpu_stats, _tpu_probs
    else:
        kw = dict(n_split=n_split, n_inner=n_inner, scale=scale, block_s=block_s, interpret=interpret)
        stats, probs = _gpu_stats, _gpu_probs

    m = jnp.full((B, K, Mp), NEG, jnp.float32)
    l = jnp.zeros((B, K, Mp), jnp.float32)
    if s_main:
        m, l = stats(qg, keys, kp, rp, **kw)
    if s_main < S:
        s_t, mask_t = _tail_logits(qg, keys[:, :, s_main:], kp[:, :, s_main:], rp, scale)
        m_new = jnp.maximum(m, s_t.max(-1))
        l = l * jnp.exp(m - m_new) + jnp.where(mask_t, jnp.exp(s_t - m_new[..., None]), 0.0).sum(-1)
        m = m_new
    inv_l = 1.0 / jnp.maximum(l, 1e-30)
    out = jnp.zeros((B, K, Mp, Hp), jnp.float32)
    scores = []
    if s_main:
        out, sc = probs(qg, keys, values, kp, rp, w, m, inv_l, reduce=reduce, **kw)
        scores.append(sc)
    if s_main < S:
        p_t = jnp.where(mask_t, jnp.exp(s_t - m[..., None]), 0.0) * inv_l[..., None]
        v_t = values[:, :, s_main:]
        out = out + jnp.einsum("bkms,bksh->bkmh", p_t.astype(v_t.dtype), v_t, preferred_element_type=jnp.float32)
        pw = p_t * w[:, None, :, None]
        scores.append(pw.sum(2) if reduce == "mean" else pw.max(2))
    scores = scores[0] if len(scores) == 1 else jnp.concatenate(scores, -1)
    out = out[:, :, :M, :H].reshape(B, K, G, L, H).transpose(0, 3, 1, 2, 4).reshape(B, L, N, H)
    return out.astype(q.dtype), scores
