"""Presses by name, for the CLI and the evaluation runner: `make_press("snapkv", budget=64)`, and what a
press needs from its caller besides its settings (`press_needs`: LookaheadKV an adapter, SpecKV a draft)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lkv_jax.presses.adakv import AdaKVPress
from lkv_jax.presses.base import BasePress
from lkv_jax.presses.expected_attention import ExpectedAttentionPress
from lkv_jax.presses.knorm import KnormPress
from lkv_jax.presses.laq import LAQPress
from lkv_jax.presses.lookahead_kv import LookaheadKVPress
from lkv_jax.presses.observed_attention import ObservedAttentionPress
from lkv_jax.presses.pyramidkv import PyramidKVPress
from lkv_jax.presses.random_press import RandomPress
from lkv_jax.presses.snapkv import SnapKVPress
from lkv_jax.presses.speckv import SpecKVPress
from lkv_jax.presses.streaming_llm import StreamingLLMPress
from lkv_jax.presses.tova import TOVAPress


def _adaptive(inner: Callable[..., BasePress]) -> Callable[..., BasePress]:
    """AdaKV head-wise budgets around a scoring press: alpha_safeguard= goes to AdaKV, the rest inside."""

    def build(*, alpha_safeguard: float = 0.2, **kwargs: Any) -> BasePress:
        return AdaKVPress(inner(**kwargs), alpha_safeguard=alpha_safeguard)

    return build


# scoring presses AdaKV can wrap, by name
_SCORERS: dict[str, Callable[..., BasePress]] = {
    "snapkv": SnapKVPress,
    "snapkv-paper": SnapKVPress.paper,  # window 32, kernel 7, max-pool (the LookaheadKV paper's baseline)
    "pyramidkv": PyramidKVPress,
    "pyramidkv-paper": PyramidKVPress.paper,
    "streamingllm": StreamingLLMPress,
    "tova": TOVAPress,
    "knorm": KnormPress,
    "observed-attention": ObservedAttentionPress,
    "h2o": ObservedAttentionPress,
    "random": RandomPress,
    "expected-attention": ExpectedAttentionPress,
    "laq": LAQPress,
}

# name -> constructor taking compression_ratio= / budget= and press-specific keywords
PRESSES: dict[str, Callable[..., BasePress]] = {
    **_SCORERS,
    "speckv": SpecKVPress,
    "lookaheadkv": LookaheadKVPress,
    **{f"adakv-{name}": _adaptive(ctor) for name, ctor in _SCORERS.items()},
}

# name -> the keyword a caller must supply from outside the press's settings (a trained adapter, a model)
NEEDS: dict[str, str] = {"speckv": "draft_model", "lookaheadkv": "adapter"}


def press_key(name: str) -> str:
    """The registry's spelling of a press name ("SnapKV_paper" -> "snapkv-paper")."""
    return name.lower().replace("_", "-")


def press_needs(name: str) -> str | None:
    """The keyword a registered press needs from its caller ("adapter", "draft_model"), or None."""
    return NEEDS.get(press_key(name))


def make_press(name: str, *, compression_ratio: float | None = None, budget: int | None = None,
               **kwargs: Any) -> BasePress:
    """Build a registered press; exactly one of compression_ratio / budget (or neither: ratio 0)."""
    key = press_key(name)
    if key not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known: {', '.join(sorted(PRESSES))}")
    if compression_ratio is not None and budget is not None:
        raise ValueError("give either compression_ratio or budget, not both")
    if budget is not None:
        kwargs["budget"] = budget
    elif compression_ratio is not None:
        kwargs["compression_ratio"] = compression_ratio
    return PRESSES[key](**kwargs)
