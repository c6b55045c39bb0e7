"""Eviction presses, one per module, with NVIDIA kvpress's names, fields and defaults."""

from lkv_jax.presses.adakv import AdaKVPress
from lkv_jax.presses.base import BasePress, CompressOutput, Scored, register_press
from lkv_jax.presses.expected_attention import ExpectedAttentionPress
from lkv_jax.presses.knorm import KnormPress
from lkv_jax.presses.laq import LAQPress
from lkv_jax.presses.lookahead_kv import LookaheadKVPress
from lkv_jax.presses.observed_attention import ObservedAttentionPress
from lkv_jax.presses.pyramidkv import PyramidKVPress
from lkv_jax.presses.random_press import RandomPress
from lkv_jax.presses.registry import PRESSES, make_press
from lkv_jax.presses.snapkv import SnapKVPress
from lkv_jax.presses.speckv import SpecKVPress
from lkv_jax.presses.streaming_llm import StreamingLLMPress
from lkv_jax.presses.tova import TOVAPress

__all__ = [
    "AdaKVPress", "BasePress", "CompressOutput", "ExpectedAttentionPress", "KnormPress", "LAQPress",
    "LookaheadKVPress", "ObservedAttentionPress", "PRESSES", "PyramidKVPress", "RandomPress", "Scored",
    "SnapKVPress", "SpecKVPress", "StreamingLLMPress", "TOVAPress", "make_press", "register_press",
]
