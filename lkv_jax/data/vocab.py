"""The built-in word-level vocabulary of the project's tiny models: a `tokenizers.Tokenizer`.

Every synthetic task is written in words drawn from a few fixed pools (structure words, ordinals, names,
value words, tags, filler), so a prompt tokenises one word to one id and a tiny model needs only a few
hundred embeddings. The vocabulary is the tiny target's `tokenizer.json` (lkv_jax/assets/tiny_target/: a
WordLevel model whose pre-tokenizer splits on whitespace), read with `tokenizers` as a real model's is; its
words are, in id order, the four specials, then the pools below (plain English filler, so a real model reads
the haystack as ordinary if dull text; four-letter consonant-vowel pseudo-words for names, values and tags).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
BUILTIN_DIR = Path(__file__).parents[1] / "assets" / "tiny_target"


class Vocab:
    """A WordLevel tokenizer with the synthetic tasks' conventions: `encode` adds no specials unless asked
    (`bos`) and can refuse unknown words (`strict`); `decode` drops `<pad>` always."""

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def __init__(self, tokenizer: Tokenizer):
        if not isinstance(tokenizer.model, models.WordLevel):
            raise ValueError(f"not a WordLevel tokenizer (model {type(tokenizer.model).__name__})")
        ids = tokenizer.get_vocab(with_added_tokens=True)
        words = sorted(ids, key=ids.get)
        if [ids[w] for w in words] != list(range(len(words))):
            raise ValueError("the tokenizer's ids are not contiguous from 0")
        if words[:4] != list(SPECIALS):
            raise ValueError(f"the first four words must be {SPECIALS}, got {words[:4]}")
        self.tokenizer = tokenizer
        self.words = tuple(words)

    @classmethod
    def from_words(cls, words: list[str] | tuple[str, ...]) -> Vocab:
        """The WordLevel tokenizer of a word list (id = position; specials first), whitespace-split."""
        words = list(words)
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"duplicate words in vocabulary: {dup[:5]}")
        if any(not w or any(c.isspace() for c in w) for w in words):
            raise ValueError("vocabulary words must be non-empty and contain no whitespace")
        tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words)}, unk_token=UNK))
        # split on whitespace only: "." and ":" are words of their own, always written with spaces
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        return cls(tok)

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str, *, bos: bool = False, strict: bool = False) -> list[int]:
        """Text (words separated by whitespace) -> ids; `strict` raises on unknown words."""
        enc = self.tokenizer.encode(text, add_special_tokens=False)
        ids = enc.ids
        if strict and UNK_ID in ids:
            unknown = [text[a:b] for (a, b), i in zip(enc.offsets, ids, strict=True) if i == UNK_ID]
            unknown = [w for w in unknown if w != UNK]
            if unknown:
                raise ValueError(f"words not in the vocabulary: {unknown[:5]}")
        return [BOS_ID, *ids] if bos else ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """ids -> words joined by single spaces (specials dropped when skip_special; `<pad>` always)."""
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < len(self.words):
                raise ValueError(f"token id {i} outside the vocabulary of {len(self.words)}")
        return self.tokenizer.decode([i for i in ids if i != PAD_ID], skip_special_tokens=skip_special)

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a matching `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "pad_token": PAD, "unk_token": UNK, "model_max_length": 1 << 20,
                  "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory / "tokenizer.json"


def load_vocab(path: str | Path) -> Vocab:
    """The Vocab of a WordLevel `tokenizer.json` (or a directory holding one); ValueError for any other
    tokenizer (a real model's)."""
    path = Path(path)
    return Vocab(Tokenizer.from_file(str(path / "tokenizer.json" if path.is_dir() else path)))


@functools.cache
def builtin_vocab() -> Vocab:
    """The project's vocabulary: the tiny target's tokenizer.json."""
    return load_vocab(BUILTIN_DIR)


def _pools() -> tuple[tuple[str, ...], ...]:
    """The word pools after the specials, in id order, cut by their sizes."""
    sizes = (13, 20, 62, 160, 128, 16)  # structure, ordinals 0-19, filler, names, values, tags
    words, start, pools = builtin_vocab().words, len(SPECIALS), []
    for n in sizes:
        pools.append(words[start:start + n])
        start += n
    if start != len(words):
        raise ValueError(f"{BUILTIN_DIR / 'tokenizer.json'}: {len(words)} words, the pools hold {start}")
    return tuple(pools)


# STRUCTURE: the words of the tasks' grammar (records "key K : ..." and questions "? keys K1 K2 : ...")
STRUCTURE, ORDINALS, FILLER, NAMES, VALUES, TAGS = _pools()
