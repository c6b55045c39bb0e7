"""Expected attention (Devoto et al., "Expected Attention: KV Cache Compression by Estimating Attention
from Future Queries Distribution", 2025). kvpress `ExpectedAttentionPress(n_future_positions=512,
n_sink=4, use_covariance=True, use_vnorm=True, epsilon=0.0)`.

Per layer and query head: the mean mu and covariance C of the prompt's pre-RoPE queries (the first
`n_sink` tokens left out), rotated by the RoPE matrix R averaged over the next `n_future_positions`
positions; a key k (post-RoPE, as cached) scores softmax_k(k.mu'/sqrt(d) + k^T C' k / (2d)) over the
non-sink keys, averaged over the KV head's query heads, times ||v|| (plus epsilon first). The sinks are
always kept. The query moments are accumulated DURING the chunked prefill (a `PrefillObserver`; the
pre-RoPE query is the cached post-RoPE one rotated back), so no extra pass over the prompt is needed.
Prompts must be longer than `n_sink` tokens.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from lkv_jax.inference import PrefillObserver, prefill_pure
from lkv_jax.models.rope import apply_rope
from lkv_jax.presses.base import BasePress, Scored, register_press

_NEG = -1e30


@dataclasses.dataclass(frozen=True)
class QueryMomentObserver(PrefillObserver):
    """Per layer (sum of q [B, N, H], sum of q q^T [B, N, H, H] or None, count [B]) over the valid
    tokens at positions >= n_sink; q is the pre-RoPE query, float32."""

    n_sink: int
    use_covariance: bool
    inv_freq: np.ndarray = dataclasses.field(compare=False)

    def init(self, model, batch, capacity):
        N, H = model.config.num_attention_heads, model.config.head_dim
        second = jnp.zeros((batch, N, H, H), jnp.float32) if self.use_covariance else None
        return jnp.zeros((batch, N, H), jnp.float32), second, jnp.zeros((batch,), jnp.float32)

    def update(self, layer, state, chunk):
        s1, s2, count = state
        q = apply_rope(chunk.q.astype(jnp.float32), -chunk.positions, self.inv_freq)  # undo RoPE
        w = (chunk.valid & (chunk.positions >= self.n_sink)).astype(jnp.float32)
        qw = q * w[:, :, None, None]
        s1 = s1 + qw.sum(1)
        if s2 is not None:  # two-operand einsums: one batched matmul each, no [B, C, N, H, H] temporary
            s2 = s2 + jnp.einsum("bcnh,bcni->bnhi", qw, q)
        return s1, s2, count + w.sum(1)


def average_rope_matrix(start, n_future: int, inv_freq) -> jnp.ndarray:
    """Mean over positions start .. start + n_future - 1 (start int [B]) of the RoPE rotation matrix
    (HF half-split layout): float32 [B, H, H]."""
    pos = start[:, None].astype(jnp.float32) + jnp.arange(n_future, dtype=jnp.float32)[None]  # [B, F]
    ang = pos[..., None] * jnp.asarray(inv_freq)  # [B, F, H/2]
    c, s = jnp.cos(ang).mean(1), jnp.sin(ang).mean(1)  # [B, H/2]
    dc, ds = jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(c), jnp.vectorize(jnp.diag, signature="(n)->(n,n)")(s)
    top = jnp.concatenate([dc, -ds], axis=-1)
    bottom = jnp.concatenate([ds, dc], axis=-1)
    return jnp.concatenate([top, bottom], axis=-2)


@register_press
@dataclasses.dataclass(frozen=True)
class ExpectedAttentionPress(BasePress):
    n_future_positions: int = 512
    n_sink: int = 4
    use_covariance: bool = True
    use_vnorm: bool = True
    epsilon: float = 0.0

    def __post_init__(self):
        if self.n_future_positions < 1 or self.n_sink < 0:
            raise ValueError("n_future_positions must be >= 1 and n_sink >= 0")
        super().__post_init__()

    @property
    def n_protected(self) -> int:
        return self.n_sink

    def check_prompt(self, model, prompt) -> None:
        """Raise for prompt rows not longer than the sinks."""
        n = np.asarray(prompt.valid).sum(1)
        if (n <= self.n_sink).any():
            raise ValueError(f"ExpectedAttentionPress needs prompts longer than n_sink={self.n_sink} tokens; "
                             f"the shortest row has {int(n.min())}")

    def prefill_and_score(self, model, prompt_ids, valid, positions, chunk, prefix=None):
        # observers need every query's attention: a shared prefix is ignored, the prompt prefilled in full
        cfg = model.config
        B, T = prompt_ids.shape
        K, G, H = cfg.num_key_value_heads, cfg.n_groups, cfg.head_dim
        observer = QueryMomentObserver(self.n_sink, self.use_covariance, model.inv_freq)
        cache, logits, moments = prefill_pure(model, prompt_ids, valid, positions, chunk=chunk, capacity=T,
                                              observe=observer)
        n = valid.sum(1)
        R = average_rope_matrix(n, self.n_future_positions, model.inv_freq)  # [B, H, H]
        scored = valid & (positions >= self.n_sink)  # [B, S]
        scores = []
        for l, (s1, s2, count) in enumerate(moments):
            mu = s1 / count[:, None, None]
            mu_r = jnp.einsum("bij,bnj->bni", R, mu).reshape(B, K, G, H)
            keys = cache.keys[l].astype(jnp.float32)  # [B, K, S, H]
            logit = jnp.einsum("bksh,bkgh->bkgs", keys, mu_r) / np.sqrt(H)
            if s2 is not None:
                cov = s2 / count[:, None, None, None] - mu[..., :, None] * mu[..., None, :]
                cov_r = jnp.einsum("bij,bnjk,blk->bnil", R, cov, R).reshape(B, K, G, H, H)
                kc = jnp.einsum("bksh,bkghi->bkgsi", keys, cov_r)
                logit = logit + jnp.einsum("bkgsi,bksi->bkgs", kc, keys) / H / 2
            logit = jnp.where(scored[:, None, None, :], logit, _NEG)
            p = jnp.exp(logit - logit.max(-1, keepdims=True))
            p = jnp.where(scored[:, None, None, :], p, 0.0)
            s = (p / p.sum(-1, keepdims=True)).mean(2)  # [B, K, S]
            if self.use_vnorm:
                s = (s + self.epsilon) * jnp.linalg.norm(cache.values[l].astype(jnp.float32), axis=-1)
            scores.append(s)
        sinks = jnp.broadcast_to((valid & (positions < self.n_sink))[:, None, :], (B, K, T))
        return Scored(cache=cache, logits=logits, scores=tuple(scores), protected=(sinks,) * len(scores))
