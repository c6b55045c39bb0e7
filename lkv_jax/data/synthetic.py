"""RULER-style synthetic long-context tasks, generated offline from a seed.

Every task writes a haystack of filler sentences with a few records hidden at chosen depths, then asks a
question whose answer can only be copied from those records, so answering needs the middle of the prompt,
and every answer is several tokens long (eviction shows only after the first generated token, which comes
from the full prefill). The grammar is a handful of words (see `lkv_jax.data.vocab`):

    record      key K : a b c d .            question  ? key K :                  answer  a b c d
    (same key)  key K : a b c d . (x4)       question  ? all key K :             answer  a b c d ; e f g h ; ...
    (4 keys)                                 question  ? keys K1 K2 K3 K4 :      answer  K1 : a b c d ; K2 : ...
    chain       var X1 = V .  var X2 = X1 .  question  ? chain V :               answer  X1 X2 X3 X4 X5
    word counts (Zipf haystack)              question  ? top :                   answer  w1 w2 w3
    tagged      tag T 1 : a b c .            question  ? list T :                answer  T 1 : a b c ; T 2 : ...

Tasks (RULER name in brackets): niah_single, niah_multikey (distractor keys), niah_multivalue, niah_multiquery,
vt (variable tracking, multi-hop), fwe (frequent words) and tag_list (long answer: every record carrying a
tag, in order). A `Sample` holds the text; `encode_builtin` and `HFPromptEncoder` turn it into token ids,
with the question after the context (query-aware) or as a separate segment appended after compression
(question-agnostic). `length` counts context tokens under the tokenisation's counter (words for the built-in
vocabulary), the question excluded.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from lkv_jax.data.vocab import FILLER, NAMES, TAGS, VALUES

Counter = Callable[[str], int]  # text -> number of tokens under some tokenisation


def count_words(text: str) -> int:
    """Token count under the built-in word-level vocabulary."""
    return len(text.split())


@dataclasses.dataclass(frozen=True)
class Sample:
    """One benchmark item.

    context: the haystack text (words separated by single spaces); question: the question segment;
    target: the full expected answer (what a perfect model generates before EOS); references: the strings
    the metric looks for in a prediction; needles: for each hidden record, (word offset in the context,
    record text), in context order; depths: the requested depth of each needle in [0, 1].
    """

    task: str
    context: str
    question: str
    target: str
    references: tuple[str, ...]
    length: int
    needles: tuple[tuple[int, str], ...] = ()
    depths: tuple[float, ...] = ()
    metric: str = "string_match_all"

    @property
    def max_new_tokens(self) -> int:
        """Enough new tokens for the target in the built-in vocabulary, plus EOS and slack."""
        return len(self.target.split()) + 4

    def prompt(self, query_aware: bool = True) -> str:
        """The prompt text: context and question (query-aware) or the context alone."""
        return f"{self.context} {self.question}" if query_aware else self.context


def _pick(rng: np.random.Generator, pool: Sequence[str], n: int) -> list[str]:
    if n > len(pool):
        raise ValueError(f"asked for {n} distinct words from a pool of {len(pool)}")
    return [pool[i] for i in rng.choice(len(pool), n, replace=False)]


def value_words(rng: np.random.Generator, n: int, pool: Sequence[str] = VALUES) -> str:
    """n words of `pool` (default: the value words; repeats allowed) as one string."""
    return " ".join(pool[i] for i in rng.integers(0, len(pool), n))


def key_record(key: str, value: str) -> str:
    return f"key {key} : {value} ."


def var_record(name: str, source: str) -> str:
    return f"var {name} = {source} ."


def tag_record(tag: str, ordinal: int, value: str) -> str:
    return f"tag {tag} {ordinal} : {value} ."


def filler_sentence(rng: np.random.Generator) -> list[str]:
    n = int(rng.integers(4, 11))
    return [FILLER[i] for i in rng.integers(0, len(FILLER), n)] + ["."]


def build_haystack(rng: np.random.Generator, length: int, needles: Sequence[tuple[float, str]],
                   count: Counter = count_words) -> tuple[str, tuple[tuple[int, str], ...]]:
    """Filler sentences of about `length` tokens (under `count`) with each needle inserted at its depth.

    needles: (depth in [0, 1], record text), depth = the fraction of the filler that comes before the record
    (as RULER's depth percent; with one needle, where it starts as a fraction of the context).
    Needles go between sentences, at the boundary closest to their depth, in the order given for equal
    depths. Returns (context text, ((word offset, record text), ...) in context order).
    """
    if length <= 0:
        raise ValueError(f"length must be positive, got {length}")
    for d, _ in needles:
        if not 0.0 <= d <= 1.0:
            raise ValueError(f"needle depth must lie in [0, 1], got {d}")
    need = sum(count(text) for _, text in needles)
    budget = length - need
    if budget < 0:
        raise ValueError(f"length {length} is too short for needles of {need} tokens")
    sentences, n_tok = [], 0
    while n_tok < budget:
        s = filler_sentence(rng)
        c = count(" ".join(s))
        if n_tok + c > budget:  # trim the last sentence so the word count lands exactly (built-in vocab)
            s = s[: max(budget - n_tok, 1)]
            c = count(" ".join(s))
        sentences.append(s)
        n_tok += c
    # cumulative token count at each sentence boundary (boundary i sits before sentence i)
    bounds = np.concatenate([[0], np.cumsum([count(" ".join(s)) for s in sentences])])
    order = sorted(range(len(needles)), key=lambda i: needles[i][0])
    inserts: dict[int, list[str]] = {}
    for i in order:
        d, text = needles[i]
        b = int(np.argmin(np.abs(bounds - d * budget)))
        inserts.setdefault(b, []).append(text)
    words: list[str] = []
    placed = []
    for b in range(len(sentences) + 1):
        for text in inserts.get(b, []):
            placed.append((len(words), text))
            words.extend(text.split())
        if b < len(sentences):
            words.extend(sentences[b])
    return " ".join(words), tuple(placed)


def _depths(rng: np.random.Generator, n: int, depths: Sequence[float] | float | None) -> list[float]:
    if depths is None:
        return sorted(float(x) for x in rng.uniform(0.0, 1.0, n))
    if isinstance(depths, (int, float)):
        return [float(depths)] * n
    if len(depths) != n:
        raise ValueError(f"expected {n} depths, got {len(depths)}")
    return [float(d) for d in depths]


def niah_single(rng, length, *, depth: float | None = None, value_len: int = 4, count: Counter = count_words):
    """One record `key K : v1..vn .` at `depth`; question `? key K :`, answer its value."""
    key = _pick(rng, NAMES, 1)[0]
    value = value_words(rng, value_len)
    d = float(rng.uniform(0.0, 1.0)) if depth is None else float(depth)
    context, placed = build_haystack(rng, length, [(d, key_record(key, value))], count)
    return Sample("niah_single", context, f"? key {key} :", value, (value,), length, placed, (d,))


def niah_multikey(rng, length, *, n_keys: int = 4, depths=None, value_len: int = 4, count: Counter = count_words):
    """n_keys records with distinct keys; the question asks for one of them (the others are distractors)."""
    keys = _pick(rng, NAMES, n_keys)
    values = [value_words(rng, value_len) for _ in keys]
    ds = _depths(rng, n_keys, depths)
    records = [(d, key_record(k, v)) for d, k, v in zip(ds, keys, values, strict=True)]
    context, placed = build_haystack(rng, length, records, count)
    q = int(rng.integers(0, n_keys))
    return Sample("niah_multikey", context, f"? key {keys[q]} :", values[q], (values[q],), length, placed,
                  tuple(ds))


def niah_multivalue(rng, length, *, n_values: int = 4, depths=None, value_len: int = 4,
                    count: Counter = count_words):
    """n_values records share one key; the answer lists all their values, in context order."""
    key = _pick(rng, NAMES, 1)[0]
    values = [value_words(rng, value_len) for _ in range(n_values)]
    ds = _depths(rng, n_values, depths)
    records = [(d, key_record(key, v)) for d, v in zip(ds, values, strict=True)]
    context, placed = build_haystack(rng, length, records, count)
    in_order = [text.split(":", 1)[1].rsplit(".", 1)[0].strip() for _, text in placed]
    return Sample("niah_multivalue", context, f"? all key {key} :", " ; ".join(in_order), tuple(in_order),
                  length, placed, tuple(ds))


def niah_multiquery(rng, length, *, n_queries: int = 4, depths=None, value_len: int = 4,
                    count: Counter = count_words):
    """n_queries records with distinct keys, all asked at once; the answer gives `K : value` for each."""
    keys = _pick(rng, NAMES, n_queries)
    values = [value_words(rng, value_len) for _ in keys]
    ds = _depths(rng, n_queries, depths)
    records = [(d, key_record(k, v)) for d, k, v in zip(ds, keys, values, strict=True)]
    context, placed = build_haystack(rng, length, records, count)
    order = list(rng.permutation(n_queries))  # ask in an order unrelated to the context order
    target = " ; ".join(f"{keys[i]} : {values[i]}" for i in order)
    return Sample("niah_multiquery", context, f"? keys {' '.join(keys[i] for i in order)} :", target,
                  tuple(values[i] for i in order), length, placed, tuple(ds))


def vt(rng, length, *, n_hops: int = 5, n_chains: int = 2, depths=None, count: Counter = count_words):
    """Variable tracking: chains `var X1 = V . var X2 = X1 . ...`; `? chain V :` asks for every variable
    holding V, in assignment order (RULER's multi-hop tracing). The other chains are distractors."""
    names = _pick(rng, NAMES, n_hops * n_chains)
    roots = _pick(rng, VALUES, n_chains)
    chains = [names[c * n_hops:(c + 1) * n_hops] for c in range(n_chains)]
    records = []
    for c in range(n_chains):
        ds = _depths(rng, n_hops, None if depths is None or c else depths)
        src = roots[c]
        for d, name in zip(ds, chains[c], strict=True):
            records.append((d, var_record(name, src)))
            src = name
    # equal depths keep list order, so a chain's records stay in assignment order
    records.sort(key=lambda r: r[0])
    context, placed = build_haystack(rng, length, records, count)
    answer = chains[0]
    return Sample("vt", context, f"? chain {roots[0]} :", " ".join(answer), tuple(answer), length, placed,
                  tuple(d for d, _ in records))


def fwe(rng, length, *, alpha: float = 2.0, n_top: int = 3, count: Counter = count_words):
    """Frequent words: a haystack of value words drawn from a Zipf law (exponent alpha); the answer is
    the n_top most frequent, most frequent first. Resamples until the top n_top counts are distinct."""
    ranks = np.arange(1, len(VALUES) + 1, dtype=np.float64)
    p = ranks ** -alpha
    p /= p.sum()
    words_by_rank = _pick(rng, VALUES, len(VALUES))
    per_word = max(1, count(" ".join(words_by_rank[:8])) // 8)
    n = max(1, length // per_word)
    for _ in range(100):
        draws = rng.choice(len(VALUES), n, p=p)
        counts = np.bincount(draws, minlength=len(VALUES))
        top = np.argsort(-counts, kind="stable")[: n_top + 1]
        if len(set(counts[top].tolist())) == n_top + 1:
            break
    else:
        raise ValueError(f"could not draw distinct top-{n_top} counts at length {length}; use a longer context")
    answer = [words_by_rank[i] for i in top[:n_top]]
    context = " ".join(words_by_rank[i] for i in draws)
    return Sample("fwe", context, "? top :", " ".join(answer), tuple(answer), length)


def tag_list(rng, length, *, n_items: int = 6, n_tags: int = 3, value_len: int = 3, depths=None,
             count: Counter = count_words):
    """Long answer: records `tag T i : a b c .` for several tags, interleaved through the context; the
    question `? list T :` asks for every record of one tag, in order (`T 1 : a b c ; T 2 : ...`)."""
    if not 1 <= n_items <= 19:
        raise ValueError(f"n_items must lie in 1..19 (ordinal words), got {n_items}")
    tags = _pick(rng, TAGS, n_tags)
    records = []
    answer_items = []
    for t, tag in enumerate(tags):
        k = n_items if t == 0 else int(rng.integers(2, n_items + 1))
        ds = _depths(rng, k, None if depths is None or t else depths)
        for i, d in enumerate(ds, start=1):
            v = value_words(rng, value_len)
            records.append((d, tag_record(tag, i, v)))
            if t == 0:
                answer_items.append((tag, i, v))
    records.sort(key=lambda r: r[0])
    context, placed = build_haystack(rng, length, records, count)
    target = " ; ".join(f"{tag} {i} : {v}" for tag, i, v in answer_items)
    return Sample("tag_list", context, f"? list {tags[0]} :", target, tuple(v for _, _, v in answer_items),
                  length, placed, tuple(d for d, _ in records))


TASKS: dict[str, Callable[..., Sample]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "niah_multiquery": niah_multiquery,
    "vt": vt,
    "fwe": fwe,
    "tag_list": tag_list,
}


def generate_samples(task: str, n: int, length: int, *, seed: int = 0, count: Counter = count_words,
                     **params) -> list[Sample]:
    """n samples of one task at one context length; sample i depends only on (seed, task, length, i)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    task_id = list(TASKS).index(task)
    return [TASKS[task](np.random.default_rng([seed, task_id, length, i]), length, count=count, **params)
            for i in range(n)]


@dataclasses.dataclass(frozen=True)
class EncodedSample:
    """Token ids of one sample: prompt [T] (with the question when query-aware), question [Q] (empty when
    query-aware; else the segment the runner appends after compression), target [A] (ends with EOS)."""

    prompt: np.ndarray
    question: np.ndarray
    target: np.ndarray


def encode_builtin(sample: Sample, vocab, *, query_aware: bool = True) -> EncodedSample:
    """Token ids under the built-in vocabulary: `<bos>` + context (+ question)."""
    prompt = vocab.encode(sample.prompt(query_aware), bos=True, strict=True)
    question = [] if query_aware else vocab.encode(sample.question, strict=True)
    target = vocab.encode(sample.target, strict=True) + [vocab.eos_id]
    return EncodedSample(np.asarray(prompt, np.int32), np.asarray(question, np.int32), np.asarray(target, np.int32))


# task instructions for real (instruction-tuned) models; the tiny model reads the bare grammar
_ONE_RECORD = ("Records of the form 'key NAME : WORDS .' are hidden in the text below. Answer with the words of the "
               "record the question names.")
INSTRUCTIONS = {
    "niah_single": _ONE_RECORD,
    "niah_multikey": _ONE_RECORD,
    "niah_multivalue": "Several records of the form 'key NAME : WORDS .' share one name in the text below. "
                       "Answer with the words of every record with the asked name, in order, separated by ' ; '.",
    "niah_multiquery": "Records of the form 'key NAME : WORDS .' are hidden in the text below. For each asked "
                       "name answer 'NAME : WORDS', separated by ' ; '.",
    "vt": "Assignments 'var X = Y .' are hidden in the text below. Answer with every variable that ends up "
          "holding the asked value, in assignment order, separated by spaces.",
    "fwe": "Answer with the three most frequent words of the text below, most frequent first.",
    "tag_list": "Records of the form 'tag TAG N : WORDS .' are hidden in the text below. List every record "
                "with the asked tag, in order, as 'TAG N : WORDS', separated by ' ; '.",
}
_SPLIT = "\u0000QUESTION\u0000"  # marks where the context ends in a rendered chat prompt


class HFPromptEncoder:
    """Token ids for a Hugging Face tokenizer directory: `tokenizer.json` (through `tokenizers`) plus the
    chat template of `tokenizer_config.json` or `chat_template.jinja` when there is one (rendered with
    jinja2, the user turn = instruction + context + question, with the generation prompt).

    `count` gives context lengths in this tokenizer's tokens (pass it to `generate_samples`).
    """

    def __init__(self, directory, *, use_chat_template: bool = True, instructions: bool = True):
        from tokenizers import Tokenizer

        directory = Path(directory)
        if not (directory / "tokenizer.json").exists():
            raise FileNotFoundError(f"{directory} has no tokenizer.json")
        self.tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
        cfg_path = directory / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text()) if cfg_path.exists() else {}
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template}
            template = named.get("default") or next(iter(named.values()), None)
        if template is None and (directory / "chat_template.jinja").exists():
            template = (directory / "chat_template.jinja").read_text()
        self.chat_template = template if use_chat_template else None
        self.instructions = instructions
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token", "pad_token")}
        eos = self.special["eos_token"]
        self.eos_id = self.tokenizer.token_to_id(eos) if eos else None

    def count(self, text: str) -> int:
        return len(self.tokenizer.encode(text, add_special_tokens=False).ids)

    def render(self, user: str) -> str:
        """The chat-formatted prompt text of one user turn (the raw text when there is no template)."""
        if self.chat_template is None:
            return user
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        # Llama 3.x templates print today's date; a fixed date keeps prompts reproducible
        env.globals["strftime_now"] = lambda fmt: datetime.date(2026, 1, 1).strftime(fmt)
        env.filters["tojson"] = lambda x, indent=None, **_: json.dumps(x, indent=indent)
        return env.from_string(self.chat_template).render(
            messages=[{"role": "user", "content": user}], add_generation_prompt=True,
            bos_token=self.special["bos_token"] or "", eos_token=self.special["eos_token"] or "")

    def encode(self, sample: Sample, *, query_aware: bool = True) -> EncodedSample:
        """prompt ids [T] (+ question ids [Q] when question-agnostic) and target ids [A] (+ EOS if known)."""
        head = f"{INSTRUCTIONS[sample.task]}\n\n" if self.instructions else ""
        text = self.render(f"{head}{sample.context}{_SPLIT}\n\n{sample.question}")
        context_part, question_part = text.split(_SPLIT)
        templated = self.chat_template is not None
        # a chat template writes the BOS itself; without one the tokenizer's post-processor adds it
        enc = lambda s, special: self.tokenizer.encode(s, add_special_tokens=special).ids
        if query_aware:
            prompt, question = enc(context_part + question_part, not templated), []
        else:
            prompt, question = enc(context_part, not templated), enc(question_part, False)
        target = enc(" " + sample.target if not templated else sample.target, False)
        if self.eos_id is not None:
            target.append(self.eos_id)
        return EncodedSample(np.asarray(prompt, np.int32), np.asarray(question, np.int32), np.asarray(target, np.int32))


def _token_text(tok) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts
    if isinstance(tok, dict):
        return tok.get("content")
    return tok
