"""The lookahead adapter: `n_lookahead` learned embeddings plus, per layer, a LoRA on chosen projections.

The adapter is its own pytree, separate from the base model: optax and orbax see only it, and
`adapter=None` is exactly the base model. Its LoRA is applied only at the lookahead positions
(`lora_mask`), so the prompt's hidden states, KV and logits never depend on it.

    adapter.embeddings     float32 [L, D]
    adapter.layers[l][p]   {"a": float32 [in_p, R] (random), "b": float32 [R, out_p] (zeros at init)}

`rank`, `alpha` and `targets` are static metadata (the LoRA scale is alpha / rank).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from lkv_jax.config import ModelConfig
from lkv_jax.errors import AdapterMismatchError, CheckpointError
from lkv_jax.models.transformer import PROJECTIONS, projection_shapes


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LookaheadAdapter:
    """Lookahead embeddings [L, D] and a per-layer tuple of projection -> {"a" [in, R], "b" [R, out]}."""

    embeddings: jax.Array
    layers: tuple[dict[str, dict[str, jax.Array]], ...]
    rank: int = dataclasses.field(default=8, metadata=dict(static=True))
    alpha: float = dataclasses.field(default=32.0, metadata=dict(static=True))
    targets: tuple[str, ...] = dataclasses.field(default=PROJECTIONS, metadata=dict(static=True))

    @property
    def scale(self) -> float:
        """The LoRA multiplier alpha / rank (4 for the paper's rank 8, alpha 32)."""
        return float(self.alpha) / int(self.rank)

    @property
    def n_lookahead(self) -> int:
        return int(self.embeddings.shape[0])

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def check_model(self, config: ModelConfig) -> None:
        """Raise `AdapterMismatchError` unless every tensor's shape fits `config`."""
        check_adapter_shapes(config, {k: tuple(v.shape) for k, v in flatten_named(self).items()},
                             self.rank, self.targets)


def _check_targets(targets) -> tuple[str, ...]:
    targets = tuple(targets)
    bad = [t for t in targets if t not in PROJECTIONS]
    if bad or len(set(targets)) != len(targets):
        raise ValueError(f"LoRA targets must be distinct names among {PROJECTIONS}, got {targets}")
    return tuple(t for t in PROJECTIONS if t in targets)  # canonical order


def init_adapter(config: ModelConfig, key: jax.Array, n_lookahead: int = 32, rank: int = 8, alpha: float = 32.0,
                 targets=PROJECTIONS, embed_std: float = 0.02) -> LookaheadAdapter:
    """A fresh adapter for `config`.

    Embeddings ~ N(0, embed_std^2) (the scale of the base model's embedding init); LoRA A ~ N(0, 1/in)
    (Kaiming-like, as PEFT), B = 0, so the fresh adapter leaves even the lookahead positions' LoRA
    delta at zero. All tensors float32 (they are trained; the base may be bfloat16).
    """
    if n_lookahead < 1 or rank < 1:
        raise ValueError(f"n_lookahead and rank must be >= 1, got {n_lookahead}, {rank}")
    targets = _check_targets(targets)
    shapes = projection_shapes(config)
    k_emb, k_lora = jax.random.split(key)
    embeddings = jax.random.normal(k_emb, (n_lookahead, config.hidden_size), jnp.float32) * embed_std
    layer_keys = jax.random.split(k_lora, config.num_hidden_layers * max(len(targets), 1))
    layers = []
    for l in range(config.num_hidden_layers):
        layer = {}
        for j, name in enumerate(targets):
            din, dout = shapes[name]
            a = jax.random.normal(layer_keys[l * len(targets) + j], (din, rank), jnp.float32) / np.sqrt(din)
            layer[name] = {"a": a, "b": jnp.zeros((rank, dout), jnp.float32)}
        layers.append(layer)
    return LookaheadAdapter(embeddings=embeddings, layers=tuple(layers), rank=int(rank), alpha=float(alpha),
                            targets=targets)


def count_params(adapter: LookaheadAdapter) -> int:
    """Trainable parameters of the adapter (works on abstract `jax.eval_shape` adapters too)."""
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(adapter)))


def base_param_count(config: ModelConfig) -> int:
    """Parameters of the base model, computed from shapes only (no memory: `jax.eval_shape`)."""
    from flax import nnx

    from lkv_jax.models.transformer import abstract_transformer

    model = abstract_transformer(config, jnp.bfloat16)
    return int(sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param))))


def param_summary(config: ModelConfig, adapter: LookaheadAdapter) -> str:
    """A one-line count of the adapter as a fraction of the base model, e.g. for the training log."""
    n, base = count_params(adapter), base_param_count(config)
    return f"lookahead adapter: {n:,} parameters = {100.0 * n / base:.3f}% of the base model's {base:,}"


def flatten_named(adapter: LookaheadAdapter) -> dict[str, jax.Array]:
    """Readable names: `lookahead.embeddings`, `layers.3.q.lora_a`, `layers.3.q.lora_b`."""
    out = {"lookahead.embeddings": adapter.embeddings}
    for l, layer in enumerate(adapter.layers):
        for name in adapter.targets:
            out[f"layers.{l}.{name}.lora_a"] = layer[name]["a"]
            out[f"layers.{l}.{name}.lora_b"] = layer[name]["b"]
    return out


def check_adapter_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], rank: int, targets) -> None:
    """Raise `AdapterMismatchError` if named tensor shapes do not fit a model of `config`."""
    emb = shapes.get("lookahead.embeddings")
    if emb is None or len(emb) != 2 or emb[1] != config.hidden_size:
        raise AdapterMismatchError(f"lookahead.embeddings has shape {emb}; the model needs [L, {config.hidden_size}]")
    proj = projection_shapes(config)
    expected = {"lookahead.embeddings"}
    for l in range(config.num_hidden_layers):
        for name in targets:
            din, dout = proj[name]
            for suffix, want in (("lora_a", (din, rank)), ("lora_b", (rank, dout))):
                key = f"layers.{l}.{name}.{suffix}"
                expected.add(key)
                if key not in shapes:
                    raise AdapterMismatchError(f"adapter has no tensor {key} (model has {config.num_hidden_layers} "
                                               f"layers, targets {tuple(targets)})")
                if tuple(shapes[key]) != want:
                    raise AdapterMismatchError(f"{key} has shape {tuple(shapes[key])}, the model needs {want} "
                                               f"(rank {rank})")
    extra = sorted(set(shapes) - expected)
    if extra:
        raise AdapterMismatchError(f"adapter has tensors the model has no place for, e.g. {extra[:3]} "
                                   f"(model has {config.num_hidden_layers} layers)")


def save_adapter(adapter: LookaheadAdapter, path) -> None:
    """Write the adapter as one safetensors file (float32) with rank/alpha/targets in its metadata
    (atomically, with the user's umask)."""
    from lkv_jax.checkpoint.safetensors_io import save_safetensors

    tensors = {k: np.asarray(v, np.float32) for k, v in flatten_named(adapter).items()}
    meta = {"format": "lkv_jax.lookahead", "rank": str(adapter.rank), "alpha": repr(float(adapter.alpha)),
            "targets": json.dumps(list(adapter.targets)), "n_lookahead": str(adapter.n_lookahead),
            "n_layers": str(adapter.n_layers)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors, path, meta)


def load_adapter(path, config: ModelConfig | None = None) -> LookaheadAdapter:
    """Read a file written by `save_adapter`; with `config`, check it fits that model. A truncated or
    garbage file raises CheckpointError."""
    from lkv_jax.checkpoint.safetensors_io import open_safetensors

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no adapter file at {path}")
    with open_safetensors(path) as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("format") != "lkv_jax.lookahead":
        raise AdapterMismatchError(f"{path} is not a lookahead adapter file (metadata {meta})")
    rank, alpha, targets, n_layers = _adapter_metadata(meta, path)
    if config is not None:
        if config.num_hidden_layers != n_layers:
            raise AdapterMismatchError(f"adapter {path} was made for {n_layers} layers, "
                                       f"the model has {config.num_hidden_layers}")
        check_adapter_shapes(config, {k: v.shape for k, v in tensors.items()}, rank, targets)
    try:
        layers = tuple({name: {"a": jnp.asarray(tensors[f"layers.{l}.{name}.lora_a"]),
                               "b": jnp.asarray(tensors[f"layers.{l}.{name}.lora_b"])} for name in targets}
                       for l in range(n_layers))
        embeddings = jnp.asarray(tensors["lookahead.embeddings"])
    except KeyError as e:
        raise CheckpointError(f"{path} lacks the adapter tensor {e}") from None
    return LookaheadAdapter(embeddings=embeddings, layers=layers, rank=rank, alpha=alpha, targets=targets)


def _adapter_metadata(meta: dict, path) -> tuple[int, float, tuple[str, ...], int]:
    """(rank, alpha, targets, n_layers) from an adapter file's metadata; CheckpointError if they are not there."""
    try:
        return (int(meta["rank"]), float(meta["alpha"]), _check_targets(json.loads(meta["targets"])),
                int(meta["n_layers"]))
    except (KeyError, ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: adapter metadata is missing or invalid ({e!r})") from None
