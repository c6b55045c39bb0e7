"""Multi-host plumbing: process initialisation, globally sharded batches from per-process rows, and
gathering sharded results to every host."""

from __future__ import annotations

import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from lkv_jax.sharding import batch_spec


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
