"""The press protocol: how a press scores the prompt's cache, and the shared compress pipeline.

A press is a frozen dataclass (kvpress names and defaults) registered as a JAX pytree: array fields
(e.g. LookaheadKV's adapter) are leaves, everything else is static. A scoring press implements

    prefill_and_score(model, prompt_ids, valid, positions, chunk, prefix=None) -> Scored

as a pure function (it runs under `jit`): it prefills the prompt (however it likes: SnapKV stops
before its window and glimpses with it) and returns the cache, the last token's logits, per-layer
float32 scores [B, K, S] over cache slots, and the slots that must be kept. `BasePress.compress`
then selects the top entries per layer and KV head and gathers the compact cache. `prefix` (an
`inference.PromptPrefix` of the same batch, or None) lets the prefill start from slots computed once for
every press of an evaluation grid; it is passed on to `prefill_pure`.
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkv_jax.cache import KVCache
from lkv_jax.errors import BudgetError
from lkv_jax.inference import Prompt
from lkv_jax.selection import compact_cache, select_slots


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Scored:
    """cache: the prompt's cache (slots past the prompt may hold a scoring suffix: never selected); its
    next_position is the prompt's, since decoding continues right after the prompt (a press that appended a
    suffix resets it, as SpecKV and LookaheadKV do). logits: float32 [B, V] of the last prompt token.
    scores / protected: per layer [B, K, S]."""

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


def register_press(cls):
    """Class decorator: register a press dataclass as a pytree (fields in `array_fields` are leaves).

    The class itself is part of the static data: with `register_dataclass` the tree structures of two press
    types with equal field values compared equal (KnormPress and TOVAPress at the same ratio), so a jit
    cache lookup could, rarely, hand one press the other's compiled function."""
    names = [f.name for f in dataclasses.fields(cls)]
    data = tuple(n for n in names if n in cls.array_fields)
    meta = tuple(n for n in names if n not in data)

    def flatten_with_keys(press):
        children = [(jax.tree_util.GetAttrKey(n), getattr(press, n)) for n in data]
        return children, (cls, tuple(getattr(press, n) for n in meta))

    def unflatten(aux, children):
        _, values = aux
        press = object.__new__(cls)  # no __init__ / __post_init__: leaves may be tracers or placeholders
        for n, v in zip(meta, values, strict=True):
            object.__setattr__(press, n, v)
        for n, v in zip(data, children, strict=True):
            object.__setattr__(press, n, v)
        return press

    jax.tree_util.register_pytree_with_keys(cls, flatten_with_keys, unflatten)
    return cls


@dataclasses.dataclass(frozen=True)
class BasePress:
    """Common fields: `compression_ratio` (fraction of the prompt removed: n_kept = int(T * (1 - ratio)),
    kvpress semantics) or `budget` (entries kept per layer and KV head, the papers' convention). A
    budget at or above the prompt length keeps everything."""

    compression_ratio: float = 0.0
    budget: int | None = None
    # the score-and-evict op (pallas_kernels.suffix_attention) where a press's scoring allows it:
    # None = Pallas on GPU/TPU and the jnp reference on CPU; "xla"; "pallas" (interpret=True on CPU)
    implementation: str | None = None
    interpret: bool = False

    array_fields: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self):
        if self.implementation not in (None, "xla", "pallas"):
            raise ValueError(f"implementation must be None, 'xla' or 'pallas', got {self.implementation!r}")
        if not 0.0 <= self.compression_ratio < 1.0:
            raise ValueError(f"compression_ratio must lie in [0, 1), got {self.compression_ratio}")
        if self.budget is not None:
            if self.compression_ratio != 0.0:
                raise ValueError("give either compression_ratio or budget, not both")
            if int(self.budget) + self.extra_kept < 1:
                raise BudgetError(f"budget={self.budget} keeps no entry of {type(self).__name__}; the budget "
                                 "counts the entries kept per layer and KV head and must be >= 1")
            if int(self.budget) + self.extra_kept < self.n_protected:
                raise BudgetError(f"budget={self.budget} is smaller than the {self.n_protected} protected "
                                 f"entries (window/sinks) of {type(self).__name__}; raise the budget")

    # -- what presses override ------------------------------------------------------------------
    @property
    def n_protected(self) -> int:
        """Entries always kept (window, sinks); they count inside the budget."""
        return 0

    @property
    def extra_kept(self) -> int:
        """Entries kept on top of the budget or ratio (0: everything counts inside, kvpress semantics)."""
        return 0

    @property
    def suffix_slots(self) -> int:
        """Cache slots the scoring writes after the prompt (a lookahead suffix), reserved at prefill."""
        return 0

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk: int, prefix=None) -> Scored:
        raise NotImplementedError(f"{type(self).__name__} must implement prefill_and_score")

    def layer_budgets(self, n_kept: int, n_prompt: int, n_layers: int) -> list[int]:
        """Entries kept per layer (uniform here; PyramidKV overrides)."""
        return [n_kept] * n_layers

    # -- shared ---------------------------------------------------------------------------------
    def keep_count(self, n_prompt):
        """Entries kept per row for prompts of n_prompt real tokens: numpy for Python ints and numpy
        arrays (static sizes), jnp for jax arrays (traced counts under jit)."""
        xp = np if isinstance(n_prompt, int | np.ndarray | np.integer) else jnp
        n = xp.asarray(n_prompt)
        if self.budget is not None:
            return xp.minimum(int(self.budget) + self.extra_kept, n)
        return xp.minimum(xp.floor(n * (1.0 - self.compression_ratio)).astype(xp.int32) + self.extra_kept, n)

    def eviction_plan(self, model, prompt: Prompt) -> tuple[np.ndarray, tuple[int, ...]]:
        """(entries kept per row int [B], static capacity per layer) for a prepared prompt batch."""
        n_prompt = np.asarray(prompt.valid).sum(1)
        counts = self.keep_count(n_prompt)
        if (counts < np.minimum(self.n_protected, n_prompt)).any():
            raise ValueError(f"{type(self).__name__} keeps {counts.min()} entries for a {n_prompt.min()}-token "
                             f"prompt, fewer than its {self.n_protected} protected ones")
        n_kept = int(max(counts.max(), 1))
        return counts, tuple(self.layer_budgets(n_kept, int(n_prompt.max()), model.config.num_hidden_layers))

    def compress(self, model, prompt: Prompt, prefix=None) -> CompressOutput:
        """Prefill, score and evict a prepared prompt batch (see `lkv_jax.compress`)."""
        counts, budgets = self.eviction_plan(model, prompt)
        graphdef, params = nnx.split(model)
        return _compress_jit(graphdef, params, self, prompt.ids, prompt.valid, prompt.positions,
                             jnp.asarray(counts, jnp.int32), prefix, chunk=prompt.chunk, budgets=budgets)


def accepts_prefix(press: BasePress) -> bool:
    """Whether a press's `prefill_and_score` takes a shared `prefix` (every press of lkv_jax does)."""
    return "prefix" in inspect.signature(type(press).prefill_and_score).parameters


def evict(scored: Scored, n_prompt_slots: int, budgets, counts, base_count) -> CompressOutput:
    """Select and gather (pure). counts int [B]: entries row b keeps at the base budget `base_count`;
    a layer with budget n keeps round(counts * n / base_count), at most n."""
    cache = scored.cache
    slots, kept = [], []
    for l, n in enumerate(budgets):
        S = cache.capacity(l)
        selectable = cache.valid[l] & (jnp.arange(S) < n_prompt_slots)
        layer_count = jnp.minimum(n, jnp.round(counts * (n / max(base_count, 1))).astype(jnp.int32))
        s, k = select_slots(scored.scores[l], selectable, scored.protected[l] & selectable, n, layer_count)
        slots.append(s)
        kept.append(k)
    new_cache, kept_positions = compact_cache(cache, slots, kept)
    return CompressOutput(cache=new_cache, kept_positions=kept_positions, scores=scored.scores, logits=scored.logits)


def compress_pure(graphdef, params, press, ids, valid, positions, counts, prefix=None, *, chunk,
                  budgets) -> CompressOutput:
    """The whole prefill-score-evict path as one pure function (jit it, with shardings if you like)."""
    model = nnx.merge(graphdef, params)
    # presses written before shared prefixes existed take no `prefix` argument
    scored = (press.prefill_and_score(model, ids, valid, positions, chunk) if prefix is None
              else press.prefill_and_score(model, ids, valid, positions, chunk, prefix))
    base = max(budgets) if len(set(budgets)) == 1 else round(sum(budgets) / len(budgets))
    return evict(scored, ids.shape[1], budgets, counts, base)


_compress_jit = jax.jit(compress_pure, static_argnames=("graphdef", "chunk", "budgets"))
