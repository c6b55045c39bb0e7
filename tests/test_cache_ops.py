"""prefill / glimpse / decode / generate against transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model
from transformers import DynamicCache

import lkv_jax


@pytest.fixture
def pair(tmp_path):
    hf = build_hf_model("llama", num_key_value_heads=2)
    return hf, lkv_jax.load_hf(save_hf_model(hf, tmp_path / "m"))


def test_chunked_prefill_equals_one_shot(pair, rng):
    _, model = pair
    ids = rng.randint(3, 128, size=(2, 100))
    ref_cache, ref_logits = lkv_jax.prefill(model, ids, chunk_size=128)
    for chunk in (8, 24, 50):
        cache, logits = lkv_jax.prefill(model, ids, chunk_size=chunk)
        np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), atol=1e-4)  # summation order differs
        for l in range(cache.n_layers):
            ok = np.asarray(cache.valid[l])
            ok_ref = np.asarray(ref_cache.valid[l])
            assert ok.sum() == ok_ref.sum() == 2 * 2 * 100
            np.testing.assert_allclose(np.asarray(cache.keys[l])[ok], np.asarray(ref_cache.keys[l])[ok_ref], atol=5e-5)
            np.testing.assert_array_equal(np.asarray(cache.positions[l])[ok],
                                          np.asarray(ref_cache.positions[l])[ok_ref])


def test_glimpse_mass_equals_transformers_eager_attention(pair, rng):
    hf, model = pair
    full = rng.randint(3, 128, size=(1, 45))
    with torch.no_grad():
        out = hf(torch.tensor(full), output_attentions=True)
    cache, _ = lkv_jax.prefill(model, full[:, :37], chunk_size=16)
    g = lkv_jax.glimpse(model, cache, full[:, 37:], reduce=None)
    slots = np.asarray(cache.valid[0])[0, 0]  # prompt slots (after left padding to whole chunks)
    for l in range(2):
        ref = out.attentions[l][0, :, 37:, :37].numpy()  # [N, L, T]
        ours = np.asarray(g.scores[l])[0][:, :, slots]
        np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(g.logits[0]), out.logits[0, 37:].numpy(), atol=1e-4)
    # mean over the suffix queries
    gm = lkv_jax.glimpse(model, cache, full[:, 37:], reduce="mean")
    np.testing.assert_allclose(np.asarray(gm.scores[1])[0][:, slots],
                               out.attentions[1][0, :, 37:, :37].numpy().mean(1), atol=1e-5)


def test_decode_after_prefill_equals_full_forward(pair, rng):
    hf, model = pair
    full = rng.randint(3, 128, size=(2, 30))
    with torch.no_grad():
        ref = hf(torch.tensor(full)).logits.numpy()
    cache, logits = lkv_jax.prefill(model, full[:, :25], extra_capacity=5, chunk_size=8)
    np.testing.assert_allclose(np.asarray(logits), ref[:, 24], atol=1e-4)
    for t in range(25, 30):
        logits, cache = lkv_jax.decode(model, cache, full[:, t])
        np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-4)
    with pytest.raises(ValueError, match="room"):
        lkv_jax.decode(model, cache, full[:, 0])


def test_decode_on_noncontiguous_cache_equals_pruned_transformers_cache(pair, rng):
    """Evict different positions per KV head, then decode: compare with transformers decoding from
    the same entries gathered out of its DynamicCache (what kvpress does) at the true position."""
    hf, model = pair
    T, n_keep = 40, 17
    ids = rng.randint(3, 128, size=(1, T))
    nxt = rng.randint(3, 128, size=(1, 3))
    keep = np.stack([np.sort(rng.choice(T, n_keep, replace=False)) for _ in range(2)])  # [K, n]
    # ours: prefill, then gather per head by hand into a compact cache
    cache, _ = lkv_jax.prefill(model, ids, chunk_size=T)
    import jax.numpy as jnp

    from lkv_jax.eviction import compact_cache

    slots = [jnp.asarray(keep[None], jnp.int32)] * cache.n_layers
    kept = [jnp.ones((1, 2, n_keep), bool)] * cache.n_layers
    small, positions = compact_cache(cache, slots, kept)
    np.testing.assert_array_equal(np.asarray(positions[0])[0], keep)
    small = small.grow(3)
    # transformers: full prompt cache, gathered per head
    with torch.no_grad():
        out = hf(torch.tensor(ids), use_cache=True)
        hf_cache = out.past_key_values
        idx = torch.tensor(keep)[None, :, :, None]
        for layer in hf_cache.layers:
            layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = torch.gather(layer.values, 2, idx.expand(-1, -1, -1, layer.values.shape[-1]))
        assert isinstance(hf_cache, DynamicCache)
        for t in range(3):
            pos = T + t
            o = hf(torch.tensor(nxt[:, t:t + 1]), cache=hf_cache, position_ids=torch.tensor([[pos]]),
                   cache_position=torch.tensor([n_keep + t]), use_cache=True)
            hf_cache = o.past_key_values
            logits, small = lkv_jax.decode(model, small, nxt[:, t])
            np.testing.assert_allclose(np.asarray(logits)[0], o.logits[0, -1].numpy(), atol=1e-4)


def test_generate_matches_transformers_greedy_with_left_padding(pair, rng):
    hf, model = pair
    ids = rng.randint(3, 128, size=(2, 20))
    mask = np.ones_like(ids)
    mask[1, :6] = 0
    ids[1, :6] = 0
    with torch.no_grad():
        ref = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                          do_sample=False)[:, 20:].numpy()
    ours = lkv_jax.generate(model, ids, 12, attention_mask=mask)
    np.testing.assert_array_equal(ours, ref)
    # an EOS that row 0 emits at step 3 stops that row: both libraries pad it afterwards
    eos = int(ref[0, 3])
    with torch.no_grad():
        ref2 = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=12,
                           do_sample=False, eos_token_id=eos, pad_token_id=0)[:, 20:].numpy()
    ours2 = lkv_jax.generate(model, ids, 12, attention_mask=mask, eos_token_id=eos, pad_token_id=0)
    np.testing.assert_array_equal(ours2, ref2)
    assert (ours2[0, 4:] == 0).all()


def test_bad_inputs_raise_clear_errors(pair):
    _, model = pair
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        lkv_jax.forward(model, np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ValueError, match="token ids must lie"):
        lkv_jax.forward(model, np.array([[1, 2, 500]]))
    with pytest.raises(ValueError, match="attention_mask shape"):
        lkv_jax.forward(model, np.ones((2, 5), np.int32), attention_mask=np.ones((2, 4)))
    with pytest.raises(ValueError, match="at least one real token"):
        lkv_jax.forward(model, np.ones((2, 5), np.int32), attention_mask=np.array([[1] * 5, [0] * 5]))
    with pytest.raises(ValueError, match="max_new_tokens"):
        lkv_jax.generate(model, np.ones((1, 5), np.int32), 0)
