"""Hugging Face checkpoints <-> lkv_jax parameters, through a small regex table (no torch, no pickle).

A parameter path is the NNX state path joined with dots (`layers.3.q.kernel`). HF linear weights are
[out, in] and ours [in, out]: conversion is a transpose and nothing else, so round trips are bit-exact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from lkv_jax.atomic_files import atomic_copy, atomic_write_text
from lkv_jax.checkpoint.safetensors_io import open_safetensors, save_safetensors
from lkv_jax.config import ModelConfig
from lkv_jax.errors import CheckpointError
from lkv_jax.models.transformer import ATTENTION_PROJECTIONS, MLP_PROJECTIONS, Transformer, abstract_transformer
from lkv_jax.output_dirs import remove_weight_files

_ATTN, _MLP = "|".join(ATTENTION_PROJECTIONS), "|".join(MLP_PROJECTIONS)
# (HF name, our path, transpose); {i} is a layer index, {p} one of the listed projection names
_TABLE = [
    ("model.embed_tokens.weight", "embed", False, ""),
    ("model.norm.weight", "final_norm.weight", False, ""),
    ("lm_head.weight", "lm_head", True, ""),
    ("model.layers.{i}.self_attn.{p}_proj.weight", "layers.{i}.{p}.kernel", True, _ATTN),
    ("model.layers.{i}.self_attn.{p}_proj.bias", "layers.{i}.{p}.bias", False, _ATTN),
    ("model.layers.{i}.self_attn.{p}_norm.weight", "layers.{i}.{p}_norm.weight", False, "q|k"),
    ("model.layers.{i}.mlp.{p}_proj.weight", "layers.{i}.{p}.kernel", True, _MLP),
    ("model.layers.{i}.mlp.{p}_proj.bias", "layers.{i}.{p}.bias", False, _MLP),
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight", False, ""),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_norm.weight", False, ""),
]


def _regex(template: str, choices: str) -> re.Pattern:
    pattern = re.escape(template).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{p\}", f"(?P<p>{choices})")
    return re.compile(pattern)


_FROM_HF = [(_regex(hf, c), ours, t) for hf, ours, t, c in _TABLE]
_TO_HF = [(_regex(ours, c), hf, t) for hf, ours, t, c in _TABLE]
# buffers some older checkpoints carry that hold nothing we need
_IGNORED = re.compile(r".*rotary_emb\.inv_freq$")
_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "generation_config.json", "vocab.json", "merges.txt", "chat_template.jinja")


def hf_to_path(name: str) -> tuple[str, bool] | None:
    """Our parameter path and whether to transpose, or None for an unknown HF tensor name."""
    for regex, template, transpose in _FROM_HF:
        m = regex.fullmatch(name)
        if m:
            return template.format(**m.groupdict()), transpose
    return None


def path_to_hf(path: str) -> tuple[str, bool]:
    """Inverse of `hf_to_path`: HF tensor name and whether to transpose."""
    for regex, template, transpose in _TO_HF:
        m = regex.fullmatch(path)
        if m:
            return template.format(**m.groupdict()), transpose
    raise KeyError(path)


def resolve_dtype(dtype):
    if dtype is None or not isinstance(dtype, str):
        return dtype
    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {dtype!r}")
    return _DTYPES[dtype]


def safetensors_files(directory: Path) -> list[Path]:
    index = directory / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = sorted({directory / f for f in weight_map.values()})
        missing = [str(f.name) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{directory}: index names shard files that do not exist: {missing}")
        return files
    single = directory / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(directory.glob("*.safetensors"))
    if files:
        return files
    bins = sorted(directory.glob("*.bin"))
    hint = " (found pickle .bin files: convert them to safetensors; we never unpickle)" if bins else ""
    raise CheckpointError(f"{directory} holds no safetensors weights{hint}")


def read_config(directory: str | Path) -> ModelConfig:
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory} is not a directory")
    cfg = directory / "config.json"
    if not cfg.exists():
        raise CheckpointError(f"{directory} is not a Hugging Face checkpoint: no config.json")
    return ModelConfig.from_json(cfg)


def param_paths(model: Transformer) -> dict[str, tuple[int, ...]]:
    """Flat {path: shape} of a (possibly abstract) model's parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {".".join(map(str, k)): tuple(v.shape) for k, v in flat}


def load_hf(directory: str | Path, dtype=None) -> Transformer:
    """Load a Hugging Face Llama / Mistral / Qwen2 / Qwen3 directory (config.json + safetensors).

    dtype: "float32" | "bfloat16" | "float16" | a jnp dtype | None (keep the stored dtype).
    Raises CheckpointError naming missing, unexpected or mis-shaped tensors.
    """
    directory = Path(directory)
    config = read_config(directory)
    files = safetensors_files(directory)
    tensors: dict[str, np.ndarray] = {}
    unexpected = []
    for f in files:
        with open_safetensors(f) as sf:
            for name in sf.keys():
                if _IGNORED.match(name):
                    continue
                mapped = hf_to_path(name)
                if mapped is None:
                    unexpected.append(name)
                    continue
                path, transpose = mapped
                if path == "lm_head" and config.tie_word_embeddings:
                    continue  # a duplicate of the embedding in tied checkpoints
                t = sf.get_tensor(name)
                tensors[path] = t.T if transpose else t
    return _assemble(config, tensors, resolve_dtype(dtype), unexpected, source=str(directory))


def _assemble(config: ModelConfig, tensors: dict[str, np.ndarray], dtype, unexpected, source: str) -> Transformer:
    if dtype is None:
        dtype = jnp.dtype(tensors["embed"].dtype) if "embed" in tensors else jnp.float32
    abstract = abstract_transformer(config, dtype)
    expected = param_paths(abstract)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or unexpected or extra:
        to_hf = lambda p: path_to_hf(p)[0]
        parts = []
        if missing:
            parts.append(f"missing tensors: {[to_hf(p) for p in missing]}")
        if unexpected or extra:
            parts.append(f"unexpected tensors: {sorted(unexpected) + [to_hf(p) for p in extra]}")
        raise CheckpointError(f"{source}: " + "; ".join(parts))
    bad = [f"{path_to_hf(p)[0]}: expected {expected[p]} (ours, [in, out]) got {tensors[p].shape}"
           for p in expected if tuple(tensors[p].shape) != expected[p]]
    if bad:
        raise CheckpointError(f"{source}: shape mismatch: " + "; ".join(bad))
    graphdef, state = nnx.split(abstract)
    leaves = {k: jnp.asarray(tensors[".".join(map(str, k))], dtype=dtype) for k, _ in nnx.to_flat_state(state)}
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(leaves))
    return nnx.merge(graphdef, state)


def model_tensors(model: Transformer) -> dict[str, np.ndarray]:
    """{HF tensor name: numpy array} of a model, ready for safetensors."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    out = {}
    for k, v in flat:
        name, transpose = path_to_hf(".".join(map(str, k)))
        a = np.asarray(jax.device_get(v[...]))
        out[name] = np.ascontiguousarray(a.T if transpose else a)
    return out


def save_hf(model: Transformer, directory: str | Path, *, max_shard_bytes: int | None = None,
            copy_tokenizer_from: str | Path | None = None) -> Path:
    """Write `model` as a Hugging Face directory (config.json + safetensors, sharded above
    `max_shard_bytes` with a `model.safetensors.index.json`). Weights already in `directory` are removed
    first: a stale shard index would otherwise shadow the new weights. Files are written atomically (a
    symlink at a file's name is replaced, never written through) with the user's umask."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = model_tensors(model)
    cfg = model.config.to_hf_dict()
    cfg["torch_dtype"] = cfg["dtype"] = str(np.dtype(model.dtype)) if model.dtype != jnp.bfloat16 else "bfloat16"
    remove_weight_files(directory)
    atomic_write_text(directory / "config.json", json.dumps(cfg, indent=2))
    meta = {"format": "pt"}
    if max_shard_bytes is None:
        save_safetensors(tensors, directory / "model.safetensors", meta)
    else:
        shards, current, size = [], {}, 0
        for name in sorted(tensors):
            nbytes = tensors[name].nbytes
            if current and size + nbytes > max_shard_bytes:
                shards.append(current)
                current, size = {}, 0
            current[name] = tensors[name]
            size += nbytes
        shards.append(current)
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_safetensors(shard, directory / fname, meta)
            weight_map.update({n: fname for n in shard})
        index = {"metadata": {"total_size": sum(t.nbytes for t in tensors.values())}, "weight_map": weight_map}
        atomic_write_text(directory / "model.safetensors.index.json", json.dumps(index, indent=2))
    if copy_tokenizer_from is not None:
        copy_tokenizer_files(copy_tokenizer_from, directory)
    return directory


def copy_tokenizer_files(src: str | Path, dst: str | Path) -> None:
    """Copy the tokenizer and generation files of `src` into `dst` (atomically: a link in dst is replaced)."""
    for name in TOKENIZER_FILES:
        f = Path(src) / name
        if f.exists() and Path(src).resolve() != Path(dst).resolve():
            atomic_copy(f, Path(dst) / name)
