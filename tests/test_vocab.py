"""The built-in word-level vocabulary: ids, round trips, and its Hugging Face tokenizer.json."""

import numpy as np
import pytest

from lkv_jax.data.synthetic import TASKS, generate_samples
from lkv_jax.data.vocab import EOS, FILLER, NAMES, TAGS, VALUES, Vocab, builtin_vocab, load_vocab


def test_specials_and_pools():
    v = builtin_vocab()
    assert v.words[:3] == ("<pad>", "<bos>", "<eos>") and (v.pad_id, v.bos_id, v.eos_id) == (0, 1, 2)
    assert len(set(v.words)) == len(v.words) and len(v) < 512
    # name / value / tag words are 4 letters, so one can never be a substring of another word's match
    assert all(len(w) == 4 for w in NAMES + VALUES + TAGS)
    assert not set(NAMES) & set(VALUES) and not set(VALUES) & set(TAGS) and not set(FILLER) & set(NAMES)


def test_every_task_word_is_in_the_vocabulary():
    v = builtin_vocab()
    for task in TASKS:
        s = generate_samples(task, 2, 256, seed=3)[0]
        for text in (s.context, s.question, s.target):
            assert v.decode(v.encode(text, strict=True)) == text


def test_encode_decode_by_hand():
    v = Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "key", "a", ":"])
    assert v.encode("key a : zzz", bos=True) == [1, 4, 5, 6, 3]
    assert v.decode([1, 4, 5, 6, 2, 0]) == "key a :"
    assert v.decode([1, 4, 2], skip_special=False) == "<bos> key <eos>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("key zzz", strict=True)
    with pytest.raises(ValueError, match="outside"):
        v.decode([7])
    with pytest.raises(ValueError, match="first four"):
        Vocab(["a", "<pad>", "<bos>", "<eos>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocab(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"])


def test_hf_tokenizer_json_round_trip(tmp_path):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    v = builtin_vocab()
    v.save(tmp_path)
    s = generate_samples("niah_multiquery", 1, 128, seed=0)[0]
    text = s.prompt() + " " + s.target + " " + EOS
    expected = v.encode(text, strict=True)
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.encode(text, add_special_tokens=False).ids == expected
    assert tok.decode(expected, skip_special_tokens=True) == s.prompt() + " " + s.target
    assert load_vocab(tmp_path).words == v.words
    # transformers reads the directory as any Hub tokenizer (an independent reader of the same files)
    hf = AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.encode(text, add_special_tokens=False) == expected
    assert (hf.eos_token_id, hf.pad_token_id, hf.bos_token_id) == (2, 0, 1)
    assert hf.decode(np.asarray(expected), skip_special_tokens=True) == s.prompt() + " " + s.target
