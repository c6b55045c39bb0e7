"""Hugging Face loading errors and the HF -> orbax -> HF round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model
from safetensors.numpy import load_file, save_file

import lkv_jax
from lkv_jax.cli import main as cli_main


def _all_tensors(d):
    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_hf_orbax_hf_round_trip_is_bit_exact(tmp_path, dtype):
    hf = build_hf_model("qwen2").to(dtype)
    src = save_hf_model(hf, tmp_path / "hf")
    assert cli_main([ "convert", src, str(tmp_path / "ox"), "--to", "orbax"]) == 0
    assert cli_main(["convert", str(tmp_path / "ox"), str(tmp_path / "back"), "--to", "hf",
                     "--max-shard-mb", "0.02"]) == 0
    assert (tmp_path / "back" / "model.safetensors.index.json").exists()  # sharded on the way back
    a, b = _all_tensors(tmp_path / "hf"), _all_tensors(tmp_path / "back")
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert a[name].tobytes() == b[name].tobytes(), name
    # the sharded directory loads through load_hf, the converted one through load
    m1, m2 = lkv_jax.load_hf(tmp_path / "back"), lkv_jax.load(tmp_path / "ox")
    ids = np.arange(3, 40)[None]
    np.testing.assert_array_equal(np.asarray(lkv_jax.forward(m1, ids)), np.asarray(lkv_jax.forward(m2, ids)))


def test_unsupported_architecture_lists_supported(tmp_path):
    d = tmp_path / "m"
    save_hf_model(build_hf_model("llama"), d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(lkv_jax.UnsupportedModelError, match="LlamaForCausalLM.*Qwen3ForCausalLM"):
        lkv_jax.load_hf(d)


def test_missing_unexpected_and_misshaped_tensors_are_named(tmp_path):
    d = tmp_path / "m"
    save_hf_model(build_hf_model("llama"), d)
    tensors = load_file(str(d / "model.safetensors"))
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    broken["model.layers.0.self_attn.extra_proj.weight"] = np.zeros((2, 2), np.float32)
    save_file(broken, str(d / "model.safetensors"))
    with pytest.raises(lkv_jax.CheckpointError, match=r"missing tensors: \['model.layers.1.mlp.up_proj.weight'\]") as e:
        lkv_jax.load_hf(d)
    assert "unexpected tensors: ['model.layers.0.self_attn.extra_proj.weight']" in str(e.value)
    bad = dict(tensors)
    bad["model.layers.0.self_attn.q_proj.weight"] = np.zeros((64, 32), np.float32)
    save_file(bad, str(d / "model.safetensors"))
    with pytest.raises(lkv_jax.CheckpointError, match="shape mismatch: model.layers.0.self_attn.q_proj.weight"):
        lkv_jax.load_hf(d)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(lkv_jax.CheckpointError, match="not a directory"):
        lkv_jax.load_hf(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(lkv_jax.CheckpointError, match="no config.json"):
        lkv_jax.load_hf(tmp_path / "empty")
    d = tmp_path / "noweights"
    save_hf_model(build_hf_model("llama"), d)
    (d / "model.safetensors").unlink()
    with pytest.raises(lkv_jax.CheckpointError, match="no safetensors"):
        lkv_jax.load_hf(d)
    with pytest.raises(lkv_jax.CheckpointError, match="not a converted"):
        lkv_jax.load_converted(d)
