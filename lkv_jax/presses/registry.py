"""Presses by name, for the CLI and the evaluation runner: `make_press("snapkv", budget=64)`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from lkv_jax.presses.base import BasePress
from lkv_jax.presses.lookahead_kv import LookaheadKVPress
from lkv_jax.presses.streaming_llm import StreamingLLMPress

# name -> constructor taking compression_ratio= / budget= and press-specific keywords
PRESSES: dict[str, Callable[..., BasePress]] = {
    "streamingllm": StreamingLLMPress,
    "lookaheadkv": LookaheadKVPress,  # needs adapter=
}


def make_press(name: str, *, compression_ratio: float | None = None, budget: int | None = None,
               **kwargs: Any) -> BasePress:
    """Build a registered press; exactly one of compression_ratio / budget (or neither: ratio 0)."""
    key = name.lower().replace("_", "-")
    if key not in PRESSES:
        raise ValueError(f"unknown press {name!r}; known: {', '.join(sorted(PRESSES))}")
    if compression_ratio is not None and budget is not None:
        raise ValueError("give either compression_ratio or budget, not both")
    if budget is not None:
        kwargs["budget"] = budget
    elif compression_ratio is not None:
        kwargs["compression_ratio"] = compression_ratio
    return PRESSES[key](**kwargs)
