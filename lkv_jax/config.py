"""Model configuration read from a Hugging Face `config.json`.

One frozen dataclass covers the decoder families we support (Llama 2/3.x, Mistral, Qwen2/2.5, Qwen3):
they differ only in biases, per-head q/k norms, RoPE scaling and embedding tying.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from lkv_jax.errors import ConfigError, SequenceTooLongError, UnsupportedModelError

# architectures string in config.json -> family name used in this package
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")
# keys every supported config.json has (the rest have defaults)
REQUIRED_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling (Llama 3.1 / 3.2)
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Static shape and numerics of a decoder-only transformer.

    Attributes use HF names where they exist. `head_dim` is independent of `hidden_size` (Qwen3).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    family: str = "llama"
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2 always; Llama when attention_bias
    o_bias: bool = False  # Llama attention_bias
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3
    sliding_window: int | None = None  # only enforced as "sequence must fit inside"
    max_position_embeddings: int = 131072
    bos_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self):
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                              f"num_key_value_heads={self.num_key_value_heads}")

    @property
    def n_groups(self) -> int:
        """G = N / K, query heads per KV head."""
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def max_length(self) -> int:
        """Positions the model supports: max_position_embeddings, or more where the config's llama3 RoPE
        scaling says so (original_max_position_embeddings x factor). Linear scaling adds nothing: HF
        configs that use it already state the scaled length in max_position_embeddings."""
        if self.rope.rope_type == "llama3":
            scaled = int(self.rope.original_max_position_embeddings * self.rope.factor)
            return max(int(self.max_position_embeddings), scaled)
        return int(self.max_position_embeddings)

    def check_length(self, total_length: int) -> None:
        """Raise if a sequence of `total_length` tokens (prompt plus whatever follows it: a scoring
        suffix, generated tokens) exceeds the model's positions or would hit the sliding window.

        Past `max_length` RoPE extrapolates and the results are silently wrong. We implement full
        attention only; a Mistral-style window shorter than the sequence would change results silently
        too, so both are errors instead.
        """
        if total_length > self.max_length:
            raise SequenceTooLongError(f"sequence of {total_length} tokens (prompt plus suffix or generated tokens) "
                                       f"exceeds the model's {self.max_length} positions (max_position_embeddings / "
                                       "RoPE scaling in config.json); shorten the prompt or generate fewer tokens")
        if self.sliding_window is not None and total_length > self.sliding_window:
            raise UnsupportedModelError(f"sequence of {total_length} tokens exceeds the model's sliding_window="
                                        f"{self.sliding_window}; lkv_jax implements full attention only, which "
                                        "would change this model's results")

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any]) -> ModelConfig:
        """The config of a Hugging Face config.json dict; ConfigError names a missing or invalid key."""
        if not isinstance(cfg, dict):
            raise ConfigError(f"a config must be a JSON object, got {type(cfg).__name__}")
        missing = [k for k in REQUIRED_KEYS if k not in cfg]
        if missing:
            raise ConfigError(f"config misses required keys {missing}")
        bad = [f"{k}={cfg[k]!r}" for k in REQUIRED_KEYS if not _is_positive_int(cfg[k])]
        if bad:
            raise ConfigError(f"config keys must be positive integers: {', '.join(bad)}")
        archs = cfg.get("architectures") or []
        family = next((SUPPORTED_ARCHITECTURES[a] for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if not archs and cfg.get("model_type") in SUPPORTED_ARCHITECTURES.values():  # no architectures: model_type
            family = cfg["model_type"]
        if family is None:
            raise UnsupportedModelError(f"unsupported architectures {archs or cfg.get('model_type')!r}; supported: "
                                        f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if cfg.get("hidden_act", "silu") != "silu":
            raise UnsupportedModelError(f"hidden_act={cfg['hidden_act']!r}; only 'silu' is supported")
        n_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_heads
        sliding = cfg.get("sliding_window")
        if family == "qwen2" or family == "qwen3":
            sliding = sliding if cfg.get("use_sliding_window", False) else None
        eos = cfg.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, list) else (int(eos),))
        attention_bias = bool(cfg.get("attention_bias", False))
        return cls(
            vocab_size=cfg["vocab_size"], hidden_size=cfg["hidden_size"], intermediate_size=cfg["intermediate_size"],
            num_hidden_layers=cfg["num_hidden_layers"], num_attention_heads=n_heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or n_heads, head_dim=head_dim, family=family,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), rope=_rope_from_hf(cfg),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=family == "qwen2" or attention_bias, o_bias=attention_bias and family != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)), qk_norm=family == "qwen3", sliding_window=sliding,
            max_position_embeddings=cfg.get("max_position_embeddings", 131072), bos_token_id=cfg.get("bos_token_id"),
            eos_token_id=eos, pad_token_id=cfg.get("pad_token_id"))

    @classmethod
    def from_json(cls, path: str | Path) -> ModelConfig:
        """Read a config.json; ConfigError names the file and what is wrong with it."""
        try:
            cfg = json.loads(Path(path).read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"{path}: not a text file ({e.reason})") from None
        try:
            return cls.from_hf_dict(cfg)
        except ConfigError as e:
            raise type(e)(f"{path}: {e}") from None
        except (TypeError, ValueError, AttributeError) as e:  # a value of the wrong type deeper in
            raise ConfigError(f"{path}: invalid value ({e})") from None

    def to_hf_dict(self) -> dict[str, Any]:
        """A config.json for the same model (used when writing HF directories)."""
        arch = {v: k for k, v in SUPPORTED_ARCHITECTURES.items()}[self.family]
        rope: dict[str, Any] = {"rope_type": self.rope.rope_type, "rope_theta": self.rope.theta}
        if self.rope.rope_type == "linear":
            rope["factor"] = self.rope.factor
        elif self.rope.rope_type == "llama3":
            rope.update(factor=self.rope.factor, low_freq_factor=self.rope.low_freq_factor,
                        high_freq_factor=self.rope.high_freq_factor,
                        original_max_position_embeddings=self.rope.original_max_position_embeddings)
        d: dict[str, Any] = {
            "architectures": [arch],
            "model_type": self.family,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope.theta,
            "rope_parameters": rope,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": list(self.eos_token_id) if len(self.eos_token_id) != 1 else self.eos_token_id[0],
            "pad_token_id": self.pad_token_id,
        }
        if self.family == "llama":
            d["attention_bias"] = self.qkv_bias
            d["mlp_bias"] = self.mlp_bias
        if self.sliding_window is not None:
            d["sliding_window"] = self.sliding_window
            if self.family in ("qwen2", "qwen3"):
                d["use_sliding_window"] = True
        elif self.family == "mistral":
            d["sliding_window"] = None
        return d


def _is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _rope_from_hf(cfg: dict[str, Any]) -> RopeConfig:
    # transformers >= 5 writes `rope_parameters` (theta inside); older files `rope_theta` + `rope_scaling`
    params = dict(cfg.get("rope_parameters") or {})
    scaling = cfg.get("rope_scaling") or {}
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    merged = {**scaling, **params}
    rope_type = merged.get("rope_type", merged.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedModelError(f"rope_type={rope_type!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_ROPE_TYPES)}")
    return RopeConfig(theta=float(theta), rope_type=rope_type, factor=float(merged.get("factor", 1.0)),
                      low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
                      high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
                      original_max_position_embeddings=int(merged.get("original_max_position_embeddings", 8192)))
