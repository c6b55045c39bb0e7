"""The decoder-only transformer shared by Llama 2/3.x, Mistral, Qwen2/2.5 and Qwen3, as Flax NNX modules.

The modules hold parameters and define one layer's arithmetic; they never own a KV cache. Attention is
supplied by the caller as `attend(q, k, v) -> out`, so the same layer code serves the chunked prefill,
the glimpse, single-token decoding and the dense differentiable path (see `lkv_jax.inference`).

Weights are stored `[in, out]` (the transpose of torch's `nn.Linear`), with RoPE in the HF half-split
layout, so Hugging Face conversion is a transpose and nothing else.

Each parameter declares its logical axes beside it (NNX `out_sharding` metadata, e.g. ("embed",
"heads") for the query kernel); `lkv_jax.sharding` maps logical axes to mesh axes. The projections of a
layer, their logical axes and hence their shapes are listed once, in `PROJECTION_AXES`.

LoRA hook: every projection accepts an optional `(a [in, R], b [R, out])` pair, a scale and a boolean
mask `[B, T]`; the delta `scale * x @ a @ b` is added only where the mask is True, so masked-off
positions compute exactly the base model's values (used by the lookahead adapter).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from lkv_jax.config import ModelConfig
from lkv_jax.models.rope import apply_rope, inverse_frequencies

# every projection of a layer: (logical input axis, logical output axis) of its [in, out] kernel
PROJECTION_AXES = {
    "q": ("embed", "heads"), "k": ("embed", "kv_heads"), "v": ("embed", "kv_heads"), "o": ("heads", "embed"),
    "gate": ("embed", "mlp"), "up": ("embed", "mlp"), "down": ("mlp", "embed"),
}
ATTENTION_PROJECTIONS = ("q", "k", "v", "o")
MLP_PROJECTIONS = ("gate", "up", "down")
PROJECTIONS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS
LoraLayer = Mapping[str, Mapping[str, jax.Array]]  # projection -> {"a": [in, R], "b": [R, out]}
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


class LoraContext:
    """The per-layer LoRA tensors plus the static scale and the [B, T] position mask."""

    def __init__(self, layer: LoraLayer | None, scale: float, mask: jax.Array | None):
        self.layer, self.scale, self.mask = layer or {}, scale, mask

    def delta(self, name: str, x: jax.Array, y: jax.Array) -> jax.Array:
        if name not in self.layer or self.mask is None:
            return y
        a, b = self.layer[name]["a"], self.layer[name]["b"]
        d = (x.astype(a.dtype) @ a) @ b * self.scale
        return jnp.where(self.mask[..., None], y + d.astype(y.dtype), y)


NO_LORA = LoraContext(None, 0.0, None)


def axis_sizes(cfg: ModelConfig) -> dict[str, int]:
    """The size of each logical axis of the projections' kernels."""
    return {"embed": cfg.hidden_size, "heads": cfg.num_attention_heads * cfg.head_dim,
            "kv_heads": cfg.num_key_value_heads * cfg.head_dim, "mlp": cfg.intermediate_size}


def projection_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in, out) of every projection of one layer, in the [in, out] weight layout."""
    sizes = axis_sizes(cfg)
    return {name: (sizes[a], sizes[b]) for name, (a, b) in PROJECTION_AXES.items()}


def _param(value: jax.Array, axes: tuple[str | None, ...] | None = None) -> nnx.Param:
    """A parameter with its logical axes as metadata (None: replicated). The axes only declare the
    layout: nothing is sharded when the parameter is created."""
    if axes is None:
        return nnx.Param(value)
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


def _init(rngs: nnx.Rngs, shape, dtype, std=0.02):
    return (jax.random.normal(rngs.params(), shape, jnp.float32) * std).astype(dtype)


class Linear(nnx.Module):
    def __init__(self, axes: tuple[str, str], sizes: dict[str, int], *, bias: bool, dtype, rngs: nnx.Rngs):
        self.kernel = _param(_init(rngs, (sizes[axes[0]], sizes[axes[1]]), dtype), axes)
        self.bias = _param(jnp.zeros((sizes[axes[1]],), dtype), axes[1:]) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = x @ self.kernel[...]
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype):
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        # float32 statistics, then cast back before the weight (as transformers' LlamaRMSNorm)
        xf = x.astype(jnp.float32)
        xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * xf.astype(x.dtype)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, dtype, rngs: nnx.Rngs):
        D, H = cfg.hidden_size, cfg.head_dim
        sizes = axis_sizes(cfg)
        bias = {"q": cfg.qkv_bias, "k": cfg.qkv_bias, "v": cfg.qkv_bias, "o": cfg.o_bias}
        proj = lambda name: Linear(PROJECTION_AXES[name], sizes, bias=bias.get(name, cfg.mlp_bias), dtype=dtype,
                                   rngs=rngs)
        self.input_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.q, self.k, self.v, self.o = (proj(name) for name in ATTENTION_PROJECTIONS)
        self.q_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.k_norm = RMSNorm(H, cfg.rms_norm_eps, dtype) if cfg.qk_norm else None
        self.post_norm = RMSNorm(D, cfg.rms_norm_eps, dtype)
        self.gate, self.up, self.down = (proj(name) for name in MLP_PROJECTIONS)
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, H

    def qkv(self, x: jax.Array, positions: jax.Array, inv_freq, lora: LoraContext = NO_LORA):
        """x [B, T, D] -> q [B, T, N, H], k, v [B, T, K, H] (RoPE applied to q and k)."""
        B, T, _ = x.shape
        # named scopes label the ops in profiles (experiments/bench_prefill.py --breakdown); no effect on the code
        with jax.named_scope("norm"):
            h = self.input_norm(x)
        with jax.named_scope("projections"):
            q = lora.delta("q", h, self.q(h)).reshape(B, T, self.n_heads, self.head_dim)
            k = lora.delta("k", h, self.k(h)).reshape(B, T, self.n_kv_heads, self.head_dim)
            v = lora.delta("v", h, self.v(h)).reshape(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:
            with jax.named_scope("norm"):
                q, k = self.q_norm(q), self.k_norm(k)
        with jax.named_scope("rope"):
            return apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq), v

    def finish(self, x: jax.Array, attn: jax.Array, lora: LoraContext = NO_LORA) -> jax.Array:
        """Residual stream after attention output `attn` [B, T, N, H] and the MLP."""
        B, T = attn.shape[:2]
        a = attn.reshape(B, T, -1).astype(x.dtype)
        with jax.named_scope("projections"):
            x = x + lora.delta("o", a, self.o(a))
        with jax.named_scope("norm"):
            h = self.post_norm(x)
        with jax.named_scope("mlp"):
            g = lora.delta("gate", h, self.gate(h))
            u = lora.delta("up", h, self.up(h))
            m = jax.nn.silu(g) * u
            return x + lora.delta("down", m, self.down(m))

    def __call__(self, x, positions, inv_freq, attend: Attend, lora: LoraContext = NO_LORA):
        q, k, v = self.qkv(x, positions, inv_freq, lora)
        return self.finish(x, attend(q, k, v), lora)


class Transformer(nnx.Module):
    """A causal LM. `config` is static; parameters live in NNX `Param`s (split them for pure functions)."""

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.embed = _param(_init(rngs, (config.vocab_size, config.hidden_size), dtype), ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.lm_head = (None if config.tie_word_embeddings else
                        _param(_init(rngs, (config.hidden_size, config.vocab_size), dtype), ("embed", "vocab")))

    @property
    def dtype(self):
        return self.embed[...].dtype

    @property
    def inv_freq(self):
        return inverse_frequencies(self.config.rope, self.config.head_dim)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embed[...], ids, axis=0)

    def logits(self, x: jax.Array) -> jax.Array:
        """Final norm and LM head: [B, T, D] -> float32 [B, T, V]."""
        h = self.final_norm(x)
        w = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return (h @ w).astype(jnp.float32)

    def num_params(self) -> int:
        return sum(x.size for x in jax.tree.leaves(nnx.state(self, nnx.Param)))


def abstract_transformer(config: ModelConfig, dtype) -> Transformer:
    """A Transformer whose parameters are `ShapeDtypeStruct`s (no memory), for loading into."""
    return nnx.eval_shape(lambda: Transformer(config, dtype=dtype, rngs=nnx.Rngs(0)))
