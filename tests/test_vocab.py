"""The built-in word-level vocabulary: ids, round trips, and its Hugging Face tokenizer.json."""

import numpy as np
import pytest

from lkv_jax.data.synthetic import TASKS, encode_builtin, generate_samples
from lkv_jax.data.training_stream import training_sequence
from lkv_jax.data.vocab import EOS, FILLER, NAMES, TAGS, VALUES, Vocab, builtin_vocab, load_vocab
from lkv_jax.tiny_target import ASSET_DIR


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


def _reference_words() -> list[str]:
    """The vocabulary the tiny target was trained with, rebuilt here independently of the package (and of
    the shipped tokenizer.json): specials, structure words, ordinals, filler, then two-syllable
    consonant-vowel words walked with stride 1009, cut into 160 names, 128 values and 16 tags."""
    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    structure = [".", ":", ";", "?", "=", "key", "keys", "all", "var", "chain", "tag", "list", "top"]
    ordinals = [str(i) for i in range(20)]
    filler = ("the grass is green sky blue sun yellow here we go there and back again a day in life of river "
              "stone tree wind road old new small big quiet slow bright dark long short warm cold morning evening "
              "light rain field hill house door window bird song walk far near under over with from into every "
              "people often see it they").split()
    syllables = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]
    pairs = [a + b for a in syllables for b in syllables if a != b]
    taken = set(specials + structure + ordinals + filler)
    pseudo = [w for w in (pairs[(k * 1009) % len(pairs)] for k in range(len(pairs))) if w not in taken]
    return specials + structure + ordinals + filler + pseudo[:160 + 128 + 16]


def test_shipped_tokenizer_keeps_the_ids_the_tiny_target_was_trained_with():
    words = _reference_words()
    v = builtin_vocab()
    assert v.words == tuple(words) and load_vocab(ASSET_DIR).words == tuple(words)
    assert (NAMES, VALUES, TAGS) == (tuple(words[-304:-144]), tuple(words[-144:-16]), tuple(words[-16:]))
    ids = {w: i for i, w in enumerate(words)}
    for task in TASKS:  # every prompt, question and answer: one id per whitespace-separated word, as before
        for length, seed in [(300, 0), (1000, 1), (3000, 2)]:
            for s in generate_samples(task, 2, length, seed=seed):
                for query_aware in (True, False):
                    e = encode_builtin(s, v, query_aware=query_aware)
                    assert e.prompt.tolist() == [1] + [ids[w] for w in s.prompt(query_aware).split()]
                    assert e.question.tolist() == ([] if query_aware else [ids[w] for w in s.question.split()])
                    assert e.target.tolist() == [ids[w] for w in s.target.split()] + [2]
    seq, _ = training_sequence(np.random.default_rng(0), 500, v, p_haystack=0.5, p_recall=0.3)
    assert seq[0] == 1 and v.encode(v.decode(seq, skip_special=False)) == seq.tolist()


def test_load_vocab_refuses_a_real_models_tokenizer(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2}, merges=[("a", "b")])).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match="not a WordLevel"):
        load_vocab(tmp_path)


def test_encode_decode_by_hand():
    v = Vocab.from_words(["<pad>", "<bos>", "<eos>", "<unk>", "key", "a", ":"])
    assert v.encode("key a : zzz", bos=True) == [1, 4, 5, 6, 3]
    assert v.decode([1, 4, 5, 6, 2, 0]) == "key a :"
    assert v.decode([1, 4, 2], skip_special=False) == "<bos> key <eos>"
    with pytest.raises(ValueError, match="not in the vocabulary"):
        v.encode("key zzz", strict=True)
    with pytest.raises(ValueError, match="outside"):
        v.decode([7])
    assert v.encode("<unk> key", strict=True) == [3, 4]  # the word "<unk>" itself is in the vocabulary
    with pytest.raises(ValueError, match="first four"):
        Vocab.from_words(["a", "<pad>", "<bos>", "<eos>"])
    with pytest.raises(ValueError, match="duplicate"):
        Vocab.from_words(["<pad>", "<bos>", "<eos>", "<unk>", "a", "a"])
    with pytest.raises(ValueError, match="whitespace"):
        Vocab.from_words(["<pad>", "<bos>", "<eos>", "<unk>", "a b"])


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
