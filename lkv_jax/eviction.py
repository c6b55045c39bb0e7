"""Eviction: what a press's scores become. Plan how many entries each row and layer keeps, select them per
KV head, gather them into a compact cache that keeps every entry's ORIGINAL position.

A press only scores (`Scored`: the prompt's cache, per-layer float32 scores [B, K, S] and the slots it
protects); the selection is a strategy the press declares:

    TopPerHead()                  every KV head keeps its own top entries (the same number per head)
    AdaptiveAcrossHeads(alpha)    AdaKV: the layer's budget is shared by its KV heads

Invalid slots (padding, slots past the prompt such as a scoring suffix) are never chosen; protected
slots (windows, sinks) are always chosen and count inside the budget.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from lkv_jax.cache import KVCache
from lkv_jax.suffix_scoring import on_kv_head_shards
from pallas_kernels.topk_select.op import EXCLUDE, PROTECT, select_slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scored:
    """What a press returns. cache: the prompt's cache (slots past the prompt may hold a scoring suffix:
    never selected); its next_position is the prompt's, since decoding continues right after the prompt (a
    press that appended a suffix resets it, as SpecKV and LookaheadKV do). logits: float32 [B, V] of the
    last prompt token. scores / protected: per layer [B, K, S]."""

    cache: KVCache
    logits: jax.Array
    scores: tuple[jax.Array, ...]
    protected: tuple[jax.Array, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CompressOutput:
    """cache: compressed cache, capacity n_kept per layer (call `.grow(n)` to decode n tokens).
    kept_positions: per layer int32 [B, K, n_kept], original positions ascending; rows that keep
    fewer entries (shorter prompts in a batch) are padded with -1 at the end.
    scores: per layer float32 [B, K, S] over the prefill cache's slots (left padding included).
    logits: float32 [B, V], the last prompt token's logits (they give the first generated token)."""

    cache: KVCache
    kept_positions: tuple[jax.Array, ...]
    scores: tuple[jax.Array, ...]
    logits: jax.Array


# ----------------------------------------------------------------------------------------------
# plan: entries kept per row and per layer


def keep_count(press, n_prompt):
    """Entries kept per row for prompts of n_prompt real tokens under a press's `compression_ratio`
    (n_kept = int(T * (1 - ratio)), kvpress) or `budget`, plus its `extra_kept`: numpy for Python ints and
    numpy arrays (static sizes), jnp for jax arrays (traced counts under jit)."""
    xp = np if isinstance(n_prompt, int | np.ndarray | np.integer) else jnp
    n = xp.asarray(n_prompt)
    if press.budget is not None:
        return xp.minimum(int(press.budget) + press.extra_kept, n)
    return xp.minimum(xp.floor(n * (1.0 - press.compression_ratio)).astype(xp.int32) + press.extra_kept, n)


def eviction_plan(press, valid, n_layers: int) -> tuple[np.ndarray, tuple[int, ...]]:
    """(entries kept per row int [B], static capacity per layer) of a prompt batch with `valid` [B, T]."""
    n_prompt = np.asarray(valid).sum(1)
    counts = keep_count(press, n_prompt)
    if (counts < np.minimum(press.n_protected, n_prompt)).any():
        raise ValueError(f"{type(press).__name__} keeps {counts.min()} entries for a {n_prompt.min()}-token "
                         f"prompt, fewer than its {press.n_protected} protected ones")
    n_kept = int(max(counts.max(), 1))
    return counts, tuple(press.layer_budgets(n_kept, int(n_prompt.max()), n_layers))


def layer_counts(counts, budgets: tuple[int, ...]) -> list[jax.Array]:
    """Per layer int32 [B]: a row keeping counts[b] at the base budget keeps round(counts * n / base), at
    most n, in a layer of budget n (base: the uniform budget, or the mean of per-layer ones)."""
    base = max(budgets) if len(set(budgets)) == 1 else round(sum(budgets) / len(budgets))
    return [jnp.minimum(n, jnp.round(counts * (n / max(base, 1))).astype(jnp.int32)) for n in budgets]


# ----------------------------------------------------------------------------------------------
# select: the strategies


@dataclasses.dataclass(frozen=True)
class TopPerHead:
    """Every KV head keeps its top `count` entries at a static capacity. implementation / interpret: the
    top-n op (`pallas_kernels.topk_select`: None and "xla" are `lax.top_k`, "pallas" the threshold-select
    kernel, run per (batch, KV-head) shard under a mesh)."""

    implementation: str | None = None
    interpret: Any = False

    adaptive = False

    def select(self, scores, selectable, protected, capacity: int, count):
        """(slots int32 [B, K, capacity], kept bool [B, K, capacity]): kept slots ascending, then dropped."""
        op = lambda s, a, p, c: select_slots(s, a, p, capacity, c, implementation=self.implementation,
                                             interpret=self.interpret)
        if self.implementation == "pallas":
            kv3 = P("data", "tensor", None)
            op = on_kv_head_shards(op, (kv3, kv3, kv3, P("data")), (kv3, kv3))
        return op(scores, selectable, protected, count)


@dataclasses.dataclass(frozen=True)
class AdaptiveAcrossHeads:
    """AdaKV: every head first keeps its top floor(count * alpha_safeguard) entries, then the layer keeps its
    top K * count entries over all heads together. The per-head numbers are known only after scoring, so the
    gather follows in a second step (`slots_of_mask`) once the largest is read back."""

    alpha_safeguard: float = 0.2

    adaptive = True

    def select(self, scores, selectable, protected, capacity: int, count):
        """keep bool [B, K, S] (`capacity`, the mean per-head budget, does not bound a head)."""
        B, K, S = scores.shape
        s = jnp.where(protected, PROTECT, scores.astype(jnp.float32))
        s = jnp.where(selectable, s, EXCLUDE)
        n_safe = jnp.floor(count * self.alpha_safeguard).astype(jnp.int32)
        rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1)  # rank inside the head
        s = jnp.where((rank < n_safe[:, None, None]) & selectable, PROTECT, s)
        flat = s.reshape(B, K * S)
        grank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1)
        keep = (grank < (K * count)[:, None]) & selectable.reshape(B, K * S)
        return keep.reshape(B, K, S)


def select(scored: Scored, n_prompt_slots: int, budgets: tuple[int, ...], counts, strategy) -> tuple:
    """The strategy's choice per layer over the prompt's slots (the first n_prompt_slots of the cache).
    counts int [B]: entries each row keeps at the base budget (`eviction_plan`)."""
    cache = scored.cache
    out = []
    for l, (n, count) in enumerate(zip(budgets, layer_counts(counts, budgets), strict=True)):
        selectable = cache.valid[l] & (jnp.arange(cache.capacity(l)) < n_prompt_slots)
        out.append(strategy.select(scored.scores[l], selectable, scored.protected[l] & selectable, n, count))
    return tuple(out)


def mask_capacities(keep) -> tuple[int, ...]:
    """The static capacity per layer an adaptive choice needs: its largest per-head count (host sync)."""
    return tuple(max(int(np.asarray(k.sum(-1)).max()), 1) for k in keep)


def slots_of_mask(keep, capacity: int):
    """keep bool [B, K, S] -> (slots int32, kept bool) [B, K, capacity], kept slots ascending first."""
    S = keep.shape[-1]
    order = jnp.where(keep, -jnp.arange(S, dtype=jnp.float32), -jnp.inf)
    vals, idx = jax.lax.top_k(order, capacity)
    return idx.astype(jnp.int32), vals > -jnp.inf


# ----------------------------------------------------------------------------------------------
# gather


def compact_cache(cache: KVCache, layer_slots, layer_kept) -> tuple[KVCache, tuple[jax.Array, ...]]:
    """Gather per-layer (slots, kept) [B, K, n_l] from `cache`; returns the compact cache and the kept
    positions (int32 [B, K, n_l] per layer, -1 where not kept)."""
    keys, values, positions = [], [], []
    for l in range(cache.n_layers):
        slots, kept = layer_slots[l], layer_kept[l]
        keys.append(jnp.take_along_axis(cache.keys[l], slots[..., None], axis=2))
        values.append(jnp.take_along_axis(cache.values[l], slots[..., None], axis=2))
        positions.append(jnp.where(kept, jnp.take_along_axis(cache.positions[l], slots, axis=2), -1))
    cursor = jnp.asarray([s.shape[-1] for s in layer_slots], jnp.int32)
    out = dataclasses.replace(cache, keys=tuple(keys), values=tuple(values), positions=tuple(positions),
                              valid=tuple(layer_kept), cursor=cursor)
    return out, tuple(positions)


def evict(scored: Scored, chosen, capacities: tuple[int, ...] | None = None) -> CompressOutput:
    """The compressed output from a `select` choice: per-layer (slots, kept), or keep masks with their
    `capacities` (adaptive)."""
    if capacities is not None:
        chosen = tuple(slots_of_mask(k, c) for k, c in zip(chosen, capacities, strict=True))
    cache, kept_positions = compact_cache(scored.cache, [s for s, _ in chosen], [k for _, k in chosen])
    return CompressOutput(cache=cache, kept_positions=kept_positions, scores=scored.scores, logits=scored.logits)
