"""Device meshes, PartitionSpec trees (base parameters, the lookahead adapter, KV caches, batches) and the
compile cache of the entry points jitted with explicit shardings.

Mesh axes are ("data", "fsdp", "tensor") with Auto axis types; one device is a 1x1x1 mesh. Parameters
declare their logical axes beside them (`lkv_jax.models.transformer`) and one short table maps logical
axes to mesh axes:

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

from lkv_jax.cache import KVCache
from lkv_jax.config import ModelConfig
from lkv_jax.errors import MeshError
from lkv_jax.models.transformer import PROJECTION_AXES

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


def make_mesh(shape: tuple[int, int, int], devices=None) -> Mesh:
    """A mesh with Auto axis types over the first prod(shape) devices; shape: (data, fsdp, tensor) sizes."""
    shape = tuple(int(n) for n in shape)
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


def model_mesh(model, mesh: Mesh | None = None) -> Mesh | None:
    """The mesh an entry point on `model` runs on when given `mesh`: that mesh, else the mesh of several
    devices its parameters were placed on (`shard_model`, `load_converted(shardings=)`), else None (one
    device; `resolve_mesh` makes it a 1x1x1 mesh)."""
    if mesh is None:
        sharding = getattr(model.embed.get_value(), "sharding", None)
        if isinstance(sharding, NamedSharding) and sharding.mesh.size > 1:
            return sharding.mesh
    return mesh


def entry_mesh(model, mesh: Mesh | None = None, *, batch: int | None = None) -> Mesh:
    """The mesh an entry point on `model` runs on (`model_mesh`; one device: 1x1x1), checked to divide the
    model and the batch."""
    mesh = resolve_mesh(model_mesh(model, mesh))
    check_mesh(mesh, model.config, batch=batch)
    return mesh


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


def state_specs(state: nnx.State) -> nnx.State:
    """The PartitionSpec of every parameter of a model's state (`nnx.split(model)[1]`), same structure:
    each parameter's logical axes (its `out_sharding` metadata, declared in `lkv_jax.models.transformer`)
    mapped through `LOGICAL_RULES`; parameters without axes (norm weights) are replicated."""
    with nnx.logical_axis_rules(tuple(LOGICAL_RULES.items())):
        return nnx.get_partition_spec(state)


def param_specs(model) -> dict:
    """PartitionSpec pure-dict tree matching `nnx.to_pure_dict(nnx.state(model, nnx.Param))`."""
    return nnx.to_pure_dict(state_specs(nnx.state(model, nnx.Param)))


def adapter_specs(adapter):
    """Specs for a LookaheadAdapter: LoRA A follows the base weight's input-dimension spec, B its
    output-dimension spec, the rank is replicated; the lookahead embeddings are replicated."""
    lora = lambda p: {"a": logical_to_spec((PROJECTION_AXES[p][0], "rank")),
                      "b": logical_to_spec(("rank", PROJECTION_AXES[p][1]))}
    layers = tuple({p: lora(p) for p in layer} for layer in adapter.layers)
    return dataclasses.replace(adapter, embeddings=P(None, None), layers=layers)


def cache_specs(n_layers: int):
    """Specs for a KVCache of `n_layers` layers: batch over data, KV heads over tensor."""
    kv, pv = logical_to_spec(("batch", "kv_heads", "seq", "head_dim")), logical_to_spec(("batch", "kv_heads", "seq"))
    return KVCache(keys=(kv,) * n_layers, values=(kv,) * n_layers, positions=(pv,) * n_layers,
                   valid=(pv,) * n_layers, cursor=P(), next_position=logical_to_spec(("batch",)))


def batch_spec(ndim: int) -> P:
    """Activations / inputs: leading batch dimension over data, the rest replicated."""
    return P("data", *([None] * (ndim - 1)))


def named(mesh: Mesh, specs):
    """Turn a tree of PartitionSpecs into NamedShardings on `mesh`."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda x: isinstance(x, P))


def param_shardings(mesh: Mesh, state: nnx.State) -> nnx.State:
    """NamedShardings of a model's state (`nnx.split(model)[1]`) per its parameters' declared axes."""
    return named(mesh, state_specs(state))


def cache_shardings(mesh: Mesh, n_layers: int):
    """NamedShardings of a KVCache per `cache_specs`."""
    return named(mesh, cache_specs(n_layers))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """The batch over data, the rest replicated."""
    return NamedSharding(mesh, batch_spec(ndim))


def shard_model(model, mesh: Mesh):
    """A copy of `model` whose parameters are placed on `mesh` per `param_specs`."""
    check_mesh(mesh, model.config)
    graphdef, state = nnx.split(model)
    return nnx.merge(graphdef, jax.device_put(state, param_shardings(mesh, state)))
