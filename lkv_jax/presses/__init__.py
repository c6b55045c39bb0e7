"""Eviction presses, one per module, with NVIDIA kvpress's names, fields and defaults."""

from lkv_jax.presses.base import BasePress, CompressOutput, Scored, register_press
from lkv_jax.presses.lookahead_kv import LookaheadKVPress
from lkv_jax.presses.streaming_llm import StreamingLLMPress

__all__ = ["BasePress", "LookaheadKVPress", "CompressOutput", "Scored", "StreamingLLMPress", "register_press"]
