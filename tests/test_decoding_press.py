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

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.presses import KnormPress, SnapKVPress, StreamingLLMPress, TOVAPress

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
    """TOVA: the last appended token's attention row averaged over ALL query heads, shared by every KV head;
    that token (the last entry) is protected. rows[-1]: float64 [N, C]."""
    K, C = positions.shape
    s = rows[-1].mean(0).expand(K, C)
    return s, (torch.arange(C) == C - 1).expand(K, C)


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
    `keep_recent` entries, then the highest scores."""
    C = scores.shape[-1]
    forced = protected | (torch.arange(C) >= C - keep_recent)
    s = scores.masked_fill(forced, float("inf"))
    return s.topk(budget, dim=-1).indices.sort(-1).values


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
                    keep_recent: int = 0) -> OracleRun:
    """Greedy decoding of one prompt (int [T]) for n_new tokens. press=None: the full cache (plain greedy);
    else every time the cache holds budget + interval entries after an append it is evicted to `budget`."""
    T = len(prompt)
    capacity = budget + interval
    with torch.no_grad():
        out = hf(torch.tensor(np.asarray(prompt))[None], use_cache=True)
    cache = out.cache
    positions = [torch.arange(T).expand(N_KV, T).clone() for _ in cache.layers]
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
