"""Logits parity with transformers (eager attention, float32) for every supported family."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax


def _randomize_norms_and_biases(hf, seed=1):
    """HF initialises norms to 1 and biases to 0; random values make parity tests bite."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=g))
            elif name.endswith(".bias"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return hf


def _hf_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


CASES = {
    "llama_kv1": ("llama", dict(num_key_value_heads=1)),
    "llama_kv2": ("llama", dict(num_key_value_heads=2)),
    "llama_kv4": ("llama", dict(num_key_value_heads=4)),
    "llama2_untied": ("llama", dict(rope_theta=10000.0)),
    "llama3_rope_scaling": ("llama", dict(rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}, rope_theta=500000.0)),
    "llama_attention_bias": ("llama", dict(attention_bias=True)),
    "mistral": ("mistral", dict(sliding_window=None)),
    "qwen2_biases": ("qwen2", dict()),
    "qwen3_norms_tied": ("qwen3", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    "qwen3_untied": ("qwen3", dict(tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers_float32(case, tmp_path, rng):
    family, overrides = CASES[case]
    hf = _randomize_norms_and_biases(build_hf_model(family, **overrides))
    model = lkv_jax.load_hf(save_hf_model(hf, tmp_path / case), dtype="float32")
    ids = rng.randint(3, 128, size=(2, 150))  # > original_max_position_embeddings: llama3 scaling matters
    ours = np.asarray(lkv_jax.forward(model, ids, chunk_size=64))
    assert np.abs(ours - _hf_logits(hf, ids)).max() <= 1e-4


def test_bfloat16_within_bf16_tolerance(tmp_path, rng):
    hf = _randomize_norms_and_biases(build_hf_model("qwen2", init_std=0.1))
    model = lkv_jax.load_hf(save_hf_model(hf, tmp_path / "m"), dtype="bfloat16")
    assert model.dtype == np.dtype("bfloat16")
    ids = rng.randint(3, 128, size=(1, 64))
    ref = _hf_logits(hf, ids)
    ours = np.asarray(lkv_jax.forward(model, ids))
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 0.05 * scale  # bf16 has 8 mantissa bits over 2 layers
    assert (ours.argmax(-1) == ref.argmax(-1)).mean() > 0.9


def test_left_padded_rows_equal_unpadded(tmp_path, rng):
    hf = build_hf_model("llama")
    model = lkv_jax.load_hf(save_hf_model(hf, tmp_path / "m"))
    ids = rng.randint(3, 128, size=(2, 40))
    mask = np.ones_like(ids)
    mask[1, :15] = 0
    ours = np.asarray(lkv_jax.forward(model, ids, attention_mask=mask))
    ref = _hf_logits(hf, ids[1:, 15:])
    assert np.abs(ours[1, 15:] - ref[0]).max() <= 1e-4


def test_old_style_rope_config_is_read(tmp_path):
    """Files written before transformers 5 spell RoPE as rope_theta + rope_scaling{"type": ...}."""
    hf = build_hf_model("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}, rope_theta=20000.0)
    d = save_hf_model(hf, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg.pop("rope_parameters", None)
    cfg["rope_theta"], cfg["rope_scaling"] = 20000.0, {"type": "linear", "factor": 2.0}
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    model = lkv_jax.load_hf(d)
    assert model.config.rope.rope_type == "linear" and model.config.rope.factor == 2.0
    assert model.config.rope.theta == 20000.0
    ids = np.arange(3, 90)[None]
    assert np.abs(np.asarray(lkv_jax.forward(model, ids)) - _hf_logits(hf, ids)).max() <= 1e-4


def test_mistral_sliding_window_shorter_than_sequence_is_an_error(tmp_path):
    hf = build_hf_model("mistral", sliding_window=16)
    model = lkv_jax.load_hf(save_hf_model(hf, tmp_path / "m"))
    lkv_jax.forward(model, np.arange(3, 19)[None])  # 16 tokens fit the window: same results
    with pytest.raises(lkv_jax.UnsupportedModelError, match="sliding_window=16"):
        lkv_jax.forward(model, np.arange(3, 40)[None])


def test_training_forward_matches_transformers_over_query_blocks(tmp_path, rng):
    """forward_dense_pure (the training forward) at 300 tokens: three query blocks of 128, the last one
    partial, each attending only to the keys before its end."""
    from lkv_jax.inference import forward_dense_pure

    hf = _randomize_norms_and_biases(build_hf_model("llama"))
    model = lkv_jax.load_hf(save_hf_model(hf, tmp_path / "m"), dtype="float32")
    ids = rng.randint(3, 128, size=(2, 300))
    assert np.abs(np.asarray(forward_dense_pure(model, ids)) - _hf_logits(hf, ids)).max() <= 1e-4


@pytest.mark.parametrize("block", [4, 7, 64])
def test_dense_causal_attention_and_its_gradients_match_torch(block, rng):
    """Outputs and q/k/v gradients against torch's scaled_dot_product_attention with the same causal and
    padding mask (GQA heads expanded), for blocks that divide T, do not, and exceed it."""
    import jax
    import jax.numpy as jnp

    from lkv_jax.attention import dense_causal_attention

    B, T, N, K, H = 2, 23, 4, 2, 8
    q, k, v, r = (rng.randn(B, T, n, H).astype(np.float32) for n in (N, K, K, N))
    valid = np.ones((B, T), bool)
    valid[1, :5] = False  # left padding

    def ours(q, k, v):
        return (dense_causal_attention(q, k, v, jnp.asarray(valid), block=block) * r).sum()

    val, grads = jax.value_and_grad(ours, argnums=(0, 1, 2))(q, k, v)

    tq, tk, tv = (torch.tensor(x, requires_grad=True) for x in (q, k, v))
    mask = torch.tril(torch.ones(T, T, dtype=torch.bool))[None, None] & torch.tensor(valid)[:, None, None, :]
    rows = mask.any(-1, keepdim=True)  # padded query rows see no key: ours gives 0 there
    out = torch.nn.functional.scaled_dot_product_attention(
        tq.transpose(1, 2), tk.repeat_interleave(N // K, 2).transpose(1, 2),
        tv.repeat_interleave(N // K, 2).transpose(1, 2), attn_mask=mask | ~rows)
    out = torch.where(rows, out, 0.0).transpose(1, 2)
    ref = (out * torch.tensor(r)).sum()
    ref.backward()
    assert abs(float(val) - ref.item()) <= 1e-3
    for g, t in zip(grads, (tq, tk, tv), strict=True):
        assert np.abs(np.asarray(g) - t.grad.numpy()).max() <= 1e-4
