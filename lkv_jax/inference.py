"""The three cache operations everything else is built from: `prefill`, `glimpse` and `decode`.

    prefill(model, prompt)          -> cache, logits      chunked, O(T) memory, no gradient needed
    glimpse(model, cache, suffix)   -> suffix outputs + per-layer float32 attention mass on the cache
    decode(model, cache, token)     -> next logits, cache  (a one-token glimpse that appends itself)

Every query-aware eviction method is a glimpse: SnapKV's window, TOVA's last token, LookaheadKV's
learned suffix (with the LoRA switched on by `lora_mask`), the response that defines training labels,
draft tokens. A glimpse either leaves the cache as it is (`glimpse_pure`) or writes the suffix into it
(`append_pure`: decoding, windows, lookahead suffixes). Each public function takes the NNX model and runs a
jitted pure function of `(graphdef, params)`; the `*_pure` functions are those pure functions, for composing
under one `jit`. `prefill` and `decode` take `mesh=` and are jitted with explicit shardings (one device is a
1x1x1 mesh).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from lkv_jax.attention import attention_with_probs, blockwise_causal_attention, cache_attention, dense_causal_attention
from lkv_jax.cache import KVCache, write_entries
from lkv_jax.errors import InputError
from lkv_jax.models.transformer import NO_LORA, LoraContext, Transformer
from lkv_jax.sharding import batch_sharding, cache_shardings, entry_mesh, entry_point, param_shardings
from lkv_jax.suffix_scoring import kv_head_scores

DEFAULT_CHUNK = 512


# ----------------------------------------------------------------------------------------------
# prompt preparation


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A left-padded prompt batch. ids/valid/positions: [B, T]; `chunk` divides T."""

    ids: jax.Array
    valid: jax.Array
    positions: jax.Array
    chunk: int


def prepare_prompt(input_ids, attention_mask=None, chunk_size: int = DEFAULT_CHUNK,
                   vocab_size: int | None = None) -> Prompt:
    """Validate a prompt batch and left-pad it to a whole number of prefill chunks.

    input_ids int [B, T] (or [T]); attention_mask 0/1 [B, T], padding on the left. Real tokens get
    positions 0, 1, ... per row (as `generate` in transformers), pads are invalid cache entries.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int | np.integer) or chunk_size < 1:
        raise InputError(f"chunk_size (prefill chunk) must be a positive integer, got {chunk_size!r}")
    ids = np.asarray(input_ids)
    if ids.ndim == 1:
        ids = ids[None]
    if ids.ndim != 2 or ids.shape[1] == 0:
        raise ValueError(f"input_ids must be int [B, T] with T > 0, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"input_ids must be integers, got {ids.dtype}")
    mask = np.ones_like(ids, dtype=bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.ndim == 1:
        mask = mask[None]
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
    if not mask.any(axis=1).all():
        raise ValueError("every row needs at least one real token (attention_mask all zero in a row)")
    if vocab_size is not None and ((ids[mask] < 0).any() or (ids[mask] >= vocab_size).any()):
        raise InputError(f"token ids must lie in [0, {vocab_size})")
    B, T = ids.shape
    n_chunks = -(-T // chunk_size)
    chunk = -(-T // n_chunks)
    chunk = -(-chunk // 8) * 8  # sublane-friendly block size
    pad = n_chunks * chunk - T
    ids = np.pad(ids, ((0, 0), (pad, 0)))
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    ids = np.where(mask, ids, 0)
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Prompt(jnp.asarray(ids, jnp.int32), jnp.asarray(mask), jnp.asarray(positions, jnp.int32), chunk)


# ----------------------------------------------------------------------------------------------
# pure functions (model = nnx.merge(graphdef, params) inside jit)


@dataclasses.dataclass(frozen=True)
class PrefillChunk:
    """What a `PrefillObserver` sees of one layer and one prefill chunk (traced values).

    x: [B, C, D] the layer's input; q [B, C, N, H] (RoPE applied), k/v [B, C, K, H]; positions int
    [B, C] and valid bool [B, C] of the chunk's tokens; keys [B, K, S, H] the layer's cache keys with
    this chunk written; key_valid bool [B, S]; q_start: the chunk's first slot; block: the chunk size;
    stats: the chunk's final softmax statistics (m, l), float32 [B, K, G, C] each.
    """

    x: jax.Array
    q: jax.Array
    k: jax.Array
    v: jax.Array
    positions: jax.Array
    valid: jax.Array
    keys: jax.Array
    key_valid: jax.Array
    q_start: jax.Array
    block: int
    stats: tuple[jax.Array, jax.Array]


class PrefillObserver:
    """Accumulates per-layer statistics while `prefill_pure` runs (observed attention, query moments).

    `init(model, batch, capacity)` returns the initial state of one layer (a pytree); `update(layer,
    state, chunk)` returns the state after a `PrefillChunk`. Both run under `jit`.
    """

    def init(self, model: Transformer, batch: int, capacity: int) -> Any:
        raise NotImplementedError

    def update(self, layer: int, state: Any, chunk: PrefillChunk) -> Any:
        raise NotImplementedError


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PromptPrefix:
    """The keys and values of a prompt batch's first `length` slots, per layer [B, K, length, H].

    By causality they do not depend on anything after `length`, so every press that prefills the same
    batch (SnapKV stops before its window, LookaheadKV prefills it all) can start from them and compute
    only the rest: the evaluation grid prefills each batch once for all its presses and budgets."""

    keys: tuple[jax.Array, ...]
    values: tuple[jax.Array, ...]
    length: int = dataclasses.field(metadata={"static": True})


def prompt_prefix_pure(model: Transformer, prompt_ids, valid, positions, *, chunk: int, length: int) -> PromptPrefix:
    """Prefill a prompt batch (as `prefill_pure`) and keep its first `length` slots as a `PromptPrefix`."""
    T = prompt_ids.shape[1]
    head = valid & (jnp.arange(T) < length)[None]
    cache, _ = prefill_pure(model, prompt_ids, head, positions, chunk=chunk, capacity=T)
    cut = lambda bufs: tuple(b[:, :, :length] for b in bufs)
    return PromptPrefix(keys=cut(cache.keys), values=cut(cache.values), length=length)


def prefill_pure(model: Transformer, prompt_ids, valid, positions, *, chunk: int, capacity: int,
                 all_logits: bool = False, observe: PrefillObserver | None = None,
                 prefix: PromptPrefix | None = None):
    """Fill an empty cache of `capacity` slots with a left-padded prompt, `chunk` tokens at a time.

    prompt_ids/valid/positions [B, T] with T a multiple of chunk. Returns (cache, logits) with logits
    float32 [B, T, V] if all_logits else [B, V] for the last token. With an `observe` observer
    (default off) it returns (cache, logits, states): the observer's final state per layer.

    prefix: the first `prefix.length` slots of this same batch, already computed (`prompt_prefix_pure`):
    they are copied in and only slots [prefix.length, T) are computed, as one query block (not with
    `observe` or `all_logits`, which need every query).
    """
    cfg = model.config
    B, T = prompt_ids.shape
    start = 0 if prefix is None else prefix.length
    if prefix is not None and (observe is not None or all_logits or not 0 < start < T):
        raise ValueError(f"a prefix of {start} slots serves a {T}-slot prompt without observe / all_logits")
    # queries per scan step: `chunk`, or the whole part after a given prefix in one step
    step_len = chunk if prefix is None else T - start
    n_chunks = (T - start) // step_len
    cache = KVCache.empty(cfg.num_hidden_layers, B, cfg.num_key_value_heads, capacity, cfg.head_dim, model.dtype)
    keys0, values0 = cache.keys, cache.values
    if prefix is not None:
        fill = lambda bufs, pre: tuple(jax.lax.dynamic_update_slice_in_dim(b, p.astype(b.dtype), 0, 2)
                                       for b, p in zip(bufs, pre, strict=True))
        keys0, values0 = fill(keys0, prefix.keys), fill(values0, prefix.values)
    key_valid = jnp.zeros((B, capacity), bool).at[:, :T].set(valid)
    inv_freq = model.inv_freq
    observed = () if observe is None else tuple(observe.init(model, B, capacity) for _ in model.layers)

    last = len(model.layers) - 1

    def step(carry, xs):
        keys, values, obs = carry
        i, ids_c, pos_c, valid_c = xs
        q0 = start + i * step_len  # the slot of this step's first query
        x = model.embed_tokens(ids_c)
        keys, values, obs = list(keys), list(values), list(obs)
        for l, layer in enumerate(model.layers):
            q, k, v = layer.qkv(x, pos_c, inv_freq)
            put = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(
                buf, jnp.swapaxes(new, 1, 2).astype(buf.dtype), q0, 2)
            keys[l], values[l] = put(keys[l], k), put(values[l], v)
            if l == last and not all_logits and observe is None:
                # only the prompt's last token reads the last layer past its keys/values: its query,
                # attention, o/MLP and LM head run once after the scan, not once per chunk (q is unused
                # here, so XLA drops its projection)
                return (tuple(keys), tuple(values), tuple(obs)), (x[:, -1:], None)
            if observe is not None:
                attn, stats = blockwise_causal_attention(q, keys[l], values[l], key_valid, q0, chunk,
                                                         return_stats=True)
                obs[l] = observe.update(l, obs[l], PrefillChunk(x, q, k, v, pos_c, valid_c, keys[l], key_valid,
                                                                q0, chunk, stats))
                if l == last and not all_logits:
                    return (tuple(keys), tuple(values), tuple(obs)), (x[:, -1:], attn[:, -1:])
            else:
                attn = blockwise_causal_attention(q, keys[l], values[l], key_valid, q0, chunk)
            x = layer.finish(x, attn)
        return (tuple(keys), tuple(values), tuple(obs)), model.logits(x)

    split = lambda a: a[:, start:].reshape(B, n_chunks, step_len).swapaxes(0, 1)
    (keys, values, observed), out = jax.lax.scan(
        step, (keys0, values0, observed),
        (jnp.arange(n_chunks), split(prompt_ids), split(positions), split(valid)))
    if all_logits:
        logits = out.swapaxes(0, 1).reshape(B, T, -1)
    else:
        # the last step's last token: [B, 1, D] input of the last layer, and its attention if observed
        x, attn = jax.tree.map(lambda a: a[-1], out)
        layer = model.layers[last]
        if attn is None:
            q, _, _ = layer.qkv(x, positions[:, -1:], inv_freq)
            attn = blockwise_causal_attention(q, keys[last], values[last], key_valid, T - 1, chunk)
        logits = model.logits(layer.finish(x, attn))[:, 0]
    K = cfg.num_key_value_heads
    pos = jnp.full((B, K, capacity), -1, jnp.int32).at[:, :, :T].set(jnp.where(valid, positions, -1)[:, None])
    val = jnp.broadcast_to(key_valid[:, None], (B, K, capacity))
    cache = KVCache(keys=keys, values=values, positions=(pos,) * len(keys), valid=(val,) * len(keys),
                    cursor=jnp.full((len(keys),), T, jnp.int32),
                    next_position=positions[:, -1] + 1)
    if observe is not None:
        return cache, logits, observed
    return cache, logits


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class GlimpseOutput:
    """What a glimpse returns.

    hidden: [B, L, D] final hidden states of the suffix (before the final norm).
    logits: float32 [B, L, V], or None when not asked for.
    scores: per layer, float32 attention mass on every cache slot of the cache glimpsed at (see
            `QueryHeadScores`, `KVHeadScores`), or None when not scored. When the suffix is appended the
            slots include its own.
    cache:  the cache with the suffix appended (`append_pure`), else the input cache.
    """

    hidden: jax.Array
    logits: jax.Array | None
    scores: tuple[jax.Array, ...] | None
    cache: KVCache


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SuffixLora:
    """LoRA on some suffix positions: `layers` per layer a projection -> {"a", "b"} dict, applied times
    `scale` where `mask` (bool [B, L]) is True (LookaheadKV's selective LoRA)."""

    layers: tuple
    mask: jax.Array
    scale: float = dataclasses.field(metadata={"static": True})


@dataclasses.dataclass(frozen=True)
class QueryHeadScores:
    """Scores per query head from dense jnp attention (differentiable): float32 [B, N, S] reduced over the
    scored suffix queries ("mean" or "max"), or [B, N, L, S] with reduce=None."""

    reduce: str | None = "mean"


@dataclasses.dataclass(frozen=True)
class KVHeadScores:
    """Scores per KV head, float32 [B, K, S], reduced over the scored suffix queries AND the G query heads
    of each group by the score-and-evict op (`lkv_jax.suffix_scoring.kv_head_scores`: Pallas on GPU/TPU
    unless `implementation` says "xla"). It reads the suffix's keys from the cache, so only an appended
    suffix (`append_pure`) scores this way."""

    reduce: str = "mean"
    implementation: str | None = None
    interpret: Any = False


def _reduce_probs(p, score_mask, reduce):
    """p float32 [B, K, G, L, S] -> [B, N, S] (mean/max over masked L) or [B, N, L, S]."""
    B, K, G, L, S = p.shape
    if reduce is None:
        return p.reshape(B, K * G, L, S)
    w = score_mask[:, None, None, :, None]
    if reduce == "mean":
        r = (p * w).sum(3) / jnp.maximum(score_mask.sum(-1), 1)[:, None, None, None]
    elif reduce == "max":
        r = jnp.where(w, p, 0.0).max(3)
    else:
        raise ValueError(f"reduce must be 'mean', 'max' or None, got {reduce!r}")
    return r.reshape(B, K * G, S)


def glimpse_pure(model: Transformer, cache: KVCache, x, *, reduce: str | None = "mean",
                 lora: SuffixLora | None = None, score_mask=None, logits: bool = True) -> GlimpseOutput:
    """Run a suffix of embeddings x [B, L, D] on top of `cache`, causally among itself, leaving the cache
    unchanged; scores per query head as `QueryHeadScores(reduce)`.

    Positions continue each row's `next_position`. `score_mask` [B, L] chooses which suffix queries the
    reduced scores average over (default all).
    """
    return _suffix_pure(model, cache, x, QueryHeadScores(reduce), lora, score_mask, logits, append=False)


def append_pure(model: Transformer, cache: KVCache, x, scoring: QueryHeadScores | KVHeadScores | None = None, *,
                lora: SuffixLora | None = None, score_mask=None, logits: bool = True, at=None) -> GlimpseOutput:
    """Write a suffix of embeddings x [B, L, D] into `cache` at its cursor and run it (decoding, SnapKV's
    window, a lookahead suffix). `scoring` None: no scores (decoding); else as the options say. `at` int32
    [B]: write each row at its own slot instead (decoding-time eviction; the cursor is then meaningless)."""
    return _suffix_pure(model, cache, x, scoring, lora, score_mask, logits, append=True, at=at)


def replay_pure(model: Transformer, cache: KVCache, ids, positions,
                scoring: QueryHeadScores | KVHeadScores) -> tuple[jax.Array, ...]:
    """Re-run tokens the cache already holds (ids / positions int32 [B, R], in order) to recover their
    queries: each one attends to the entries at or before its position, as when it was decoded if no
    eviction happened since. Returns their per-layer scores as `scoring` says; the cache is not written.
    Decoding-time SnapKV and TOVA score with the last generated tokens this way."""
    return _suffix_pure(model, cache, model.embed_tokens(ids), scoring, None, None, False, append=False,
                        positions=positions).scores


def _suffix_pure(model, cache, x, scoring, lora, score_mask, logits, *, append, at=None, positions=None):
    B, L, _ = x.shape
    replay = positions is not None
    if positions is None:
        positions = cache.next_position[:, None] + jnp.arange(L)[None]
    if score_mask is None:
        score_mask = jnp.ones((B, L), bool)
    inv_freq = model.inv_freq
    causal = jnp.tril(jnp.ones((L, L), bool))
    keys, values, poss, valids = map(list, (cache.keys, cache.values, cache.positions, cache.valid))
    layer_scores = []
    for l, layer in enumerate(model.layers):
        ctx = NO_LORA if lora is None else LoraContext(lora.layers[l], lora.scale, lora.mask)
        q, k, v = layer.qkv(x, positions, inv_freq, ctx)
        if append:
            keys[l], values[l], poss[l], valids[l] = write_entries(
                keys[l], values[l], poss[l], valids[l], cache.cursor[l] if at is None else at, k, v, positions,
                jnp.ones((B, L), bool))
        # appended or replayed, the suffix's own keys are in the cache: attend by position
        seen = valids[l][:, :, None, None, :] & (poss[l][:, :, None, None, :] <= positions[:, None, None, :, None])
        if isinstance(scoring, KVHeadScores):
            out, s_l = kv_head_scores(q, positions, keys[l], values[l], poss[l], valids[l], score_mask,
                                      reduce=scoring.reduce, implementation=scoring.implementation,
                                      interpret=scoring.interpret)
        elif scoring is None:  # decoding: no probabilities to return
            out, s_l = cache_attention(q, keys[l], values[l], seen), None
        else:
            out, p = (attention_with_probs(q, keys[l], values[l], seen) if append or replay else
                      attention_with_probs(q, keys[l], values[l], valids[l][:, :, None, None, :], extra=(k, v, causal)))
            s_l = _reduce_probs(p, score_mask, scoring.reduce)
        layer_scores.append(s_l)
        x = layer.finish(x, out, ctx)
    if append:
        cache = KVCache(keys=tuple(keys), values=tuple(values), positions=tuple(poss), valid=tuple(valids),
                        cursor=cache.cursor + L, next_position=cache.next_position + L)
    return GlimpseOutput(hidden=x, logits=model.logits(x) if logits else None,
                         scores=None if scoring is None else tuple(layer_scores), cache=cache)


def forward_dense_pure(model: Transformer, input_ids, valid=None, positions=None, *, lora=None,
                       lora_scale: float = 0.0, lora_mask=None):
    """Differentiable full-sequence forward (dense causal attention, [B, N, T, T] scores).

    For training short sequences; inference uses the chunked `prefill_pure`. Returns float32 [B, T, V].
    """
    B, T = input_ids.shape
    valid = jnp.ones((B, T), bool) if valid is None else valid
    positions = jnp.broadcast_to(jnp.arange(T), (B, T)) if positions is None else positions
    x = model.embed_tokens(input_ids)
    inv_freq = model.inv_freq
    for l, layer in enumerate(model.layers):
        ctx = NO_LORA if lora is None else LoraContext(lora[l], lora_scale, lora_mask)
        x = layer(x, positions, inv_freq, lambda q, k, v: dense_causal_attention(q, k, v, valid), ctx)
    return model.logits(x)


# ----------------------------------------------------------------------------------------------
# jitted public entry points


def jitted_prefill(graphdef, params, mesh: Mesh, *, chunk: int, capacity: int, all_logits: bool = False):
    """The jitted prefill of one model structure on `mesh` for these static sizes (built once, cached):
    `fn(params, ids, valid, positions) -> (cache, logits)` as `prefill_pure`, parameters per their
    declared axes, the batch over data, the cache per `cache_specs`."""
    def build():
        def prefill_step(params, ids, valid, positions):
            return prefill_pure(nnx.merge(graphdef, params), ids, valid, positions, chunk=chunk, capacity=capacity,
                                all_logits=all_logits)

        b2 = batch_sharding(mesh, 2)
        out = (cache_shardings(mesh, len(params["layers"])), batch_sharding(mesh, 3 if all_logits else 2))
        return jax.jit(prefill_step, in_shardings=(param_shardings(mesh, params), b2, b2, b2), out_shardings=out)

    return entry_point(("prefill", graphdef, mesh, chunk, capacity, all_logits), build)


def prefill(model: Transformer, input_ids, attention_mask=None, *, chunk_size: int = DEFAULT_CHUNK,
            extra_capacity: int = 0, all_logits: bool = False, mesh: Mesh | None = None) -> tuple[KVCache, jax.Array]:
    """Prefill a (left-padded) prompt batch into a new cache.

    input_ids int [B, T], attention_mask 0/1 [B, T]. The cache holds ceil(T / chunk) * chunk prompt
    slots (extra left padding is invalid) plus `extra_capacity` empty slots. Returns (cache, logits):
    float32 [B, V] for the last token, or [B, T, V] (original T) with all_logits. With a `mesh` (B
    divisible by its data axis) the cache's batch lies over data and its KV heads over tensor.
    """
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    T_orig = np.asarray(input_ids).shape[-1]
    Tp = prompt.ids.shape[1]
    # positions are counted from each row's first real token: left padding takes none
    model.config.check_length(int(np.asarray(prompt.valid).sum(1).max()) + extra_capacity)
    mesh = entry_mesh(model, mesh, batch=prompt.ids.shape[0])
    graphdef, params = nnx.split(model)
    fn = jitted_prefill(graphdef, params, mesh, chunk=prompt.chunk, capacity=Tp + extra_capacity,
                        all_logits=all_logits)
    cache, logits = fn(params, prompt.ids, prompt.valid, prompt.positions)
    if all_logits:
        logits = logits[:, Tp - T_orig:]
    return cache, logits


def suffix_embeddings(model: Transformer, suffix_ids=None, suffix_embeds=None) -> jax.Array:
    if (suffix_ids is None) == (suffix_embeds is None):
        raise ValueError("pass exactly one of suffix_ids [B, L] and suffix_embeds [B, L, D]")
    if suffix_embeds is not None:
        e = jnp.asarray(suffix_embeds)
        if e.ndim != 3 or e.shape[-1] != model.config.hidden_size:
            raise ValueError(f"suffix_embeds must be [B, L, {model.config.hidden_size}], got {e.shape}")
        return e.astype(model.dtype)
    ids = jnp.asarray(suffix_ids)
    if ids.ndim != 2:
        raise ValueError(f"suffix_ids must be int [B, L], got shape {ids.shape}")
    return model.embed_tokens(ids)


@functools.partial(jax.jit, static_argnames=("graphdef", "scoring", "append", "logits"))
def _glimpse_jit(graphdef, params, cache, x, lora, score_mask, *, scoring, append, logits):
    model = nnx.merge(graphdef, params)
    if append:
        return append_pure(model, cache, x, scoring, lora=lora, score_mask=score_mask, logits=logits)
    return glimpse_pure(model, cache, x, reduce=scoring.reduce, lora=lora, score_mask=score_mask, logits=logits)


def _check_room(cache: KVCache, n: int) -> None:
    free = min(cache.capacity(l) - int(c) for l, c in enumerate(np.asarray(cache.cursor)))
    if n > free:
        raise ValueError(f"cache has room for {free} more entries, {n} requested; grow it with cache.grow(n)")


def glimpse(model: Transformer, cache: KVCache, suffix_ids=None, *, suffix_embeds=None,
            lora: Any = None, lora_scale: float = 0.0, lora_mask=None, score_mask=None,
            reduce: str | None = "mean", append: bool = False, logits: bool = True) -> GlimpseOutput:
    """Run a short suffix (token ids [B, L] or embeddings [B, L, D]) on top of `cache`.

    Returns a `GlimpseOutput`: suffix logits and, per layer, each query head's float32 attention mass
    on every cache slot ([B, N, S] averaged over the suffix queries in `score_mask`, "max" for the
    maximum, reduce=None for [B, N, L, S]). `lora_mask` [B, L] switches the `lora` tensors on for
    some suffix positions only.
    """
    x = suffix_embeddings(model, suffix_ids, suffix_embeds)
    B, L, _ = x.shape
    if B != cache.next_position.shape[0]:
        raise ValueError(f"suffix batch {B} != cache batch {cache.next_position.shape[0]}")
    if append:
        _check_room(cache, L)
    suffix_lora = None if lora is None else SuffixLora(
        lora, jnp.ones((B, L), bool) if lora_mask is None else lora_mask, float(lora_scale))
    graphdef, params = nnx.split(model)
    return _glimpse_jit(graphdef, params, cache, x, suffix_lora, score_mask, scoring=QueryHeadScores(reduce),
                        append=append, logits=logits)


def decode(model: Transformer, cache: KVCache, token, *, mesh: Mesh | None = None) -> tuple[jax.Array, KVCache]:
    """Append one token per row (int [B]) at its true next position; returns (float32 [B, V], cache)."""
    token = jnp.asarray(token).reshape(-1, 1)
    _check_room(cache, 1)
    mesh = entry_mesh(model, mesh, batch=token.shape[0])
    graphdef, params = nnx.split(model)

    def build():
        def decode_step(params, cache, token):
            model = nnx.merge(graphdef, params)
            out = append_pure(model, cache, model.embed_tokens(token))
            return out.logits[:, 0], out.cache

        b2, c_sh = batch_sharding(mesh, 2), cache_shardings(mesh, cache.n_layers)
        return jax.jit(decode_step, in_shardings=(param_shardings(mesh, params), c_sh, b2), out_shardings=(b2, c_sh))

    return entry_point(("decode", graphdef, mesh), build)(params, cache, token)
