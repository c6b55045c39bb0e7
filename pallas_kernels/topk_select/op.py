"""Top-n selection per row and KV head (what every press's eviction runs, through
`lkv_jax.eviction.TopPerHead` with the press's `implementation`): `lax.top_k` (the reference,
`_select_xla`) or a Pallas threshold-select with the same kept sets (protected slots forced in,
unselectable slots never chosen, ties by lowest slot) from threshold cuts and a prefix-sum compaction."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.checks import check_arg
from pallas_kernels.topk_select.kernel import order_keys, topn_cuts

IMPLEMENTATIONS = (None, "xla", "pallas")
PROTECT = 1e30  # the scores protected / unselectable slots get (finite: arithmetic stays NaN-free)
EXCLUDE = -jnp.inf


def _select_xla(scores, selectable, protected, n_kept, keep_count):
    """`lax.top_k` selection (same contract as `select_slots`); the default everywhere for now."""
    s = jnp.where(protected, PROTECT, scores.astype(jnp.float32))
    s = jnp.where(selectable, s, EXCLUDE)
    _, idx = jax.lax.top_k(s, n_kept)
    rank = jnp.arange(n_kept)
    kept = (rank[None, None, :] < keep_count[:, None, None]) & jnp.take_along_axis(selectable, idx, axis=-1)
    S = scores.shape[-1]
    order = jnp.argsort(jnp.where(kept, idx, idx + S), axis=-1)
    return jnp.take_along_axis(idx, order, -1).astype(jnp.int32), jnp.take_along_axis(kept, order, -1)


def _select_pallas(scores, selectable, protected, n_kept, keep_count, *, interpret, target):
    B, K, S = scores.shape
    s = jnp.where(protected, PROTECT, scores.astype(jnp.float32))
    key = order_keys(jnp.where(selectable, s, EXCLUDE)).reshape(B * K, S)
    c = jnp.minimum(jnp.repeat(keep_count.astype(jnp.int32), K), n_kept)
    counts = jnp.stack([jnp.full((B * K,), n_kept, jnp.int32), jnp.maximum(c, 1)])
    t, j = topn_cuts(key, counts, target=target, interpret=interpret)
    idx = jnp.arange(S, dtype=jnp.int32)[None]
    top = lambda i: (key > t[i][:, None]) | ((key == t[i][:, None]) & (idx <= j[i][:, None]))
    chosen = top(0)  # the top n_kept (what lax.top_k returns)
    kept = top(1) & (c[:, None] > 0) & selectable.reshape(B * K, S)
    dropped = chosen & ~kept
    # prefix-sum compaction: kept slots ascending first, then the dropped ones ascending
    n_in = kept.sum(-1, keepdims=True, dtype=jnp.int32)
    dest = jnp.where(kept, jnp.cumsum(kept, -1, dtype=jnp.int32) - 1,
                     jnp.where(dropped, n_in + jnp.cumsum(dropped, -1, dtype=jnp.int32) - 1, n_kept))
    rows = jnp.broadcast_to(jnp.arange(B * K)[:, None], dest.shape)
    slots = jnp.zeros((B * K, n_kept), jnp.int32).at[rows, dest].set(jnp.broadcast_to(idx, dest.shape), mode="drop")
    kept_out = jnp.arange(n_kept)[None] < n_in
    return slots.reshape(B, K, n_kept), kept_out.reshape(B, K, n_kept)


def select_slots(scores, selectable, protected, n_kept: int, keep_count, *, implementation: str | None = None,
                 interpret=False, target: str | None = None):
    """Top slots per row and KV head.

    scores float32 [B, K, S]; selectable/protected bool [B, K, S]; n_kept static int <= S (the compact
    capacity); keep_count int [B] (entries row b keeps, <= n_kept). Returns slots int32 [B, K, n_kept]
    (kept entries ascending by slot, then the dropped ones ascending) and kept bool [B, K, n_kept].

    implementation: None and "xla" use `lax.top_k` (the Pallas path has not been measured faster on
    any hardware yet, so it is not the default); "pallas" uses threshold cuts found by bisection in
    a Pallas kernel (interpret=True to run it on CPU) and an XLA prefix-sum compaction.
    target: "tpu" or "gpu" driver (default: "gpu" on GPUs, else "tpu").
    """
    scores, selectable, protected = map(jnp.asarray, (scores, selectable, protected))
    keep_count = jnp.asarray(keep_count)
    check_arg("scores", "[B, K, S]", scores, rank=3)
    check_arg("selectable", f"bool like scores {scores.shape}", selectable, shape=scores.shape, dtype=bool)
    check_arg("protected", f"bool like scores {scores.shape}", protected, shape=scores.shape, dtype=bool)
    if not 1 <= int(n_kept) <= scores.shape[-1]:
        raise ValueError(f"n_kept must lie in [1, S={scores.shape[-1]}], got {n_kept}")
    check_arg("keep_count", f"[B={scores.shape[0]}]", keep_count, shape=scores.shape[:1])
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation in (None, "xla"):
        return _select_xla(scores, selectable, protected, int(n_kept), keep_count)
    if not interpret and jax.default_backend() not in ("gpu", "tpu"):
        raise ValueError(f"the Pallas kernel needs a GPU or TPU (backend is {jax.default_backend()!r}); "
                         "pass interpret=True to run it on CPU, or implementation='xla'")
    if target is None:
        target = "gpu" if jax.default_backend() == "gpu" else "tpu"
    if target not in ("tpu", "gpu"):
        raise ValueError(f"target must be 'tpu' or 'gpu', got {target!r}")
    if isinstance(interpret, pltpu.InterpretParams) and target == "gpu":
        raise ValueError("pltpu.InterpretParams simulates a TPU: use it with target='tpu'")
    return _select_pallas(scores, selectable, protected, int(n_kept), keep_count, interpret=interpret, target=target)
