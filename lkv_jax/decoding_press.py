"""Decoding-time eviction: the cache of a long answer stays within `budget + interval` entries.

kvpress's `DecodingPress` re-scores the cache every N steps with a prompt press; here the loop keeps fixed
shapes: a cache of capacity B + N slots per layer and KV head (plus the scorer's scratch slots), each row
writing at its own fill. When a row's cache holds B + N entries it is scored by `scorer` (any press that
defines `decoding_scores`: SnapKV, TOVA, Knorm, StreamingLLM, LookaheadKV) and compacted in place to its top
B entries per KV head, the last `keep_recent` tokens always kept. Rows evict independently. The scores
come from the score-and-evict op and the top-n select of `lkv_jax.eviction`, inside the jitted loop.

    D = DecodingPress(LookaheadKVPress(adapter), budget=256, interval=64)
    tokens = lkv_jax.generate(model, ids, 1024, press=LookaheadKVPress(adapter, budget=256), decoding_press=D)
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.cache import KVCache
from lkv_jax.decoding import decoding_ids, greedy_loop_pure
from lkv_jax.distributed import fetch_to_host
from lkv_jax.errors import BudgetError
from lkv_jax.eviction import TopPerHead, compact_cache
from lkv_jax.inference import append_pure
from lkv_jax.models.transformer import Transformer
from lkv_jax.presses.base import BasePress, scores_while_decoding
from lkv_jax.sharding import batch_sharding, cache_shardings, entry_mesh, entry_point, param_shardings


@functools.partial(jax.tree_util.register_dataclass, data_fields=["scorer"],
                   meta_fields=["budget", "interval", "keep_recent"])
@dataclasses.dataclass(frozen=True)
class DecodingPress:
    """`DecodingPress(scorer, budget=B, interval=N, keep_recent=w)`: evict to B entries per layer and KV
    head whenever a row's cache holds B + N; the last w tokens and the scorer's protected entries (SnapKV's
    window, TOVA's last token, StreamingLLM's sinks) are always kept and count inside B. The scorer's own
    budget or ratio plays no part. Peak cache: B + N entries (+ LookaheadKV's n_lookahead scratch slots)."""

    scorer: BasePress
    budget: int = dataclasses.field(kw_only=True)
    interval: int = dataclasses.field(default=64, kw_only=True)
    keep_recent: int = dataclasses.field(default=8, kw_only=True)

    def __post_init__(self):
        if not isinstance(self.scorer, BasePress) or not scores_while_decoding(self.scorer):
            raise ValueError(f"{type(self.scorer).__name__} cannot score a cache while decoding; decoding-time "
                             "scorers: SnapKVPress, TOVAPress, KnormPress, StreamingLLMPress, LookaheadKVPress")
        if self.interval < 1 or self.keep_recent < 0:
            raise ValueError(f"interval must be >= 1 and keep_recent >= 0, got {self.interval}, {self.keep_recent}")
        if self.scorer.window > self.interval:
            raise ValueError(f"the scorer's window ({self.scorer.window} tokens) must fit in the interval "
                             f"({self.interval}): it re-runs tokens decoded since the last eviction")
        if self.budget < 1 or self.keep_recent + self.scorer.n_protected > self.budget:
            raise BudgetError(f"budget={self.budget} must be >= 1 and hold keep_recent ({self.keep_recent}) plus the "
                              f"scorer's {self.scorer.n_protected} protected entries")

    @property
    def capacity(self) -> int:
        """Slots holding entries: B + N."""
        return self.budget + self.interval

    @property
    def slots(self) -> int:
        """Slots per layer and KV head of the decoding cache, scratch included."""
        return self.capacity + self.scorer.suffix_slots


# ----------------------------------------------------------------------------------------------
# the cache between evictions: entries first, in position order


def pack(cache: KVCache, slots: int) -> tuple[KVCache, np.ndarray]:
    """Move every layer's and head's valid entries to its first slots (position order kept) in a cache of
    `slots` slots; returns it and the entries per row (int [B]). Every layer and head of a row must hold
    as many entries (a full cache, or one compressed by a uniform press: not PyramidKV or AdaKV)."""
    counts = np.stack([np.asarray(v).sum(-1) for v in cache.valid])  # [L, B, K]
    if (counts != counts[:1, :, :1]).any():
        raise ValueError("decoding-time eviction needs the same number of entries in every layer and KV head; "
                         "compress the prompt with a uniform press (not PyramidKV or AdaKV)")
    fill = counts[0, :, 0]
    if fill.max() > slots:
        raise ValueError(f"the cache holds {fill.max()} entries, more than {slots} slots")
    # valid slots first, in slot order; a row's entries fit in every layer's smallest capacity
    n = min(*(cache.capacity(l) for l in range(cache.n_layers)), slots)
    order = [jnp.argsort(~v, axis=-1, stable=True)[..., :n] for v in cache.valid]
    kept = [jnp.take_along_axis(v, o, axis=-1) for v, o in zip(cache.valid, order, strict=True)]
    packed, _ = compact_cache(cache, order, kept)
    return packed.grow(slots - n), fill


def evict_full_rows(model: Transformer, cache: KVCache, fill, recent_ids, press: DecodingPress):
    """Rows whose cache holds `press.capacity` entries (fill int32 [B]) are scored and compacted to their
    top `press.budget` entries per KV head, kept entries first in position order; other rows are unchanged.
    recent_ids int32 [B, R]: the last tokens appended. Returns (cache, fill)."""
    full = fill >= press.capacity

    def evict(cache):
        scores, protected = press.scorer.decoding_scores(model, cache, recent_ids, press.capacity)
        count = jnp.full(fill.shape, press.budget, jnp.int32)
        recent = cache.next_position[:, None, None] - press.keep_recent
        select = TopPerHead(press.scorer.implementation, press.scorer.interpret).select
        # the compacted entries, then the freed slots (left empty) and the scratch, in their own order
        freed = jnp.arange(press.budget, press.slots)
        layer_slots, layer_kept = [], []
        for l in range(cache.n_layers):
            entries = cache.valid[l] & (jnp.arange(press.slots) < press.capacity)
            keep = (protected[l] | (cache.positions[l] >= recent)) & entries
            slots, kept = select(scores[l], entries, keep, press.budget, count)
            tail = jnp.broadcast_to(freed, slots.shape[:2] + freed.shape)
            layer_slots.append(jnp.concatenate([slots, tail], axis=-1))
            layer_kept.append(jnp.concatenate([kept, jnp.zeros(tail.shape, bool)], axis=-1))
        compacted, _ = compact_cache(cache, layer_slots, layer_kept)
        # only the full rows take the compacted cache
        pick = lambda n, o: jnp.where(full.reshape((-1,) + (1,) * (n.ndim - 1)), n, o)
        return dataclasses.replace(cache, **{f: tuple(map(pick, getattr(compacted, f), getattr(cache, f)))
                                              for f in ("keys", "values", "positions", "valid")})

    cache = jax.lax.cond(full.any(), evict, lambda c: c, cache)
    return cache, jnp.where(full, press.budget, fill)


def evicting_loop_pure(model: Transformer, cache: KVCache, fill, first_logits, press: DecodingPress, *,
                       max_new_tokens: int, eos: tuple[int, ...], pad: int):
    """Greedy decoding with decoding-time eviction inside one while loop (pure, jittable): `greedy_loop_pure`
    whose step appends each row's token at its own fill, then evicts the rows that are full. cache: packed
    (`pack`) with `press.slots` slots, fill int32 [B] entries per row (each <= press.budget); first_logits
    float32 [B, V]. Returns (tokens int32 [B, max_new_tokens], n, the final cache)."""
    B = first_logits.shape[0]

    def step(cache, state, tok):
        fill, recent = state
        g = append_pure(model, cache, model.embed_tokens(tok[:, None]), at=fill)
        recent = jnp.concatenate([recent[:, 1:], tok[:, None]], axis=1)
        cache, fill = evict_full_rows(model, g.cache, fill + 1, recent, press)
        return g.logits[:, 0], cache, (fill, recent)

    recent = jnp.full((B, max(press.scorer.window, 1)), pad, jnp.int32)
    return greedy_loop_pure(model, cache, first_logits, max_new_tokens=max_new_tokens, eos=eos, pad=pad,
                            return_cache=True, step=step, state=(fill, recent))


def jitted_evicting_loop(graphdef, params, mesh: Mesh, *, max_new_tokens: int, eos: tuple[int, ...], pad: int):
    """`evicting_loop_pure` of one model structure jitted on `mesh` (built once, cached): `fn(params, press,
    cache, fill, first_logits)`, the press replicated, the cache donated and updated in place."""
    def build():
        def loop(params, press, cache, fill, first_logits):
            return evicting_loop_pure(nnx.merge(graphdef, params), cache, fill, first_logits, press,
                                      max_new_tokens=max_new_tokens, eos=eos, pad=pad)

        b1, b2, c_sh = batch_sharding(mesh, 1), batch_sharding(mesh, 2), cache_shardings(mesh, len(params["layers"]))
        return jax.jit(loop, in_shardings=(param_shardings(mesh, params), NamedSharding(mesh, P()), c_sh, b1, b2),
                       out_shardings=(b2, NamedSharding(mesh, P()), c_sh), donate_argnums=(2,))

    return entry_point(("evicting", graphdef, mesh, max_new_tokens, eos, pad), build)


def decode_evicting(model: Transformer, cache: KVCache, first_logits, max_new_tokens: int, press: DecodingPress, *,
                    eos_token_id: int | tuple[int, ...] | None = None, pad_token_id: int | None = None,
                    mesh: Mesh | None = None) -> tuple[np.ndarray, KVCache]:
    """Greedy decoding from `cache` (a prompt's cache, full or compressed, holding at most `press.budget`
    entries per row, layer and KV head) with decoding-time eviction; EOS and pad ids as `lkv_jax.generate`.
    first_logits float32 [B, V] give the first token. Returns (tokens int [B, n], n <= max_new_tokens, the
    cache after the last step: `press.slots` slots, each row's entries first)."""
    if not isinstance(press, DecodingPress):
        raise TypeError(f"decoding_press must be a DecodingPress, got {type(press).__name__}")
    cache, fill = pack(cache, press.slots)
    if fill.max() > press.budget:
        raise BudgetError(f"the prompt's cache holds {fill.max()} entries per KV head, more than the decoding "
                          f"budget {press.budget}: compress the prompt first (press=... with budget <= "
                          f"{press.budget})")
    eos, pad = decoding_ids(model.config, eos_token_id, pad_token_id)
    mesh = entry_mesh(model, mesh, batch=first_logits.shape[0])
    graphdef, params = nnx.split(model)
    fn = jitted_evicting_loop(graphdef, params, mesh, max_new_tokens=max_new_tokens, eos=eos, pad=pad)
    with jax.set_mesh(mesh):  # the Pallas ops run per (batch, KV-head) shard of this mesh
        tokens, n, cache = fn(params, press, cache, fill.astype(np.int32), first_logits)
    tokens, n = fetch_to_host((tokens, n))
    return tokens[:, : int(n)], cache
