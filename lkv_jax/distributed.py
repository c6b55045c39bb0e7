"""Multi-host plumbing: process initialisation, the rows of a dataset each process feeds, globally
sharded batches from per-process rows, and gathering sharded results to every host."""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.inference import DEFAULT_CHUNK, prepare_prompt
from lkv_jax.presses.base import BasePress, CompressOutput, compress_pure
from lkv_jax.sharding import batch_spec, cache_specs, check_mesh, logical_to_spec, named, param_specs


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when launched as one of several processes.

    Triggers on JAX_COORDINATOR_ADDRESS (host:port of process 0) or LKV_DISTRIBUTED=1 (a multi-worker
    TPU VM or SLURM job, which jax auto-detects; our TPU launcher sets it). Outside auto-detected
    clusters give JAX_NUM_PROCESSES and JAX_PROCESS_ID too. On CPU (JAX_PLATFORMS=cpu) the processes'
    collectives go through gloo. Returns True if it initialised. Must run before any other JAX call.
    """
    env = os.environ
    if not (env.get("JAX_COORDINATOR_ADDRESS") or env.get("LKV_DISTRIBUTED") == "1"):
        return False
    kw = {}
    if env.get("JAX_NUM_PROCESSES"):
        kw["num_processes"] = int(env["JAX_NUM_PROCESSES"])
    if env.get("JAX_PROCESS_ID"):
        kw["process_id"] = int(env["JAX_PROCESS_ID"])
    if env.get("JAX_PLATFORMS", "").strip() == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(**kw)
    return True


def process_shard(n_items: int) -> range:
    """The indices of a dataset this process feeds (contiguous interleave over processes)."""
    return range(jax.process_index(), n_items, jax.process_count())


def fetch_to_host(tree):
    """numpy copies of a pytree's arrays on every process (all-gathered when sharded over processes;
    every process must call it)."""
    if jax.process_count() == 1:
        return jax.tree.map(np.asarray, tree)
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(tree, tiled=True)


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Assemble per-process batches (leading dim = local batch) into global arrays sharded over data."""
    return {k: jax.make_array_from_process_local_data(NamedSharding(mesh, batch_spec(np.ndim(v))), np.asarray(v))
            for k, v in local.items()}


# -------------------------------------------------------------------------------------------------
# prefill-eviction on a mesh


def compress_out_specs(n_layers: int) -> CompressOutput:
    """Specs of a CompressOutput: the cache per `cache_specs`, kept positions and scores [B, K, n] like
    the cache, logits batch-sharded."""
    kv3 = logical_to_spec(("batch", "kv_heads", None))
    return CompressOutput(cache=cache_specs(n_layers), kept_positions=(kv3,) * n_layers, scores=(kv3,) * n_layers,
                          logits=logical_to_spec(("batch", None)))


_COMPRESS_FNS: dict = {}


def _compress_on_mesh_fn(model, graphdef, mesh: Mesh, chunk: int, budgets: tuple[int, ...]):
    """The jitted, sharded compress for one (model structure, mesh, chunk, budgets); cached."""
    key = (graphdef, mesh, chunk, budgets)
    if key not in _COMPRESS_FNS:
        b2 = NamedSharding(mesh, batch_spec(2))
        # the press (e.g. LookaheadKV's adapter) is small: replicated, given as a sharding prefix
        in_sh = (named(mesh, param_specs(model)), NamedSharding(mesh, P()), b2, b2, b2, NamedSharding(mesh, P("data")))
        out_sh = named(mesh, compress_out_specs(model.config.num_hidden_layers))
        fn = functools.partial(compress_pure, graphdef, chunk=chunk, budgets=budgets)
        _COMPRESS_FNS[key] = jax.jit(fn, in_shardings=in_sh, out_shardings=out_sh)
    return _COMPRESS_FNS[key]


def compress_on_mesh(model, input_ids, press: BasePress, mesh: Mesh, *, attention_mask=None,
                     chunk_size: int = DEFAULT_CHUNK) -> CompressOutput:
    """`lkv_jax.compress` jitted over `mesh`: parameters per `param_specs`, the batch over data, the
    cache's KV heads over tensor. Same results as the single-device path."""
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    check_mesh(mesh, model.config, batch=prompt.ids.shape[0])
    counts, budgets = press.eviction_plan(model, prompt)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)  # shardings are given as a pure-dict tree
    fn = _compress_on_mesh_fn(model, graphdef, mesh, prompt.chunk, budgets)
    counts = jnp.asarray(counts, jnp.int32)
    with jax.set_mesh(mesh):  # the Pallas scoring op runs under shard_map over this mesh
        return fn(params, press, prompt.ids, prompt.valid, prompt.positions, counts)
