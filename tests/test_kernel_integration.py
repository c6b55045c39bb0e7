"""The presses through the score-and-evict op: Pallas (interpreted) and XLA keep the same positions, and
the op path equals the per-query-head path it replaces."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from conftest import INTERPRET, build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.decoding_press import decode_evicting
from lkv_jax.lookahead import init_adapter
from lkv_jax.presses import LookaheadKVPress, SnapKVPress, TOVAPress


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    hf = build_hf_model("llama", num_attention_heads=4, num_key_value_heads=2)
    return lkv_jax.load_hf(save_hf_model(hf, tmp_path_factory.mktemp("m")))


def _adapter(model):
    a = init_adapter(model.config, jax.random.key(0), n_lookahead=8, rank=4)
    # a non-zero LoRA B so the selective LoRA takes part
    return jax.tree.map(lambda x: x + 0.05 if x.ndim == 2 and x.shape[0] == 4 else x, a)


def _presses(model, **kw):
    return {
        "snapkv": SnapKVPress(budget=24, window_size=8, **kw),
        "tova": TOVAPress(budget=24, **kw),
        "lookaheadkv": LookaheadKVPress(_adapter(model), budget=24, **kw),
    }


@pytest.mark.parametrize("name", ["snapkv", "tova", "lookaheadkv"])
def test_pallas_interpret_and_xla_keep_the_same_positions(model, name):
    rs = np.random.RandomState(1)
    ids = rs.randint(3, 128, size=(2, 70))
    mask = np.ones_like(ids)
    mask[1, :9] = 0
    xla = lkv_jax.compress(model, ids, _presses(model, implementation="xla")[name], attention_mask=mask)
    pal = lkv_jax.compress(model, ids, _presses(model, implementation="pallas", interpret=INTERPRET)[name],
                           attention_mask=mask)
    for a, b in zip(pal.kept_positions, xla.kept_positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(pal.scores, xla.scores, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("name", ["snapkv", "tova", "lookaheadkv"])
def test_decoding_time_eviction_through_pallas_equals_xla(model, name):
    """Mid-answer scoring and the top-n select run inside the decode loop: the Pallas ops (interpreted on
    CPU) keep the same entries as XLA, so the answers and the final caches agree."""
    ids = np.random.RandomState(4).randint(3, 128, size=(2, 40))
    runs = {}
    for impl, interpret in (("xla", False), ("pallas", INTERPRET)):
        scorer = _presses(model, implementation=impl, interpret=interpret)[name]
        dp = lkv_jax.DecodingPress(scorer, budget=24, interval=8, keep_recent=2)
        out = lkv_jax.compress(model, ids, scorer)  # the prompt to 24 entries, by the same press
        runs[impl] = decode_evicting(model, out.cache, out.logits, 20, dp, eos_token_id=())  # two evictions
    np.testing.assert_array_equal(runs["pallas"][0], runs["xla"][0])
    for a, b in zip(runs["pallas"][1].positions, runs["xla"][1].positions, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_op_path_equals_per_query_head_path(model):
    """SnapKV with max pooling takes the per-head path, with avg pooling the op path: with kernel 1
    the two are the same computation, so their scores must agree."""
    ids = np.random.RandomState(2).randint(3, 128, size=(1, 60))
    op = lkv_jax.compress(model, ids, SnapKVPress(budget=20, window_size=8, kernel_size=1, pooling="avg"))
    dense = lkv_jax.compress(model, ids, SnapKVPress(budget=20, window_size=8, kernel_size=1, pooling="max"))
    for a, b in zip(op.scores, dense.scores, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_unknown_implementation_is_an_error():
    with pytest.raises(ValueError, match="implementation must be"):
        SnapKVPress(budget=8, implementation="cuda")


def test_snapkv_window_outside_keeps_budget_plus_window(model):
    """window_outside: the `budget` best prefix entries by the same scores, plus the whole window."""
    ids = np.random.RandomState(5).randint(3, 128, size=(1, 60))
    inside = lkv_jax.compress(model, ids, SnapKVPress(budget=20, window_size=8))
    outside = lkv_jax.compress(model, ids, SnapKVPress(budget=20, window_size=8, window_outside=True))
    T = 60
    for l in range(2):
        pos = np.asarray(outside.kept_positions[l])[0]
        assert pos.shape == (2, 28)
        scores = np.asarray(inside.scores[l])[0][:, -T:]  # the prompt's slots (left padding first)
        for k in range(2):
            window = set(range(T - 8, T))
            assert window <= set(pos[k].tolist())
            best = set(np.argsort(-scores[k, : T - 8], kind="stable")[:20].tolist())
            assert set(pos[k].tolist()) - window == best
    with pytest.raises(ValueError, match="smaller than the 8 protected"):
        SnapKVPress(budget=4, window_size=8)
    SnapKVPress(budget=4, window_size=8, window_outside=True)  # 4 + the window: allowed
