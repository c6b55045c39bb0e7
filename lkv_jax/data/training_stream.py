"""Densely supervised training sequences for the tiny target model, in the grammar of the synthetic tasks.

A sparse loss (one short answer after a long prompt) leaves a tiny model on a plateau, and copies at a fixed
distance teach a positional shortcut instead of retrieval. So a training sequence is a stream of records
(`key`, multi-value `key`, `var` chains, `tag` lists) and filler sentences, with questions about records seen
earlier inserted all along it (associative recall at random distances); the loss is on every answer token and
its EOS. Spans of random value words are also repeated verbatim later in the stream, with the loss on every
repeated word after the first: plain copies at random distances, from which induction heads form fastest
(without them a tiny model sat on a plateau for hundreds of steps). A fraction of sequences are frequent-word
streams with `? top :` questions instead. The questions and answers are written exactly as
`lkv_jax.data.synthetic` writes them, so the benchmark's prompts are in distribution.
"""

from __future__ import annotations

import numpy as np

from lkv_jax.data.synthetic import build_haystack, filler_sentence, key_record, tag_record, value_words, var_record
from lkv_jax.data.vocab import NAMES, TAGS, VALUES

MAX_MULTI_VALUES, MAX_HOPS, MAX_TAG_ITEMS = 6, 8, 12


class _Stream:
    """Words of one sequence and, per word, whether it is a supervised answer word."""

    def __init__(self):
        self.words: list[str] = ["<bos>"]
        self.weights: list[float] = [0.0]

    def context(self, text: str) -> None:
        w = text.split()
        self.words += w
        self.weights += [0.0] * len(w)

    def copy(self, span: str) -> None:
        """Repeat an earlier span: its first word cannot be predicted, every later one can."""
        w = span.split()
        self.words += w
        self.weights += [0.0] + [1.0] * (len(w) - 1)

    def answer(self, question: str, target: str) -> None:
        self.context(question)
        w = target.split() + ["<eos>"]
        self.words += w
        self.weights += [1.0] * len(w)


def _record_stream(rng: np.random.Generator, n_words: int, values, names) -> _Stream:
    s = _Stream()
    p_filler = rng.uniform(0.05, 0.8)  # from record-dense streams to haystacks with a few needles
    p_question = rng.uniform(0.15, 0.4)
    free_names = list(rng.permutation(names))
    free_roots = list(rng.permutation(values))
    tags = list(rng.choice(TAGS, int(rng.integers(1, 5)), replace=False))
    single: dict[str, str] = {}  # key -> value
    multi: dict[str, list[str]] = {}  # key -> values in context order
    chains: list[list[str]] = []  # [root value, X1, X2, ...]
    tagged: dict[str, list[str]] = {t: [] for t in tags}
    spans: list[str] = []
    while len(s.words) < n_words:
        r = rng.random()
        if r < p_filler:
            s.context(" ".join(filler_sentence(rng)))
            continue
        questions = _questions(single, multi, chains, tagged)
        if spans and rng.random() < p_question * 0.5:
            s.copy(spans[int(rng.integers(0, len(spans)))])
            continue
        if questions and rng.random() < p_question:
            kind = questions[int(rng.integers(0, len(questions)))]
            s.answer(*_ask(rng, kind, single, multi, chains, tagged))
            continue
        kind = rng.choice(["key", "multi", "var", "tag", "span"], p=[0.3, 0.12, 0.2, 0.2, 0.18])
        if kind == "span":
            spans.append(value_words(rng, int(rng.integers(5, 17)), values) + " .")
            s.context(spans[-1])
        elif kind == "key" and free_names:
            k, v = free_names.pop(), value_words(rng, int(rng.integers(3, 6)), values)
            single[k] = v
            s.context(key_record(k, v))
        elif kind == "multi" and (free_names or multi):
            open_keys = [k for k, vs in multi.items() if len(vs) < MAX_MULTI_VALUES]
            if free_names and (not open_keys or rng.random() < 0.3):
                k = free_names.pop()
                multi[k] = []
            elif open_keys:
                k = open_keys[int(rng.integers(0, len(open_keys)))]
            else:
                continue
            v = value_words(rng, int(rng.integers(3, 6)), values)
            multi[k].append(v)
            s.context(key_record(k, v))
        elif kind == "var" and free_names:
            open_chains = [c for c in chains if len(c) <= MAX_HOPS]
            if not open_chains or rng.random() < 0.3:
                chain = [free_roots.pop()]
                chains.append(chain)
            else:
                chain = open_chains[int(rng.integers(0, len(open_chains)))]
            name = free_names.pop()
            s.context(var_record(name, chain[-1]))
            chain.append(name)
        elif kind == "tag":
            t = tags[int(rng.integers(0, len(tags)))]
            if len(tagged[t]) < MAX_TAG_ITEMS:
                v = value_words(rng, int(rng.integers(2, 5)), values)
                tagged[t].append(v)
                s.context(tag_record(t, len(tagged[t]), v))
    return s


def _questions(single, multi, chains, tagged) -> list[str]:
    kinds = []
    if single:
        kinds.append("key")
    if len(single) >= 2:
        kinds.append("keys")
    if multi and any(multi.values()):
        kinds.append("all")
    if chains:
        kinds.append("chain")
    if any(tagged.values()):
        kinds.append("list")
    return kinds


def _ask(rng, kind, single, multi, chains, tagged) -> tuple[str, str]:
    """(question, target) for a question of `kind` about the records so far."""
    if kind == "key":
        k = list(single)[int(rng.integers(0, len(single)))]
        return f"? key {k} :", single[k]
    if kind == "keys":
        n = int(rng.integers(2, min(4, len(single)) + 1))
        ks = [list(single)[i] for i in rng.choice(len(single), n, replace=False)]
        return f"? keys {' '.join(ks)} :", " ; ".join(f"{k} : {single[k]}" for k in ks)
    if kind == "all":
        ks = [k for k, vs in multi.items() if vs]
        k = ks[int(rng.integers(0, len(ks)))]
        return f"? all key {k} :", " ; ".join(multi[k])
    if kind == "chain":
        c = chains[int(rng.integers(0, len(chains)))]
        return f"? chain {c[0]} :", " ".join(c[1:])
    ts = [t for t, vs in tagged.items() if vs]
    t = ts[int(rng.integers(0, len(ts)))]
    return f"? list {t} :", " ; ".join(f"{t} {i} : {v}" for i, v in enumerate(tagged[t], start=1))


def _haystack_stream(rng: np.random.Generator, n_words: int, values, names, distinct: bool = False) -> _Stream:
    """The benchmark's shape: a filler haystack of 60-85% of the sequence with a few records at random depths
    (single keys, a multi-value key, a tag list, a variable chain), then questions about them until the
    end, each answer supervised. Answers must come from anywhere in a long context, as in the tasks.

    distinct: every value word occurs in at most one record (while the alphabet lasts), so the word before
    a copied one names the copy's source unambiguously, as in the benchmark's few-record haystacks."""
    free_names = list(rng.permutation(names))
    free_values = list(rng.permutation(values)) if distinct else []

    def draw(n):  # n value words of one record
        if not distinct:
            return value_words(rng, n, values)
        if len(free_values) < n:  # the alphabet ran out: start a fresh permutation
            free_values.extend(rng.permutation(values))
        return " ".join(free_values.pop() for _ in range(n))

    single: dict[str, str] = {}
    multi: dict[str, list[str]] = {}
    chains: list[list[str]] = []
    tagged: dict[str, list[str]] = {}
    needles: list[tuple[float, str]] = []

    def ordered_depths(n):  # records of one list/chain/key in context order
        return sorted(float(x) for x in rng.uniform(0.0, 1.0, n))

    for _ in range(int(rng.integers(1, 7))):
        k, v = free_names.pop(), draw(int(rng.integers(3, 6)))
        single[k] = v
        needles.append((float(rng.uniform()), key_record(k, v)))
    if rng.random() < 0.5:
        k = free_names.pop()
        multi[k] = [draw(int(rng.integers(3, 6))) for _ in range(int(rng.integers(2, 5)))]
        needles += [(d, key_record(k, v)) for d, v in zip(ordered_depths(len(multi[k])), multi[k], strict=True)]
    if rng.random() < 0.6:
        for t in rng.choice(TAGS, int(rng.integers(1, 3)), replace=False):
            tagged[t] = [draw(int(rng.integers(2, 5))) for _ in range(int(rng.integers(2, 8)))]
            needles += [(d, tag_record(t, i, v)) for i, (d, v) in
                        enumerate(zip(ordered_depths(len(tagged[t])), tagged[t], strict=True), start=1)]
    if rng.random() < 0.4:
        chain = [draw(1) if distinct else values[int(rng.integers(0, len(values)))]]
        depths = ordered_depths(int(rng.integers(2, 6)))
        for d in depths:
            name = free_names.pop()
            needles.append((d, var_record(name, chain[-1])))
            chain.append(name)
        chains.append(chain)
    need = sum(len(t.split()) for _, t in needles)
    context_len = max(int(n_words * rng.uniform(0.6, 0.85)), need + 8)
    # stable sort by depth keeps each list's records in order (build_haystack keeps the given order too)
    context, _ = build_haystack(rng, context_len, sorted(needles, key=lambda x: x[0]))
    s = _Stream()
    s.context(context)
    kinds = _questions(single, multi, chains, tagged)
    while len(s.words) < n_words:
        s.answer(*_ask(rng, kinds[int(rng.integers(0, len(kinds)))], single, multi, chains, tagged))
    return s


def _recall_stream(rng: np.random.Generator, n_words: int, values, names, max_words: int = 5) -> _Stream:
    """Multi-query associative recall in the task grammar: `key K : v .` records back to back (a filler
    sentence now and then) with `? key K :` questions about any earlier record interleaved, each answer
    supervised. Every record looks alike after its key, so the first answer word can only come from matching
    the key two words before the value (copying whatever follows a `:` picks a random record: what the tiny
    target did on niah_multikey, 25% with 4 keys at any length, before this stream existed).

    max_words: values have 1 to max_words words. With 1, every supervised word but EOS is such a match, the
    strongest signal for forming the matching head (a copy-trained model sits near chance on longer values,
    where the words after the first are easy copies that dominate the loss)."""
    s = _Stream()
    free_names = list(rng.permutation(names))
    single: dict[str, str] = {}
    while len(s.words) < n_words:
        r = rng.random()
        if r < 0.08:
            s.context(" ".join(filler_sentence(rng)))
        elif free_names and (len(single) < 2 or r >= 0.45):
            k, v = free_names.pop(), value_words(rng, int(rng.integers(1, max_words + 1)), values)
            single[k] = v
            s.context(key_record(k, v))
        else:  # at least two records so far (the alphabet has at least four names)
            k = list(single)[int(rng.integers(0, len(single)))]
            s.answer(f"? key {k} :", single[k])
    return s


def _copy_stream(rng: np.random.Generator, n_words: int, values) -> _Stream:
    """Fresh spans of value words and verbatim repeats of earlier ones, about half of them repeats."""
    s = _Stream()
    spans: list[str] = []
    while len(s.words) < n_words:
        if spans and rng.random() < 0.6:
            s.copy(spans[int(rng.integers(0, len(spans)))])
        else:
            spans.append(value_words(rng, int(rng.integers(5, 17)), values) + " .")
            s.context(spans[-1])
    return s


def _frequent_words_stream(rng: np.random.Generator, n_words: int, values) -> _Stream:
    s = _Stream()
    alpha = rng.uniform(1.5, 2.5)
    ranks = np.arange(1, len(values) + 1, dtype=np.float64)
    p = ranks ** -alpha
    p /= p.sum()
    words = list(rng.permutation(values))
    counts = dict.fromkeys(values, 0)
    next_question = int(rng.integers(48, 160))
    while len(s.words) < n_words:
        w = words[int(rng.choice(len(words), p=p))]
        s.context(w)
        counts[w] += 1
        if len(s.words) >= next_question:
            next_question = len(s.words) + int(rng.integers(64, 256))
            top = sorted(counts, key=lambda x: -counts[x])[:4]
            if len({counts[x] for x in top}) == 4:  # only ask when the top three are unambiguous
                s.answer("? top :", " ".join(top[:3]))
                for x in top[:3]:  # the answer words are words of the text from now on
                    counts[x] += 1
    return s


def training_sequence(rng: np.random.Generator, length: int, vocab, *, p_frequent_words: float = 0.1,
                      symbols: int | None = None, p_copy: float = 0.0, p_haystack: float = 0.0,
                      p_distinct: float = 0.0, p_recall: float = 0.0, recall_words: int = 5):
    """One sequence of `length + 1` token ids (`<bos>` first) and per-token loss weights (1 on answer words,
    their EOS and copies): inputs are ids[:-1], targets ids[1:] weighted by weights[1:]. int32, float32 [T+1].

    symbols: use only the first `symbols` value words and names (all when None). A tiny model forms its
    induction heads within a few hundred steps on a 16-word alphabet and not within a thousand on the full
    128 (measured on this CPU), so the curriculum starts small and widens the alphabet.
    p_copy: the probability of a pure copy sequence (spans and their repeats only), for the first steps.
    p_haystack / p_recall: the probability (of the non-copy sequences) of a benchmark-shaped haystack with the
    questions at its end (`_haystack_stream`) / of a key-value recall stream (`_recall_stream`, values of 1 to
    `recall_words` words); p_distinct: that a haystack sequence uses each value word in at most one record.
    Any of these at 0 leaves the random stream exactly what it was without the option.
    """
    if length < 16:
        raise ValueError(f"length must be at least 16, got {length}")
    values = VALUES if symbols is None else VALUES[:symbols]
    names = NAMES if symbols is None else NAMES[:symbols]
    if len(values) < 4:
        raise ValueError(f"symbols must be at least 4, got {symbols}")
    if recall_words < 1:
        raise ValueError(f"recall_words must be at least 1, got {recall_words}")
    r = rng.random()
    # thresholds written so that p_recall=0 gives exactly the floats (and streams) of before the option
    base, rest = p_copy + (1 - p_copy) * p_recall, (1 - p_copy) * (1 - p_recall)
    if r < p_copy:
        stream = _copy_stream(rng, length + 1, values)
    elif r < base:
        stream = _recall_stream(rng, length + 1, values, names, recall_words)
    elif r < base + rest * p_frequent_words:
        stream = _frequent_words_stream(rng, length + 1, values)
    elif r < base + rest * (p_frequent_words + p_haystack):
        distinct = p_distinct > 0 and rng.random() < p_distinct
        stream = _haystack_stream(rng, length + 1, values, names, distinct)
    else:
        stream = _record_stream(rng, length + 1, values, names)
    ids = np.asarray(vocab.encode(" ".join(stream.words[: length + 1]), strict=True), np.int32)
    return ids, np.asarray(stream.weights[: length + 1], np.float32)


def training_batch(rng: np.random.Generator, batch: int, length: int, vocab, **kw):
    """`batch` sequences from `training_sequence`: ids int32 [B, T+1], weights float32 [B, T+1]."""
    seqs = [training_sequence(rng, length, vocab, **kw) for _ in range(batch)]
    return np.stack([s[0] for s in seqs]), np.stack([s[1] for s in seqs])
