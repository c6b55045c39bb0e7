"""Suffix attention with per-key attention mass: the scoring step of query-aware KV-cache eviction
(SnapKV's window, TOVA's last token, LookaheadKV's lookahead suffix, draft tokens) as one op.

    out, scores = suffix_attention(q, q_pos, keys, values, key_pos, key_valid, score_mask=..., reduce="mean")

`reference.py` is the spec (dense jnp); `kernel.py` the Pallas kernels (TPU and GPU drivers).
"""

from pallas_kernels.suffix_attention.op import suffix_attention

__all__ = ["suffix_attention"]
