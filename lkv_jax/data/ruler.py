"""RULER's synthetic tasks on the essay haystack, sized in a model's tokenizer (text level).

Follows NVIDIA RULER (github.com/NVIDIA/RULER): the task configurations of `scripts/synthetic.yaml`, the
templates, answer prefixes and generation lengths of `scripts/data/synthetic/constants.py`, and the generators
`niah.py`, `variable_tracking.py`, `common_words_extraction.py` and `freq_words_extraction.py`. As there, the
whole prompt (model template, task template, answer prefix) plus the tokens to generate fits in `length`
tokens, the haystack sized by binary search over its number of units (noise sentences, needle sentences,
essay words, listed words); every metric is `string_match_all`. Where RULER needs what we do not have:

* words: RULER draws niah's word keys (`adjective-noun`) and cwe's words from the `wonderwords` package;
  here both come from `word_list(split)`, the lowercase alphabetic words of 4 to 12 letters of the split's
  essays minus their 100 most frequent (function words such as "that", "with"); a word key is two of them
  joined by "-".
* sentences: RULER splits the essay haystack with nltk's punkt; here after ".", "!" or "?" before a space.
* haystack: RULER concatenates all essays; here only the `split` half ("eval" for evaluation, "train" for
  training prompts), so no training prompt shares a sentence with an evaluation prompt. Like RULER, the essay
  haystack starts at the first word; `random_start=True` (training) starts it at a random word instead.
* draws: the needle haystack's keys are redrawn when they hit an asked key, vt's names are distinct (RULER
  leaves both to chance).
* randomness: one numpy Generator per sample, seeded by (seed, task, length, index, split), so sample i does
  not depend on how many samples are drawn; RULER reseeds some shuffles with its fixed run seed.
* length search: RULER searches once per task and shrinks per sample; here each sample is searched.
* vt's in-context example (about 500 tokens, before the task) is drawn with three-letter names and a random
  value directly, where RULER draws "12345" and renames afterwards; cwe's few-shot example and vt's example
  use the bare task template (they sit in the user turn), where RULER wraps them in the model template too.
"""

from __future__ import annotations

import dataclasses
import re
import string
import uuid
import zlib
from collections import Counter as _WordCounts
from collections.abc import Callable
from functools import cache

import numpy as np

from lkv_jax.data.essays import SPLITS, load_essays

# ----------------------------------------------------------------------------------------------
# RULER's constants


@dataclasses.dataclass(frozen=True)
class Family:
    """One of RULER's task scripts: template (with {context}), answer prefix, tokens to generate, metric."""

    template: str
    answer_prefix: str
    tokens_to_generate: int
    metric: str = "string_match_all"


FAMILIES = {  # scripts/data/synthetic/constants.py and scripts/eval/synthetic/constants.py
    "niah": Family(
        "Some special magic {type_needle_v} are hidden within the following text. Make sure to memorize it. "
        "I will quiz you about the {type_needle_v} afterwards.\n{context}\n"
        "What are all the special magic {type_needle_v} for {query} mentioned in the provided text?",
        " The special magic {type_needle_v} for {query} mentioned in the provided text are", 128),
    "variable_tracking": Family(
        "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n{context}\n"
        "Question: Find all variables that are assigned the value {query} in the text above.",
        " Answer: According to the chain(s) of variable assignment in the text above, {num_v} variables are "
        "assigned the value {query}, they are: ", 30),
    "common_words_extraction": Family(
        "Below is a numbered list of words. In these words, some appear more often than others. Memorize the "
        "ones that appear most often.\n{context}\nQuestion: What are the 10 most common words in the above list?",
        " Answer: The top 10 words that appear most often in the list are:", 120),
    "freq_words_extraction": Family(
        "Read the following coded text and track the frequency of each coded word. Find the three most "
        "frequently appeared coded words. {context}\nQuestion: Do not provide any explanation. Please ignore the "
        "dots '....'. What are the three most frequently appeared words in the above coded text?",
        " Answer: According to the coded text above, the three most frequently appeared words are:", 50),
}


def _niah(haystack: str, key: str, value: str, k: int = 1, v: int = 1, q: int = 1) -> tuple[str, dict]:
    return "niah", dict(type_haystack=haystack, type_needle_k=key, type_needle_v=value,
                        num_needle_k=k, num_needle_v=v, num_needle_q=q)


TASKS: dict[str, tuple[str, dict]] = {  # scripts/synthetic.yaml, less qa_1/qa_2 (they need SQuAD, HotpotQA)
    "niah_single_1": _niah("noise", "words", "numbers"),
    "niah_single_2": _niah("essay", "words", "numbers"),
    "niah_single_3": _niah("essay", "words", "uuids"),
    "niah_multikey_1": _niah("essay", "words", "numbers", k=4),
    "niah_multikey_2": _niah("needle", "words", "numbers"),
    "niah_multikey_3": _niah("needle", "uuids", "uuids"),
    "niah_multivalue": _niah("essay", "words", "numbers", v=4),
    "niah_multiquery": _niah("essay", "words", "numbers", q=4),
    "vt": ("variable_tracking", dict(type_haystack="noise", num_chains=1, num_hops=4)),
    "cwe": ("common_words_extraction", dict(freq_cw=30, freq_ucw=3, num_cw=10)),
    "fwe": ("freq_words_extraction", dict(alpha=2.0)),
}
LENGTHS = (1024, 2048, 4096, 8192)

NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
DEPTHS = tuple(int(d) for d in np.round(np.linspace(0, 100, num=40, endpoint=True)))  # needle depths, percent
VT_EXAMPLE_TOKENS = 500  # variable_tracking.py sizes its in-context example to 500 tokens
MIN_UNITS = 5  # the smallest haystack searched (RULER starts its searches at 5 or more units)


# ----------------------------------------------------------------------------------------------
# samples


@dataclasses.dataclass(frozen=True)
class RulerSample:
    """One RULER prompt, as text.

    The user turn is `context + question`: context = everything up to the end of the haystack (in-context
    example, task instructions, haystack), question = the rest of the task template (starts with "\\n").
    The model's turn starts with `answer_prefix`. references: the strings `metric` looks for in the
    prediction; target: an answer that scores 1, written as RULER's examples write answers. evidence: the
    inserted strings (needles, assignments) the answer is read from, distractors: other needle-like strings,
    each occurring verbatim in `context`.
    """

    task: str
    length: int
    index: int
    split: str
    context: str
    question: str
    answer_prefix: str
    references: tuple[str, ...]
    target: str
    metric: str
    tokens_to_generate: int
    evidence: tuple[str, ...] = ()
    distractors: tuple[str, ...] = ()

    @property
    def user(self) -> str:
        """The user turn: context + question."""
        return self.context + self.question

    @property
    def text(self) -> str:
        """The prompt under RULER's `base` model template: user turn + answer prefix."""
        return self.user + self.answer_prefix


Counter = Callable[[RulerSample], int]  # tokens of a sample's whole prompt, as the model reads it


@dataclasses.dataclass(frozen=True)
class _Spec:
    """What a builder needs besides its random generator and haystack size."""

    task: str
    length: int
    index: int
    split: str
    random_start: bool
    args: dict

    def sample(self, family: str, **fields) -> RulerSample:
        f = FAMILIES[family]
        return RulerSample(task=self.task, length=self.length, index=self.index, split=self.split,
                           metric=f.metric, tokens_to_generate=f.tokens_to_generate, **fields)


def _lead(answer_prefix: str) -> str:
    # a continuation after "... are" starts with a space; after "they are: " it does not
    return "" if answer_prefix.endswith(" ") else " "


def _parts(template: str, **fields) -> tuple[str, str]:
    """A template split at {context} and formatted piece by piece (the haystack may hold braces)."""
    before, after = template.split("{context}")
    return before.format(**fields), after.format(**fields)


# ----------------------------------------------------------------------------------------------
# words and haystacks


@cache
def essay_words(split: str) -> tuple[str, ...]:
    """The split's essays, concatenated in file order, as whitespace-separated words (RULER's essay haystack)."""
    return tuple(" ".join(load_essays(split)).split())


@cache
def word_list(split: str) -> tuple[str, ...]:
    """Sorted distinct lowercase alphabetic words of 4-12 letters in the split's essays, less the 100 most
    frequent: the stand-in for RULER's `wonderwords` nouns, adjectives and verbs."""
    counts = _WordCounts(w for e in load_essays(split) for w in re.findall(r"(?<![\w'-])[a-z]{4,12}(?![\w'-])", e))
    frequent = {w for w, _ in counts.most_common(100)}
    return tuple(sorted(set(counts) - frequent))


def split_sentences(text: str) -> list[str]:
    """Sentences of single-spaced text: a break after ".", "!" or "?" before a space (`" ".join` restores it)."""
    return re.split(r"(?<=[.!?]) ", text.strip())


def random_value(rng: np.random.Generator, kind: str, words: tuple[str, ...]) -> str:
    """RULER's needle keys and values: a 7-digit number, a word key `w1-w2` or a version-4 uuid."""
    if kind == "numbers":
        return str(int(rng.integers(10**6, 10**7)))
    if kind == "words":
        a, b = rng.integers(0, len(words), 2)
        return f"{words[a]}-{words[b]}"
    if kind == "uuids":
        return str(uuid.UUID(int=int.from_bytes(rng.bytes(16), "big"), version=4))
    raise ValueError(f"unknown needle type {kind!r}")


def essay_haystack(rng: np.random.Generator, n_words: int, split: str, random_start: bool) -> str:
    """n_words essay words (wrapping around the split), from the first word or a random one, single-spaced."""
    words = essay_words(split)
    start = int(rng.integers(0, len(words))) if random_start else 0
    return " ".join(words[(start + i) % len(words)] for i in range(n_words))


def insert_in_essay(rng: np.random.Generator, text: str, needles: list[str]) -> str:
    """niah.py's essay insertion: needles in order at sentence boundaries int(n_sentences * depth / 100),
    depths drawn without replacement from DEPTHS, all pieces joined by one space."""
    sents = split_sentences(text)
    depths = rng.choice(DEPTHS, len(needles), replace=False)
    cuts = [0] + sorted(int(len(sents) * (int(d) / 100)) for d in depths) + [len(sents)]
    pieces = []
    for i in range(1, len(cuts)):
        pieces.append(" ".join(sents[cuts[i - 1]:cuts[i]]))
        if i - 1 < len(needles):
            pieces.append(needles[i - 1])
    return " ".join(pieces)


def insert_in_lines(rng: np.random.Generator, lines: list[str], needles: list[str]) -> list[str]:
    """niah.py's noise/needle insertion: needles at distinct line indices, inserted from the last index down."""
    if len(lines) < len(needles):
        raise ValueError(f"{len(lines)} haystack lines cannot hold {len(needles)} needles")
    out = list(lines)
    at = sorted((int(i) for i in rng.choice(len(lines), len(needles), replace=False)), reverse=True)
    for index, needle in zip(at, needles, strict=True):
        out.insert(index, needle)
    return out


# ----------------------------------------------------------------------------------------------
# niah


def _niah_template(n_answers: int, type_v: str) -> tuple[str, str, str]:
    """(template, answer prefix, needle type word): niah.py's singular rewrite when one value is asked."""
    f = FAMILIES["niah"]
    template, prefix = f.template, f.answer_prefix
    if n_answers == 1:
        for old, new in (("Some", "A"), ("are all", "is"), ("are", "is"), ("answers", "answer")):
            template, prefix = template.replace(old, new), prefix.replace(old, new)
        type_v = type_v[:-1]
    return template, prefix, type_v


def build_niah(rng: np.random.Generator, n: int, spec: _Spec) -> RulerSample:
    """niah.py with n haystack units: noise sentences, needle sentences or essay words."""
    a = spec.args
    words = word_list(spec.split)
    n_keys, type_v = max(a["num_needle_k"], a["num_needle_q"]), a["type_needle_v"]
    keys, values, needles = [], [], []
    for _ in range(n_keys):
        keys.append(random_value(rng, a["type_needle_k"], words))
        values.append([random_value(rng, type_v, words) for _ in range(a["num_needle_v"])])
        needles += [NEEDLE.format(type_needle_v=type_v, key=keys[-1], value=v) for v in values[-1]]
    needles = [needles[i] for i in rng.permutation(len(needles))]
    distractors = []
    if a["type_haystack"] == "essay":
        haystack = insert_in_essay(rng, essay_haystack(rng, n, spec.split, spec.random_start), needles)
    else:
        if a["type_haystack"] == "noise":
            lines = [NOISE] * n
        else:  # "needle": every haystack line is a needle of another key (redrawn if it hits a real key)
            lines = []
            while len(lines) < n:
                key = random_value(rng, a["type_needle_k"], words)
                if key not in keys:
                    lines.append(NEEDLE.format(type_needle_v=type_v, key=key, value=random_value(rng, type_v, words)))
            distractors = list(lines)
        haystack = "\n".join(insert_in_lines(rng, lines, needles))
    asked = [int(i) for i in rng.choice(n_keys, a["num_needle_q"], replace=False)]
    queries = [keys[i] for i in asked]
    answers = tuple(v for i in asked for v in values[i])
    query = ", ".join(queries[:-1]) + ", and " + queries[-1] if len(queries) > 1 else queries[0]
    template, prefix, type_word = _niah_template(len(answers), type_v)
    head, question = _parts(template, type_needle_v=type_word, query=query)
    evidence = tuple(NEEDLE.format(type_needle_v=type_v, key=keys[i], value=v) for i in asked for v in values[i])
    distractors += [s for s in needles if s not in evidence]
    prefix = prefix.format(type_needle_v=type_word, query=query)
    return spec.sample("niah", context=head + haystack, question=question, answer_prefix=prefix,
                       references=answers, target=_lead(prefix) + ", ".join(answers) + ".", evidence=evidence,
                       distractors=tuple(distractors))


# ----------------------------------------------------------------------------------------------
# variable tracking


def _var_names(rng: np.random.Generator, n: int, letters: int) -> list[str]:
    names: list[str] = []
    while len(names) < n:  # distinct names (RULER's redraw loop may keep duplicates)
        name = "".join(string.ascii_uppercase[i] for i in rng.integers(0, 26, letters))
        if name not in names:
            names.append(name)
    return names


def build_vt(rng: np.random.Generator, n: int, spec: _Spec, *, example: str = "", letters: int = 5) -> RulerSample:
    """variable_tracking.py (noise haystack): chains `VAR X1 = 12345`, `VAR X2 = VAR X1 `, ... as lines among
    n noise lines; the answer is every variable of the first chain. `example` (an answered prompt) goes first."""
    hops, n_chains = spec.args["num_hops"], spec.args["num_chains"]
    names = _var_names(rng, (hops + 1) * n_chains, letters)
    chains, value = [], str(int(rng.integers(10000, 99999)))
    for c in range(n_chains):
        v = names[c * (hops + 1):(c + 1) * (hops + 1)]
        start = value if c == 0 else str(int(rng.integers(10000, 99999)))
        chains.append([f"VAR {v[0]} = {start}"] + [f"VAR {v[j + 1]} = VAR {v[j]} " for j in range(hops)])
    lines = [NOISE] * n
    for chain in chains:  # a chain's lines keep their order: each goes after the previous one
        at = sorted(int(i) for i in rng.choice(len(lines), len(chain), replace=False))
        for j, i in enumerate(at):
            lines.insert(i + j, chain[j])
    haystack = "\n".join(lines).replace(". \n", ".\n")
    f = FAMILIES["variable_tracking"]
    head, question = _parts(f.template, query=value, num_v=hops + 1)
    prefix = f.answer_prefix.format(query=value, num_v=hops + 1)
    refs = tuple(names[:hops + 1])
    return spec.sample("variable_tracking", context=example + head + haystack, question=question,
                       answer_prefix=prefix, references=refs, target=_lead(prefix) + " ".join(refs),
                       evidence=tuple(chains[0]), distractors=tuple(s for c in chains[1:] for s in c))


def vt_example(rng: np.random.Generator, spec: _Spec, count: Counter) -> str:
    """variable_tracking.py's in-context example: a vt prompt with three-letter names sized to 500 tokens,
    answered (`answer prefix + " " + names + "\\n"`), followed by the "\\n" that separates it from the task."""
    key = int(rng.integers(2**63))  # one draw: every candidate size must see the same names and value
    ex = fit(lambda n: build_vt(np.random.default_rng(key), n, spec, letters=3), count, VT_EXAMPLE_TOKENS)
    return ex.text + " " + " ".join(ex.references) + "\n" + "\n"


# ----------------------------------------------------------------------------------------------
# common words extraction


def numbered(words: list[str] | tuple[str, ...]) -> str:
    """cwe's list format: "1. w1 2. w2 ..."."""
    return " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))


def cwe_list(rng: np.random.Generator, words: tuple[str, ...], n_words: int, common_repeats: int,
             uncommon_repeats: int, n_common: int) -> tuple[str, list[str]]:
    """common_words_extraction.py's get_example: n_words distinct words, the first n_common repeated
    common_repeats times, the others uncommon_repeats times, shuffled and numbered -> (list text, common)."""
    if n_words > len(words):
        raise ValueError(f"cwe needs {n_words} distinct words, the word list has {len(words)}")
    # a prefix of one permutation: a larger n_words adds words and keeps the others (the size search needs it)
    chosen = [words[i] for i in rng.permutation(len(words))[:n_words]]
    common, uncommon = chosen[:n_common], chosen[n_common:]
    items = common * common_repeats + uncommon * uncommon_repeats
    return numbered([items[i] for i in rng.permutation(len(items))]), common


def build_cwe(rng: np.random.Generator, n: int, spec: _Spec) -> RulerSample:
    """common_words_extraction.py: one answered few-shot list, then a list of n distinct words. Below 4096
    tokens RULER uses lighter settings (example 20 words x3/x1, task x6/x1) than the configured ones."""
    a, f, words = spec.args, FAMILIES["common_words_extraction"], word_list(spec.split)
    small = spec.length < 4096
    shot_ctx, shot_common = cwe_list(rng, words, *((20, 3, 1) if small else (40, 10, 3)), a["num_cw"])
    ctx, common = cwe_list(rng, words, n, *((6, 1) if small else (a["freq_cw"], a["freq_ucw"])), a["num_cw"])
    head, question = _parts(f.template)
    shot = head + shot_ctx + question + f.answer_prefix + " " + numbered(shot_common)
    return spec.sample("common_words_extraction", context=shot + "\n" + head + ctx, question=question,
                       answer_prefix=f.answer_prefix, references=tuple(common),
                       target=_lead(f.answer_prefix) + numbered(common))


# ----------------------------------------------------------------------------------------------
# frequent words extraction


def zeta(alpha: float, terms: int = 1000) -> float:
    """Riemann zeta(alpha), alpha > 1 (Euler-Maclaurin tail after `terms` terms; scipy.special.zeta in RULER)."""
    k = np.arange(1, terms, dtype=np.float64)
    n = float(terms)
    tail = n ** (1 - alpha) / (alpha - 1) + n ** -alpha / 2 + alpha * n ** (-alpha - 1) / 12
    return float(np.sum(k ** -alpha) + tail)


def coded_vocab(rng: np.random.Generator, size: int, word_len: int = 6) -> list[str]:
    """fwe's vocabulary: `size` distinct random lowercase words in random order, the first replaced by "..."
    (the top-ranked word is noise)."""
    vocab: dict[str, None] = {}  # distinct words in the order first drawn
    while len(vocab) < size:
        vocab["".join(string.ascii_lowercase[i] for i in rng.integers(0, 26, word_len))] = None
    return ["...", *list(vocab)[1:]]


def build_fwe(rng: np.random.Generator, n: int, spec: _Spec) -> RulerSample:
    """freq_words_extraction.py: word of rank k appears int(n k^-alpha / zeta(alpha)) times, shuffled; the
    answer is ranks 2-4 (rank 1 is "..."). The vocabulary has (length - tokens to generate) // 50 words."""
    f = FAMILIES["freq_words_extraction"]
    vocab = coded_vocab(rng, (spec.length - f.tokens_to_generate) // 50)
    alpha = spec.args["alpha"]
    k = np.arange(1, len(vocab) + 1, dtype=np.float64)
    counts = (n * k ** -alpha / zeta(alpha)).astype(int)
    items = [w for w, c in zip(vocab, counts, strict=True) for _ in range(int(c))]
    head, question = _parts(f.template)
    refs = tuple(vocab[1:4])
    return spec.sample("freq_words_extraction", context=head + " ".join(items[i] for i in rng.permutation(len(items))),
                       question=question, answer_prefix=f.answer_prefix, references=refs,
                       target=_lead(f.answer_prefix) + ", ".join(refs) + ".")


# ----------------------------------------------------------------------------------------------
# sizing


def fit(make: Callable[[int], RulerSample], count: Counter, budget: int, *, lo: int = MIN_UNITS,
        hi: int | None = None) -> RulerSample:
    """The sample make(n) with the largest n in [lo, hi] whose prompt counts <= budget tokens, by doubling
    then bisection (count taken as non-decreasing in n; make must be deterministic in n)."""
    cache: dict[int, RulerSample] = {}

    def fits(n: int) -> bool:
        cache.setdefault(n, make(n))
        return count(cache[n]) <= budget

    if not fits(lo):
        raise ValueError(f"{count(cache[lo])} tokens with the smallest haystack ({lo}) exceed the budget {budget}")
    up = lo * 2
    while (hi is None or up <= hi) and fits(up):
        lo, up = up, up * 2
    if hi is not None and up > hi:
        if fits(hi):
            raise ValueError(f"{hi} haystack units fit in {budget} tokens: the word source is too small")
        up = hi
    while up - lo > 1:  # fits(lo), not fits(up)
        mid = (lo + up) // 2
        lo, up = (mid, up) if fits(mid) else (lo, mid)
    return cache[lo]


def _rng(seed: int, task: str, length: int, index: int, split: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(task.encode()), length, index, SPLITS.index(split)])


def generate_sample(task: str, length: int, index: int, *, count: Counter, seed: int = 0, split: str = "eval",
                    random_start: bool = False) -> RulerSample:
    """Sample `index` of a RULER task whose prompt (as `count` measures it) plus tokens_to_generate fits in
    `length` tokens; depends only on (task, length, index, seed, split, random_start) and the tokenizer."""
    if task not in TASKS:
        raise ValueError(f"unknown RULER task {task!r}; known: {', '.join(TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    family, args = TASKS[task]
    spec = _Spec(task, length, index, split, random_start, args)
    budget = length - FAMILIES[family].tokens_to_generate
    key = int(_rng(seed, task, length, index, split).integers(2**63))
    build = {"niah": build_niah, "variable_tracking": build_vt, "common_words_extraction": build_cwe,
             "freq_words_extraction": build_fwe}[family]
    kw = {"example": vt_example(np.random.default_rng([key, 1]), spec, count)} if build is build_vt else {}
    hi = len(word_list(split)) if build is build_cwe else None  # cwe cannot list more words than there are
    return fit(lambda n: build(np.random.default_rng([key, 0]), n, spec, **kw), count, budget, hi=hi)


def generate_samples(task: str, length: int, n: int, *, count: Counter, seed: int = 0, split: str = "eval",
                     random_start: bool = False) -> list[RulerSample]:
    """Samples 0..n-1 of `generate_sample`."""
    return [generate_sample(task, length, i, count=count, seed=seed, split=split, random_start=random_start)
            for i in range(n)]


def postprocess(prediction: str) -> str:
    """RULER's `postprocess_pred` (scripts/eval/evaluate.py): strip, control characters to newlines, strip."""
    return re.sub(r"[\x00-\x1f]", "\n", prediction.strip()).strip()

