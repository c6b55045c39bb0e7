"""Shared fixtures: tiny random Hugging Face models built in-process (no network) and saved to tmp_path, and
the experiment scripts loaded as modules."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

# 8 fake CPU devices for the sharding tests: chex sets the XLA flag, before any test starts jax's backends
chex.set_n_cpu_devices(8)
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# The Pallas kernel tests run interpreted (on CPU) by default. LKV_PALLAS_COMPILED=1 runs the same tests
# compiled on this machine's GPU or TPU (experiments/device_check.sh); cases written for the other
# accelerator's driver, and the interpreter-only ones, are skipped then.
PALLAS_COMPILED = os.environ.get("LKV_PALLAS_COMPILED", "") not in ("", "0")
INTERPRET = not PALLAS_COMPILED


def pallas_device_target() -> str:
    """The Pallas driver compiled mode runs: "gpu" or "tpu" (the backend jax found)."""
    import jax

    backend = jax.default_backend()
    if backend not in ("gpu", "tpu"):
        raise RuntimeError(f"LKV_PALLAS_COMPILED=1 needs a GPU or TPU backend, jax found {backend!r}")
    return backend


def skip_unless_runnable(target: str | None = None, *, interpreter_only: bool = False) -> None:
    """In compiled mode, skip a kernel case for the other accelerator's driver or one that needs the
    interpreter (a TPU memory simulation); interpreted, every case runs."""
    if not PALLAS_COMPILED:
        return
    if interpreter_only:
        pytest.skip("needs the Pallas interpreter (LKV_PALLAS_COMPILED=1 runs compiled kernels)")
    if target is not None and target != pallas_device_target():
        pytest.skip(f"a {target} kernel case; this device runs {pallas_device_target()} kernels")

FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "mistral": ("MistralConfig", "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
}


def build_hf_model(family: str = "llama", *, seed: int = 0, init_std: float = 0.3, **overrides):
    """A tiny random transformers model in float32 eval mode, eager attention.

    init_std well above HF's 0.02 so random models produce varied, non-degenerate greedy outputs.
    """
    import torch
    import transformers

    cfg_name, model_name = FAMILIES[family]
    kw = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=4096, initializer_range=init_std,
              eos_token_id=2, bos_token_id=1, pad_token_id=0, attn_implementation="eager")
    if family == "qwen3":
        kw["head_dim"] = 32
    kw.update(overrides)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_name)(**kw)
    model = getattr(transformers, model_name)(cfg).eval()
    return model


def save_hf_model(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture
def tiny_llama(tmp_path):
    """(transformers model, HF directory) of a 2-layer Llama with 4 query / 2 KV heads."""
    hf = build_hf_model("llama")
    return hf, save_hf_model(hf, tmp_path / "llama")


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture
def experiment_script():
    """load(name) -> the module experiments/<name>.py (scripts are files, not a package)."""

    def load(name: str):
        path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module

    return load


# the ChatML chat template (SmolLM2 / Qwen style) of the test tokenizer
CHATML = ("{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory):
    """A tokenizer directory: a byte-level BPE (vocabulary 2000) trained on six training-half essays, with a
    ChatML template (no model needed)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from lkv_jax.data.essays import load_essays

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(load_essays("train")[:6], trainer)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML, "eos_token": "<|im_end|>"}))
    return d
