"""lkv_jax: LookaheadKV and KV-cache eviction baselines in JAX/Flax.

    model = lkv_jax.load_hf(hf_dir, dtype="bfloat16")
    logits = lkv_jax.forward(model, input_ids)
    out = lkv_jax.compress(model, input_ids, lkv_jax.presses.SnapKVPress(compression_ratio=0.5))
    tokens = lkv_jax.generate(model, input_ids, max_new_tokens=64, press=press)
"""

from lkv_jax import presses
from lkv_jax.cache import KVCache
from lkv_jax.checkpoint.gguf import load_gguf
from lkv_jax.checkpoint.hf import CheckpointError, load_hf, save_hf
from lkv_jax.checkpoint.orbax_io import convert, load, load_converted, save_converted
from lkv_jax.compression import compress
from lkv_jax.config import ModelConfig, UnsupportedModelError
from lkv_jax.decoding import generate_from_cache
from lkv_jax.decoding_press import DecodingPress
from lkv_jax.errors import LkvError
from lkv_jax.generation import forward, generate
from lkv_jax.inference import decode, glimpse, prefill
from lkv_jax.models.transformer import Transformer

__all__ = [
    "CheckpointError", "DecodingPress", "KVCache", "LkvError", "ModelConfig", "Transformer", "UnsupportedModelError",
    "compress", "convert", "decode", "forward", "generate", "generate_from_cache", "glimpse", "load", "load_converted",
    "load_gguf", "load_hf", "prefill", "presses", "save_converted", "save_hf",
]
