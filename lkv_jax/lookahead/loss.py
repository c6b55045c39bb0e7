"""The training objective and its metric, over prompt positions.

loss   = mean over batch rows, layers and query heads of KL(label || prediction), both normalised to
         sum 1 over the row's real prompt positions.
recall = the label mass (averaged over a KV head's query heads) that the top-`budget` prompt
         positions by predicted score (reduced to KV heads, as eviction does) would keep.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from lkv_jax.lookahead.scoring import normalise
from lkv_jax.suffix_scoring import reduce_gqa

EPS = 1e-10  # floor inside the logs: a label mass of 0 contributes 0 (0 log 0 = 0)


def kl_divergence(label, pred, valid):
    """Per-row KL(label || pred) over the last axis: label/pred float32 [..., T], valid bool broadcastable.

    Both are renormalised over `valid` first. Returns [...] (the leading axes).
    """
    p, q = normalise(label, valid), normalise(pred, valid)
    # p != 0 (not p > 0): a NaN label must make the loss NaN, not vanish silently
    terms = jnp.where(valid & (p != 0), p * (jnp.log(jnp.maximum(p, EPS)) - jnp.log(jnp.maximum(q, EPS))), 0.0)
    return terms.sum(-1)


def lookahead_loss(labels, pred, prompt_valid, row_weight=None):
    """labels, pred float32 [B, n_layers, N, T]; prompt_valid bool [B, T]; row_weight float [B] (0 for
    batch padding rows). Returns the scalar mean KL."""
    kl = kl_divergence(labels, pred, prompt_valid[:, None, None, :])  # [B, n_layers, N]
    w = jnp.ones(kl.shape[0], jnp.float32) if row_weight is None else row_weight.astype(jnp.float32)
    return (kl.mean((1, 2)) * w).sum() / jnp.maximum(w.sum(), 1.0)


def label_mass_recall(labels, pred, prompt_valid, n_kv_heads: int, budget: int, row_weight=None):
    """Mean fraction of label mass kept by the top-`budget` positions of `pred` per layer and KV head.

    labels/pred [B, n_layers, N, T]; budget is clipped to each row's prompt length (recall 1 then).
    """
    B, nl, N, T = labels.shape
    k = min(int(budget), T)
    lab = normalise(labels, prompt_valid[:, None, None, :]).reshape(B * nl, N, T)
    sc = reduce_gqa(pred.reshape(B * nl, N, T), n_kv_heads, "mean")
    lab_kv = reduce_gqa(lab, n_kv_heads, "mean")  # [B*nl, K, T]
    valid = jnp.repeat(prompt_valid, nl, axis=0)[:, None, :]
    sc = jnp.where(valid, sc, -jnp.inf)
    _, idx = jax.lax.top_k(sc, k)
    kept = jnp.take_along_axis(lab_kv, idx, -1).sum(-1)  # invalid slots carry 0 label mass
    per_row = kept.reshape(B, nl, -1).mean((1, 2))
    w = jnp.ones(B, jnp.float32) if row_weight is None else row_weight.astype(jnp.float32)
    return (per_row * w).sum() / jnp.maximum(w.sum(), 1.0)
