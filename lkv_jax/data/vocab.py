"""The built-in word-level vocabulary of the project's tiny models.

Every synthetic task is written in words drawn from a few fixed pools (structure words, ordinals, names,
value words, tags, filler), so a prompt tokenises one word to one id and a tiny model needs only a few
hundred embeddings. The same vocabulary is saved as a Hugging Face `tokenizer.json` (WordLevel model,
whitespace pre-tokenizer) beside a shipped model, and loads back with `tokenizers` or `load_vocab`.
"""

from __future__ import annotations

import json
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)  # ids 0, 1, 2, 3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

# words that give the tasks their grammar (records "key K : ..." and questions "? keys K1 K2 : ...")
STRUCTURE = (".", ":", ";", "?", "=", "key", "keys", "all", "var", "chain", "tag", "list", "top")
ORDINALS = tuple(str(i) for i in range(20))
# filler is plain English so a real model reads the haystack as ordinary (if dull) text
FILLER = (
    "the grass is green sky blue sun yellow here we go there and back again a day in life of river "
    "stone tree wind road old new small big quiet slow bright dark long short warm cold morning evening "
    "light rain field hill house door window bird song walk far near under over with from into every "
    "people often see it they"
).split()
_CONSONANTS, _VOWELS = "bdfgklmnprstvz", "aeiou"
N_NAMES, N_VALUES, N_TAGS = 160, 128, 16


def _pseudo_words() -> list[str]:
    """Two-syllable consonant-vowel words (70 x 70 of them), in a fixed scrambled order."""
    syllables = [c + v for c in _CONSONANTS for v in _VOWELS]
    n = len(syllables)
    words = [syllables[i] + syllables[j] for i in range(n) for j in range(n) if i != j]
    # a fixed stride walks the list so consecutive pool entries do not share their first syllable
    stride = 1009  # prime, coprime with len(words) = 4830
    return [words[(k * stride) % len(words)] for k in range(len(words))]


def _pools() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    taken = set(SPECIALS) | set(STRUCTURE) | set(ORDINALS) | set(FILLER)
    words = [w for w in _pseudo_words() if w not in taken]
    names = tuple(words[:N_NAMES])
    values = tuple(words[N_NAMES:N_NAMES + N_VALUES])
    tags = tuple(words[N_NAMES + N_VALUES:N_NAMES + N_VALUES + N_TAGS])
    return names, values, tags


NAMES, VALUES, TAGS = _pools()


class Vocab:
    """A word <-> id table. Unknown words encode to `<unk>`; decoding drops nothing but `<pad>`."""

    def __init__(self, words: list[str] | tuple[str, ...]):
        words = list(words)
        if words[:4] != list(SPECIALS):
            raise ValueError(f"the first four words must be {SPECIALS}, got {words[:4]}")
        if len(set(words)) != len(words):
            dup = sorted({w for w in words if words.count(w) > 1})
            raise ValueError(f"duplicate words in vocabulary: {dup[:5]}")
        if any(not w or any(c.isspace() for c in w) for w in words):
            raise ValueError("vocabulary words must be non-empty and contain no whitespace")
        self.words = tuple(words)
        self.ids = {w: i for i, w in enumerate(words)}

    def __len__(self) -> int:
        return len(self.words)

    pad_id, bos_id, eos_id, unk_id = PAD_ID, BOS_ID, EOS_ID, UNK_ID

    def encode(self, text: str | list[str], *, bos: bool = False, strict: bool = False) -> list[int]:
        """Text (words separated by whitespace) or a word list -> ids; `strict` raises on unknown words."""
        words = text.split() if isinstance(text, str) else list(text)
        if strict:
            unknown = [w for w in words if w not in self.ids]
            if unknown:
                raise ValueError(f"words not in the vocabulary: {unknown[:5]}")
        ids = [self.ids.get(w, UNK_ID) for w in words]
        return [BOS_ID, *ids] if bos else ids

    def decode(self, ids, *, skip_special: bool = True) -> str:
        """ids -> words joined by single spaces (specials dropped when skip_special; `<pad>` always)."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.words):
                raise ValueError(f"token id {i} outside the vocabulary of {len(self.words)}")
            if i == PAD_ID or (skip_special and i < len(SPECIALS)):
                continue
            out.append(self.words[i])
        return " ".join(out)

    # ------------------------------------------------------------------ Hugging Face tokenizer.json
    def to_hf_tokenizer(self):
        """A `tokenizers.Tokenizer` (WordLevel + whitespace-split pre-tokenizer) with the same ids."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel(vocab=dict(self.ids), unk_token=UNK))
        # split on whitespace only: "." and ":" are words of their own, always written with spaces
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with single spaces
        tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
        return tok

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and a matching `tokenizer_config.json` into `directory`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_hf_tokenizer().save(str(directory / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": EOS,
                  "pad_token": PAD, "unk_token": UNK, "model_max_length": 1 << 20,
                  "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        return directory / "tokenizer.json"


def builtin_vocab() -> Vocab:
    """The project's vocabulary: specials, structure words, ordinals, filler, names, values, tags."""
    return Vocab([*SPECIALS, *STRUCTURE, *ORDINALS, *FILLER, *NAMES, *VALUES, *TAGS])


def load_vocab(path: str | Path) -> Vocab:
    """Read a Vocab back from a `tokenizer.json` (or a directory holding one) written by `Vocab.save`."""
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    data = json.loads(path.read_text())
    model = data.get("model", {})
    if model.get("type") != "WordLevel":
        raise ValueError(f"{path} is not a WordLevel tokenizer (model type {model.get('type')!r})")
    vocab = model["vocab"]
    words = sorted(vocab, key=vocab.get)
    if [vocab[w] for w in words] != list(range(len(words))):
        raise ValueError(f"{path}: ids are not contiguous from 0")
    return Vocab(words)
