"""Oracle diagnostics: how much of the true response attention a press's kept set covers.

The truth is LookaheadKV's training label (`lkv_jax.lookahead.labels`): per layer l and query head n,
the mean over the model's own greedy response tokens of their attention on each prompt position,
normalised to sum 1 over the prompt. A press keeps, per layer and KV head k, a set of positions. The
coverage of layer l is

    coverage[l] = mean over query heads n of  sum_{p kept by KV head n // G} label[l, n, p]

i.e. each query head's label mass on the entries its KV head kept, AVERAGED over the query heads
(equivalently: per KV head, the mass summed within its group of G query heads, divided by G, then
averaged over KV heads). 1 when everything is kept; a press that keeps what the response reads scores
near 1 even at small budgets. In question-agnostic runs the question tokens (appended after
compression, never evicted) count as kept.

Coverage weighs every head's mass alike, and most of a small model's attention mass sits on sinks and
recent tokens; an answer copied from a record hidden in the prompt needs those few record tokens in the
one or two heads that retrieve them. So synthetic tasks also report the evidence recall: per layer, the
share of the answer-bearing records' tokens kept by the KV head that keeps most of them.
"""

from __future__ import annotations

import functools

import jax
import numpy as np
from flax import nnx

from lkv_jax.lookahead.labels import response_labels_pure


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk"))
def _labels_jit(graphdef, params, ids, valid, positions, response_ids, response_mask, *, chunk):
    return response_labels_pure(nnx.merge(graphdef, params), ids, valid, positions, response_ids, response_mask,
                                chunk=chunk)


def response_labels(model, prompt, response_ids, response_mask) -> np.ndarray:
    """Labels of a prepared (left-padded) prompt batch (`lkv_jax.inference.Prompt`, ids [B, T]) and
    right-padded responses int [B, R] with mask bool [B, R] (every row >= 1 real token).

    Returns float32 [B, n_layers, N, T] over the prompt's padded slots, summing to 1 per (b, l, n).
    """
    response_mask = np.asarray(response_mask, bool)
    if not response_mask.any(axis=1).all():
        raise ValueError("every response needs at least one token to define a label")
    graphdef, params = nnx.split(model)
    return np.asarray(_labels_jit(graphdef, params, prompt.ids, prompt.valid, prompt.positions,
                                  np.asarray(response_ids, np.int32), response_mask, chunk=prompt.chunk))


def slots_to_positions(labels: np.ndarray, valid: np.ndarray) -> list[np.ndarray]:
    """Per row b, the label in position space: float32 [n_layers, N, n_b] (n_b real prompt tokens;
    left padding dropped, so index p is the token at original position p)."""
    valid = np.asarray(valid, bool)
    return [labels[b][..., valid[b]] for b in range(labels.shape[0])]


def kept_mask(kept_positions: np.ndarray, n_positions: int) -> np.ndarray:
    """kept_positions int [K, n_kept] (original positions, -1 padding) -> bool [K, n_positions]."""
    kept_positions = np.asarray(kept_positions)
    mask = np.zeros((kept_positions.shape[0], n_positions), bool)
    k_idx, j_idx = np.nonzero(kept_positions >= 0)
    pos = kept_positions[k_idx, j_idx]
    if (pos >= n_positions).any():
        raise ValueError(f"kept position {pos.max()} outside a prompt of {n_positions} tokens")
    mask[k_idx, pos] = True
    return mask


def evidence_recall(kept: list[np.ndarray] | np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Per layer, the share of the `evidence` positions (int [E], E >= 1) kept by the best KV head.

    kept: per layer bool [K, P] (a list, or an array [n_layers, K, P]). Returns float64 [n_layers].
    """
    evidence = np.asarray(evidence, np.int64)
    if evidence.size == 0:
        raise ValueError("no evidence positions")
    return np.array([float(np.asarray(m, bool)[:, evidence].mean(axis=1).max()) for m in kept])


def coverage(label: np.ndarray, kept: list[np.ndarray] | np.ndarray,
             always_kept: np.ndarray | None = None) -> np.ndarray:
    """Per-layer coverage of one sample.

    label float [n_layers, N, P] (position space, rows summing to 1); kept: per layer bool [K, P] (a
    list, or an array [n_layers, K, P]); always_kept optional bool [P] (positions present whatever the
    press did: the question in question-agnostic runs). Returns float64 [n_layers] in [0, 1]:
    the label mass of each query head on its KV head's kept positions, averaged over query heads.
    """
    label = np.asarray(label, np.float64)
    n_layers, N, P = label.shape
    out = np.empty(n_layers)
    for l in range(n_layers):
        m = np.asarray(kept[l], bool)
        K = m.shape[0]
        if N % K or m.shape[1] != P:
            raise ValueError(f"layer {l}: kept mask {m.shape} does not fit a label of {N} heads x {P} positions")
        if always_kept is not None:
            m = m | np.asarray(always_kept, bool)[None]
        per_head = np.repeat(m, N // K, axis=0)  # query head n reads KV head n // G
        out[l] = float((label[l] * per_head).sum(-1).mean())
    return out
