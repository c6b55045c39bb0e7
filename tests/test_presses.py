"""The eviction presses against brute-force numpy references built from transformers' eager attention
(full attention matrices, hidden states and cached keys of the same random model), plus kvpress's
invariants: cache length, top-score selection, identity at ratio 0, protected windows/sinks, PyramidKV's
mean budget, generation with a budget >= the prompt, and batched == single runs."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.presses import (
    ExpectedAttentionPress,
    KnormPress,
    ObservedAttentionPress,
    PyramidKVPress,
    RandomPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
    make_press,
)
from lkv_jax.presses.pyramidkv import pyramid_budgets

N_HEADS, N_KV = 4, 2
G = N_HEADS // N_KV


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = build_hf_model("llama")
    path = save_hf_model(hf, tmp_path_factory.mktemp("presses") / "llama")
    return hf, lkv_jax.load_hf(path)


@pytest.fixture(scope="module")
def prompts():
    rs = np.random.RandomState(1)
    return [rs.randint(3, 128, size=n) for n in (37, 29)]


def hf_run(hf, ids):
    """Eager transformers forward of one unpadded prompt: attentions [L][N, T, T], hidden states,
    cached keys/values [L][K, T, H] (post-RoPE, as kvpress sees them)."""
    with torch.no_grad():
        out = hf(torch.tensor(ids)[None], output_attentions=True, output_hidden_states=True, use_cache=True)
    att = [a[0].double().numpy() for a in out.attentions]
    keys = [layer.keys[0].double().numpy() for layer in out.cache.layers]
    values = [layer.values[0].double().numpy() for layer in out.cache.layers]
    return att, out.hidden_states, keys, values


def batch(prompts):
    """Left-padded batch of the prompts: (ids [B, T], mask [B, T])."""
    T = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), T), np.int64)
    mask = np.zeros((len(prompts), T), np.int64)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = p
        mask[b, T - len(p):] = 1
    return ids, mask


def pool(x, k, mode):
    """Zero-padded 1-D pooling along the last axis, stride 1 (torch avg_pool1d/max_pool1d, padding k//2)."""
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(k // 2, k // 2)])
    win = np.stack([pad[..., i:i + x.shape[-1]] for i in range(k)], axis=0)
    return win.mean(0) if mode == "avg" else win.max(0)


def snapkv_reference(att, n, w, k, mode):
    """kvpress SnapKV: mean over the window queries of the probabilities on the prefix keys, pooled, mean
    over the GQA group. Returns [L][K, n - w]."""
    out = []
    for a in att:
        s = a[:, n - w:, : n - w].mean(1)
        s = pool(s, k, mode)
        out.append(s.reshape(N_KV, G, n - w).mean(1))
    return out


def compress_one(model, press, ids, **kw):
    return lkv_jax.compress(model, np.asarray(ids)[None], press, **kw)


def scores_of(out, b=0):
    """Per layer float [K, S] of row b."""
    return [np.asarray(s[b], np.float64) for s in out.scores]


# ----------------------------------------------------------------------------------------------
# scoring rules, per layer and head, against the brute-force references


@pytest.mark.parametrize("w,k,mode", [(8, 5, "avg"), (5, 7, "max")])
def test_snapkv_scores_match_eager_attention(models, prompts, w, k, mode):
    hf, model = models
    ids = prompts[0]
    n = len(ids)
    att, _, _, _ = hf_run(hf, ids)
    ref = snapkv_reference(att, n, w, k, mode)
    press = SnapKVPress(compression_ratio=0.5, window_size=w, kernel_size=k, pooling=mode)
    out = compress_one(model, press, ids, chunk_size=16)  # 3 prefill chunks
    T = out.scores[0].shape[-1]
    for layer, s in enumerate(scores_of(out)):
        np.testing.assert_allclose(s[:, T - n: T - w], ref[layer], rtol=2e-4, atol=1e-6)


def test_snapkv_paper_preset():
    p = SnapKVPress.paper(budget=64)
    assert (p.window_size, p.kernel_size, p.pooling, p.budget) == (32, 7, "max", 64)
    d = SnapKVPress()
    assert (d.window_size, d.kernel_size, d.pooling, d.compression_ratio) == (64, 5, "avg", 0.0)
    assert make_press("snapkv-paper", budget=40) == SnapKVPress(window_size=32, kernel_size=7, pooling="max", budget=40)


def test_tova_scores_are_last_query_attention_mean_over_heads(models, prompts):
    hf, model = models
    ids = prompts[1]
    n = len(ids)
    att, _, _, _ = hf_run(hf, ids)
    out = compress_one(model, TOVAPress(budget=10), ids)
    T = out.scores[0].shape[-1]
    for layer, s in enumerate(scores_of(out)):
        ref = att[layer][:, n - 1, : n - 1].mean(0)  # mean over ALL query heads
        for kv in range(N_KV):
            np.testing.assert_allclose(s[kv, T - n: T - 1], ref, rtol=2e-4, atol=1e-7)
    kept = np.asarray(out.kept_positions[0][0])
    assert (kept == n - 1).any(axis=-1).all()  # the last token is always kept


def test_knorm_scores_are_negative_key_norms(models, prompts):
    hf, model = models
    ids = prompts[0]
    n = len(ids)
    _, _, keys, _ = hf_run(hf, ids)
    out = compress_one(model, KnormPress(compression_ratio=0.6), ids)
    T = out.scores[0].shape[-1]
    for layer, s in enumerate(scores_of(out)):
        np.testing.assert_allclose(s[:, T - n:], -np.linalg.norm(keys[layer], axis=-1), rtol=1e-4)


@pytest.mark.parametrize("chunk", [8, 512])
def test_observed_attention_is_h2o_normalised_mass(models, prompts, chunk):
    """Accumulated during chunked prefill (chunk 8: five chunks) == eager attention summed over queries."""
    hf, model = models
    ids = prompts[0]
    n = len(ids)
    att, _, _, _ = hf_run(hf, ids)
    out = compress_one(model, ObservedAttentionPress(budget=12), ids, chunk_size=chunk)
    T = out.scores[0].shape[-1]
    for layer, s in enumerate(scores_of(out)):
        ref = att[layer].sum(1) / np.arange(n, 0, -1)  # [N, n]: mass / number of queries seeing the key
        ref = ref.reshape(N_KV, G, n).mean(1)
        np.testing.assert_allclose(s[:, T - n:], ref, rtol=2e-4, atol=1e-7)


def expected_attention_reference(hf, hidden, keys, values, n, n_future, n_sink, use_cov, use_vnorm, eps):
    """kvpress ExpectedAttention in numpy, from the eager model's hidden states and cache."""
    H = keys[0].shape[-1]
    inv_freq = 1.0 / (10000.0 ** (np.arange(0, H, 2) / H))
    ang = np.arange(n, n + n_future)[:, None] * inv_freq[None]  # [F, H/2]
    c, s = np.cos(ang), np.sin(ang)
    R = np.zeros((n_future, H, H))
    h2 = H // 2
    for i in range(h2):  # HF half-split RoPE: (x_i, x_{i+H/2}) rotated together
        R[:, i, i], R[:, i, i + h2], R[:, i + h2, i], R[:, i + h2, i + h2] = c[:, i], -s[:, i], s[:, i], c[:, i]
    R = R.mean(0)
    out = []
    for layer in range(len(keys)):
        mod = hf.model.layers[layer]
        with torch.no_grad():
            q = mod.self_attn.q_proj(mod.input_layernorm(hidden[layer]))[0].double().numpy()  # [n, N*H]
        q = q.reshape(n, N_HEADS, H)[n_sink:]
        mu = q.mean(0)  # [N, H]
        scores = np.zeros((N_KV, n - n_sink))
        for head in range(N_HEADS):
            m = R @ mu[head]
            k = keys[layer][head // G, n_sink:]  # [n - sink, H]
            logit = k @ m / np.sqrt(H)
            if use_cov:
                qc = q[:, head] - mu[head]
                cov = R @ (qc.T @ qc / len(qc)) @ R.T
                logit = logit + np.einsum("sh,hi,si->s", k, cov, k) / H / 2
            p = np.exp(logit - logit.max())
            scores[head // G] += p / p.sum() / G
        if use_vnorm:
            scores = (scores + eps) * np.linalg.norm(values[layer][:, n_sink:], axis=-1)
        out.append(scores)
    return out


@pytest.mark.parametrize("use_cov,use_vnorm,eps", [(True, True, 0.01), (False, False, 0.0)])
def test_expected_attention_matches_numpy(models, prompts, use_cov, use_vnorm, eps):
    hf, model = models
    ids = prompts[0]
    n = len(ids)
    _, hidden, keys, values = hf_run(hf, ids)
    press = ExpectedAttentionPress(budget=10, n_future_positions=64, use_covariance=use_cov, use_vnorm=use_vnorm,
                                   epsilon=eps)
    out = compress_one(model, press, ids, chunk_size=16)
    ref = expected_attention_reference(hf, hidden, keys, values, n, 64, 4, use_cov, use_vnorm, eps)
    T = out.scores[0].shape[-1]
    for layer, s in enumerate(scores_of(out)):
        np.testing.assert_allclose(s[:, T - n + 4:], ref[layer], rtol=2e-3, atol=1e-6)
    kept = np.asarray(out.kept_positions[0][0])
    assert np.isin(np.arange(4), kept[0]).all() and np.isin(np.arange(4), kept[1]).all()  # sinks kept


def test_random_press_is_seeded(models, prompts):
    _, model = models
    ids = prompts[0]
    a = compress_one(model, RandomPress(budget=9, seed=3), ids)
    b = compress_one(model, RandomPress(budget=9, seed=3), ids)
    c = compress_one(model, RandomPress(budget=9, seed=4), ids)
    assert all((np.asarray(x) == np.asarray(y)).all() for x, y in zip(a.kept_positions, b.kept_positions, strict=True))
    assert any((np.asarray(x) != np.asarray(y)).any() for x, y in zip(a.kept_positions, c.kept_positions, strict=True))
    s = np.asarray(a.scores[0])
    assert ((s >= 0) & (s < 1)).all()


# ----------------------------------------------------------------------------------------------
# PyramidKV budgets


def test_pyramid_budgets_hand_worked():
    # n_kept 64 of 200, window 8, beta 2, 4 layers: min 32, max 96, step 64/3
    assert pyramid_budgets(64, 200, 4, 8, 2) == [96, 75, 53, 32]
    # beta 20: min 3.2 < window -> kvpress falls back to the uniform (SnapKV) budget
    assert pyramid_budgets(64, 200, 4, 8, 20) == [64] * 4
    # max capped at n_prompt - window: max 92, min 36
    assert pyramid_budgets(64, 100, 3, 8, 2) == [92, 64, 36]


@pytest.mark.parametrize("n_kept,n_prompt,layers,beta", [(300, 1000, 8, 20), (128, 4000, 32, 20), (50, 80, 5, 3)])
def test_pyramid_budgets_preserve_the_mean(n_kept, n_prompt, layers, beta):
    b = pyramid_budgets(n_kept, n_prompt, layers, 8, beta)
    assert abs(np.mean(b) - n_kept) <= 0.5
    assert b == sorted(b, reverse=True) and min(b) >= 8


def test_pyramidkv_layer_cache_lengths(models, prompts):
    _, model = models
    ids = prompts[0]  # 37 tokens, budget 20, window 4, beta 2 -> layers [30, 10]
    press = PyramidKVPress(budget=20, window_size=4, beta=2)
    out = compress_one(model, press, ids)
    budgets = pyramid_budgets(20, 37, 2, 4, 2)
    assert budgets == [30, 10]
    assert [int(np.asarray(v).sum(-1).max()) for v in out.cache.valid] == budgets
    for layer, kp in enumerate(out.kept_positions):
        kp = np.asarray(kp[0])
        assert kp.shape[-1] == budgets[layer]
        assert np.isin(np.arange(33, 37), kp).all()  # window kept in every layer


# ----------------------------------------------------------------------------------------------
# kvpress invariants


SCORERS = [
    lambda **kw: SnapKVPress(window_size=4, **kw),
    lambda **kw: SnapKVPress.paper(window_size=6, **kw),
    lambda **kw: TOVAPress(**kw),
    lambda **kw: KnormPress(**kw),
    lambda **kw: ObservedAttentionPress(**kw),
    lambda **kw: ExpectedAttentionPress(**kw),
    lambda **kw: RandomPress(seed=0, **kw),
    lambda **kw: PyramidKVPress(window_size=4, beta=2, **kw),
]


@pytest.mark.parametrize("make", SCORERS)
def test_cache_length_top_scores_and_protection(models, prompts, make):
    _, model = models
    ids, mask = batch(prompts)
    press = make(compression_ratio=0.4)
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    T = out.scores[0].shape[-1]  # prompt slots (padded to whole prefill chunks)
    for b, p in enumerate(prompts):
        n = len(p)
        n_kept = int(n * 0.6)
        uniform = not isinstance(press, PyramidKVPress)
        for layer in range(len(out.cache.keys)):
            kp = np.asarray(out.kept_positions[layer][b])  # [K, C]
            valid = np.asarray(out.cache.valid[layer][b])
            if uniform:
                assert out.cache.keys[layer].shape[2] == int(len(prompts[0]) * 0.6)
                assert (valid.sum(-1) == n_kept).all()
            s = np.asarray(out.scores[layer][b])[:, T - n:]  # scores of positions 0..n-1
            prot = np.zeros(n, bool)
            if isinstance(press, SnapKVPress):
                prot[n - press.window_size:] = True
            elif isinstance(press, TOVAPress):
                prot[n - 1] = True
            elif isinstance(press, ExpectedAttentionPress):
                prot[: press.n_sink] = True
            for h in range(N_KV):
                kept = kp[h][kp[h] >= 0]
                assert (np.diff(kept) > 0).all()  # ascending original positions
                assert prot[kept].sum() == prot.sum()  # protected entries kept
                if not uniform:
                    continue
                free = n_kept - prot.sum()
                order = np.argsort(-np.where(prot, -np.inf, s[h]), kind="stable")[:free]
                chosen = kept[~prot[kept]]
                assert len(chosen) == free
                # the kept scores are the top scores (compared as values: exact ties may order either way);
                # this caught KnormPress running TOVAPress's compiled function (see the tree-structure test)
                np.testing.assert_allclose(
                    np.sort(s[h][chosen]), np.sort(s[h][order]), rtol=1e-5, atol=1e-6
                )


@pytest.mark.parametrize("make", [SCORERS[0], SCORERS[3], SCORERS[4]])
def test_ratio_zero_is_identity(models, prompts, make):
    hf, model = models
    ids = prompts[1]
    n = len(ids)
    _, _, keys, _ = hf_run(hf, ids)
    out = compress_one(model, make(compression_ratio=0.0), ids)
    for layer in range(len(keys)):
        kp = np.asarray(out.kept_positions[layer][0])
        assert (kp == np.arange(n)).all()
        assert np.asarray(out.cache.valid[layer][0]).all()
        k = np.asarray(out.cache.keys[layer][0], np.float64)  # [K, C, H]
        np.testing.assert_allclose(k[:, :n], keys[layer], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("make", [SCORERS[0], SCORERS[5]])
def test_budget_at_least_prompt_generates_like_full_kv(models, prompts, make):
    _, model = models
    ids, mask = batch(prompts)
    full = lkv_jax.generate(model, ids, 6, attention_mask=mask)
    got = lkv_jax.generate(model, ids, 6, press=make(budget=ids.shape[1] + 5), attention_mask=mask)
    np.testing.assert_array_equal(got, full)


@pytest.mark.parametrize("make", [SCORERS[1]])
def test_batch_of_two_equals_two_single_runs(models, prompts, make):
    _, model = models
    ids, mask = batch(prompts)
    press = make(budget=14)
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    toks = lkv_jax.generate(model, ids, 5, press=press, attention_mask=mask)
    for b, p in enumerate(prompts):
        single = compress_one(model, press, p)
        for layer in range(len(out.kept_positions)):
            np.testing.assert_array_equal(np.asarray(out.kept_positions[layer][b]),
                                          np.asarray(single.kept_positions[layer][0]))
        np.testing.assert_array_equal(toks[b], lkv_jax.generate(model, p[None], 5, press=press)[0])


# ----------------------------------------------------------------------------------------------
# errors


def test_errors(models, prompts):
    _, model = models
    with pytest.raises(ValueError, match="compression_ratio"):
        SnapKVPress(compression_ratio=1.0)
    with pytest.raises(ValueError, match="compression_ratio"):
        KnormPress(compression_ratio=-0.1)
    with pytest.raises(ValueError, match="protected"):
        SnapKVPress(budget=10, window_size=16)
    with pytest.raises(ValueError, match="protected"):
        ExpectedAttentionPress(budget=2)
    with pytest.raises(ValueError, match="unknown press"):
        make_press("snapkv2", budget=8)
    with pytest.raises(ValueError, match="longer than its window"):
        compress_one(model, SnapKVPress(budget=40, window_size=32), prompts[1])
    with pytest.raises(ValueError, match="fewer than its"):  # ratio leaves fewer entries than the window
        compress_one(model, SnapKVPress(compression_ratio=0.9, window_size=8), prompts[0])
    with pytest.raises(ValueError, match="kernel_size"):
        SnapKVPress(kernel_size=4)
    with pytest.raises(ValueError, match="pooling"):
        SnapKVPress(pooling="median")


def test_press_types_with_equal_fields_have_distinct_tree_structures():
    # regression: registered as plain dataclasses, KnormPress and TOVAPress (and ObservedAttention and
    # Random) at the same ratio had equal tree structures, so jit's cache could rarely serve one press the
    # other's compiled function (an intermittent wrong selection in test_cache_length_top_scores_and_protection)
    presses = [KnormPress(compression_ratio=0.4), TOVAPress(compression_ratio=0.4),
               ObservedAttentionPress(compression_ratio=0.4), RandomPress(seed=0, compression_ratio=0.4),
               SnapKVPress(compression_ratio=0.4), StreamingLLMPress(compression_ratio=0.4)]
    structures = [jax.tree_util.tree_structure(p) for p in presses]
    for i, a in enumerate(structures):
        for j, b in enumerate(structures):
            assert (a == b) == (i == j), (presses[i], presses[j])
    # and a press survives flatten / unflatten unchanged
    for p in presses:
        leaves, tree = jax.tree_util.tree_flatten(p)
        assert jax.tree_util.tree_unflatten(tree, leaves) == p
