"""GGUF import against independent references: transformers' own GGUF loader, the original transformers model a
tiny GGUF was written from, the `tokenizers` tokenizer its vocabulary was trained as, and the real SmolLM2 file."""

from __future__ import annotations

import json
import math

import gguf
import jinja2.sandbox
import numpy as np
import pytest
import torch
from conftest import CHATML, build_hf_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM

import lkv_jax
from lkv_jax.checkpoint.gguf import GGUFTypeError, convert_gguf, dequantize_tensor
from lkv_jax.cli import main as cli_main
from lkv_jax.data.essays import load_essays
from lkv_jax.data.installed import smollm2_gguf
from lkv_jax.data.synthetic import HFPromptEncoder

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
Q = gguf.GGMLQuantizationType
ARCHES = {"llama": gguf.MODEL_ARCH.LLAMA, "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
PRE_TOKENIZERS = {  # llama.cpp name -> the `tokenizers` pre-tokenizer a model of that family is trained with
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False),
    "smollm": lambda: pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False)]),
}


def _train_bpe(pre: str, texts) -> Tokenizer:
    """A byte-level BPE of 320 tokens (3 special, 256 bytes, 61 merges)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = PRE_TOKENIZERS[pre]()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def texts():
    return load_essays("train")[:3]


@pytest.fixture(scope="module")
def bpe(texts):
    return _train_bpe("gpt-2", texts)


def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's convert_hf_to_gguf does to Llama q/k rows: each head's two RoPE halves interleaved."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama3_rope_freqs(theta: float, head_dim: int, factor: float, low: float, high: float, old: int) -> np.ndarray:
    """llama.cpp's precomputed Llama 3 RoPE divisors (its `rope_freqs` tensor), float32 [head_dim/2]."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def _write_gguf(path, hf, arch: str, tok: Tokenizer, *, pre: str = "gpt-2", qtype=Q.F32, tokenizer_model="gpt2",
                rope_freqs=None, raw_types=None):
    """Write transformers model `hf` as llama.cpp would: gguf's own HF->GGUF tensor names, Llama q/k permuted,
    2-D weights in `qtype`, tensors named in `raw_types` stored as zero bytes of that type."""
    cfg = hf.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(head_dim)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL if t in SPECIALS else gguf.TokenType.NORMAL for t in tokens])
    w.add_token_merges([" ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    names = gguf.get_tensor_name_map(ARCHES[arch], cfg.num_hidden_layers)
    for name, t in hf.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        a = t.detach().float().numpy()
        gname = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if arch == "llama" and (".attn_q." in gname or ".attn_k." in gname):
            a = _llama_cpp_permute(a, cfg.num_attention_heads if ".attn_q." in gname else cfg.num_key_value_heads)
        if gname in (raw_types or {}):
            qt = raw_types[gname]
            block, nbytes = gguf.GGML_QUANT_SIZES[qt]
            w.add_tensor(gname, np.zeros((a.shape[0], a.shape[1] // block * nbytes), np.uint8), raw_dtype=qt)
        elif a.ndim == 2 and qtype != Q.F32:
            w.add_tensor(gname, gguf.quants.quantize(a, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
    if rope_freqs is not None:
        w.add_tensor("rope_freqs.weight", rope_freqs)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _randomize_norms_and_biases(hf, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.copy_((1.0 if "norm" in name else 0.0) + 0.3 * torch.randn(p.shape, generator=g))
    return hf


def _logits(hf, ids) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor(ids)).logits.float().numpy()


def _transformers_gguf(path):
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                attn_implementation="eager").eval()


LLAMA3 = dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                            "original_max_position_embeddings": 8192}, rope_theta=500000.0)
# name: (family, transformers overrides, GGUF type, compare with transformers' GGUF loader, with the original)
CASES = {
    "llama_f32": ("llama", {}, Q.F32, True, True),
    "llama_q8_0_kv1": ("llama", dict(num_key_value_heads=1), Q.Q8_0, True, False),
    "qwen2_q8_0_tied": ("qwen2", dict(tie_word_embeddings=True), Q.Q8_0, True, False),
    # transformers' GGUF loader ignores qwen3's key_length (head_dim stays its default, 128) and llama.cpp's
    # rope_freqs: for other head sizes and for Llama 3 scaling the original model is the only reference
    "qwen3_f32": ("qwen3", dict(head_dim=128), Q.F32, True, True),
    "qwen3_head_dim_32": ("qwen3", dict(head_dim=32), Q.F32, False, True),
    "llama3_rope_freqs": ("llama", LLAMA3, Q.F32, False, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_tiny_gguf_logits_match_transformers(case, tmp_path, bpe, rng):
    family, overrides, qtype, vs_gguf_loader, vs_original = CASES[case]
    hf = _randomize_norms_and_biases(build_hf_model(family, vocab_size=bpe.get_vocab_size(), **overrides))
    freqs = _llama3_rope_freqs(500000.0, 16, 8.0, 1.0, 4.0, 8192) if "rope_scaling" in overrides else None
    path = _write_gguf(tmp_path / f"{case}.gguf", hf, family, bpe, qtype=qtype, rope_freqs=freqs)
    ids = rng.randint(3, bpe.get_vocab_size(), size=(2, 40))
    ours = np.asarray(lkv_jax.forward(lkv_jax.load_gguf(path), ids))
    converted = np.asarray(lkv_jax.forward(lkv_jax.load_hf(convert_gguf(path, tmp_path / "out")), ids))
    np.testing.assert_array_equal(converted, ours)
    if vs_gguf_loader:
        assert np.abs(ours - _logits(_transformers_gguf(path), ids)).max() <= 1e-4
    if vs_original:
        assert np.abs(ours - _logits(hf, ids)).max() <= 1e-4


@pytest.mark.parametrize("pre", sorted(PRE_TOKENIZERS))
def test_tiny_tokenizer_encodes_as_the_original(pre, tmp_path, texts):
    original = _train_bpe(pre, texts)
    hf = build_hf_model("llama", vocab_size=original.get_vocab_size())
    out = convert_gguf(_write_gguf(tmp_path / "m.gguf", hf, "llama", original, pre=pre), tmp_path / "out")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    samples = list(load_essays("eval")[:3]) + ["Call 555-0123 at 10:45, room 2048.", "<|im_start|>user\nhi<|im_end|>"]
    for text in samples:
        assert ours.encode(text).ids == original.encode(text).ids
        assert ours.decode(ours.encode(text).ids, skip_special_tokens=False) == text
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["eos_token"], cfg["bos_token"], cfg["chat_template"]) == ("<|im_end|>", "<|im_start|>", CHATML)
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


# mantissa / quantization bits: a dequantized value is within max|w| * 2**-bits of the original
TYPE_BITS = {Q.F16: 10, Q.BF16: 7, Q.Q8_0: 7, Q.Q5_0: 4, Q.Q5_1: 4, Q.Q4_0: 3, Q.Q4_1: 3}


def test_dequantize_tensor_restores_layout_and_values(tmp_path, rng):
    """Each type's tensor comes back in [rows, cols] order (GGUF stores dims reversed) close to the original."""
    weights = {t: rng.randn(24, 96 + 32 * i).astype(np.float32) for i, t in enumerate(TYPE_BITS)}
    w = gguf.GGUFWriter(str(tmp_path / "types.gguf"), "llama")
    for t, a in weights.items():
        if t == Q.F16:
            w.add_tensor(t.name, a.astype(np.float16))
        else:
            w.add_tensor(t.name, gguf.quants.quantize(a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    for tensor in gguf.GGUFReader(str(tmp_path / "types.gguf")).tensors:
        t = Q[tensor.name]
        got, want = dequantize_tensor(tensor), weights[t]
        assert tensor.tensor_type == t and got.dtype == np.float32 and got.shape == want.shape
        assert np.abs(got - want).max() <= np.abs(want).max() * 2.0 ** -TYPE_BITS[t], t.name


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_embedding_length(64)
    w.add_head_count(4)
    w.add_tensor("token_embd.weight", np.zeros((32, 64), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(lkv_jax.UnsupportedModelError, match=r"'phi3'.*supported: llama, qwen2, qwen3") as e:
        lkv_jax.load_gguf(tmp_path / "phi.gguf")
    assert "\n" not in str(e.value)


def test_unsupported_tensor_type_or_tokenizer_is_one_clear_error(tmp_path, bpe):
    hf = build_hf_model("llama", vocab_size=bpe.get_vocab_size())
    q81 = _write_gguf(tmp_path / "q81.gguf", hf, "llama", bpe, raw_types={"blk.1.ffn_up.weight": Q.Q8_1})
    with pytest.raises(GGUFTypeError, match=r"blk\.1\.ffn_up\.weight has type Q8_1") as e:
        lkv_jax.load_gguf(q81)
    assert isinstance(e.value, lkv_jax.CheckpointError) and "\n" not in str(e.value)
    spm = _write_gguf(tmp_path / "spm.gguf", hf, "llama", bpe, tokenizer_model="llama")
    with pytest.raises(lkv_jax.UnsupportedModelError, match=r"tokenizer model 'llama'.*supported: gpt2"):
        convert_gguf(spm, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_converts_gguf(tmp_path, bpe):
    hf = build_hf_model("qwen2", vocab_size=bpe.get_vocab_size())
    src = str(_write_gguf(tmp_path / "m.gguf", hf, "qwen2", bpe))
    assert cli_main(["convert", src, str(tmp_path / "out"), "--dtype", "bfloat16"]) == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"
    assert lkv_jax.load_hf(tmp_path / "out").dtype == np.dtype("bfloat16")
    assert cli_main(["convert", src, str(tmp_path / "out")]) == 2  # not empty
    assert cli_main(["convert", str(tmp_path / "out"), str(tmp_path / "ox"), "--dtype", "float32"]) == 2


def test_convert_refuses_used_destinations_and_overwrites_without_following_links(tmp_path, bpe, rng):
    hf = build_hf_model("llama", vocab_size=bpe.get_vocab_size())
    src = _write_gguf(tmp_path / "m.gguf", hf, "llama", bpe)
    out = convert_gguf(src, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds files"):
        convert_gguf(src, out)
    (tmp_path / "empty").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "empty")
    with pytest.raises(ValueError, match="symlink"):
        convert_gguf(src, tmp_path / "link")
    assert not any((tmp_path / "empty").iterdir())
    outside = tmp_path / "outside.json"
    outside.write_text("keep")
    (out / "tokenizer.json").unlink()
    (out / "tokenizer.json").symlink_to(outside)
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"lm_head.weight": "gone.safetensors"}}')
    convert_gguf(src, out, overwrite=True)
    assert outside.read_text() == "keep" and not (out / "tokenizer.json").is_symlink()
    assert not (out / "model.safetensors.index.json").exists()
    ids = rng.randint(3, bpe.get_vocab_size(), size=(1, 20))
    assert np.abs(np.asarray(lkv_jax.forward(lkv_jax.load_hf(out), ids)) - _logits(hf, ids)).max() <= 1e-4


# ---- the real SmolLM2-135M-Instruct Q4_1 file ----

@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """(GGUF path, its Hugging Face directory, the loaded model), converted once per module."""
    src = smollm2_gguf()
    out = convert_gguf(src, tmp_path_factory.mktemp("smollm2") / "hf")
    return src, out, lkv_jax.load_hf(out)


def test_smollm2_logits_match_transformers(smollm2):
    """Both sides dequantize the same Q4_1 blocks, so only float32 summation order differs: measured 7.8e-5 at 256
    tokens and 1.6e-4 at 1024 (2e-6 and 4e-6 of the max |logit|, about 39). The bound, 1e-5 of the max |logit|,
    keeps 5x headroom and is far below the Q4_1 quantization error a wrong dequantization would show."""
    src, out, model = smollm2
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    ids = np.array([tok.encode(load_essays("eval")[0]).ids[:256]])
    want = _logits(_transformers_gguf(src), ids)
    ours = np.asarray(lkv_jax.forward(model, ids))
    assert (ours.argmax(-1) == want.argmax(-1)).all()
    assert np.abs(ours - want).max() <= 1e-5 * np.abs(want).max()


def test_smollm2_tokenizer_round_trips_every_essay(smollm2):
    tok = Tokenizer.from_file(str(smollm2[1] / "tokenizer.json"))
    essays = list(load_essays("train") + load_essays("eval"))
    assert len(essays) == 49
    decoded = tok.decode_batch([e.ids for e in tok.encode_batch(essays)], skip_special_tokens=False)
    assert [i for i, (a, b) in enumerate(zip(decoded, essays, strict=True)) if a != b] == []


def test_smollm2_tokenizer_basics(smollm2):
    out = smollm2[1]
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    needle = "The special magic number for long-context is: 1234567."
    assert tok.decode(tok.encode(needle).ids) == needle
    assert tok.encode("1234567").tokens == list("1234567")  # SmolLM2 splits digits one by one
    enc = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert enc.ids[0] == 1 and enc.ids[-2] == 2 and enc.tokens[0] == "<|im_start|>" and enc.tokens[-2] == "<|im_end|>"
    assert tok.decode(enc.ids) == "user\nhi\n"  # special tokens are special
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    assert (cfg["bos_token"], cfg["eos_token"], cfg["pad_token"]) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    for name in ("config.json", "generation_config.json"):
        assert json.loads((out / name).read_text())["eos_token_id"] == 2


SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


def test_smollm2_chat_template(smollm2):
    out = smollm2[1]
    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    chat = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And of Italy?"}]
    rendered = env.from_string(template).render(messages=chat, add_generation_prompt=True)
    assert rendered == ("<|im_start|>system\nAnswer briefly.<|im_end|>\n"
                        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
                        "<|im_start|>user\nAnd of Italy?<|im_end|>\n<|im_start|>assistant\n")
    enc = HFPromptEncoder(out)
    assert enc.chat_template == template and enc.eos_id == 2
    assert enc.render("Hi") == SMOL_SYSTEM + "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_smollm2_greedy_answer_names_paris(smollm2):
    enc = HFPromptEncoder(smollm2[1])
    ids = enc.tokenizer.encode(enc.render("What is the capital of France?"), add_special_tokens=False).ids
    new = lkv_jax.generate(smollm2[2], np.array([ids]), max_new_tokens=12)
    assert "Paris" in enc.tokenizer.decode(new[0].tolist())
