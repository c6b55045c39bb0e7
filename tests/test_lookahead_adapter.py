"""The lookahead adapter, LookaheadKVPress and the response labels, against independent references:
a float64 numpy Llama forward written here from the transformers weights, and transformers' own eager
attention probabilities."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lkv_jax
from lkv_jax.config import ModelConfig
from lkv_jax.inference import forward_dense_pure, prefill_pure, prepare_prompt
from lkv_jax.lookahead import (
    AdapterMismatchError,
    LabelDataset,
    LookaheadAdapter,
    compute_labels,
    count_params,
    init_adapter,
    load_adapter,
    make_label_dataset,
    save_adapter,
)
from lkv_jax.presses import LookaheadKVPress
from lkv_jax.presses.registry import make_press
from lkv_jax.suffix_scoring import pool_scores

HF_PROJ = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
           "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import build_hf_model, save_hf_model

    hf = build_hf_model("llama")
    d = save_hf_model(hf, tmp_path_factory.mktemp("llama"))
    return hf, lkv_jax.load_hf(d, dtype="float32")


def random_adapter(config, seed=1, n_lookahead=6, rank=4, targets=None):
    """An adapter whose B is non-zero (a fresh one has B = 0)."""
    kw = {} if targets is None else {"targets": targets}
    ad = init_adapter(config, jax.random.key(seed), n_lookahead=n_lookahead, rank=rank, alpha=8.0, **kw)
    keys = iter(jax.random.split(jax.random.key(seed + 100), 1000))
    layers = tuple({p: {"a": t["a"], "b": jax.random.normal(next(keys), t["b"].shape) * 0.3} for p, t in layer.items()}
                   for layer in ad.layers)
    return LookaheadAdapter(embeddings=ad.embeddings * 20, layers=layers, rank=ad.rank, alpha=ad.alpha,
                            targets=ad.targets)


# ----------------------------------------------------------------------------------------------
# independent float64 numpy reference (weights read from the transformers model, torch [out, in])


def numpy_forward(hf, x, adapter=None, lora_rows=None):
    """x float64 [T, D] input embeddings; LoRA (our [in, R] @ [R, out] convention) added on rows
    `lora_rows`. Returns (per-layer attention probabilities [N, T, T], logits [T, V])."""
    sd = {k: v.detach().double().numpy() for k, v in hf.state_dict().items()}
    c = hf.config
    N, K, H = c.num_attention_heads, c.num_key_value_heads, c.hidden_size // c.num_attention_heads
    T = x.shape[0]
    pos = np.arange(T)
    inv = 1.0 / (c.rope_parameters["rope_theta"] ** (np.arange(0, H, 2) / H))
    ang = pos[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rope(t):  # [T, heads, H], half-split rotation
        rot = np.concatenate([-t[..., H // 2:], t[..., : H // 2]], -1)
        return t * cos[:, None] + rot * sin[:, None]

    def norm(h, w):
        return w * h / np.sqrt((h * h).mean(-1, keepdims=True) + c.rms_norm_eps)

    def lin(l, name, h):
        y = h @ sd[f"model.layers.{l}.{HF_PROJ[name]}.weight"].T
        if adapter is not None and name in adapter.targets:
            a = np.asarray(adapter.layers[l][name]["a"], np.float64)
            b = np.asarray(adapter.layers[l][name]["b"], np.float64)
            y = y + np.where(lora_rows[:, None], (h @ a @ b) * adapter.scale, 0.0)
        return y

    probs = []
    for l in range(c.num_hidden_layers):
        h = norm(x, sd[f"model.layers.{l}.input_layernorm.weight"])
        q = rope(lin(l, "q", h).reshape(T, N, H))
        k = rope(lin(l, "k", h).reshape(T, K, H))
        v = lin(l, "v", h).reshape(T, K, H)
        k, v = np.repeat(k, N // K, 1), np.repeat(v, N // K, 1)
        s = np.einsum("tnh,snh->nts", q, k) / np.sqrt(H)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        probs.append(p)
        x = x + lin(l, "o", np.einsum("nts,snh->tnh", p, v).reshape(T, N * H))
        h = norm(x, sd[f"model.layers.{l}.post_attention_layernorm.weight"])
        g, u = lin(l, "gate", h), lin(l, "up", h)
        x = x + lin(l, "down", g / (1 + np.exp(-g)) * u)
    logits = norm(x, sd["model.norm.weight"]) @ sd["lm_head.weight"].T
    return probs, logits


# ----------------------------------------------------------------------------------------------
# adapter


LLAMA_8B = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)


def test_parameter_count_llama_8b_shape():
    from lkv_jax.lookahead import base_param_count

    ad = jax.eval_shape(lambda k: init_adapter(LLAMA_8B, k), jax.random.key(0))
    n = count_params(ad)
    # by hand: per layer r * (in + out) summed over q,k,v,o,gate,up,down; plus 32 x 4096 embeddings
    per_layer = 8 * ((4096 + 4096) + (4096 + 1024) * 2 + (4096 + 4096) + (4096 + 14336) * 3)
    assert n == 32 * per_layer + 32 * 4096 == 21_102_592
    assert base_param_count(LLAMA_8B) == 8_030_261_248  # Llama-3.1-8B
    assert n / base_param_count(LLAMA_8B) < 0.005


def test_init_shapes_and_zero_b(tiny):
    _, model = tiny
    ad = init_adapter(model.config, jax.random.key(0), n_lookahead=32, rank=8, alpha=32, targets=("v", "q"))
    assert ad.embeddings.shape == (32, 64) and ad.embeddings.dtype == jnp.float32
    assert ad.targets == ("q", "v") and ad.scale == 4.0
    assert ad.layers[1]["v"]["a"].shape == (64, 8) and ad.layers[1]["v"]["b"].shape == (8, 32)
    assert all(float(jnp.abs(t["b"]).max()) == 0.0 for layer in ad.layers for t in layer.values())
    assert float(jnp.abs(ad.layers[0]["q"]["a"]).max()) > 0
    with pytest.raises(ValueError, match="targets"):
        init_adapter(model.config, jax.random.key(0), targets=("q", "wq"))


def test_zero_b_adapter_equals_base(tiny):
    """B = 0 (a fresh adapter) with the LoRA switched on everywhere: logits bit-identical to the base."""
    _, model = tiny
    ad = init_adapter(model.config, jax.random.key(3))
    ids = jnp.asarray(np.random.RandomState(0).randint(3, 128, (2, 12)))
    base = forward_dense_pure(model, ids)
    on = forward_dense_pure(model, ids, lora=ad.layers, lora_scale=ad.scale, lora_mask=jnp.ones((2, 12), bool))
    np.testing.assert_array_equal(np.asarray(on), np.asarray(base))


def test_random_adapter_leaves_prompt_bit_identical(tiny):
    """With a non-zero adapter, the press's prompt logits and prompt KV equal a plain prefill bit for bit."""
    _, model = tiny
    ad = random_adapter(model.config)
    ids = np.random.RandomState(1).randint(3, 128, (2, 21))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    prompt = prepare_prompt(ids, mask, 8, model.config.vocab_size)
    press = LookaheadKVPress(ad, budget=4)
    T = prompt.ids.shape[1]
    graphdef, params = nnx.split(model)

    @jax.jit
    def both(params, press):
        m = nnx.merge(graphdef, params)
        scored = press.prefill_and_score(m, prompt.ids, prompt.valid, prompt.positions, prompt.chunk)
        base = prefill_pure(m, prompt.ids, prompt.valid, prompt.positions, chunk=prompt.chunk, capacity=T)
        return scored, base

    scored, (cache, logits) = both(params, press)
    np.testing.assert_array_equal(np.asarray(scored.logits), np.asarray(logits))
    for l in range(model.config.num_hidden_layers):
        np.testing.assert_array_equal(np.asarray(scored.cache.keys[l][:, :, :T]), np.asarray(cache.keys[l]))
        np.testing.assert_array_equal(np.asarray(scored.cache.values[l][:, :, :T]), np.asarray(cache.values[l]))
    # and the compressed cache decodes exactly as the base model from the kept entries
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    ref = lkv_jax.compress(model, ids, LookaheadKVPress(ad, budget=30), attention_mask=mask)
    assert out.cache.capacity(0) == 4 and ref.cache.capacity(0) == 21  # budget clipped to the longest prompt
    np.testing.assert_array_equal(np.asarray(out.logits), np.asarray(ref.logits))


def test_budget_at_least_prompt_generates_like_full_kv(tiny):
    """Nothing evicted: generation after LookaheadKV equals the plain model's, token for token. Decoding
    continues at the prompt's next position; the lookahead suffix the scoring appended is gone (a cache
    that kept the suffix's positions decoded every token n_lookahead positions too far)."""
    _, model = tiny
    ad = random_adapter(model.config)
    ids = np.random.RandomState(3).randint(3, 128, (2, 19))
    mask = np.ones_like(ids)
    mask[0, :6] = 0
    press = LookaheadKVPress(ad, budget=ids.shape[1] + 5)
    out = lkv_jax.compress(model, ids, press, attention_mask=mask)
    np.testing.assert_array_equal(np.asarray(out.cache.next_position), mask.sum(1))
    full = lkv_jax.generate(model, ids, 8, attention_mask=mask)
    np.testing.assert_array_equal(lkv_jax.generate(model, ids, 8, press=press, attention_mask=mask), full)


def test_safetensors_round_trip_and_mismatch(tiny, tmp_path):
    from safetensors import safe_open

    _, model = tiny
    ad = random_adapter(model.config, targets=("q", "down"))
    path = tmp_path / "a" / "adapter.safetensors"
    save_adapter(ad, path)
    with safe_open(str(path), framework="numpy") as f:
        names, meta = set(f.keys()), f.metadata()
    assert names == {"lookahead.embeddings"} | {f"layers.{l}.{p}.lora_{x}" for l in range(2) for p in ("q", "down")
                                                for x in "ab"}
    assert meta["rank"] == "4" and json.loads(meta["targets"]) == ["q", "down"] and float(meta["alpha"]) == 8.0
    back = load_adapter(path, model.config)
    assert (back.rank, back.alpha, back.targets) == (ad.rank, ad.alpha, ad.targets)
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(ad), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    other = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(AdapterMismatchError, match="3"):
        load_adapter(path, other)
    wider = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    with pytest.raises(AdapterMismatchError, match="down.lora_a"):
        load_adapter(path, wider)
    with pytest.raises(FileNotFoundError):
        load_adapter(tmp_path / "missing.safetensors")


# ----------------------------------------------------------------------------------------------
# the press


def test_pooling_hand_values():
    s = jnp.asarray([[[1.0, 2.0, 3.0, 0.0]]])
    np.testing.assert_allclose(np.asarray(pool_scores(s, "avg", 3))[0, 0], [1.0, 2.0, 5.0 / 3, 1.0], rtol=1e-6)
    np.testing.assert_allclose(np.asarray(pool_scores(s, "max", 3))[0, 0], [2.0, 3.0, 3.0, 3.0])


@pytest.mark.parametrize("gqa", ["mean", "max"])
def test_press_scores_match_numpy_forward(tiny, gqa):
    """Scores = mean over lookahead queries of attention on each prompt key (brute-force numpy forward
    of [prompt; lookahead] with the LoRA on the lookahead rows only), reduced over each KV head's group."""
    hf, model = tiny
    ad = random_adapter(model.config, n_lookahead=5)
    ids = np.random.RandomState(2).randint(3, 128, 19)
    press = LookaheadKVPress(ad, budget=6, gqa_reduction=gqa)
    out = lkv_jax.compress(model, ids[None], press, chunk_size=8)
    T, L = len(ids), 5
    emb = hf.model.embed_tokens.weight.detach().double().numpy()
    x = np.concatenate([emb[ids], np.asarray(ad.embeddings, np.float64)])
    probs, _ = numpy_forward(hf, x, ad, lora_rows=np.arange(T + L) >= T)
    pad = out.scores[0].shape[-1] - T - L  # left padding of the chunked prompt
    for l, p in enumerate(probs):
        per_head = p[:, T:, :T].mean(1)  # [N, T]
        grouped = per_head.reshape(2, 2, T)
        want = grouped.mean(1) if gqa == "mean" else grouped.max(1)
        got = np.asarray(out.scores[l][0, :, pad:pad + T])
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=1e-6)
        # kept: the top-6 prompt positions per KV head, ascending
        top = np.sort(np.argsort(-want, axis=-1)[:, :6], axis=-1)
        np.testing.assert_array_equal(np.asarray(out.kept_positions[l][0]), top)


def test_press_construction_and_registry(tiny):
    _, model = tiny
    ad = init_adapter(model.config, jax.random.key(0), n_lookahead=4)
    p = make_press("lookaheadkv", compression_ratio=0.5, adapter=ad, pooling="avg", kernel_size=3)
    assert isinstance(p, LookaheadKVPress) and p.compression_ratio == 0.5 and p.suffix_slots == 4
    assert LookaheadKVPress(ad, 0.9).compression_ratio == 0.9
    leaves, treedef = jax.tree.flatten(p)
    assert [x.shape for x in leaves] == [x.shape for x in jax.tree.leaves(ad)]  # the adapter is the only leaf
    assert jax.tree.unflatten(treedef, leaves).pooling == "avg"
    with pytest.raises(ValueError, match="needs an adapter"):
        make_press("lookaheadkv", budget=8)
    with pytest.raises(ValueError, match="gqa_reduction"):
        LookaheadKVPress(ad, budget=8, gqa_reduction="sum")
    with pytest.raises(ValueError, match="kernel_size"):
        LookaheadKVPress(ad, budget=8, pooling="max", kernel_size=4)
    toks = lkv_jax.generate(model, np.arange(3, 23)[None], 4, press=p)
    assert toks.shape[0] == 1 and 1 <= toks.shape[1] <= 4


# ----------------------------------------------------------------------------------------------
# labels


def hf_labels(hf, prompt, response):
    """Brute force: transformers eager attentions on [prompt; response]; mean over response rows of
    each head's probabilities on the prompt columns, renormalised over the prompt."""
    import torch

    with torch.no_grad():
        out = hf(torch.tensor([list(prompt) + list(response)]), output_attentions=True)
    T = len(prompt)
    lab = np.stack([a[0, :, T:, :T].double().numpy().mean(1) for a in out.attentions])  # [layers, N, T]
    return lab / lab.sum(-1, keepdims=True)


def test_labels_match_transformers_attention(tiny):
    hf, model = tiny
    rs = np.random.RandomState(5)
    prompts = [list(rs.randint(3, 128, 23)), list(rs.randint(3, 128, 9))]
    responses = [list(rs.randint(3, 128, 7)), list(rs.randint(3, 128, 2))]
    labels = compute_labels(model, prompts, responses, chunk_size=8)
    for p, r, lab in zip(prompts, responses, labels, strict=True):
        assert lab.dtype == np.float32 and lab.shape == (2, 4, len(p))
        np.testing.assert_allclose(lab, hf_labels(hf, p, r), rtol=2e-4, atol=1e-6)


def test_label_dataset_resumable_and_matches_generate(tiny, tmp_path, monkeypatch):
    from lkv_jax.lookahead import label_store

    hf, model = tiny
    rs = np.random.RandomState(6)
    prompts = [list(rs.randint(3, 128, n)) for n in (12, 30, 7, 18, 25)]
    out = tmp_path / "labels"
    make = dict(max_new_tokens=6, batch_size=2, shard_size=2, progress=False)
    # killed while writing its second shard (of three): the first is whole, the second never appears
    real_encode, records = label_store.encode_sample, []

    def dying(*args):
        records.append(1)
        if len(records) == 3:
            raise KeyboardInterrupt("killed")
        return real_encode(*args)

    monkeypatch.setattr(label_store, "encode_sample", dying)
    with pytest.raises(KeyboardInterrupt):
        make_label_dataset(model, prompts, out, **make)
    monkeypatch.setattr(label_store, "encode_sample", real_encode)
    assert [p.name for p in (out / "shards").iterdir()] == ["00000.array_record"]
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LabelDataset(out)
    first = out / "shards" / "00000.array_record"
    before = first.stat().st_mtime_ns
    make_label_dataset(model, prompts, out, **make)  # resumed after the last whole shard
    assert first.stat().st_mtime_ns == before
    ds = LabelDataset(out)
    assert len(ds) == 5 and list(ds.prompt_lengths) == [12, 30, 7, 18, 25]
    import torch

    for i in (1, 2):
        s = ds[i]
        with torch.no_grad():  # the response is transformers' greedy continuation
            g = hf.generate(torch.tensor([prompts[i]]), max_new_tokens=6, do_sample=False, eos_token_id=2,
                            pad_token_id=0)[0, len(prompts[i]):].tolist()
        want = g[: g.index(2) + 1] if 2 in g else g
        assert s["response_ids"].tolist() == want
        np.testing.assert_allclose(s["labels"], hf_labels(hf, prompts[i], want), rtol=2e-4, atol=1e-6)
    whole = LabelDataset(make_label_dataset(model, prompts, tmp_path / "uninterrupted", **make))
    for i in range(5):
        assert ds[i]["response_ids"].tolist() == whole[i]["response_ids"].tolist()
        np.testing.assert_array_equal(ds[i]["labels"], whole[i]["labels"])
    # a missing shard is made again, the others are not touched
    saved = ds[3]
    (out / "shards" / "00001.array_record").unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        LabelDataset(out)
    make_label_dataset(model, prompts, out, **make)
    assert first.stat().st_mtime_ns == before
    again = LabelDataset(out)[3]
    assert again["response_ids"].tolist() == saved["response_ids"].tolist()
    np.testing.assert_allclose(again["labels"], saved["labels"], rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="other settings"):
        make_label_dataset(model, prompts, out, **{**make, "max_new_tokens": 9})


def test_labels_of_the_npz_layout_are_refused_with_how_to_remake_them(tiny, tmp_path):
    _, model = tiny
    old = tmp_path / "old"
    (old / "samples").mkdir(parents=True)
    np.savez(old / "samples" / "00000000.npz", prompt_ids=np.arange(4))
    (old / "meta.json").write_text(json.dumps({"n_samples": 1, "label_dtype": "float32"}))
    (old / "index.json").write_text(json.dumps([{"prompt_len": 4, "response_len": 1}]))
    for call in (lambda: LabelDataset(old),
                 lambda: make_label_dataset(model, [[5, 6, 7, 8]], old, max_new_tokens=2, progress=False)):
        with pytest.raises(ValueError, match="older lkv versions.*`lkv make-labels` into a new directory"):
            call()


def test_label_dataset_reads_from_many_threads(tiny, tmp_path, monkeypatch):
    """grain reads samples from several threads. Reading parses no Python literals (CPython 3.11's AST
    constructor is not thread-safe: numpy's .npy header parser once killed a training run that way)."""
    import ast
    from concurrent.futures import ThreadPoolExecutor

    _, model = tiny
    rs = np.random.RandomState(7)
    prompts = [list(rs.randint(3, 128, n)) for n in (5, 9, 6, 11)]
    make_label_dataset(model, prompts, tmp_path / "ds", max_new_tokens=3, batch_size=4, shard_size=3,
                       progress=False)
    ds = LabelDataset(tmp_path / "ds")
    want = [ds[i] for i in range(len(ds))]
    parsed = []
    parse = ast.literal_eval
    monkeypatch.setattr(ast, "literal_eval", lambda text: (parsed.append(text), parse(text))[1])
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lambda i: ds[i % len(ds)], range(24)))
    assert parsed == []
    for i, s in enumerate(got):
        w = want[i % len(ds)]
        assert s["prompt_ids"].tolist() == w["prompt_ids"].tolist()
        assert s["labels"].dtype == np.float32 and np.array_equal(s["labels"], w["labels"])


def test_make_labels_cli(tiny, tmp_path):
    from conftest import save_hf_model

    from lkv_jax.cli import main

    hf, _ = tiny
    d = save_hf_model(hf, tmp_path / "m")
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prompt_ids": [5, 6, 7, 8, 9, 10]}\n\n{"prompt_ids": [11, 12, 13]}\n')
    assert main(["make-labels", d, str(jl), str(tmp_path / "ds"), "--max-new-tokens", "3", "--dtype", "float32",
                 "--no-progress"]) == 0
    assert len(LabelDataset(tmp_path / "ds")) == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hello"}\n')
    assert main(["make-labels", d, str(bad), str(tmp_path / "ds2"), "--no-progress"]) == 2  # no tokenizer
