"""Device meshes and PartitionSpec trees for base parameters, the lookahead adapter, KV caches and batches.

Mesh axes are ("data", "fsdp", "tensor") with Auto axis types. Arrays name their dimensions with
logical axes and one short table maps logical axes to mesh axes:

    batch -> data          embed -> fsdp (FSDP: parameters split along the model dimension)
    heads, kv_heads, mlp, vocab -> tensor (tensor parallelism)
    everything else (head_dim, seq, rank, lookahead) -> replicated

Eviction is per KV head, so the KV cache (batch over data, KV heads over tensor) needs no
communication to score and select.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Hashable

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.config import ModelConfig
from lkv_jax.errors import MeshError

AXES = ("data", "fsdp", "tensor")
LOGICAL_RULES: dict[str, str | None] = {
    "batch": "data",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "vocab": "tensor",
    "head_dim": None,
    "seq": None,
    "rank": None,
    "lookahead": None,
}

# logical axes of every parameter, by the last two components of its path
_PARAM_AXES = {
    ("q", "kernel"): ("embed", "heads"),
    ("k", "kernel"): ("embed", "kv_heads"),
    ("v", "kernel"): ("embed", "kv_heads"),
    ("o", "kernel"): ("heads", "embed"),
    ("gate", "kernel"): ("embed", "mlp"),
    ("up", "kernel"): ("embed", "mlp"),
    ("down", "kernel"): ("mlp", "embed"),
    ("q", "bias"): ("heads",),
    ("k", "bias"): ("kv_heads",),
    ("v", "bias"): ("kv_heads",),
    ("o", "bias"): ("embed",),
    ("gate", "bias"): ("mlp",),
    ("up", "bias"): ("mlp",),
    ("down", "bias"): ("embed",),
}


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Sizes of the ("data", "fsdp", "tensor") mesh axes; their product is the device count used."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.data, self.fsdp, self.tensor)


def make_mesh(cfg: MeshConfig | tuple[int, int, int], devices=None) -> Mesh:
    """A mesh with Auto axis types over the first prod(shape) devices."""
    shape = cfg.shape if isinstance(cfg, MeshConfig) else tuple(cfg)
    n = int(np.prod(shape))
    available = jax.devices() if devices is None else list(devices)
    if n > len(available):
        raise MeshError(f"mesh {dict(zip(AXES, shape, strict=True))} needs {n} devices, {len(available)} available")
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * 3, devices=available[:n])


@functools.cache
def _single_device_mesh() -> Mesh:
    return make_mesh((1, 1, 1))


def resolve_mesh(mesh: Mesh | None) -> Mesh:
    """The mesh an entry point runs on: `mesh`, or a 1x1x1 mesh over the first device. One device is the
    smallest mesh, so every entry point has a single jitted path with explicit shardings."""
    return _single_device_mesh() if mesh is None else mesh


_ENTRY_POINTS: dict = {}


def entry_point(key: Hashable, build: Callable[[], Callable]) -> Callable:
    """The package's one compile cache: the jitted function of an entry point for `key` (model structure,
    mesh, static sizes), built by `build()` on first use. jax.jit needs the mesh's shardings when it is
    created, so a function jitted with `in_shardings` / `out_shardings` is built once per key here."""
    fn = _ENTRY_POINTS.get(key)
    if fn is None:
        fn = _ENTRY_POINTS[key] = build()
    return fn


def logical_to_spec(logical: tuple[str | None, ...]) -> P:
    return P(*(None if name is None else LOGICAL_RULES[name] for name in logical))


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return 1 if axis is None else mesh.shape[axis]


def check_mesh(mesh: Mesh, config: ModelConfig, batch: int | None = None) -> None:
    """Raise `MeshError` naming the axis and the sizes when the mesh does not divide the model/batch."""
    t, f = mesh.shape["tensor"], mesh.shape["fsdp"]
    checks = [
        ("tensor", t, "num_attention_heads", config.num_attention_heads),
        ("tensor", t, "num_key_value_heads", config.num_key_value_heads),
        ("tensor", t, "intermediate_size", config.intermediate_size),
        ("tensor", t, "vocab_size", config.vocab_size),
        ("fsdp", f, "hidden_size", config.hidden_size),
    ]
    if batch is not None:
        checks.append(("data", mesh.shape["data"], "batch size", batch))
    for axis, size, what, value in checks:
        if value % size:
            raise MeshError(f"mesh axis {axis!r} of size {size} does not divide {what}={value}")


def param_logical_axes(path: tuple) -> tuple[str | None, ...]:
    """Logical axes of a base parameter from its state path, e.g. ('layers', 3, 'q', 'kernel')."""
    if path[-1] == "embed" or path == ("embed",):
        return ("vocab", "embed")
    if path == ("lm_head",):
        return ("embed", "vocab")
    if path[-1] == "weight":  # norms: small, replicated
        return (None,)
    return _PARAM_AXES[tuple(path[-2:])]


def param_specs(model) -> dict:
    """PartitionSpec pure-dict tree matching `nnx.to_pure_dict(nnx.state(model, nnx.Param))`."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out: dict = {}
    for path, _ in flat:
        d = out
        for part in path[:-1]:
            d = d.setdefault(part, {})
        d[path[-1]] = logical_to_spec(param_logical_axes(tuple(path)))
    return out


def _proj_axes(proj: str) -> tuple[str | None, str | None]:
    return _PARAM_AXES[(proj, "kernel")]


def adapter_specs(adapter):
    """Specs for a LookaheadAdapter: LoRA A follows the base weight's input-dimension spec, B its
    output-dimension spec, the rank is replicated; the lookahead embeddings are replicated."""
    layers = tuple(
        {p: {"a": logical_to_spec((_proj_axes(p)[0], "rank")), "b": logical_to_spec(("rank", _proj_axes(p)[1]))}
         for p in layer}
        for layer in adapter.layers)
    return dataclasses.replace(adapter, embeddings=P(None, None), layers=layers)


def cache_specs(n_layers: int):
    """Specs for a KVCache of `n_layers` layers: batch over data, KV heads over tensor."""
    from lkv_jax.cache import KVCache

    kv, pv = logical_to_spec(("batch", "kv_heads", "seq", "head_dim")), logical_to_spec(("batch", "kv_heads", "seq"))
    return KVCache(keys=(kv,) * n_layers, values=(kv,) * n_layers, positions=(pv,) * n_layers,
                   valid=(pv,) * n_layers, cursor=P(), next_position=logical_to_spec(("batch",)))


def batch_spec(ndim: int) -> P:
    """Activations / inputs: leading batch dimension over data, the rest replicated."""
    return P("data", *([None] * (ndim - 1)))


def named(mesh: Mesh, specs):
    """Turn a tree of PartitionSpecs into NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def shard_model(model, mesh: Mesh):
    """A copy of `model` whose parameters are placed on `mesh` per `param_specs`."""
    check_mesh(mesh, model.config)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)
    placed = jax.device_put(pure, named(mesh, param_specs(model)))
    nnx.replace_by_pure_dict(state, placed)
    return nnx.merge(graphdef, state)
