"""The public suffix-attention op: dispatch between the jnp reference and the Pallas kernels."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.checks import check_arg
from pallas_kernels.suffix_attention.kernel import TARGETS, suffix_attention_pallas
from pallas_kernels.suffix_attention.reference import REDUCES, suffix_attention_reference

IMPLEMENTATIONS = (None, "xla", "pallas")


def default_implementation() -> str:
    """"pallas" on GPU/TPU, "xla" (the reference) elsewhere."""
    return "pallas" if jax.default_backend() in ("gpu", "tpu") else "xla"


def default_target() -> str:
    """The Pallas driver for this machine: "gpu" on GPUs, else the TPU layout (also used interpreted on CPU)."""
    return "gpu" if jax.default_backend() == "gpu" else "tpu"


def _check(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce):
    check_arg("q", "[B, L, N, H]", q, rank=4)
    B, L, N, H = q.shape
    check_arg("keys", f"[B={B}, K, S, H={H}]", keys, rank=4, shape=(B, None, None, H))
    K, S = keys.shape[1], keys.shape[2]
    check_arg("values", f"keys' shape {keys.shape}", values, shape=keys.shape)
    if N % K:
        raise ValueError(f"query heads N={N} must be a multiple of KV heads K={K}")
    check_arg("q_pos", f"int [B={B}, L={L}]", q_pos, shape=(B, L), dtype=int)
    check_arg("key_pos", f"int [B={B}, K={K}, S={S}]", key_pos, shape=(B, K, S), dtype=int)
    check_arg("key_valid", f"bool [B={B}, K={K}, S={S}]", key_valid, shape=(B, K, S), dtype=bool)
    check_arg("score_mask", f"bool [B={B}, L={L}]", score_mask, shape=(B, L), dtype=bool)
    if reduce not in REDUCES:
        raise ValueError(f"reduce must be one of {REDUCES}, got {reduce!r}")


def _differentiable_pallas(reduce, interpret, block_s, target):
    """The Pallas forward with a custom VJP whose backward is the reference's (recomputed): gradients
    equal those of the reference, so training may call the op with implementation="pallas"."""

    @jax.custom_vjp
    def f(q, q_pos, keys, values, key_pos, key_valid, score_mask):
        return suffix_attention_pallas(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce=reduce,
                                       interpret=interpret, block_s=block_s, target=target)

    def fwd(q, q_pos, keys, values, key_pos, key_valid, score_mask):
        return f(q, q_pos, keys, values, key_pos, key_valid, score_mask), (q, q_pos, keys, values, key_pos,
                                                                          key_valid, score_mask)

    def bwd(res, cts):
        q, q_pos, keys, values, key_pos, key_valid, score_mask = res
        _, vjp = jax.vjp(lambda a, k, v: suffix_attention_reference(a, q_pos, k, v, key_pos, key_valid, score_mask,
                                                                    reduce), q, keys, values)
        dq, dk, dv = vjp(cts)
        return dq, None, dk, dv, None, None, None

    f.defvjp(fwd, bwd)
    return f


def suffix_attention(q, q_pos, keys, values, key_pos, key_valid, *, score_mask=None, reduce: str = "mean",
                     implementation: str | None = None, interpret=False, block_s: int | None = None,
                     target: str | None = None):
    """Attention of a short query suffix over a long cache, plus the attention mass on every cache key.

    q [B, L, N, H] (query head n belongs to KV head n // G, G = N // K); q_pos int32 [B, L] the
    queries' positions; keys, values [B, K, S, H]; key_pos int32 [B, K, S] the keys' ORIGINAL
    positions; key_valid bool [B, K, S]; score_mask bool [B, L] the queries counted in the scores
    (default all). Query (b, l, n) sees key (b, n // G, s) iff key_valid and key_pos <= q_pos[b, l]
    (causality inside a suffix already written into the cache; evicted caches with gaps in their
    positions). Scale 1 / sqrt(H); softmax statistics in float32.

    Returns out [B, L, N, H] in q.dtype and scores float32 [B, K, S]: per key, the mean
    (reduce="mean") or max (reduce="max") over the G query heads of its group and the score_mask
    queries of the softmax probabilities; keys nobody may see score 0.

    implementation: None picks "pallas" on GPU/TPU and "xla" (the dense jnp reference) on CPU;
    "pallas" with interpret=True (or a `pltpu.InterpretParams()`) runs the kernel anywhere.
    block_s: keys per block (TPU: multiple of 128, default 1024; GPU: power of two, default 64); S is
    padded to whole blocks inside. target: the Pallas driver, "tpu" or "gpu" (default: this machine's;
    CPU uses the TPU layout).
    Differentiable either way: the "pallas" path has a custom VJP whose backward is the reference's.
    Shards over B and K: call it inside `jax.shard_map` (with check_vma=False, as JAX's own Pallas
    ops need) on per-device blocks of batch rows and KV heads (query heads split consistently).
    """
    q, q_pos, keys, values = map(jnp.asarray, (q, q_pos, keys, values))
    key_pos, key_valid = jnp.asarray(key_pos), jnp.asarray(key_valid)
    score_mask = jnp.ones(q.shape[:2], bool) if score_mask is None else jnp.asarray(score_mask)
    _check(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce)
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if target is not None and target not in TARGETS:
        raise ValueError(f"target must be one of {TARGETS}, got {target!r}")
    impl = default_implementation() if implementation is None else implementation
    if impl == "xla":
        return suffix_attention_reference(q, q_pos, keys, values, key_pos, key_valid, score_mask, reduce)
    if isinstance(interpret, pltpu.InterpretParams) and target == "gpu":
        raise ValueError("pltpu.InterpretParams simulates a TPU: use it with target='tpu'")
    if not interpret and jax.default_backend() not in ("gpu", "tpu"):
        raise ValueError(f"the Pallas kernel needs a GPU or TPU (backend is {jax.default_backend()!r}); "
                         "pass interpret=True to run it on CPU, or implementation='xla'")
    f = _differentiable_pallas(reduce, interpret, block_s, target or default_target())
    return f(q, q_pos, keys, values, key_pos, key_valid, score_mask)
