"""Threshold-select (Pallas, interpreted on CPU) against the `lax.top_k` reference, as lkv_jax calls it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import INTERPRET, PALLAS_COMPILED, skip_unless_runnable
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.suffix_attention import suffix_attention
from pallas_kernels.topk_select import select_slots
from pallas_kernels.topk_select.kernel import order_keys


def make_scores(seed, B=2, K=3, S=300, ties=False):
    rng = np.random.default_rng(seed)
    scores = rng.random((B, K, S)).astype(np.float32)
    if ties:  # few distinct values: the cut falls inside a run of equal scores
        scores = np.round(scores * 4) / 4
    selectable = rng.random((B, K, S)) > 0.2
    selectable[:, :, -7:] = False  # e.g. a scoring suffix's own slots
    protected = rng.random((B, K, S)) > 0.97
    protected[:, :, :4] = True  # sinks
    return scores, selectable, protected


def reference(scores, selectable, protected, n_kept, keep_count):
    from lkv_jax.eviction import TopPerHead

    return TopPerHead().select(jnp.asarray(scores), jnp.asarray(selectable), jnp.asarray(protected), n_kept,
                               jnp.asarray(keep_count))


def test_order_keys_preserve_float_order():
    x = np.array([-np.inf, -3e38, -2.5, -1e-30, 0.0, 1e-40, 1e-30, 0.5, 1.0, 1e30, np.inf], np.float32)
    k = np.asarray(order_keys(jnp.asarray(x)))
    assert (np.diff(k) > 0).all()


@pytest.mark.parametrize("target", ["tpu", "gpu"])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("n_kept,keep_count", [(50, (50, 20)), (290, (290, 3)), (1, (1, 0))])
def test_same_slots_as_lkv_select_slots(target, ties, n_kept, keep_count):
    skip_unless_runnable(target)
    args = make_scores(0, ties=ties)
    want_slots, want_kept = reference(*args, n_kept, keep_count)
    slots, kept = select_slots(*args, n_kept, np.asarray(keep_count), implementation="pallas", interpret=INTERPRET,
                               target=target)
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(want_kept))
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(want_slots))


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
def test_kept_set_by_hand(implementation):
    scores = np.array([[[0.1, 0.9, 0.5, 0.5, 0.7, 0.2]]], np.float32)
    selectable = np.array([[[True, True, True, True, False, True]]])
    protected = np.array([[[True, False, False, False, False, False]]])
    # slot 0 forced in, slot 4 (0.7) never; then 0.9 (slot 1) and the lower-slot 0.5 (slot 2)
    slots, kept = select_slots(scores, selectable, protected, 3, np.array([3]), implementation=implementation,
                               interpret=INTERPRET)
    assert np.asarray(slots).tolist() == [[[0, 1, 2]]]
    assert np.asarray(kept).all()


def test_under_tpu_memory_simulation():
    skip_unless_runnable(interpreter_only=True)
    args = make_scores(1, B=1, K=2, S=130)
    want_slots, want_kept = reference(*args, 40, (25,))
    slots, kept = select_slots(*args, 40, np.array([25]), implementation="pallas", interpret=pltpu.InterpretParams())
    np.testing.assert_array_equal(np.asarray(slots), np.asarray(want_slots))
    np.testing.assert_array_equal(np.asarray(kept), np.asarray(want_kept))


def test_eviction_pipeline_kernels_match_reference_pipeline():
    """Scores from the suffix-attention kernel, then threshold-select, keep the same positions as the
    reference scores through lkv_jax's `select_slots` (random scores: tie-free)."""
    rng = np.random.default_rng(2)
    B, L, K, G, S, H = 2, 8, 2, 2, 256, 32
    q = jnp.asarray(rng.normal(size=(B, L, K * G, H)), jnp.float32)
    keys = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    values = jnp.asarray(rng.normal(size=(B, K, S, H)), jnp.float32)
    n_prompt = np.array([S - L, S - L - 60])
    key_pos = np.full((B, K, S), -1, np.int32)
    key_valid = np.zeros((B, K, S), bool)
    for b in range(B):
        pad = S - L - n_prompt[b]  # left padding, then the prompt, then the suffix's own slots
        key_pos[b, :, pad:S - L] = np.arange(n_prompt[b])
        key_pos[b, :, S - L:] = n_prompt[b] + np.arange(L)
        key_valid[b, :, pad:] = True
    q_pos = jnp.asarray(n_prompt[:, None] + np.arange(L)[None], jnp.int32)
    key_pos, key_valid = jnp.asarray(key_pos), jnp.asarray(key_valid)
    selectable = key_valid & (key_pos < jnp.asarray(n_prompt)[:, None, None])
    protected = jnp.zeros_like(selectable)
    keep = np.array([64, 40])
    _, ref_scores = suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="xla")
    want_slots, want_kept = reference(ref_scores, selectable, protected, 64, keep)
    _, scores = suffix_attention(q, q_pos, keys, values, key_pos, key_valid, implementation="pallas",
                                 interpret=INTERPRET, block_s=128)
    slots, kept = select_slots(scores, selectable, protected, 64, keep, implementation="pallas", interpret=INTERPRET)
    pos = lambda s, k: np.where(np.asarray(k), np.take_along_axis(np.asarray(key_pos), np.asarray(s), -1), -1)
    np.testing.assert_array_equal(pos(slots, kept), pos(want_slots, want_kept))
    assert np.asarray(kept).sum(-1).tolist() == [[64, 64], [40, 40]]


@pytest.mark.parametrize("target,platform,call", [("gpu", "cuda", "__gpu$xla.gpu.triton"),
                                                  ("tpu", "tpu", "tpu_custom_call")])
def test_kernel_lowers_for_the_hardware(target, platform, call):
    """Triton / Mosaic TPU lowering (with their block-shape checks) runs on CPU; only the device compile
    is left untested."""
    from pallas_kernels.topk_select.op import _select_pallas

    sds = jax.ShapeDtypeStruct
    f = jax.jit(lambda s, a, p, c: _select_pallas(s, a, p, 2048, c, interpret=False, target=target))
    text = f.trace(sds((1, 8, 32768), jnp.float32), sds((1, 8, 32768), jnp.bool_), sds((1, 8, 32768), jnp.bool_),
                   sds((1,), jnp.int32)).lower(lowering_platforms=(platform,)).as_text()
    assert f"custom_call @{call}" in text


def test_bad_inputs_raise():
    scores, selectable, protected = make_scores(3, B=1, K=1, S=20)
    with pytest.raises(ValueError, match="n_kept"):
        select_slots(scores, selectable, protected, 21, np.array([3]))
    with pytest.raises(ValueError, match="keep_count"):
        select_slots(scores, selectable, protected, 5, np.array([3, 3]))
    with pytest.raises(ValueError, match="bool"):
        select_slots(scores, selectable.astype(np.int32), protected, 5, np.array([3]))
    if not PALLAS_COMPILED:  # only a CPU refuses the compiled kernel
        with pytest.raises(ValueError, match="interpret=True"):
            select_slots(scores, selectable, protected, 5, np.array([3]), implementation="pallas")
