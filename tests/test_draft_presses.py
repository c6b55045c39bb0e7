"""SpecKV and LAQ on a tiny random target and draft sharing a vocabulary: draft tokens against
transformers' greedy generate, scores against brute-force references from transformers' eager attention
on [prompt; draft] / [prompt; pseudo tokens], the compressed cache, ragged batches and the errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.inference import prepare_prompt
from lkv_jax.presses import LAQPress, SnapKVPress, SpecKVPress, make_press
from lkv_jax.presses.speckv import draft_tokens

N_KV, G = 2, 2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("draft")
    target = build_hf_model("llama", seed=0)
    draft = build_hf_model("llama", seed=1, num_hidden_layers=1)
    return (target, lkv_jax.load_hf(save_hf_model(target, root / "target")),
            draft, lkv_jax.load_hf(save_hf_model(draft, root / "draft")))


@pytest.fixture(scope="module")
def prompt():
    return np.random.RandomState(2).randint(3, 128, size=30)


def pool(x, k, mode):
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(k // 2, k // 2)])
    win = np.stack([pad[..., i:i + x.shape[-1]] for i in range(k)], axis=0)
    return win.mean(0) if mode == "avg" else win.max(0)


def eager_attentions(hf, ids):
    with torch.no_grad():
        out = hf(torch.tensor(np.asarray(ids))[None], output_attentions=True)
    return [a[0].double().numpy() for a in out.attentions]  # [L][N, T, T]


def test_speckv_draft_tokens_are_the_drafts_greedy_output(models, prompt):
    _, _, hf_draft, draft = models
    ids, valid = draft_tokens(draft, prepare_prompt(prompt[None], chunk_size=16), 6)
    with torch.no_grad():
        ref = hf_draft.generate(torch.tensor(prompt)[None], max_new_tokens=6, do_sample=False)[0, len(prompt):].numpy()
    n = int(np.asarray(valid[0]).sum())
    np.testing.assert_array_equal(np.asarray(ids[0])[:n], ref[:n])


def test_speckv_scores_max_over_window_and_draft_queries(models, prompt):
    hf, model, _, draft = models
    n, w, L, k = len(prompt), 4, 6, 7
    press = SpecKVPress(draft, n_draft_tokens=L, window_size=w, kernel_size=k, budget=12)
    out = lkv_jax.compress(model, prompt[None], press)
    toks, valid = draft_tokens(draft, prepare_prompt(prompt[None], chunk_size=512, vocab_size=128), L)
    toks = np.asarray(toks[0])[np.asarray(valid[0])]
    att = eager_attentions(hf, np.concatenate([prompt, toks]))
    T = out.scores[0].shape[-1] - L  # prompt slots (padded to whole chunks)
    for layer, a in enumerate(att):
        ref = a[:, n - w:, : n - w].max(1)  # max over the window and draft queries
        ref = ref.reshape(N_KV, G, n - w).max(1)  # and over the KV head's query heads
        ref = pool(ref, k, "max")
        np.testing.assert_allclose(np.asarray(out.scores[layer][0])[:, T - n: T - w], ref, rtol=2e-4, atol=1e-7)
        kp = np.asarray(out.kept_positions[layer][0])
        assert kp.shape == (N_KV, 12) and np.isin(np.arange(n - w, n), kp).all()  # window kept, drafts dropped
        assert (kp < n).all()


def test_speckv_batch_equals_single_runs(models, prompt):
    _, model, _, draft = models
    short = prompt[5:]
    ids = np.stack([prompt, np.concatenate([np.zeros(5, int), short])])
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    press = SpecKVPress(draft, n_draft_tokens=5, window_size=4, budget=10)
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    for b, p in enumerate([prompt, short]):
        single = lkv_jax.compress(model, p[None], press)
        for layer in range(len(out.kept_positions)):
            np.testing.assert_array_equal(np.asarray(out.kept_positions[layer][b]),
                                          np.asarray(single.kept_positions[layer][0]))


def test_laq_pseudo_tokens_and_scores(models, prompt):
    hf, model, _, _ = models
    n, w, k, P = len(prompt), 4, 7, 4
    # the pseudo tokens: greedy decoding from the SnapKV-compressed cache (same window, kernel, budget),
    # the first one from the prompt's own logits
    snap = SnapKVPress(window_size=w, kernel_size=k, pooling="max", budget=12)
    pseudo = lkv_jax.generate(model, prompt[None], P, press=snap, eos_token_id=())[0]
    # re-selection scores: those queries' mean attention over the FULL prompt, max-pooled, GQA mean.
    # Matching them also pins LAQ's own pseudo tokens to `pseudo` (other tokens give other scores).
    out = lkv_jax.compress(model, prompt[None], LAQPress(window_size=w, kernel_size=k, budget=12, n_pseudo_tokens=P))
    att = eager_attentions(hf, np.concatenate([prompt, pseudo]))
    T = out.scores[0].shape[-1]
    for layer, a in enumerate(att):
        ref = pool(a[:, n:, : n - w].mean(1), k, "max").reshape(N_KV, G, n - w).mean(1)
        np.testing.assert_allclose(np.asarray(out.scores[layer][0])[:, T - n: T - w], ref, rtol=2e-4, atol=1e-7)
        kp = np.asarray(out.kept_positions[layer][0])
        assert kp.shape == (N_KV, 12) and np.isin(np.arange(n - w, n), kp).all()


def test_speckv_generates_like_full_kv_with_a_large_budget(models, prompt):
    _, model, _, draft = models
    full = lkv_jax.generate(model, prompt[None], 5)
    press = make_press("speckv", budget=64, draft_model=draft, n_draft_tokens=6, window_size=4)  # draft jit shared
    np.testing.assert_array_equal(lkv_jax.generate(model, prompt[None], 5, press=press), full)


def test_self_drafted_speckv_is_the_response_attention_oracle(models, prompt):
    # "speckv:draft_model=self:window_size=1:kernel_size=1:reduction=mean" (runner and SpecKVPress): the target's own
    # greedy continuation scores the prompt by its mean attention (the label LookaheadKV learns), plus the
    # last prompt token's query, which produces the first response token
    from lkv_jax.evaluation.runner import PressSpec, Setting

    hf, model, _, _ = models
    n, L, budget = len(prompt), 6, 9
    spec = PressSpec.parse(f"speckv:draft_model=self:window_size=1:kernel_size=1:reduction=mean:n_draft_tokens={L}")
    press = spec.build(Setting("budget", budget))
    assert press == SpecKVPress("self", budget=budget, window_size=1, kernel_size=1, reduction="mean",
                                n_draft_tokens=L)
    out = lkv_jax.compress(model, prompt[None], press)
    with torch.no_grad():
        response = hf.generate(torch.tensor(prompt)[None], max_new_tokens=L, do_sample=False)[0, n:].numpy()
    att = eager_attentions(hf, np.concatenate([prompt, response]))
    for layer, a in enumerate(att):
        ref = a[:, n - 1:, : n - 1].mean(1).reshape(N_KV, G, n - 1).mean(1)  # [K, n - 1]
        top = np.sort(np.argsort(-ref, axis=-1)[:, : budget - 1], axis=-1)  # + the protected last token
        expect = np.concatenate([top, np.full((N_KV, 1), n - 1)], axis=-1)
        np.testing.assert_array_equal(np.asarray(out.kept_positions[layer][0]), expect)


def test_draft_errors(models, tmp_path, prompt):
    _, model, _, _ = models
    other = lkv_jax.load_hf(save_hf_model(build_hf_model("llama", vocab_size=96, num_hidden_layers=1), tmp_path / "d"))
    with pytest.raises(ValueError, match="vocabulary"):
        lkv_jax.compress(model, prompt[None], SpecKVPress(other, budget=40))
    with pytest.raises(TypeError, match="draft model"):
        SpecKVPress(budget=40)
    with pytest.raises(TypeError, match="draft model"):
        SpecKVPress("other", budget=40)
    with pytest.raises(ValueError, match="protected"):
        LAQPress(budget=8)  # below the 32-token window
