"""`lkv_jax.compress`: prefill a prompt batch, score it with a press and evict (`lkv_jax.eviction`).

One jitted path, on one device or a mesh (one device is a 1x1x1 mesh): the parameters per their
declared axes, the batch over "data", the caches' KV heads over "tensor", the press replicated.

Comparing many presses on the same batch (the evaluation grid) need not prefill it once per press:
`shared_prefix` computes the batch's first slots once and `compress_prompt(..., prefix=)` starts every
press's prefill from them (ObservedAttention and ExpectedAttention, which observe every query, still
prefill in full).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.eviction import CompressOutput, Scored, evict, eviction_plan, mask_capacities, select
from lkv_jax.inference import DEFAULT_CHUNK, Prompt, PromptPrefix, prepare_prompt, prompt_prefix_pure
from lkv_jax.models.transformer import Transformer
from lkv_jax.presses.base import BasePress, accepts_prefix
from lkv_jax.sharding import (
    batch_sharding,
    cache_specs,
    entry_mesh,
    entry_point,
    logical_to_spec,
    named,
    param_shardings,
)


def compress(model: Transformer, input_ids, press: BasePress, *, attention_mask=None,
             chunk_size: int = DEFAULT_CHUNK, mesh: Mesh | None = None) -> CompressOutput:
    """Prefill `input_ids` (int [B, T], left-padded per `attention_mask`) and evict with `press`.

    Returns a `CompressOutput`: the compressed cache (ready to decode from after `.grow(n)`),
    `kept_positions` per layer (int [B, K, n_kept], original positions, ascending), the scores and
    the last prompt token's logits. mesh: run over a ("data", "fsdp", "tensor") mesh (B divisible by
    its data axis), the model's parameters placed on it (`sharding.shard_model`); None: the mesh the
    parameters are placed on, else one device.
    """
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    return compress_prompt(model, prompt, press, mesh=mesh)


def compress_prompt(model: Transformer, prompt: Prompt, press: BasePress, *, prefix: PromptPrefix | None = None,
                    mesh: Mesh | None = None) -> CompressOutput:
    """`compress` of a prepared prompt batch (`inference.prepare_prompt`), optionally starting from a
    `shared_prefix` of the same batch: the same result up to float rounding, without prefilling the
    prefix again."""
    if not isinstance(press, BasePress):
        raise TypeError(f"press must be a lkv_jax press, got {type(press).__name__}")
    model.config.check_length(int(np.asarray(prompt.valid).sum(1).max()) + press.suffix_slots)
    B, T = prompt.ids.shape
    mesh = entry_mesh(model, mesh, batch=B)
    press.check_prompt(model, prompt)
    scorer = press.prepare(model, prompt)
    if prefix is not None:
        if not accepts_prefix(scorer):
            raise TypeError(f"{type(scorer).__name__}.prefill_and_score takes no shared prefix")
        if prefix.keys[0].shape[0] != B or not 0 < prefix.length < T:
            raise ValueError(f"the prefix ({prefix.keys[0].shape[0]} rows, {prefix.length} slots) is not one of "
                             f"this {B} x {T} prompt batch")
    counts, budgets = eviction_plan(press, prompt.valid, model.config.num_hidden_layers)
    strategy = press.selection
    graphdef, params = nnx.split(model)
    args = (params, scorer, prompt.ids, prompt.valid, prompt.positions, jnp.asarray(counts, jnp.int32), prefix)
    static = (mesh, graphdef, params, prompt.chunk, budgets, strategy)
    with jax.set_mesh(mesh):  # the Pallas ops run per (batch, KV-head) shard of this mesh
        if not strategy.adaptive:
            return _entry(compress_pure, compress_out_specs, *static)(*args)
        # adaptive: the per-head counts, hence the compact capacities, are known only after selecting
        scored, keep = _entry(select_pure, _select_out_specs, *static)(*args)
        return _gather_entry(mesh, len(budgets), mask_capacities(keep))(scored, keep)


def select_pure(graphdef, params, press, ids, valid, positions, counts, prefix=None, *, chunk, budgets,
                strategy) -> tuple[Scored, tuple]:
    """Prefill and score with `press` (ids/valid/positions [B, T], counts int [B] from `eviction_plan`),
    then choose per layer with the selection `strategy`: (Scored, the choice)."""
    model = nnx.merge(graphdef, params)
    # a press of its own may define prefill_and_score without `prefix` (see `accepts_prefix`)
    scored = (press.prefill_and_score(model, ids, valid, positions, chunk) if prefix is None
              else press.prefill_and_score(model, ids, valid, positions, chunk, prefix))
    return scored, select(scored, ids.shape[1], budgets, counts, strategy)


def compress_pure(graphdef, params, press, ids, valid, positions, counts, prefix=None, *, chunk, budgets,
                  strategy) -> CompressOutput:
    """The whole prefill-score-evict path as one pure function, for a strategy of static capacities."""
    return evict(*select_pure(graphdef, params, press, ids, valid, positions, counts, prefix, chunk=chunk,
                              budgets=budgets, strategy=strategy))


def compress_out_specs(n_layers: int) -> CompressOutput:
    """Specs of a CompressOutput: the cache per `cache_specs`, kept positions and scores [B, K, n] like
    the cache, logits batch-sharded."""
    kv3 = logical_to_spec(("batch", "kv_heads", None))
    return CompressOutput(cache=cache_specs(n_layers), kept_positions=(kv3,) * n_layers, scores=(kv3,) * n_layers,
                          logits=logical_to_spec(("batch", None)))


def _select_out_specs(n_layers: int):
    kv3 = logical_to_spec(("batch", "kv_heads", None))
    scored = Scored(cache=cache_specs(n_layers), logits=logical_to_spec(("batch", None)),
                    scores=(kv3,) * n_layers, protected=(kv3,) * n_layers)
    return scored, (kv3,) * n_layers


def _entry(fn, out_specs, mesh, graphdef, state, chunk, budgets, strategy):
    """`fn(graphdef, state, press, ids, valid, positions, counts, prefix)` jitted over `mesh`, outputs per
    `out_specs(n_layers)`: the press (small: LookaheadKV's adapter, SpecKV's draft tokens) replicated, the
    batch over data, a shared prefix like the cache."""

    def build():
        b2 = batch_sharding(mesh, 2)
        prefix = NamedSharding(mesh, logical_to_spec(("batch", "kv_heads", "seq", "head_dim")))
        in_sh = (param_shardings(mesh, state), NamedSharding(mesh, P()), b2, b2, b2, batch_sharding(mesh, 1), prefix)
        return jax.jit(functools.partial(fn, graphdef, chunk=chunk, budgets=budgets, strategy=strategy),
                       in_shardings=in_sh, out_shardings=named(mesh, out_specs(len(budgets))))

    return entry_point((fn.__name__, graphdef, mesh, chunk, budgets, strategy), build)


def _gather_entry(mesh, n_layers: int, capacities: tuple[int, ...]):
    """`eviction.evict` of an adaptive choice at the given capacities, jitted over `mesh`."""
    return entry_point(("compress.gather", mesh, capacities),
                       lambda: jax.jit(functools.partial(evict, capacities=capacities),
                                       in_shardings=named(mesh, _select_out_specs(n_layers)),
                                       out_shardings=named(mesh, compress_out_specs(n_layers))))


@functools.partial(jax.jit, static_argnames=("graphdef", "chunk", "length"))
def _prefix_jit(graphdef, params, ids, valid, positions, *, chunk, length):
    return prompt_prefix_pure(nnx.merge(graphdef, params), ids, valid, positions, chunk=chunk, length=length)


def shared_prefix(model: Transformer, prompt: Prompt, tail: int) -> PromptPrefix:
    """The keys and values of every slot of a prepared batch but the last `tail` ([B, K, T - tail, H] per
    layer), for `compress_prompt(..., prefix=)`. Each press then prefills only the last `tail` slots; a
    window press whose window exceeds `tail` recomputes the overlap, correct but slower."""
    T = prompt.ids.shape[1]
    if not 0 < tail < T:
        raise ValueError(f"tail must lie in (0, {T}) for a {T}-slot prompt, got {tail}")
    graphdef, params = nnx.split(model)
    return _prefix_jit(graphdef, params, prompt.ids, prompt.valid, prompt.positions, chunk=prompt.chunk,
                       length=T - tail)
