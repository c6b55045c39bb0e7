"""AdaKV (Feng et al., "Ada-KV: Optimizing KV Cache Eviction by Adaptive Budget Allocation", 2024).

kvpress `AdaKVPress(press, alpha_safeguard=0.2)`: the inner press's scores, but the layer's budget is
shared by its KV heads: every head first keeps its top int(n_kept * alpha_safeguard) entries (the
safeguard), then the layer keeps its top K * n_kept entries over all heads together, so heads with
peaked scores give room to heads with flat ones. Protected entries (windows, sinks) are kept as usual.

Layout: the compressed cache stays [B, K, S_l, H] with S_l = the largest per-head count in layer l
(found after scoring, so nothing beyond the actual maximum is allocated); heads that keep fewer
entries have invalid (masked) slots at the end. This SAVES NO MEMORY against a uniform budget (it
needs at least as much), exactly like kvpress's masked implementation: it reproduces AdaKV's
selection and quality, not its memory savings.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lkv_jax.presses.base import BasePress, CompressOutput, register_press
from lkv_jax.selection import EXCLUDE, PROTECT, compact_cache


def adaptive_keep(scores, selectable, protected, counts, alpha_safeguard: float):
    """Head-adaptive selection of one layer.

    scores float32 [B, K, S]; selectable/protected bool [B, K, S]; counts int [B] (mean entries per
    head). Returns keep bool [B, K, S]: per row, the top K * counts entries over all heads after every
    head's top floor(counts * alpha) (protected first) were raised to the top.
    """
    B, K, S = scores.shape
    s = jnp.where(protected, PROTECT, scores.astype(jnp.float32))
    s = jnp.where(selectable, s, EXCLUDE)
    n_safe = jnp.floor(counts * alpha_safeguard).astype(jnp.int32)
    rank = jnp.argsort(jnp.argsort(-s, axis=-1, stable=True), axis=-1)  # rank inside the head
    s = jnp.where((rank < n_safe[:, None, None]) & selectable, PROTECT, s)
    flat = s.reshape(B, K * S)
    grank = jnp.argsort(jnp.argsort(-flat, axis=-1, stable=True), axis=-1)
    keep = (grank < (K * counts)[:, None]) & selectable.reshape(B, K * S)
    return keep.reshape(B, K, S)


@register_press
@dataclasses.dataclass(frozen=True, init=False)
class AdaKVPress(BasePress):
    """Wrap a scoring press: `AdaKVPress(SnapKVPress(compression_ratio=0.5))`. The compression ratio or
    budget is the inner press's (kvpress semantics); presses that draft with another model (SpecKV)
    cannot be wrapped."""

    press: BasePress | None = None
    alpha_safeguard: float = 0.2

    array_fields = ("press",)

    def __init__(self, press=None, alpha_safeguard: float = 0.2, **base_fields):
        # `press` first, as kvpress's AdaKVPress(press); the inherited fields are keywords
        values = {"press": press, "alpha_safeguard": alpha_safeguard, **base_fields}
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, values.pop(f.name, f.default))
        if values:
            raise TypeError(f"AdaKVPress got unexpected arguments {sorted(values)}")
        self.__post_init__()

    def __post_init__(self):
        if not isinstance(self.press, BasePress) and not _is_traced_leaf(self.press):
            raise TypeError(f"AdaKVPress needs a lkv_jax press to wrap, got {type(self.press).__name__}")
        if isinstance(self.press, BasePress):
            if type(self.press).compress is not BasePress.compress and not hasattr(self.press, "check_prompt"):
                raise TypeError(f"AdaKVPress cannot wrap {type(self.press).__name__}: its compression is not a "
                                "single scoring function")
            if (self.compression_ratio, self.budget) not in ((0.0, None),
                                                             (self.press.compression_ratio, self.press.budget)):
                raise ValueError("set compression_ratio / budget on the wrapped press, not on AdaKVPress")
            object.__setattr__(self, "compression_ratio", self.press.compression_ratio)
            object.__setattr__(self, "budget", self.press.budget)
        if not 0.0 <= self.alpha_safeguard <= 1.0:
            raise ValueError(f"alpha_safeguard must lie in [0, 1], got {self.alpha_safeguard}")
        super().__post_init__()

    @property
    def n_protected(self) -> int:
        return self.press.n_protected

    @property
    def suffix_slots(self) -> int:
        return self.press.suffix_slots

    def layer_budgets(self, n_kept, n_prompt, n_layers):
        return self.press.layer_budgets(n_kept, n_prompt, n_layers)

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        return self.press.prefill_and_score(model, prompt_ids, valid, positions, chunk, prefix)

    def compress(self, model, prompt, prefix=None) -> CompressOutput:
        check = getattr(self.press, "check_prompt", None)
        if check is not None:
            check(prompt)
        counts, budgets = self.eviction_plan(model, prompt)
        graphdef, params = nnx.split(model)
        scored, keep = _score_jit(graphdef, params, self, prompt.ids, prompt.valid, prompt.positions,
                                  jnp.asarray(counts, jnp.int32), prefix, chunk=prompt.chunk, budgets=budgets)
        capacities = tuple(max(int(np.asarray(k.sum(-1)).max()), 1) for k in keep)
        cache, kept_positions = _gather_jit(scored.cache, keep, capacities=capacities)
        return CompressOutput(cache=cache, kept_positions=kept_positions, scores=scored.scores, logits=scored.logits)


def _is_traced_leaf(x) -> bool:
    # jax rebuilds the press with placeholder leaves when it flattens / unflattens pytrees
    return not isinstance(x, BasePress) and x is not None and not isinstance(x, (int, float, str))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "budgets"))
def _score_jit(graphdef, params, press, ids, valid, positions, counts, prefix, *, chunk, budgets):
    model = nnx.merge(graphdef, params)
    scored = press.prefill_and_score(model, ids, valid, positions, chunk, prefix)
    base = max(budgets) if len(set(budgets)) == 1 else round(sum(budgets) / len(budgets))
    T = ids.shape[1]
    keep = []
    for l, n in enumerate(budgets):
        S = scored.cache.capacity(l)
        selectable = scored.cache.valid[l] & (jnp.arange(S) < T)
        layer_count = jnp.minimum(n, jnp.round(counts * (n / max(base, 1))).astype(jnp.int32))
        keep.append(adaptive_keep(scored.scores[l], selectable, scored.protected[l] & selectable, layer_count,
                                  press.alpha_safeguard))
    return scored, tuple(keep)


@functools.partial(jax.jit, static_argnames=("capacities",))
def _gather_jit(cache, keep, *, capacities):
    slots, kept = [], []
    for l, c in enumerate(capacities):
        S = keep[l].shape[-1]
        order = jnp.where(keep[l], -jnp.arange(S, dtype=jnp.float32), -jnp.inf)  # ascending slots first
        vals, idx = jax.lax.top_k(order, c)
        slots.append(idx.astype(jnp.int32))
        kept.append(vals > -jnp.inf)
    return compact_cache(cache, slots, kept)
