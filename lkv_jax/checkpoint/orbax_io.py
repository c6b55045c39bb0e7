"""Converted checkpoints: the same parameters as an orbax checkpoint, for fast and sharded loads.

Layout of a converted directory:
    config.json        the Hugging Face config (so the directory is self-describing)
    params/            orbax StandardCheckpointer tree of the parameters ([in, out] layout)
    tokenizer files    copied from the source directory when present
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from flax import nnx

from lkv_jax.atomic_files import atomic_write_text
from lkv_jax.checkpoint.hf import CheckpointError, copy_tokenizer_files, load_hf, read_config, resolve_dtype, save_hf
from lkv_jax.models.transformer import Transformer, abstract_transformer
from lkv_jax.output_dirs import remove_weight_files

PARAMS_DIR = "params"


def is_converted(directory: str | Path) -> bool:
    return (Path(directory) / PARAMS_DIR).is_dir() and (Path(directory) / "config.json").exists()


def save_converted(model: Transformer, directory: str | Path, *, source_dir: str | Path | None = None) -> Path:
    """Write `model` as a converted (orbax) directory; overwrites an existing one atomically (orbax
    writes to a temporary directory and renames). Other weights already in `directory` are removed
    first, so that the directory holds one model only."""
    directory = Path(directory).absolute()  # orbax needs absolute paths
    directory.mkdir(parents=True, exist_ok=True)
    cfg = model.config.to_hf_dict()
    cfg["dtype"] = jax.numpy.dtype(model.dtype).name
    remove_weight_files(directory)  # also a `params` symlink, which orbax would write through
    atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(directory / PARAMS_DIR, params, force=True)
        ckptr.wait_until_finished()
    if source_dir is not None:
        copy_tokenizer_files(source_dir, directory)
    return directory


def load_converted(directory: str | Path, dtype=None, shardings=None) -> Transformer:
    """Load a converted directory. dtype: as `load_hf` (None keeps the stored dtype). shardings: an
    optional pytree of `jax.sharding.Sharding` matching the parameter pure-dict, to restore each
    array directly onto a device mesh."""
    directory = Path(directory).absolute()
    if not is_converted(directory):
        raise CheckpointError(f"{directory} is not a converted lkv_jax checkpoint (no {PARAMS_DIR}/ + config.json)")
    config = read_config(directory)
    stored = json.loads((directory / "config.json").read_text()).get("dtype", "float32")
    dtype = resolve_dtype(dtype) or resolve_dtype(stored)
    graphdef, state = nnx.split(abstract_transformer(config, dtype))
    target = nnx.to_pure_dict(state)
    if shardings is not None:
        target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), target, shardings)
    with ocp.StandardCheckpointer() as ckptr:
        try:
            params = ckptr.restore(directory / PARAMS_DIR, target)
        except (ValueError, KeyError, OSError) as e:
            raise CheckpointError(f"{directory}: parameters do not restore (corrupt, or not matching "
                                  f"config.json): {e}") from e
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def load(directory: str | Path, dtype=None) -> Transformer:
    """Load either a Hugging Face directory or a converted (orbax) one."""
    return load_converted(directory, dtype) if is_converted(directory) else load_hf(directory, dtype)


def convert(src: str | Path, dst: str | Path, *, to: str = "orbax", max_shard_bytes: int | None = None) -> Path:
    """HF -> orbax (to="orbax") or converted/HF -> HF (to="hf"), keeping the stored dtype bit-exactly."""
    if to == "orbax":
        return save_converted(load_hf(src), dst, source_dir=src)
    if to == "hf":
        return save_hf(load(src), dst, max_shard_bytes=max_shard_bytes, copy_tokenizer_from=src)
    raise ValueError(f"to must be 'orbax' or 'hf', got {to!r}")
