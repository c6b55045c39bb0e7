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

from lkv_jax.eviction import AdaptiveAcrossHeads
from lkv_jax.presses.base import BasePress, register_press


@register_press
@dataclasses.dataclass(frozen=True)
class AdaKVPress(BasePress):
    """Wrap a scoring press: `AdaKVPress(SnapKVPress(compression_ratio=0.5))`. The compression ratio or
    budget is the inner press's (kvpress semantics); presses that prepare their scoring per batch (SpecKV
    drafts with another model first) cannot be wrapped."""

    press: BasePress | None = None
    alpha_safeguard: float = 0.2

    array_fields = ("press",)

    def __post_init__(self):
        if not isinstance(self.press, BasePress):
            raise TypeError(f"AdaKVPress needs a lkv_jax press to wrap, got {type(self.press).__name__}")
        if type(self.press).prepare is not BasePress.prepare:
            raise TypeError(f"AdaKVPress cannot wrap {type(self.press).__name__}: its scoring is not a single "
                            "scoring function")
        inner = (self.press.compression_ratio, self.press.budget)
        if (self.compression_ratio, self.budget) not in ((0.0, None), inner):
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

    @property
    def window(self) -> int:
        return self.press.window

    @property
    def selection(self):
        return AdaptiveAcrossHeads(self.alpha_safeguard)

    def layer_budgets(self, n_kept, n_prompt, n_layers):
        return self.press.layer_budgets(n_kept, n_prompt, n_layers)

    def check_prompt(self, model, prompt) -> None:
        self.press.check_prompt(model, prompt)

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        return self.press.prefill_and_score(model, prompt_ids, valid, positions, chunk, prefix)
