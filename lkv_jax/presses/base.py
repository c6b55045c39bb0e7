"""The press protocol: a press scores the prompt's cache; `lkv_jax.eviction` does the rest.

A press is a frozen dataclass (kvpress names and defaults) registered as a JAX pytree: array fields
(e.g. LookaheadKV's adapter) are leaves, everything else is static. It implements

    prefill_and_score(model, prompt_ids, valid, positions, chunk, prefix=None) -> Scored

as a pure function (it runs under `jit`): it prefills the prompt (however it likes: SnapKV stops
before its window and glimpses with it) and returns the cache, the last token's logits, per-layer
float32 scores [B, K, S] over cache slots, and the slots that must be kept. `prefix` (an
`inference.PromptPrefix` of the same batch, or None) lets the prefill start from slots computed once for
every press of an evaluation grid; it is passed on to `prefill_pure`.

It declares how much it keeps (`compression_ratio` / `budget`, `n_protected`, `extra_kept`,
`layer_budgets`) and how the eviction selects (`selection`), and may check a prompt batch before it is
compressed (`check_prompt`) or hand the batch to another scoring press (`prepare`: SpecKV drafts first).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
from typing import ClassVar

import jax

from lkv_jax.errors import BudgetError
from lkv_jax.eviction import CompressOutput, Scored, TopPerHead, keep_count
from lkv_jax.inference import KVHeadScores, Prompt, QueryHeadScores

__all__ = ["BasePress", "CompressOutput", "Scored", "accepts_prefix", "register_press"]

IMPLEMENTATIONS = (None, "xla", "pallas")


def register_press(cls):
    """Class decorator: register a press dataclass as a pytree (fields in `array_fields` are leaves), and
    let its constructor take the fields named in `positional_fields` by position, in that order.

    The class itself is part of the static data: with `register_dataclass` the tree structures of two press
    types with equal field values compared equal (KnormPress and TOVAPress at the same ratio), so a jit
    cache lookup could, rarely, hand one press the other's compiled function."""
    positional = getattr(cls, "positional_fields", None)
    if positional:
        cls.__init__ = _positional_init(cls.__init__, positional)
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


def _positional_init(init, names: tuple[str, ...]):
    """A keyword-only dataclass `__init__` that also takes `names` by position."""

    @functools.wraps(init)
    def __init__(self, *args, **kwargs):
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__} takes at most {len(names)} positional arguments "
                            f"({', '.join(names)}), got {len(args)}")
        init(self, **dict(zip(names[:len(args)], args, strict=True)), **kwargs)

    return __init__


@dataclasses.dataclass(frozen=True, kw_only=True)
class BasePress:
    """Common fields (keyword-only, so a press's own first field can be given positionally, as
    `LookaheadKVPress(adapter, budget=128)`): `compression_ratio` (fraction of the prompt removed:
    n_kept = int(T * (1 - ratio)), kvpress semantics) or `budget` (entries kept per layer and KV head,
    the papers' convention). A budget at or above the prompt length keeps everything."""

    compression_ratio: float = 0.0
    budget: int | None = None
    # the Pallas ops (score-and-evict `pallas_kernels.suffix_attention`, where a press's scoring allows it,
    # and the top-n select `pallas_kernels.topk_select`): None = each op's default (attention: Pallas on
    # GPU/TPU, the jnp reference on CPU; select: lax.top_k); "xla"; "pallas" (interpret=True on CPU)
    implementation: str | None = None
    interpret: bool = False

    array_fields: ClassVar[tuple[str, ...]] = ()
    # None: a press's own fields are positional in their order, the common fields above keyword-only
    positional_fields: ClassVar[tuple[str, ...] | None] = None

    def __post_init__(self):
        if self.implementation not in IMPLEMENTATIONS:
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

    @property
    def window(self) -> int:
        """Trailing prompt slots the scoring runs as a glimpse (an observation window), 0 if none: a shared
        prefix (`compression.shared_prefix`) must stop before them to be of use."""
        return 0

    @property
    def selection(self):
        """The eviction's selection strategy (`lkv_jax.eviction`): the top entries of every KV head."""
        return TopPerHead(self.implementation, self.interpret)

    def scoring(self, kv_heads: bool, reduce: str = "mean") -> KVHeadScores | QueryHeadScores:
        """How the press's glimpse scores: per KV head through the score-and-evict op (with this press's
        `implementation`), or per query head (dense jnp) where a later step needs every head."""
        return KVHeadScores(reduce, self.implementation, self.interpret) if kv_heads else QueryHeadScores(reduce)

    def check_prompt(self, model, prompt: Prompt) -> None:
        """Raise for a prompt batch (or a model) this press cannot score; runs before compressing, outside
        jit, so a mismatch is one clear error."""

    def prepare(self, model, prompt: Prompt) -> BasePress:
        """The press whose `prefill_and_score` scores this batch: the press itself, unless its scoring needs
        work that is not one pure function first (SpecKV: the draft model's tokens)."""
        return self

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk: int, prefix=None) -> Scored:
        raise NotImplementedError(f"{type(self).__name__} must implement prefill_and_score")

    def decoding_scores(self, model, cache, recent_ids, n_slots: int) -> tuple[tuple, tuple]:
        """Scores of a cache mid-answer, for decoding-time eviction (`lkv_jax.decoding_press`): per layer
        float32 scores [B, K, S] over the cache's slots and the protected slots bool [B, K, S]. Entries of
        a KV head sit in its first slots in position order; slots at and past `n_slots` are scratch (a
        lookahead suffix may be appended there). recent_ids int32 [B, window]: the last tokens appended,
        at positions next_position - window ... next_position - 1.

        A press takes part in decoding-time eviction only if its own class defines this (`scores_while_decoding`):
        a subclass such as PyramidKV or LAQ does not inherit it."""
        raise NotImplementedError(f"{type(self).__name__} cannot score a cache while decoding")

    def layer_budgets(self, n_kept: int, n_prompt: int, n_layers: int) -> list[int]:
        """Entries kept per layer (uniform here; PyramidKV overrides)."""
        return [n_kept] * n_layers

    def keep_count(self, n_prompt):
        """Entries kept per row for prompts of n_prompt real tokens (`eviction.keep_count`)."""
        return keep_count(self, n_prompt)


def scores_while_decoding(press: BasePress) -> bool:
    """Whether a press scores a cache mid-answer (defines `decoding_scores` itself)."""
    return "decoding_scores" in vars(type(press))


def accepts_prefix(press: BasePress) -> bool:
    """Whether a press's `prefill_and_score` takes a shared `prefix` (every press of lkv_jax does)."""
    return "prefix" in inspect.signature(type(press).prefill_and_score).parameters
