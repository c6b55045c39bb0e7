"""AdaKV head-wise budgets against a brute-force numpy selection (per-head safeguard, then the layer's
top K * n_kept over all heads), on Knorm scores recomputed from transformers' cached keys."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.presses import AdaKVPress, KnormPress, SnapKVPress, SpecKVPress, make_press

N_KV = 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_hf_model("llama")
    return hf, lkv_jax.load_hf(save_hf_model(hf, tmp_path_factory.mktemp("adakv") / "llama"))


@pytest.fixture(scope="module")
def prompts():
    # distinct tokens: a repeated token has exactly the same key norm in layer 0 (RoPE keeps norms),
    # and such exact ties could be broken differently by float32 and float64
    rs = np.random.RandomState(3)
    return [rs.permutation(np.arange(3, 128))[:n] for n in (37, 26)]


def adakv_reference(scores, n_kept, alpha):
    """kvpress AdaKV selection: scores [K, n] -> kept positions per head (sets)."""
    s = scores.copy()
    n_safe = int(n_kept * alpha)
    for h in range(s.shape[0]):
        s[h, np.argsort(-s[h], kind="stable")[:n_safe]] = np.inf
    flat = np.argsort(-s.reshape(-1), kind="stable")[: s.shape[0] * n_kept]
    heads, pos = np.divmod(flat, s.shape[1])
    return [set(pos[heads == h]) for h in range(s.shape[0])]


@pytest.mark.parametrize("alpha", [0.2, 0.0, 1.0])
def test_adakv_selection_matches_numpy(models, prompts, alpha):
    hf, model = models
    ids = prompts[0]
    n = len(ids)
    with torch.no_grad():
        cache = hf(torch.tensor(ids)[None], use_cache=True).cache
    out = lkv_jax.compress(model, ids[None], AdaKVPress(KnormPress(compression_ratio=0.5), alpha_safeguard=alpha))
    n_kept = int(n * 0.5)
    for layer, lay in enumerate(cache.layers):
        scores = -np.linalg.norm(lay.keys[0].double().numpy(), axis=-1)  # [K, n]
        ref = adakv_reference(scores, n_kept, alpha)
        kp = np.asarray(out.kept_positions[layer][0])
        got = [set(kp[h][kp[h] >= 0]) for h in range(N_KV)]
        assert got == ref
        assert sum(len(g) for g in got) == N_KV * n_kept
        # capacity = the largest head's count (masked layout: no memory saved)
        assert out.cache.keys[layer].shape[2] == max(len(g) for g in ref)
        valid = np.asarray(out.cache.valid[layer][0])
        assert list(valid.sum(-1)) == [len(g) for g in ref]
        if alpha == 1.0:
            assert [len(g) for g in got] == [n_kept] * N_KV  # full safeguard == uniform budgets


def test_adakv_keeps_windows_and_generates(models, prompts):
    _, model = models
    ids = np.zeros((2, 37), int)
    mask = np.zeros_like(ids)
    for b, p in enumerate(prompts):
        ids[b, 37 - len(p):] = p
        mask[b, 37 - len(p):] = 1
    press = AdaKVPress(SnapKVPress(budget=10, window_size=4))
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    single = lkv_jax.compress(model, prompts[1][None], press)  # the left-padded row, alone
    for b, p in enumerate(prompts):
        n = len(p)
        for layer in range(len(out.kept_positions)):
            kp = np.asarray(out.kept_positions[layer][b])
            assert sum((k >= 0).sum() for k in kp) == N_KV * 10
            for h in range(N_KV):
                assert np.isin(np.arange(n - 4, n), kp[h]).all()
                if b == 1:
                    ks = np.asarray(single.kept_positions[layer][0][h])
                    assert set(kp[h][kp[h] >= 0]) == set(ks[ks >= 0])
    full = lkv_jax.generate(model, ids, 4, attention_mask=mask)
    big = make_press("adakv-snapkv", budget=40, window_size=4)
    np.testing.assert_array_equal(lkv_jax.generate(model, ids, 4, press=big, attention_mask=mask), full)


def test_adakv_ratio_zero_keeps_everything(models, prompts):
    _, model = models
    out = lkv_jax.compress(model, prompts[1][None], AdaKVPress(KnormPress()))
    for kp in out.kept_positions:
        assert (np.asarray(kp[0]) == np.arange(len(prompts[1]))).all()


def test_adakv_errors(models, tmp_path):
    _, model = models
    with pytest.raises(TypeError):
        AdaKVPress("snapkv")
    with pytest.raises(ValueError, match="alpha_safeguard"):
        AdaKVPress(KnormPress(compression_ratio=0.5), alpha_safeguard=1.5)
    with pytest.raises(ValueError, match="wrapped press"):
        AdaKVPress(KnormPress(compression_ratio=0.5), compression_ratio=0.3)
    with pytest.raises(TypeError, match="cannot wrap"):
        AdaKVPress(SpecKVPress(model, budget=40))
