"""`lkv generate`: token ids and text (tokenizer.json via `tokenizers`) against transformers' greedy
generate, press options, and the errors (exit status 2 with a message)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import build_hf_model, save_hf_model

import lkv_jax
from lkv_jax.cli import main
from lkv_jax.presses import KnormPress, SnapKVPress, StreamingLLMPress

PROMPT = [1, 17, 45, 99, 3, 64, 23, 87, 5, 110, 42, 76, 9, 31, 58, 120, 14, 66, 27, 93]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    hf = build_hf_model("llama")
    return hf, save_hf_model(hf, tmp_path_factory.mktemp("cli") / "llama")


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory, model_dir):
    """The same weights plus a word-level tokenizer.json: token i is the word 'w{i}'."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    hf, _ = model_dir
    path = save_hf_model(hf, tmp_path_factory.mktemp("cli_text") / "llama")
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(128)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(f"{path}/tokenizer.json")
    return hf, path


def hf_greedy(hf, ids, n):
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids)[None], max_new_tokens=n, do_sample=False)
    new = out[0, len(ids):].tolist()
    return new[: new.index(2) + 1] if 2 in new else new  # up to and including EOS (id 2)


def run_cli(capsys, *argv):
    code = main(["generate", *argv])
    out = capsys.readouterr()
    return code, out.out.strip(), out.err


def test_ids_full_kv_match_transformers(model_dir, capsys):
    hf, path = model_dir
    code, out, _ = run_cli(capsys, "--model", path, "--prompt-ids", " ".join(map(str, PROMPT)),
                           "--max-new-tokens", "8")
    assert code == 0
    assert [int(t) for t in out.split()] == hf_greedy(hf, PROMPT, 8)


def test_press_options(model_dir, capsys):
    _, path = model_dir
    ids = ",".join(map(str, PROMPT))
    # the CLI is a thin layer over lkv_jax.generate with the press its options describe
    code, out, _ = run_cli(capsys, "--model", path, "--prompt-ids", ids, "--press",
                           "snapkv:window_size=4:kernel_size=7:pooling=max", "--compression-ratio", "0.5",
                           "--max-new-tokens", "6", "--json")
    assert code == 0
    rec = json.loads(out)
    assert rec["prompt_ids"] == PROMPT and rec["compression_ratio"] == 0.5 and rec["budget"] is None
    press = SnapKVPress(compression_ratio=0.5, window_size=4, kernel_size=7, pooling="max")
    ref = lkv_jax.generate(lkv_jax.load_hf(path), np.asarray([PROMPT]), 6, press=press)[0].tolist()
    assert rec["tokens"] == ref[: len(rec["tokens"])] and len(rec["tokens"]) >= 1


def test_decoding_press_options(model_dir, capsys):
    hf, path = model_dir
    ids = " ".join(map(str, PROMPT))
    # a budget above prompt + answer never evicts: transformers' full-cache greedy answer
    code, out, _ = run_cli(capsys, "--model", path, "--prompt-ids", ids, "--max-new-tokens", "12",
                           "--decoding-press", "tova", "--decoding-budget", "40", "--decoding-interval", "4")
    assert code == 0 and [int(t) for t in out.split()] == hf_greedy(hf, PROMPT, 12)
    # a small one: the options reach lkv_jax.generate's DecodingPress unchanged
    code, out, _ = run_cli(capsys, "--model", path, "--prompt-ids", ids, "--max-new-tokens", "16", "--json",
                           "--press", "knorm", "--budget", "10", "--decoding-press", "streamingllm:n_sink=2",
                           "--decoding-budget", "10", "--decoding-interval", "4", "--keep-recent", "3")
    assert code == 0
    rec = json.loads(out)
    assert (rec["decoding_press"], rec["decoding_budget"], rec["decoding_interval"], rec["keep_recent"]) == (
        "streamingllm:n_sink=2", 10, 4, 3)
    dp = lkv_jax.DecodingPress(StreamingLLMPress(n_sink=2), budget=10, interval=4, keep_recent=3)
    ref = lkv_jax.generate(lkv_jax.load_hf(path), np.asarray([PROMPT]), 16, press=KnormPress(budget=10),
                           decoding_press=dp)[0].tolist()
    assert rec["tokens"] == ref[: len(rec["tokens"])] and len(rec["tokens"]) >= 1


def test_text_in_text_out(text_model_dir, capsys):
    hf, path = text_model_dir
    text = " ".join(f"w{i}" for i in PROMPT)
    code, out, _ = run_cli(capsys, "--model", path, "--prompt", text, "--max-new-tokens", "5", "--press", "tova",
                           "--budget", "64")
    assert code == 0
    expected = hf_greedy(hf, PROMPT, 5)
    assert out.split() == [f"w{i}" for i in expected]


@pytest.mark.parametrize("argv,message", [
    (["--press", "snapkv2", "--budget", "8"], "unknown press"),
    (["--press", "knorm", "--compression-ratio", "1.0"], "compression_ratio"),
    (["--press", "snapkv", "--budget", "8"], "protected"),
    (["--compression-ratio", "0.5"], "need a --press"),
    (["--press", "speckv", "--budget", "40"], "draft-model"),
    (["--decoding-press", "knorm"], "needs --decoding-budget"),
    (["--decoding-budget", "8"], "needs a --decoding-press"),
    (["--decoding-press", "expected-attention", "--decoding-budget", "8"], "cannot score a cache while decoding"),
    (["--decoding-press", "knorm", "--decoding-budget", "8", "--keep-recent", "2"], "compress the prompt first"),
    (["--decoding-press", "knorm", "--decoding-budget", "4"], "hold keep_recent (8)"),
])
def test_errors(model_dir, capsys, argv, message):
    _, path = model_dir
    code, _, err = run_cli(capsys, "--model", path, "--prompt-ids", "1 2 3 4 5 6 7 8 9", *argv)
    assert code == 2 and message in err


def test_text_prompt_needs_a_tokenizer(model_dir, capsys):
    _, path = model_dir
    code, _, err = run_cli(capsys, "--model", path, "--prompt", "hello")
    assert code == 2 and "tokenizer.json" in err
