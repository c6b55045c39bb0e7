"""The tokenizer a GGUF file describes, rebuilt as Hugging Face `tokenizer.json` + `tokenizer_config.json`.

llama.cpp stores a byte-level BPE vocabulary as `tokenizer.ggml.*` metadata: the tokens (in id order), the merges,
a per-token type (control tokens are the special ones) and the special ids; the pre-tokenizer is only named
(`tokenizer.ggml.pre`), so each name llama.cpp knows maps here to the `tokenizers` pre-tokenizer with the same
splitting regex. Only `tokenizer.ggml.model == "gpt2"` (byte-level BPE: GPT-2, Llama 3, Qwen, SmolLM) is built;
SentencePiece vocabularies (`llama`) are refused with a clear error.
"""

from __future__ import annotations

import json
from typing import Any

from gguf import Keys, TokenType
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from lkv_jax.config import UnsupportedModelError

K = Keys.Tokenizer
SUPPORTED_MODELS = ("gpt2",)

# llama.cpp pre-tokenizer names (src/llama-vocab.cpp) grouped by the splitting they share
_GPT2 = ("gpt-2", "phi-2", "roberta-bpe", "mpt", "olmo", "jais")
_DIGITS_GPT2 = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b")
_QWEN2 = ("qwen2", "stablelm2", "megrez")
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3")
SUPPORTED_PRE = _GPT2 + _DIGITS_GPT2 + _QWEN2 + _LLAMA3
# Qwen2 and Llama 3 split with their own regex (digits one at a time / up to three), then map bytes without GPT-2's
_QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_REGEX = _QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")


def pre_tokenizer(pre: str):
    """The `tokenizers` pre-tokenizer of a llama.cpp pre-tokenizer name (raises UnsupportedModelError)."""
    if pre in _GPT2:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGITS_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in _QWEN2 or pre in _LLAMA3:
        regex = _QWEN2_REGEX if pre in _QWEN2 else _LLAMA3_REGEX
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise UnsupportedModelError(f"GGUF pre-tokenizer {pre!r} is not supported; supported: {', '.join(SUPPORTED_PRE)}")


def check_supported(meta: dict[str, Any]) -> None:
    """Raise UnsupportedModelError unless `build_tokenizer` can rebuild this file's tokenizer."""
    if K.HF_JSON in meta:
        return
    model = meta.get(K.MODEL)
    if model not in SUPPORTED_MODELS:
        raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported; supported: "
                                    f"{', '.join(SUPPORTED_MODELS)} (byte-level BPE)")
    pre_tokenizer(meta.get(K.PRE, "default"))


def _add_bos_eos(meta: dict[str, Any]) -> tuple[bool, bool]:
    # llama.cpp's defaults when the file does not say: Llama 3 prepends BOS, other byte-level BPEs add nothing
    add_bos = meta.get(K.ADD_BOS, meta.get(K.PRE) in _LLAMA3)
    return bool(add_bos), bool(meta.get(K.ADD_EOS, False))


def build_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` from GGUF metadata ({key: value} as `read_metadata` gives)."""
    if K.HF_JSON in meta:  # some converters embed the original tokenizer.json verbatim
        return Tokenizer.from_str(meta[K.HF_JSON])
    check_supported(meta)
    tokens: list[str] = list(meta[K.LIST])
    vocab = {t: i for i, t in enumerate(tokens)}
    if len(vocab) != len(tokens):
        dup = next(t for i, t in enumerate(tokens) if vocab[t] != i)
        raise UnsupportedModelError(f"GGUF vocabulary repeats the token {dup!r}; a BPE vocabulary cannot")
    merges = [tuple(m.split(" ", 1)) for m in meta.get(K.MERGES, [])]
    pre = meta.get(K.PRE, "default")
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3))
    tok.pre_tokenizer = pre_tokenizer(pre)
    tok.decoder = decoders.ByteLevel()
    types = meta.get(K.TOKEN_TYPE) or [TokenType.NORMAL] * len(tokens)
    # control tokens are the special ones; user-defined ones are matched whole but decoded as text
    added = [AddedToken(tokens[i], special=t == TokenType.CONTROL, normalized=False)
             for i, t in enumerate(types) if t in (TokenType.CONTROL, TokenType.USER_DEFINED)]
    tok.add_tokens([a for a in added if not a.special])
    tok.add_special_tokens([a for a in added if a.special])
    tok.post_processor = _post_processor(meta, tokens)
    return tok


def _post_processor(meta: dict[str, Any], tokens: list[str]):
    add_bos, add_eos = _add_bos_eos(meta)
    bos, eos = meta.get(K.BOS_ID), meta.get(K.EOS_ID)
    add_bos, add_eos = add_bos and bos is not None, add_eos and eos is not None
    if not (add_bos or add_eos):
        return processors.ByteLevel(trim_offsets=False)
    specials = ([(tokens[bos], bos)] if add_bos else []) + ([(tokens[eos], eos)] if add_eos else [])
    wrap = lambda body: " ".join(([f"{tokens[bos]}:0"] if add_bos else []) + [body]
                                 + ([f"{tokens[eos]}:0"] if add_eos else []))
    return processors.TemplateProcessing(single=wrap("$A:0"), pair=wrap("$A:0") + " " + wrap("$B:1"),
                                         special_tokens=specials)


def special_token_ids(meta: dict[str, Any]) -> dict[str, Any]:
    """{bos_token_id, eos_token_id, pad_token_id} for config.json / generation_config.json.

    eos_token_id is a list when the file also names distinct end-of-turn / end-of-message tokens (Llama 3
    instruct), so that generation stops on each of them."""
    eos = [meta[k] for k in (K.EOS_ID, K.EOT_ID, K.EOM_ID) if meta.get(k) is not None]
    eos = list(dict.fromkeys(int(e) for e in eos))
    return {"bos_token_id": meta.get(K.BOS_ID), "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": meta.get(K.PAD_ID)}


def tokenizer_config(meta: dict[str, Any], max_length: int | None = None) -> dict[str, Any]:
    """The tokenizer_config.json: special token texts, BOS/EOS insertion and the chat template."""
    tokens = meta.get(K.LIST) or []
    text = lambda key: tokens[meta[key]] if meta.get(key) is not None and meta[key] < len(tokens) else None
    add_bos, add_eos = _add_bos_eos(meta)
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": text(K.BOS_ID), "eos_token": text(K.EOS_ID),
           "pad_token": text(K.PAD_ID), "unk_token": text(K.UNK_ID), "add_bos_token": add_bos,
           "add_eos_token": add_eos, "clean_up_tokenization_spaces": False}
    if max_length is not None:
        cfg["model_max_length"] = max_length
    if meta.get(K.CHAT_TEMPLATE):
        cfg["chat_template"] = meta[K.CHAT_TEMPLATE]
    return cfg


def tokenizer_files(meta: dict[str, Any], max_length: int | None = None) -> dict[str, str]:
    """{file name: text} of tokenizer.json and tokenizer_config.json."""
    return {"tokenizer.json": build_tokenizer(meta).to_str(),
            "tokenizer_config.json": json.dumps(tokenizer_config(meta, max_length), indent=2, ensure_ascii=False)}
