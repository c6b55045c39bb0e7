"""Entry points jitted over a device mesh: prefill, generate and the lookahead training step, plus
the multi-host plumbing (process initialisation, per-process data, globally sharded batches, gathering to
the host). `lkv_jax.lookahead.training.train` runs on a mesh through `TrainConfig.mesh`.

Shardings come from `lkv_jax.sharding`; every function here is `jax.jit(..., in_shardings=,
out_shardings=)` around the same pure functions the single-device path runs, so results agree.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from lkv_jax.compression import compress
from lkv_jax.inference import DEFAULT_CHUNK, prepare_prompt
from lkv_jax.presses.base import BasePress
from lkv_jax.sharding import adapter_specs, batch_spec, cache_specs, check_mesh, named, param_specs

# -------------------------------------------------------------------------------------------------
# multi-host


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


def _replicated(mesh: Mesh, tree):
    return jax.tree.map(lambda _: NamedSharding(mesh, P()), tree)


_PREFILL_FNS: dict = {}
_DECODE_FNS: dict = {}


def prefill_on_mesh(model, input_ids, mesh: Mesh, *, attention_mask=None, chunk_size: int = DEFAULT_CHUNK):
    """`lkv_jax.prefill` jitted over `mesh` (a full cache, no eviction): returns (KVCache sharded per
    `cache_specs`, last-token logits float32 [B, V] over data)."""
    prompt = prepare_prompt(input_ids, attention_mask, chunk_size, model.config.vocab_size)
    check_mesh(mesh, model.config, batch=prompt.ids.shape[0])
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    key = (graphdef, mesh, prompt.chunk, prompt.ids.shape[1])
    if key not in _PREFILL_FNS:
        from lkv_jax.inference import prefill_pure

        b2 = NamedSharding(mesh, batch_spec(2))
        out_sh = (named(mesh, cache_specs(model.config.num_hidden_layers)), b2)

        def fn(params, ids, valid, positions):
            return prefill_pure(nnx.merge(graphdef, params), ids, valid, positions, chunk=prompt.chunk,
                                capacity=ids.shape[1])
        _PREFILL_FNS[key] = jax.jit(fn, in_shardings=(named(mesh, param_specs(model)), b2, b2, b2),
                                    out_shardings=out_sh)
    return _PREFILL_FNS[key](params, prompt.ids, prompt.valid, prompt.positions)


def decode_on_mesh(model, cache, first_logits, max_new_tokens: int, mesh: Mesh, *, eos_token_id=None,
                   pad_token_id=None):
    """Greedy decoding (`lkv_jax.generate_from_cache`) jitted over `mesh`: the cache in its `cache_specs`
    layout, grown by max_new_tokens inside the step; returns (tokens int32 [B, max_new_tokens] sharded
    over data, n replicated): the first n columns are the answer."""
    from lkv_jax.generation import decoding_ids, greedy_loop_pure

    eos, pad = decoding_ids(model.config, eos_token_id, pad_token_id)
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    key = (graphdef, mesh, max_new_tokens, eos, pad)
    if key not in _DECODE_FNS:
        c_sh = named(mesh, cache_specs(model.config.num_hidden_layers))

        def fn(params, cache, logits):
            return greedy_loop_pure(nnx.merge(graphdef, params), cache.grow(max_new_tokens), logits,
                                    max_new_tokens=max_new_tokens, eos=eos, pad=pad)
        _DECODE_FNS[key] = jax.jit(
            fn, in_shardings=(named(mesh, param_specs(model)), c_sh, NamedSharding(mesh, batch_spec(2))),
            out_shardings=(NamedSharding(mesh, batch_spec(2)), NamedSharding(mesh, P())))
    return _DECODE_FNS[key](params, cache, first_logits)


def generate_on_mesh(model, input_ids, max_new_tokens: int, press: BasePress | None, mesh: Mesh, *,
                     attention_mask=None, eos_token_id=None, pad_token_id=None,
                     chunk_size: int = DEFAULT_CHUNK) -> np.ndarray:
    """`lkv_jax.generate` over `mesh`: the sharded prefill (press None) or `compress(..., mesh=)`, then
    `decode_on_mesh`, each jitted with its own in/out shardings. input_ids int [B, T] (B divisible by
    the data axis); returns the new tokens int [B, n] on every process, as `generate`."""
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    model.config.check_length(np.shape(input_ids)[-1] + max_new_tokens)
    if press is None:
        cache, logits = prefill_on_mesh(model, input_ids, mesh, attention_mask=attention_mask,
                                        chunk_size=chunk_size)
    else:
        out = compress(model, input_ids, press, attention_mask=attention_mask, chunk_size=chunk_size, mesh=mesh)
        cache, logits = out.cache, out.logits
    tokens, n = decode_on_mesh(model, cache, logits, max_new_tokens, mesh, eos_token_id=eos_token_id,
                               pad_token_id=pad_token_id)
    tokens, n = fetch_to_host((tokens, n))
    return tokens[:, : int(n)]


# -------------------------------------------------------------------------------------------------
# training on a mesh


def opt_state_specs(optimizer: optax.GradientTransformation, opt_state, adapter):
    """Specs for the optimizer state: parameter-shaped parts follow the adapter, the rest replicated."""
    a_specs = adapter_specs(adapter)
    return optax.tree_map_params(optimizer, lambda _, spec: spec, opt_state, a_specs,
                                 transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))


def train_step_on_mesh(graphdef, optimizer, mesh: Mesh, base_params, adapter, opt_state, batch, *, chunk: int,
                       label_source: str = "dataset", recall_budgets=(64, 128, 256)):
    """A jitted `lkv_jax.lookahead.training.train_step` whose inputs and outputs are sharded over `mesh`:
    base per `param_specs` (FSDP + tensor), adapter per `adapter_specs`, optimizer state like the
    adapter, the batch over data. `base_params` is the pure dict (`nnx.to_pure_dict(nnx.state(model))`).
    Returns the jitted function; call it as `fn(base_params, adapter, opt_state, batch)`."""
    from lkv_jax.lookahead.training import train_step

    model = nnx.merge(graphdef, base_params)
    check_mesh(mesh, model.config, batch=next(iter(batch.values())).shape[0])
    p_sh = named(mesh, param_specs(model))
    a_sh = named(mesh, adapter_specs(adapter))
    o_sh = named(mesh, opt_state_specs(optimizer, opt_state, adapter))
    b_sh = {k: NamedSharding(mesh, batch_spec(np.ndim(v))) for k, v in batch.items()}
    fn = functools.partial(train_step, graphdef, optimizer=optimizer, chunk=chunk, label_source=label_source,
                           recall_budgets=tuple(recall_budgets))
    metrics_shape = jax.eval_shape(fn, base_params, adapter, opt_state, batch)[2]
    return jax.jit(fn, in_shardings=(p_sh, a_sh, o_sh, b_sh),
                   out_shardings=(a_sh, o_sh, _replicated(mesh, metrics_shape)))
