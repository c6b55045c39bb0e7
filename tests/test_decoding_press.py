"""Decoding-time eviction (`DecodingPress`) against an independent brute force in transformers.

The oracle decodes greedily with the same random transformers model (eager attention, float32) one token
at a time over a `DynamicCache`. Whenever its cache holds C = budget + interval entries it scores every
entry from transformers' own outputs (the attention rows each appended token paid, recorded at its step;
the cached post-RoPE keys; the entries' original positions), keeps per layer and KV head the top `budget`
entries with the protected ones forced in, and gathers them into the cache in ascending position order.
The next token then attends to the kept entries at its true position. No lkv_jax code runs on that path:
the press classes are read only for their fields (window, kernel, sinks).
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.decoding_press import DecodingPress, decode_evicting
from lkv_jax.presses import (
    AdaKVPress,
    ExpectedAttentionPress,
    KnormPress,
    LookaheadKVPress,
    SnapKVPress,
    StreamingLLMPress,
    TOVAPress,
)

N_HEADS, N_KV = 4, 2
G = N_HEADS // N_KV


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(transformers model, lkv_jax model) of one tiny random Llama: 2 layers, 4 query / 2 KV heads,
    head_dim 16, vocabulary 128."""
    hf = build_hf_model("llama")
    return hf, lkv_jax.load_hf(save_hf_model(hf, tmp_path_factory.mktemp("decoding_press") / "llama"))


# ----------------------------------------------------------------------------------------------
# the oracle: transformers decoding with brute-force eviction


@dataclasses.dataclass
class OracleRun:
    """What the oracle ends with, for one unpadded row.

    tokens:    int [n] the greedy tokens
    positions: per layer int [K, S] original positions of the cached entries, ascending per head
    keys, values: per layer float64 [K, S, H] the cached entries (keys post-RoPE)
    evictions: the decode steps (1-based, as in the semantics: step i appends token i - 1) that evicted
    """

    tokens: np.ndarray
    positions: list[np.ndarray]
    keys: list[np.ndarray]
    values: list[np.ndarray]
    evictions: list[int]


def knorm_scores(press, keys, positions, rows):
    """kvpress Knorm: -||key|| of every cached (post-RoPE) key; nothing protected. keys [K, C, H]."""
    return -keys.norm(dim=-1), torch.zeros(positions.shape, dtype=torch.bool)


def streaming_scores(press, keys, positions, rows):
    """StreamingLLM: later is better; the first n_sink positions of the sequence are protected."""
    return positions.double(), positions < press.n_sink


def tova_scores(press, keys, positions, rows):
    """TOVA: the last appended token's attention, averaged over ALL query heads per POSITION (a query head
    whose KV head no longer holds a position adds 0 to it), and that mean given to every KV head holding the
    position; the last token (the last entry) is protected. rows[-1]: float64 [N, C] over each head's slots,
    positions int [K, C] (after per-head eviction slot c holds different positions in different heads)."""
    K, C = positions.shape
    att = rows[-1]
    total = torch.zeros(int(positions.max()) + 1, dtype=torch.float64)
    for n in range(att.shape[0]):
        total.index_add_(0, positions[n // G], att[n])
    return total[positions] / att.shape[0], (torch.arange(C) == C - 1).expand(K, C)


def snapkv_scores(press, keys, positions, rows):
    """SnapKV over the last window_size appended tokens: their attention rows (each over the entries present
    at its step, i.e. the current cache up to itself: no eviction happened since) averaged over the window,
    cut to the entries before the window, pooled along the cache (stride 1, padding k // 2, zeros counted
    by avg_pool1d), then averaged over each KV head's query heads. The window's entries are protected."""
    K, C = positions.shape
    w, k = press.window_size, press.kernel_size
    window = torch.stack([F.pad(r, (0, C - r.shape[-1])) for r in rows[-w:]]).mean(0)  # [N, C]
    before = window[:, None, : C - w]  # [N, 1, C - w]
    if press.pooling == "avg":
        pooled = F.avg_pool1d(before, k, stride=1, padding=k // 2, count_include_pad=True)
    else:
        pooled = F.max_pool1d(before, k, stride=1, padding=k // 2)
    s = pooled[:, 0].reshape(K, G, C - w).mean(1)
    return F.pad(s, (0, w)), (torch.arange(C) >= C - w).expand(K, C)


ORACLE_SCORES = {SnapKVPress: snapkv_scores, KnormPress: knorm_scores, StreamingLLMPress: streaming_scores,
                 TOVAPress: tova_scores}


def kept_slots(scores, protected, budget: int, keep_recent: int):
    """Per KV head the `budget` slots to keep (int [K, budget], ascending): the protected ones and the last
    `keep_recent` entries, then the highest scores. Equal scores go to the earlier slot, as lax.top_k does
    (max pooling gives neighbours exact ties: adjacent windows share their maximum). Scores equal only up
    to rounding at the budget's edge make the choice a coin toss between float32 programs (Knorm: a token
    repeated at another position has the same layer-0 key up to RoPE's rounding): that raises, so a test
    never rests on one."""
    C = scores.shape[-1]
    forced = protected | (torch.arange(C) >= C - keep_recent)
    s = scores.masked_fill(forced, float("inf"))
    order = torch.sort(s, dim=-1, descending=True, stable=True)
    last_kept, first_dropped = order.values[:, budget - 1], order.values[:, budget]
    gap = last_kept - first_dropped
    assert ((gap == 0) | (gap > 1e-5 * first_dropped.abs())).all(), f"near-tie at the budget's edge: {gap}"
    return order.indices[:, :budget].sort(-1).values


def gather_entries(x, slots):
    """x [1, K, C, H] (a DynamicCache layer's keys or values), slots [K, n] -> [1, K, n, H]."""
    return torch.gather(x, 2, slots[None, :, :, None].expand(-1, -1, -1, x.shape[-1]))


def evict(cache, positions, layer_rows, press, budget: int, keep_recent: int):
    """Score every layer's entries and keep `budget` per KV head, in place: the cache's keys / values and the
    positions list (int [K, C] per layer) are cut to the kept slots."""
    score = ORACLE_SCORES[type(press)]
    for l, layer in enumerate(cache.layers):
        s, prot = score(press, layer.keys[0].double(), positions[l], layer_rows[l])
        slots = kept_slots(s, prot, budget, keep_recent)
        layer.keys, layer.values = gather_entries(layer.keys, slots), gather_entries(layer.values, slots)
        positions[l] = torch.gather(positions[l], 1, slots)


def oracle_generate(hf, prompt, n_new: int, press=None, *, budget: int = 0, interval: int = 0,
                    keep_recent: int = 0, start: list[np.ndarray] | None = None) -> OracleRun:
    """Greedy decoding of one prompt (int [T]) for n_new tokens. press=None: the full cache (plain greedy);
    else every time the cache holds budget + interval entries after an append it is evicted to `budget`.
    start: per layer int [K, n] prompt positions to decode from (a prompt press's choice), else all."""
    T = len(prompt)
    capacity = budget + interval
    with torch.no_grad():
        out = hf(torch.tensor(np.asarray(prompt))[None], use_cache=True)
    cache = out.cache
    positions = [torch.arange(T).expand(N_KV, T).clone() for _ in cache.layers]
    if start is not None:  # the full cache's slot t holds position t: gather the chosen slots
        for l, layer in enumerate(cache.layers):
            slots = torch.tensor(np.asarray(start[l]), dtype=torch.long)
            layer.keys, layer.values = gather_entries(layer.keys, slots), gather_entries(layer.values, slots)
            positions[l] = slots.clone()
    layer_rows = [[] for _ in cache.layers]  # per layer: each appended token's attention row since the eviction
    tokens, evictions = [int(out.logits[0, -1].argmax())], []
    for i in range(1, n_new):
        with torch.no_grad():
            o = hf(torch.tensor([[tokens[-1]]]), cache=cache, position_ids=torch.tensor([[T + i - 1]]),
                   use_cache=True, output_attentions=press is not None)
        cache = o.cache
        tokens.append(int(o.logits[0, -1].argmax()))
        for l in range(len(positions)):
            positions[l] = torch.cat([positions[l], torch.full((N_KV, 1), T + i - 1)], dim=1)
        if press is None:
            continue
        for l, a in enumerate(o.attentions):
            layer_rows[l].append(a[0, :, 0].double())  # [N, S]: the new token over every cached entry
        if positions[0].shape[1] == capacity:
            evict(cache, positions, layer_rows, press, budget, keep_recent)
            layer_rows = [[] for _ in cache.layers]
            evictions.append(i)
    return OracleRun(
        tokens=np.asarray(tokens),
        positions=[p.numpy() for p in positions],
        keys=[layer.keys[0].double().numpy() for layer in cache.layers],
        values=[layer.values[0].double().numpy() for layer in cache.layers],
        evictions=evictions,
    )


# ----------------------------------------------------------------------------------------------
# lkv_jax under test


BUDGET, INTERVAL, RECENT = 24, 8, 2
CAPACITY = BUDGET + INTERVAL

SCORERS = {
    "snapkv-avg5": SnapKVPress(window_size=4, kernel_size=5),
    "snapkv-k1": SnapKVPress(window_size=4, kernel_size=1),
    "snapkv-max3": SnapKVPress(window_size=3, kernel_size=3, pooling="max"),
    "knorm": KnormPress(),
    "streamingllm": StreamingLLMPress(n_sink=4),
    "tova": TOVAPress(),
}


@pytest.fixture(scope="module")
def prompts():
    """Two prompts of 20 and 14 tokens (ids 3..127: no pad, BOS or EOS). Seed 5: no eviction of the tests
    meets a near-tie (`kept_slots`); seed 3 does, Knorm's second eviction of the first row."""
    rs = np.random.RandomState(5)
    return [rs.randint(3, 128, size=n) for n in (20, 14)]


def left_padded(rows):
    """(ids int [B, T], mask int [B, T]) of unpadded rows, left-padded with 0."""
    T = max(len(r) for r in rows)
    ids, mask = np.zeros((len(rows), T), np.int32), np.zeros((len(rows), T), np.int32)
    for b, r in enumerate(rows):
        ids[b, T - len(r):], mask[b, T - len(r):] = r, 1
    return ids, mask


def run_evicting(model, rows, n_new: int, decoding_press, press=None):
    """lkv_jax's decode_evicting from the (optionally pressed) prompt cache of the left-padded rows:
    (tokens int [B, n], final KVCache)."""
    ids, mask = left_padded(rows)
    if press is None:
        cache, logits = lkv_jax.prefill(model, ids, mask)
    else:
        out = lkv_jax.compress(model, ids, press, attention_mask=mask)
        cache, logits = out.cache, out.logits
    return decode_evicting(model, cache, logits, n_new, decoding_press, eos_token_id=())


def cache_row(cache, b: int):
    """Row b of a KVCache as the oracle holds it: per layer (positions int [K, n], keys, values float64
    [K, n, H]) of the valid entries, ascending by position per head."""
    out = []
    for l in range(cache.n_layers):
        pos, valid = np.asarray(cache.positions[l][b]), np.asarray(cache.valid[l][b])
        keys, values = np.asarray(cache.keys[l][b], np.float64), np.asarray(cache.values[l][b], np.float64)
        heads = []
        for h in range(pos.shape[0]):
            order = np.argsort(np.where(valid[h], pos[h], np.iinfo(np.int32).max), kind="stable")[: valid[h].sum()]
            heads.append((pos[h][order], keys[h][order], values[h][order]))
        out.append(tuple(np.stack(x) for x in zip(*heads, strict=True)))
    return out


def assert_cache_equals_oracle(cache, b: int, ref: OracleRun):
    """The valid entries of row b: the oracle's positions per layer and head, and their keys / values."""
    for l, (pos, keys, values) in enumerate(cache_row(cache, b)):
        np.testing.assert_array_equal(pos, ref.positions[l], err_msg=f"layer {l}")
        np.testing.assert_allclose(keys, ref.keys[l], atol=1e-4, err_msg=f"layer {l}")
        np.testing.assert_allclose(values, ref.values[l], atol=1e-4, err_msg=f"layer {l}")


def first_eviction_length(fill0: int, k: int = 1) -> int:
    """max_new_tokens of a call that ends right after eviction k of a row starting with fill0 entries."""
    return CAPACITY - fill0 + 1 + (k - 1) * INTERVAL


# ----------------------------------------------------------------------------------------------
# the oracle itself


def test_oracle_without_eviction_is_greedy_over_the_whole_sequence(models, prompts):
    """Its cached decoding equals re-running transformers on the whole sequence for every token."""
    hf, _ = models
    seq = list(prompts[0])
    for _ in range(12):
        with torch.no_grad():
            seq.append(int(hf(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    np.testing.assert_array_equal(oracle_generate(hf, prompts[0], 12).tokens, seq[len(prompts[0]):])


def test_oracle_evicts_on_schedule_and_keeps_the_protected(models, prompts):
    hf, _ = models
    p = prompts[0]
    ref = oracle_generate(hf, p, 30, SnapKVPress(window_size=4), budget=BUDGET, interval=INTERVAL,
                          keep_recent=RECENT)
    assert ref.evictions == [12, 20, 28]
    last = len(p) + 28 - 1  # the token appended at step 28
    for pos in ref.positions:
        assert pos.shape == (N_KV, BUDGET + 1)
        assert np.isin(np.arange(last - 3, last + 2), pos).all()  # the window, and one token appended since


# ----------------------------------------------------------------------------------------------
# decoding-time eviction against the oracle


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("name", list(SCORERS))
def test_kept_entries_after_each_eviction_equal_the_oracle(models, prompts, name, k):
    hf, model = models
    p, scorer = prompts[0], SCORERS[name]
    n = first_eviction_length(len(p), k)
    ref = oracle_generate(hf, p, n, scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT)
    assert len(ref.evictions) == k and ref.evictions[-1] == n - 1
    D = DecodingPress(scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT)
    tokens, cache = run_evicting(model, [p], n, D)
    np.testing.assert_array_equal(tokens[0], ref.tokens)
    assert_cache_equals_oracle(cache, 0, ref)


def test_entries_appended_after_an_eviction_equal_the_oracle(models, prompts):
    """Three steps past the first eviction: the kept entries, then the three appended ones after them."""
    hf, model = models
    p, scorer = prompts[0], SCORERS["tova"]
    n = first_eviction_length(len(p)) + 3
    ref = oracle_generate(hf, p, n, scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT)
    tokens, cache = run_evicting(model, [p], n, DecodingPress(scorer, budget=BUDGET, interval=INTERVAL,
                                                              keep_recent=RECENT))
    np.testing.assert_array_equal(tokens[0], ref.tokens)
    assert_cache_equals_oracle(cache, 0, ref)


# ----------------------------------------------------------------------------------------------
# limits: no eviction ever, and a budget that holds everything


def test_an_interval_longer_than_the_answer_is_prefill_only_eviction(models, prompts):
    _, model = models
    ids, mask = left_padded(prompts)
    n, press = 16, SnapKVPress(budget=12, window_size=4)
    D = DecodingPress(SnapKVPress(window_size=4), budget=12, interval=n, keep_recent=RECENT)
    prefill_only = lkv_jax.generate(model, ids, n, press=press, attention_mask=mask, eos_token_id=())
    got = lkv_jax.generate(model, ids, n, press=press, attention_mask=mask, eos_token_id=(), decoding_press=D)
    np.testing.assert_array_equal(got, prefill_only)


def test_a_budget_above_the_final_length_is_the_full_cache(models, prompts):
    """Plain greedy decoding from the full cache, as the oracle (checked against transformers) decodes."""
    hf, model = models
    ids, mask = left_padded(prompts)
    n = 14
    D = DecodingPress(SCORERS["tova"], budget=len(prompts[0]) + n, interval=1, keep_recent=RECENT)
    got = lkv_jax.generate(model, ids, n, attention_mask=mask, eos_token_id=(), decoding_press=D)
    for b, p in enumerate(prompts):
        np.testing.assert_array_equal(got[b], oracle_generate(hf, p, n).tokens)


# ----------------------------------------------------------------------------------------------
# batches: rows evict at their own steps


def test_a_batch_of_two_equals_two_single_runs(models, prompts):
    """Rows of 20 and 14 prompt tokens evict at steps 12, 20, 28 and 18, 26: each row of the batch equals its
    single run (tokens, final entries) and the oracle. SnapKV: each row re-runs its own window."""
    hf, model = models
    n, scorer = 30, SCORERS["snapkv-avg5"]
    D = DecodingPress(scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT)
    tokens, cache = run_evicting(model, prompts, n, D)
    for b, p in enumerate(prompts):
        single_tokens, single_cache = run_evicting(model, [p], n, D)
        np.testing.assert_array_equal(tokens[b], single_tokens[0])
        for (pos, keys, _), (pos1, keys1, _) in zip(cache_row(cache, b), cache_row(single_cache, 0), strict=True):
            np.testing.assert_array_equal(pos, pos1)
            np.testing.assert_allclose(keys, keys1, atol=1e-5)
        ref = oracle_generate(hf, p, n, scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT)
        np.testing.assert_array_equal(tokens[b], ref.tokens)
        assert_cache_equals_oracle(cache, b, ref)


def test_after_a_prompt_press_decoding_evicts_from_its_kept_entries(models, prompts):
    """A SnapKV prompt press keeps 16 of the 20 prompt entries per head (checked against eager attention in
    test_presses); decoding-time Knorm then evicts from that cache at step 32 - 16 = 16 and 24. The oracle
    starts from transformers' full prompt cache cut to the same kept positions."""
    hf, model = models
    p, press, scorer = prompts[0], SnapKVPress(budget=16, window_size=4), SCORERS["knorm"]
    n = CAPACITY - 16 + 1 + INTERVAL
    kept = [np.asarray(k[0]) for k in lkv_jax.compress(model, p[None], press).kept_positions]
    ref = oracle_generate(hf, p, n, scorer, budget=BUDGET, interval=INTERVAL, keep_recent=RECENT, start=kept)
    assert ref.evictions == [16, 24]
    tokens, cache = run_evicting(model, [p], n, DecodingPress(scorer, budget=BUDGET, interval=INTERVAL,
                                                              keep_recent=RECENT), press=press)
    np.testing.assert_array_equal(tokens[0], ref.tokens)
    assert_cache_equals_oracle(cache, 0, ref)


# ----------------------------------------------------------------------------------------------
# LookaheadKV: no transformers reference for its glimpse; its first eviction is the prompt press's choice


def strong_adapter(config):
    """A random adapter whose glimpse differs from the base model's: a fresh one has LoRA B = 0 and tiny
    embeddings, so B is drawn and the embeddings scaled up."""
    ad = lkv_jax.lookahead.init_adapter(config, jax.random.key(5), n_lookahead=6, rank=4, alpha=8.0)
    keys = iter(jax.random.split(jax.random.key(6), 64))
    layers = tuple({name: {"a": t["a"], "b": jax.random.normal(next(keys), t["b"].shape) * 0.3}
                    for name, t in layer.items()} for layer in ad.layers)
    return dataclasses.replace(ad, embeddings=ad.embeddings * 20, layers=layers)


def test_decoding_lookaheadkv_first_eviction_is_the_prompt_press_on_the_tokens_so_far(models, prompts):
    """Ended right after the first eviction (no prompt press: the cache was prompt + generated tokens), the
    kept entries are what `compress(prompt + generated, LookaheadKVPress)` scores highest, the last
    keep_recent forced in; their keys are transformers' keys of that sequence; the tokens are plain greedy
    ones (every token came before the eviction)."""
    hf, model = models
    p = prompts[0]
    n = first_eviction_length(len(p))
    press = LookaheadKVPress(strong_adapter(model.config), budget=BUDGET)
    tokens, cache = run_evicting(model, [p], n, DecodingPress(press, budget=BUDGET, interval=INTERVAL,
                                                              keep_recent=RECENT))
    full = oracle_generate(hf, p, n)
    np.testing.assert_array_equal(tokens[0], full.tokens)
    seq = np.concatenate([p, tokens[0, : n - 1]])  # what the cache held: C entries
    assert len(seq) == CAPACITY
    scored = lkv_jax.compress(model, seq[None], press)
    hf_keys = full_keys(hf, seq)
    for l, (pos, keys, _) in enumerate(cache_row(cache, 0)):
        s = np.asarray(scored.scores[l][0], np.float64)
        s = s[:, s.shape[-1] - press.adapter.n_lookahead - CAPACITY: s.shape[-1] - press.adapter.n_lookahead]
        expected = kept_slots(torch.as_tensor(s), torch.zeros(s.shape, dtype=torch.bool), BUDGET, RECENT).numpy()
        np.testing.assert_array_equal(pos, expected, err_msg=f"layer {l}")
        np.testing.assert_allclose(keys, np.take_along_axis(hf_keys[l], pos[..., None], 1), atol=1e-4)
    # the adapter matters: a fresh one (LoRA B = 0, small embeddings) chooses otherwise
    fresh = LookaheadKVPress(lkv_jax.lookahead.init_adapter(model.config, jax.random.key(5), n_lookahead=6, rank=4),
                             budget=BUDGET)
    assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(
        scored.kept_positions, lkv_jax.compress(model, seq[None], fresh).kept_positions, strict=True))


def full_keys(hf, ids):
    """transformers' cached keys of one unpadded sequence: per layer float64 [K, T, H] (post-RoPE)."""
    with torch.no_grad():
        out = hf(torch.tensor(np.asarray(ids))[None], use_cache=True)
    return [layer.keys[0].double().numpy() for layer in out.cache.layers]


# ----------------------------------------------------------------------------------------------
# errors


def test_errors(models, prompts):
    _, model = models
    ids, mask = left_padded(prompts)
    generate = lambda D, **kw: lkv_jax.generate(model, ids, 4, attention_mask=mask, decoding_press=D, **kw)
    with pytest.raises(ValueError, match="decoding"):  # a press that cannot score a cache mid-answer
        generate(DecodingPress(ExpectedAttentionPress(), budget=BUDGET, interval=INTERVAL))
    with pytest.raises(ValueError, match="decoding"):
        generate(DecodingPress(AdaKVPress(SnapKVPress(window_size=4)), budget=BUDGET, interval=INTERVAL))
    with pytest.raises(ValueError, match="window"):  # SnapKV's window must fit in the interval
        DecodingPress(SnapKVPress(window_size=INTERVAL + 1), budget=BUDGET, interval=INTERVAL)
    with pytest.raises(ValueError):  # keep_recent + the scorer's protected entries above the budget
        DecodingPress(SnapKVPress(window_size=4), budget=5, interval=INTERVAL, keep_recent=2)
    with pytest.raises(ValueError):
        DecodingPress(KnormPress(), budget=0, interval=INTERVAL)
    with pytest.raises(ValueError):
        DecodingPress(KnormPress(), budget=BUDGET, interval=0)
    with pytest.raises(ValueError, match="budget"):  # the full 20-token prompt cache is above a budget of 16
        generate(DecodingPress(KnormPress(), budget=16, interval=INTERVAL))
    with pytest.raises(ValueError, match="budget"):  # and so is a prompt press that keeps more
        generate(DecodingPress(KnormPress(), budget=10, interval=INTERVAL), press=SnapKVPress(budget=12, window_size=4))
