"""The greedy decode loop: attention over the cache, decoding from a compressed cache against transformers
decoding from the same kept entries, donation, and no whole-cache copies in the compiled loop."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model
from flax import nnx

import lkv_jax
from lkv_jax.attention import cache_attention
from lkv_jax.decoding import _distinct_buffers, generate_from_cache, jitted_greedy_loop
from lkv_jax.presses import SnapKVPress
from lkv_jax.sharding import resolve_mesh


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = build_hf_model("llama", num_key_value_heads=2)
    return hf, lkv_jax.load_hf(save_hf_model(hf, tmp_path_factory.mktemp("m")))


@pytest.mark.parametrize("B,T", [(1, 1), (2, 1), (1, 3)])
def test_cache_attention_equals_numpy_softmax(B, T, rng):
    """Both formulations (multiply + reduce for one query on CPU, dots otherwise) against a float64 softmax,
    with a different validity per KV head."""
    K, G, S, H = 2, 3, 37, 16
    q = rng.randn(B, T, K * G, H).astype(np.float32)
    keys, values = rng.randn(B, K, S, H).astype(np.float32), rng.randn(B, K, S, H).astype(np.float32)
    valid = rng.rand(B, K, S) < 0.7
    valid[..., 0] = True
    out = np.asarray(cache_attention(jnp.asarray(q), jnp.asarray(keys), jnp.asarray(values),
                                     jnp.asarray(valid)[:, :, None, None, :]))
    ref = np.zeros((B, T, K * G, H))
    for b in range(B):
        for n in range(K * G):
            k = n // G  # query head n reads KV head n // G
            s = q[b, :, n].astype(np.float64) @ keys[b, k].T.astype(np.float64) / np.sqrt(H)
            s = np.where(valid[b, k][None], s, -np.inf)
            p = np.exp(s - s.max(-1, keepdims=True))
            ref[b, :, n] = (p / p.sum(-1, keepdims=True)) @ values[b, k]
    np.testing.assert_allclose(out, ref, atol=2e-5)


def _transformers_from_kept(hf, ids, kept_positions, n_new):
    """Greedy tokens of transformers decoding from its full prompt cache pruned, per layer and KV head, to
    the given original positions (int [B, K, n] per layer), each new token at its true position."""
    B, T = ids.shape
    with torch.no_grad():
        out = hf(torch.tensor(ids), use_cache=True)
        cache = out.past_key_values
        for layer, kept in zip(cache.layers, kept_positions, strict=True):
            idx = torch.tensor(np.asarray(kept), dtype=torch.long)[..., None]
            layer.keys = torch.gather(layer.keys, 2, idx.expand(-1, -1, -1, layer.keys.shape[-1]))
            layer.values = torch.gather(layer.values, 2, idx.expand(-1, -1, -1, layer.values.shape[-1]))
        n_kept = kept_positions[0].shape[-1]
        tok = out.logits[:, -1].argmax(-1)
        tokens = [tok]
        for t in range(n_new - 1):
            o = hf(tok[:, None], past_key_values=cache, position_ids=torch.full((B, 1), T + t),
                   cache_position=torch.tensor([n_kept + t]), use_cache=True)
            cache, tok = o.past_key_values, o.logits[:, -1].argmax(-1)
            tokens.append(tok)
    return torch.stack(tokens, 1).numpy()


@pytest.mark.parametrize("B", [1, 2])
def test_generate_from_compressed_cache_equals_transformers_on_the_kept_entries(pair, rng, B):
    hf, model = pair
    T, n_new, press = 48, 10, SnapKVPress(budget=20, window_size=8)
    ids = rng.randint(3, 128, size=(B, T))
    kept = lkv_jax.compress(model, ids, press).kept_positions
    ours = lkv_jax.generate(model, ids, n_new, press=press, eos_token_id=())
    np.testing.assert_array_equal(ours, _transformers_from_kept(hf, ids, kept, n_new))


def test_donated_decoding_equals_undonated_and_consumes_the_cache(pair, rng):
    hf, model = pair
    ids = rng.randint(3, 128, size=(2, 24))
    cache, logits = lkv_jax.prefill(model, ids, extra_capacity=7)
    kept = generate_from_cache(model, cache, logits, 8, eos_token_id=())
    assert not cache.keys[0].is_deleted()  # the caller's cache is untouched without donation
    again = generate_from_cache(model, cache, logits, 8, eos_token_id=())
    donated = generate_from_cache(model, cache, logits, 8, eos_token_id=(), donate_cache=True)
    np.testing.assert_array_equal(kept, again)
    np.testing.assert_array_equal(donated, kept)
    assert cache.keys[0].is_deleted() and cache.values[-1].is_deleted()


def _cache_copies(hlo: str, S: int, H: int) -> list[str]:
    """Instructions of a compiled module that copy or transpose a whole [.., S, H] cache buffer, alone or
    inside a fusion whose only work is that copy/transpose."""
    found = []
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = \w+\[([\d,]*)\]\S* (copy|transpose)\(", line)
        if m and {S, H} <= {int(d) for d in m.group(2).split(",") if d}:
            found.append(m.group(1))
    return found


@pytest.mark.parametrize("B", [1, 2])
def test_donated_decode_loop_never_copies_the_cache(pair, rng, B):
    """The compiled loop `generate` runs updates the donated cache in place and reads it where it lies: no
    copy or transpose of a whole cache buffer, at entry or per step (XLA:CPU used to transpose the key cache
    and copy the value cache every step at batch 1, and every call copied the cache into the loop)."""
    _, model = pair
    ids = rng.randint(3, 128, size=(B, 120))
    cache, logits = lkv_jax.prefill(model, ids, extra_capacity=7)
    S, H = cache.capacity(), model.config.head_dim
    graphdef, params = nnx.split(model)
    loop = lambda donate: jitted_greedy_loop(graphdef, params, resolve_mesh(None), max_new_tokens=8, eos=(), pad=0,
                                             donate_cache=donate)
    hlo = loop(True).lower(params, _distinct_buffers(cache), logits).compile().as_text()
    assert "while" in hlo
    assert _cache_copies(hlo, S, H) == []
    # the detector does find them where they exist: the undonated loop copies the cache into its carry
    plain = loop(False).lower(params, cache, logits).compile().as_text()
    assert len(_cache_copies(plain, S, H)) >= 2 * model.config.num_hidden_layers
    jax.block_until_ready(cache)
