"""PyramidKV (Cai et al., "PyramidKV: Dynamic KV Cache Compression based on Pyramidal Information Funneling").

kvpress `PyramidKVPress(window_size=64, kernel_size=5, beta=20)`: SnapKV scores, with a per-layer budget
falling linearly with depth from `max_num` (first layer) to `min_num = mean / beta` (last layer) so that
the mean over layers stays the uniform budget (up to rounding). When the pyramid would not fit (a layer
below the window, or above the prompt), every layer gets the uniform budget, as in kvpress.
"""

from __future__ import annotations

import dataclasses

from lkv_jax.presses.base import register_press
from lkv_jax.presses.snapkv import SnapKVPress


def pyramid_budgets(n_kept: int, n_prompt: int, n_layers: int, window_size: int, beta: float) -> list[int]:
    """kvpress's `get_layer_budget` for every layer, with `n_kept` = q_len * (1 - ratio) (or the budget)."""
    min_num = n_kept / beta
    max_num = 2 * n_kept - min_num
    if max_num >= n_prompt - window_size:
        max_num = n_prompt - window_size
        min_num = 2 * n_kept - max_num
    if n_layers < 2 or not (n_prompt >= max_num >= min_num >= window_size):
        return [n_kept] * n_layers
    steps = (max_num - min_num) / (n_layers - 1)
    return [round(max_num - l * steps) for l in range(n_layers)]


@register_press
@dataclasses.dataclass(frozen=True)
class PyramidKVPress(SnapKVPress):
    beta: int = 20

    def __post_init__(self):
        if self.beta < 1:
            raise ValueError(f"beta must be >= 1, got {self.beta}")
        super().__post_init__()

    @classmethod
    def paper(cls, **kwargs) -> PyramidKVPress:
        """PyramidKV on the LookaheadKV paper's SnapKV settings: window 32, kernel 7, max-pool."""
        return cls(**{"window_size": 32, "kernel_size": 7, "pooling": "max", **kwargs})

    def layer_budgets(self, n_kept: int, n_prompt: int, n_layers: int) -> list[int]:
        return pyramid_budgets(n_kept, n_prompt, n_layers, self.window_size, self.beta)
