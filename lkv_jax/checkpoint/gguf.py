"""GGUF files (llama.cpp) -> lkv_jax models and Hugging Face directories.

    model = lkv_jax.load_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")        # in memory, float32
    convert_gguf("model.gguf", "out_dir", dtype="bfloat16")             # config.json + safetensors + tokenizer

The `gguf` library reads and dequantizes every tensor (`gguf.quants.dequantize`, float32). GGUF lists a tensor's
dims fastest-first (ggml's `ne`); the reader's arrays are already row-major, so a dequantized linear weight is
[out, in] like Hugging Face's. Names go GGUF -> HF through a regex table, then HF -> ours through `hf.py`'s.
llama.cpp permutes the q/k rows of the `llama` architecture (HF's half-split RoPE pairs -> ggml's interleaved
ones); `unpermute_qk` undoes it. The config comes from the `{arch}.*` metadata.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from gguf import GGUFReader, Keys
from gguf.quants import dequantize

from lkv_jax.checkpoint.gguf_tokenizer import check_supported, special_token_ids, tokenizer_files
from lkv_jax.checkpoint.hf import CheckpointError, _assemble, _regex, hf_to_path, resolve_dtype, save_hf
from lkv_jax.config import SUPPORTED_ARCHITECTURES as HF_ARCHITECTURES
from lkv_jax.config import ModelConfig, RopeConfig, UnsupportedModelError
from lkv_jax.models.rope import inverse_frequencies
from lkv_jax.models.transformer import MLP_PROJECTIONS, Transformer

# GGUF architecture names, which are also our family names (config.SUPPORTED_ARCHITECTURES maps HF classes)
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# architectures whose q/k rows llama.cpp's converter permutes
_PERMUTED = ("llama",)

_MLP = "|".join(MLP_PROJECTIONS)
# (GGUF name, HF name, choices for {p}); {i} is a layer index
_TABLE = [
    ("token_embd.weight", "model.embed_tokens.weight", ""),
    ("output_norm.weight", "model.norm.weight", ""),
    ("output.weight", "lm_head.weight", ""),
    ("blk.{i}.attn_{p}.weight", "model.layers.{i}.self_attn.{p}_proj.weight", "q|k|v"),
    ("blk.{i}.attn_{p}.bias", "model.layers.{i}.self_attn.{p}_proj.bias", "q|k|v"),
    ("blk.{i}.attn_output.weight", "model.layers.{i}.self_attn.o_proj.weight", ""),
    ("blk.{i}.attn_output.bias", "model.layers.{i}.self_attn.o_proj.bias", ""),
    ("blk.{i}.attn_{p}_norm.weight", "model.layers.{i}.self_attn.{p}_norm.weight", "q|k"),
    ("blk.{i}.ffn_{p}.weight", "model.layers.{i}.mlp.{p}_proj.weight", _MLP),
    ("blk.{i}.ffn_{p}.bias", "model.layers.{i}.mlp.{p}_proj.bias", _MLP),
    ("blk.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight", ""),
    ("blk.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight", ""),
]
_FROM_GGUF = [(_regex(g, c), hf) for g, hf, c in _TABLE]
# llama.cpp's precomputed Llama 3 RoPE divisors: read into the config, not a parameter
ROPE_FREQS = "rope_freqs.weight"
# weights an overwritten directory may hold from an older model
_OLD_WEIGHTS = ("model.safetensors", "model-*-of-*.safetensors", "model.safetensors.index.json")


class GGUFTypeError(CheckpointError):
    """A tensor stored in a ggml type that `gguf.quants` cannot dequantize."""


def gguf_to_hf(name: str) -> str | None:
    """The HF tensor name of a GGUF tensor name, or None when the table does not know it."""
    for regex, template in _FROM_GGUF:
        m = regex.fullmatch(name)
        if m:
            return template.format(**m.groupdict())
    return None


def read_metadata(reader: GGUFReader) -> dict[str, Any]:
    """{key: value} of a file's metadata (strings decoded, arrays as lists), without the GGUF.* header keys."""
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


def dequantize_tensor(tensor) -> np.ndarray:
    """float32 array of a `ReaderTensor`, shape = its GGUF dims reversed ([out, in] for a linear weight).

    Raises GGUFTypeError for a type `gguf.quants` has no dequantizer for (integer tensors, Q8_1, ...)."""
    try:
        w = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise GGUFTypeError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which gguf.quants "
                            "cannot dequantize") from None
    return np.asarray(w, dtype=np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation: w [n_heads * head_dim, ...] (weight or bias) -> same shape.

    Within each head llama.cpp stores the rotary pairs interleaved (rows x0 y0 x1 y1 ...); HF keeps the halves
    apart (x0 x1 ... y0 y1 ...). So rows (head, j, half) go back to (head, half, j)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _required(meta: dict[str, Any], key: str, source: str):
    if key not in meta:
        raise CheckpointError(f"{source}: GGUF metadata lacks {key}")
    return meta[key]


def _f32(value) -> float:
    # GGUF stores float32: keep its shortest decimal (1e-05), not the widened double (9.99999974e-06)
    return float(str(np.float32(value)))


def _kv_heads(value, source: str) -> int:
    if isinstance(value, list):  # a per-layer list in some files
        if len(set(value)) != 1:
            raise UnsupportedModelError(f"{source}: per-layer KV head counts {sorted(set(value))} are not supported")
        value = value[0]
    return int(value)


def _rope_scaling(meta: dict[str, Any], arch: str) -> dict[str, Any] | None:
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get(f"{arch}.rope.scaling.factor", meta.get(f"{arch}.rope.scale_linear"))
    if kind == "none" and factor is not None and factor != 1.0:
        kind = "linear"  # older files only carry rope.scale_linear
    if kind == "none":
        return None
    # yarn etc. fall through to ModelConfig, which names the RoPE types it supports
    return {"rope_type": kind, "factor": _f32(factor if factor is not None else 1.0)}


def llama3_rope_from_factors(factors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """HF rope_scaling of llama.cpp's `rope_freqs` tensor (float [head_dim/2] divisors of the inverse frequencies).

    Its converter keeps only these divisors, not Llama 3's scaling parameters; every Llama 3.1-3.3 release uses
    low_freq_factor 1, high_freq_factor 4 and an original context of 8192, with the factor the largest divisor.
    Returns None for all-ones divisors; raises UnsupportedModelError when those parameters do not reproduce them.
    """
    factors = np.asarray(factors, dtype=np.float64).reshape(-1)
    if np.allclose(factors, 1.0):
        return None
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    rope = RopeConfig(theta=theta, rope_type="llama3", factor=scaling["factor"], low_freq_factor=1.0,
                      high_freq_factor=4.0, original_max_position_embeddings=8192)
    implied = inverse_frequencies(RopeConfig(theta=theta), head_dim) / inverse_frequencies(rope, head_dim)
    if implied.shape != factors.shape or not np.allclose(implied, factors, rtol=1e-4):
        raise UnsupportedModelError(f"GGUF {ROPE_FREQS} holds RoPE divisors that Llama 3 scaling (low 1, high 4, "
                                    "original context 8192) does not reproduce; other scalings are not supported")
    return scaling


def hf_config_dict(meta: dict[str, Any], shapes: dict[str, tuple[int, ...]], rope_factors=None,
                   source: str = "GGUF") -> dict[str, Any]:
    """A Hugging Face config.json dict from GGUF metadata and the tensors' HF-layout shapes {GGUF name: shape}.

    Raises UnsupportedModelError for an architecture other than llama / qwen2 / qwen3."""
    arch = meta.get(Keys.General.ARCHITECTURE)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(f"{source}: GGUF architecture {arch!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ARCHITECTURES)}")
    key = lambda name: _required(meta, f"{arch}.{name}", source)
    hidden, n_heads = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(meta.get(f"{arch}.attention.key_length") or hidden // n_heads)
    rope_dims = int(meta.get(f"{arch}.rope.dimension_count") or head_dim)
    value_dim = int(meta.get(f"{arch}.attention.value_length") or head_dim)
    if rope_dims != head_dim or value_dim != head_dim:
        raise UnsupportedModelError(f"{source}: partial RoPE or value heads of another size (head_dim {head_dim}, "
                                    f"rope dims {rope_dims}, value dims {value_dim}) are not supported")
    if "token_embd.weight" not in shapes:
        raise CheckpointError(f"{source}: GGUF file has no token_embd.weight")
    theta = _f32(meta.get(f"{arch}.rope.freq_base", 10000.0))
    scaling = _rope_scaling(meta, arch)
    if rope_factors is not None:
        scaling = llama3_rope_from_factors(rope_factors, theta, head_dim) or scaling
    d = {
        "architectures": [next(k for k, v in HF_ARCHITECTURES.items() if v == arch)],
        "model_type": arch,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        "intermediate_size": int(key("feed_forward_length")),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": _kv_heads(meta.get(f"{arch}.attention.head_count_kv", n_heads), source),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(meta.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": theta,
        "rope_scaling": scaling,
        "max_position_embeddings": int(meta.get(f"{arch}.context_length", 131072)),
        "tie_word_embeddings": "output.weight" not in shapes,
        **special_token_ids(meta),
    }
    if arch == "llama":  # Llama's biases are all-or-nothing flags
        d["attention_bias"] = "blk.0.attn_q.bias" in shapes
        d["mlp_bias"] = "blk.0.ffn_up.bias" in shapes
    return d


def _shapes(reader: GGUFReader) -> dict[str, tuple[int, ...]]:
    return {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}


def _read(path: str | Path) -> tuple[GGUFReader, dict[str, Any], ModelConfig]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is not a file")
    try:
        reader = GGUFReader(str(path))
    except ValueError as e:
        raise CheckpointError(f"{path}: not a readable GGUF file: {e}") from e
    meta = read_metadata(reader)
    if meta.get(Keys.Split.LLM_KV_SPLIT_COUNT, 1) > 1:
        raise CheckpointError(f"{path} is one shard of a split GGUF model; merge the shards first "
                              "(llama-gguf-split --merge)")
    factors = next((dequantize_tensor(t) for t in reader.tensors if t.name == ROPE_FREQS), None)
    config = ModelConfig.from_hf_dict(hf_config_dict(meta, _shapes(reader), factors, source=str(path)))
    return reader, meta, config


def _model(reader: GGUFReader, config: ModelConfig, dtype, source: str) -> Transformer:
    """Dequantize every tensor into our [in, out] layout and build the model."""
    tensors: dict[str, np.ndarray] = {}
    unexpected = []
    permuted = config.family in _PERMUTED
    for t in reader.tensors:
        if t.name == ROPE_FREQS:
            continue
        hf_name = gguf_to_hf(t.name)
        mapped = hf_to_path(hf_name) if hf_name else None
        if mapped is None:
            unexpected.append(t.name)
            continue
        w = dequantize_tensor(t)
        if permuted and (".attn_q." in t.name or ".attn_k." in t.name):
            w = unpermute_qk(w, config.num_attention_heads if ".attn_q." in t.name else config.num_key_value_heads)
        path, transpose = mapped
        tensors[path] = w.T if transpose else w
    return _assemble(config, tensors, resolve_dtype(dtype) or jnp.float32, unexpected, source=source)


def load_gguf(path: str | Path, dtype=None) -> Transformer:
    """A Transformer from a llama.cpp GGUF file (llama / qwen2 / qwen3; any type `gguf.quants` dequantizes).

    dtype: "float32" | "bfloat16" | "float16" | a jnp dtype | None (float32, what dequantization gives).
    Raises UnsupportedModelError (architecture, RoPE), GGUFTypeError (tensor type), CheckpointError (tensors).
    """
    reader, _, config = _read(path)
    return _model(reader, config, dtype, source=str(path))


def _check_destination(dst: Path, overwrite: bool) -> None:
    if dst.is_symlink():
        raise ValueError(f"{dst} is a symlink; refusing to write through it")
    if dst.exists() and not dst.is_dir():
        raise ValueError(f"{dst} exists and is not a directory")
    if not overwrite and dst.is_dir() and any(dst.iterdir()):
        raise ValueError(f"{dst} already holds files; give a new or empty directory")


def _move_into(tmp: Path, dst: Path) -> None:
    """Put the directory built at `tmp` in place: renamed onto a new or empty `dst`; otherwise dst's old weights
    go first (a stale shard index would shadow the new file) and each new file replaces its namesake
    (`os.replace` swaps a symlink at that name, never writes through it)."""
    if not dst.exists() or not any(dst.iterdir()):
        tmp.rename(dst)
        return
    for pattern in _OLD_WEIGHTS:
        for old in dst.glob(pattern):
            old.unlink()
    for f in tmp.iterdir():
        os.replace(f, dst / f.name)
    tmp.rmdir()


def convert_gguf(src: str | Path, dst: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a GGUF file as a Hugging Face directory: config.json, model.safetensors (`dtype`),
    generation_config.json, tokenizer.json and tokenizer_config.json (with the file's chat template).

    dst must be new or empty unless `overwrite`, and never a symlink (ValueError). The files are built in a
    sibling directory and moved into place, so a failed conversion leaves dst as it was.
    """
    dst = Path(dst)
    _check_destination(dst, overwrite)
    reader, meta, config = _read(src)
    check_supported(meta)  # refuse an unsupported tokenizer before the slow part
    model = _model(reader, config, dtype, source=str(src))
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        save_hf(model, tmp)
        (tmp / "generation_config.json").write_text(json.dumps(special_token_ids(meta), indent=2))
        for name, text in tokenizer_files(meta, config.max_position_embeddings).items():
            (tmp / name).write_text(text, encoding="utf-8")
        _check_destination(dst, overwrite)
        _move_into(tmp, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dst
