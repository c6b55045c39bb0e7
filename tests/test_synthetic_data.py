"""RULER-style synthetic tasks, the dense training stream and the string-match metrics, against a
brute-force reader of the generated text."""

from collections import Counter

import numpy as np
import pytest

from lkv_jax.data.metrics import mean_score, string_match_all, string_match_part
from lkv_jax.data.synthetic import TASKS, HFPromptEncoder, build_haystack, encode_builtin, generate_samples, niah_single
from lkv_jax.data.training_stream import training_sequence
from lkv_jax.data.vocab import FILLER, NAMES, VALUES, builtin_vocab


# ---------------------------------------------------------------------------------- brute force
def read_records(words):
    """Scan words for records (never questions) -> key values, var assignments, tag values, in order."""
    keys, assigns, tags = {}, [], {}
    for i, w in enumerate(words):
        prev = words[i - 1] if i else ""
        if prev in ("?", "all"):
            continue
        if w == "key" and i + 2 < len(words) and words[i + 2] == ":":
            end = words.index(".", i)
            keys.setdefault(words[i + 1], []).append(" ".join(words[i + 3:end]))
        elif w == "var" and i + 4 < len(words) and words[i + 2] == "=" and words[i + 4] == ".":
            assigns.append((words[i + 1], words[i + 3]))
        elif w == "tag" and i + 3 < len(words) and words[i + 3] == ":":
            end = words.index(".", i)
            tags.setdefault(words[i + 1], []).append((words[i + 2], " ".join(words[i + 4:end])))
    return keys, assigns, tags


def solve(words, question):
    """The answer a perfect reader of `words` gives to `question`, worked out independently."""
    keys, assigns, tags = read_records(words)
    q = question.split()
    assert q[0] == "?" and q[-1] == ":"
    if q[1] == "key":
        (value,) = keys[q[2]]  # the asked key must have exactly one record
        return value
    if q[1] == "all":
        return " ; ".join(keys[q[3]])
    if q[1] == "keys":
        return " ; ".join(f"{k} : {keys[k][0]}" for k in q[2:-1])
    if q[1] == "chain":
        holders, out = {q[2]}, []
        for name, src in assigns:
            if src in holders:
                holders.add(name)
                out.append(name)
        return " ".join(out)
    if q[1] == "list":
        return " ; ".join(f"{q[2]} {n} : {v}" for n, v in tags[q[2]])
    if q[1] == "top":
        counts = Counter(w for w in words if w in set(VALUES))
        return " ".join(w for w, _ in counts.most_common(3))
    raise AssertionError(question)


def _check_copies(words, mask):
    """Each maximal run of masked words, with the unmasked word before it, repeats a run of value words
    (ending in "." or cut by the sequence end) seen earlier. Returns the number of runs."""
    n, j = 0, 0
    while j < len(words):
        if not mask[j]:
            j += 1
            continue
        k = j
        while k < len(words) and mask[k]:
            k += 1
        copy = words[j - 1:k]
        assert all(x in VALUES for x in copy[:-1]) and copy[-1] in VALUES + (".",)
        assert any(words[i:i + len(copy)] == copy for i in range(j - len(copy))), copy
        n, j = n + 1, k
    return n


# ---------------------------------------------------------------------------------- tasks
@pytest.mark.parametrize("task", list(TASKS))
def test_deterministic_and_seed_dependent(task):
    a = generate_samples(task, 3, 300, seed=5)
    assert a == generate_samples(task, 3, 300, seed=5)
    b = generate_samples(task, 3, 300, seed=6)
    assert all(x.context != y.context for x, y in zip(a, b, strict=True))
    assert len({s.context for s in a}) == 3  # samples differ from each other too


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("length", [512, 2048])
def test_answer_recoverable_by_brute_force(task, length):
    for s in generate_samples(task, 4, length, seed=1):
        words = s.context.split()
        assert len(words) == length  # built-in vocab: one word, one token
        assert solve(words, s.question) == s.target
        assert len(s.target.split()) >= 3  # several answer tokens: eviction shows after the first one
        for ref in s.references:
            assert ref in s.target
        for offset, record in s.needles:
            assert words[offset:offset + len(record.split())] == record.split()


@pytest.mark.parametrize("depth", [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0])
def test_needle_sits_at_the_requested_depth(depth):
    for i in range(3):
        s = niah_single(np.random.default_rng(i), 1000, depth=depth)
        ((offset, record),) = s.needles
        words = s.context.split()
        start = [j for j in range(len(words)) if words[j:j + 3] == record.split()[:3]]
        assert start == [offset]
        # a needle goes between filler sentences (<= 11 words), so it lands within one sentence of the depth
        assert abs(offset - depth * (1000 - len(record.split()))) <= 11


def test_multi_needle_depths_and_middle():
    s = generate_samples("niah_multikey", 1, 1024, seed=0, depths=[0.2, 0.4, 0.6, 0.8])[0]
    offsets = [o for o, _ in s.needles]
    assert offsets == sorted(offsets)
    for k, (o, d) in enumerate(zip(offsets, [0.2, 0.4, 0.6, 0.8], strict=True)):
        # depth is the fraction of the filler before a needle; the k earlier needles (7 words each) add on
        assert abs(o - 7 * k - d * (1024 - 28)) <= 11
    # answers of the long-answer task come from many places, most of them in the middle of the prompt
    t = generate_samples("tag_list", 1, 2048, seed=0)[0]
    t.context.split()
    asked = t.question.split()[2]
    places = [o for o, r in t.needles if r.split()[1] == asked]
    assert len(places) == 6 and max(places) - min(places) > 256


def test_haystack_errors():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="too short"):
        build_haystack(rng, 3, [(0.5, "key a : b c d .")])
    with pytest.raises(ValueError, match="depth"):
        build_haystack(rng, 100, [(1.5, "key a : b c d .")])
    with pytest.raises(ValueError, match="unknown task"):
        generate_samples("nope", 1, 100)


def test_builtin_encoding_query_aware_and_agnostic():
    v = builtin_vocab()
    s = generate_samples("vt", 1, 256, seed=2)[0]
    qa, qg = encode_builtin(s, v), encode_builtin(s, v, query_aware=False)
    assert qa.prompt[0] == v.bos_id and qa.question.size == 0
    assert list(qa.prompt) == list(qg.prompt) + list(qg.question)
    assert len(qg.prompt) == 1 + 256 and qa.target[-1] == v.eos_id
    assert v.decode(qa.target) == s.target


# ---------------------------------------------------------------------------------- HF tokenizers
CHAT = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _hf_dir(tmp_path, chat_template):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    from lkv_jax.data.synthetic import INSTRUCTIONS

    words = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
    v = builtin_vocab()
    extra = {w for text in INSTRUCTIONS.values() for w in text.split()}
    words += [w for w in v.words[4:]] + sorted(extra - set(v.words))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.add_special_tokens(["<pad>", "<s>", "</s>", "<|user|>", "<|assistant|>", "<|end|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
           "pad_token": "<pad>", "unk_token": "<unk>"}
    if chat_template:
        cfg["chat_template"] = chat_template
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return tmp_path


def test_hf_encoder_matches_transformers_chat_template(tmp_path):
    from transformers import AutoTokenizer

    d = _hf_dir(tmp_path, CHAT)
    enc = HFPromptEncoder(d)
    s = generate_samples("niah_multikey", 1, 300, seed=0, count=enc.count)[0]
    assert abs(enc.count(s.context) - 300) <= 1
    hf = AutoTokenizer.from_pretrained(str(d))
    from lkv_jax.data.synthetic import INSTRUCTIONS

    user = f"{INSTRUCTIONS['niah_multikey']}\n\n{s.context}\n\n{s.question}"
    expected = hf.apply_chat_template([{"role": "user", "content": user}], add_generation_prompt=True,
                                      tokenize=True, return_dict=False)
    qa = enc.encode(s)
    assert list(qa.prompt) == list(expected)
    qg = enc.encode(s, query_aware=False)
    assert list(qg.prompt) + list(qg.question) == list(expected)
    assert hf.decode(qg.question).split() == s.question.split() + ["<|end|>", "<|assistant|>"]
    assert hf.decode(qa.target, skip_special_tokens=True) == s.target and qa.target[-1] == hf.eos_token_id


def test_hf_encoder_without_template_adds_bos_once(tmp_path):
    d = _hf_dir(tmp_path, None)
    enc = HFPromptEncoder(d, instructions=False)
    s = generate_samples("fwe", 1, 200, seed=0, count=enc.count)[0]
    e = enc.encode(s)
    assert e.prompt[0] == 1 and (e.prompt == 1).sum() == 1
    assert enc.tokenizer.decode(list(e.prompt)) == s.prompt()


# ---------------------------------------------------------------------------------- training stream
def test_training_stream_supervises_exactly_the_answers():
    v = builtin_vocab()
    kinds = Counter()
    for seed in range(12):
        ids, w = training_sequence(np.random.default_rng(seed), 768, v)
        assert ids.shape == w.shape == (769,) and ids[0] == v.bos_id
        words = v.decode(ids, skip_special=False).split()
        expected, questions = _check_answers(words)
        kinds.update(words[i + 1] for i, _ in questions)
        # the other supervised words are repeats of earlier value-word spans, word for word from the span start
        rest = (w > 0) & (expected == 0)
        kinds["copy"] += _check_copies(words, rest)
        expected[rest] = 1.0
        np.testing.assert_array_equal(w, expected)  # supervised: exactly the answers (+ EOS) and the copies
    assert set(kinds) == {"key", "keys", "all", "chain", "list", "top", "copy"}


def test_haystack_sequences_ask_about_records_hidden_in_filler():
    v = builtin_vocab()
    n_questions = 0
    for seed in range(10):
        ids, w = training_sequence(np.random.default_rng(seed), 512, v, p_frequent_words=0.0, p_haystack=1.0)
        words = v.decode(ids, skip_special=False).split()
        first_q = words.index("?")
        assert first_q >= 0.6 * 512 and w[:first_q].sum() == 0  # context first, nothing supervised in it
        assert sum(x in FILLER for x in words[:first_q]) > 0.4 * first_q  # a haystack, not a record list
        expected, questions = _check_answers(words, first_q)
        np.testing.assert_array_equal(w, expected)
        n_questions += len(questions)
    assert n_questions > 40


def _check_answers(words: list[str], context_end: int | None = None) -> tuple[np.ndarray, list]:
    """Assert that every answer is the solver's reading of the words before its question (of the context
    words[:context_end] when given: a haystack's), a prefix of it where the sequence ends; return the loss
    weights the answers should carry and, per question, (its index, the solver's answer words)."""
    expected = np.zeros(len(words), np.float32)
    questions = []
    for i in [j for j, x in enumerate(words) if x == "?"]:
        if ":" not in words[i:]:
            break  # a question cut by the end of the sequence
        colon = words.index(":", i)
        end = words.index("<eos>", colon) if "<eos>" in words[colon:] else len(words)
        truth = solve(words[:i if context_end is None else context_end], " ".join(words[i:colon + 1])).split()
        answer = words[colon + 1:end]
        assert answer == (truth if end < len(words) else truth[:len(answer)])
        expected[colon + 1:end + 1] = 1.0
        questions.append((i, truth))
    return expected, questions


def test_distinct_haystacks_use_each_value_word_once_and_answer_right():
    v = builtin_vocab()
    repeated = 0
    for seed in range(10):
        for p_distinct in (0.0, 1.0):
            ids, w = training_sequence(np.random.default_rng(seed), 768, v, p_frequent_words=0.0, p_haystack=1.0,
                                       p_distinct=p_distinct)
            words = v.decode(ids, skip_special=False).split()
            first_q = words.index("?")
            counts = Counter(x for x in words[:first_q] if x in VALUES)
            if p_distinct:
                assert max(counts.values()) == 1  # no value word in two records (or twice in one)
            else:
                repeated += max(counts.values()) > 1
            expected, _ = _check_answers(words, first_q)
            np.testing.assert_array_equal(w, expected)
    assert repeated >= 5  # without the option, repeats are the rule: the test can tell the difference
    # the option is off by default (that p_distinct=0 draws what the stream drew before the option existed,
    # so shipped curricula replay, was checked once against the previous implementation, not here)
    a = training_sequence(np.random.default_rng(3), 256, v, p_haystack=0.5)
    b = training_sequence(np.random.default_rng(3), 256, v, p_haystack=0.5, p_distinct=0.0)
    np.testing.assert_array_equal(a[0], b[0])


def test_recall_streams_ask_keys_among_many_records():
    v = builtin_vocab()
    for recall_words in (1, 5):
        n_records, n_keys_asked, lengths = [], set(), set()
        for seed in range(8):
            ids, w = training_sequence(np.random.default_rng(seed), 256, v, p_recall=1.0, recall_words=recall_words)
            words = v.decode(ids, skip_special=False).split()
            expected, questions = _check_answers(words)  # every answer is the brute-force reader's
            for i, truth in questions:
                n_records.append(sum(x == "key" and words[k - 1] != "?" for k, x in enumerate(words[:i])))
                n_keys_asked.add(words[i + 2])
                lengths.add(len(truth))
            np.testing.assert_array_equal(w, expected)  # supervised: exactly the answers and their EOS
        assert min(n_records) >= 2 and np.mean(n_records) > 8  # a question always has distractor records
        assert len(n_keys_asked) > 40
        assert lengths == ({1} if recall_words == 1 else {1, 2, 3, 4, 5})
    # off by default: p_recall=0 draws exactly the stream drawn without the option (shipped curricula replay)
    for seed in range(5):
        a = training_sequence(np.random.default_rng(seed), 256, v, p_copy=0.3, p_haystack=0.5)
        b = training_sequence(np.random.default_rng(seed), 256, v, p_copy=0.3, p_haystack=0.5, p_recall=0.0)
        np.testing.assert_array_equal(a[0], b[0])
    with pytest.raises(ValueError, match="recall_words"):
        training_sequence(np.random.default_rng(0), 64, v, p_recall=1.0, recall_words=0)


def test_training_stream_small_alphabet():
    v = builtin_vocab()
    allowed = set(VALUES[:8]) | set(NAMES[:8])
    for seed in range(6):
        ids, _ = training_sequence(np.random.default_rng(seed), 256, v, symbols=8)
        words = set(v.decode(ids).split())
        assert words & set(VALUES) | words & set(NAMES) <= allowed
    with pytest.raises(ValueError, match="symbols"):
        training_sequence(np.random.default_rng(0), 64, v, symbols=2)


def test_pure_copy_sequences():
    v = builtin_vocab()
    ids, w = training_sequence(np.random.default_rng(1), 200, v, symbols=16, p_copy=1.0)
    words = v.decode(ids, skip_special=False).split()
    assert set(words[1:]) <= set(VALUES[:16]) | {"."}
    assert _check_copies(words, w > 0) > 3 and w.mean() > 0.3


# ---------------------------------------------------------------------------------- metrics
def test_string_match_by_hand():
    assert string_match_all("the answer is Bobo kiki", ["bobo", "kiki", "zaza"]) == pytest.approx(2 / 3)
    assert string_match_all("", ["a"]) == 0.0
    assert string_match_part("the answer is Bobo kiki", ["zaza", "bobo"]) == 1.0
    assert string_match_part("nothing", ["zaza", "bobo"]) == 0.0
    assert string_match_all("x y z", "y z") == 1.0
    # RULER's aggregate: 100 x mean, 2 decimals
    assert mean_score("string_match_all", ["a b", "c"], [["a", "b", "q"], ["c"]]) == 83.33
    with pytest.raises(ValueError):
        mean_score("nope", ["a"], [["a"]])
    with pytest.raises(ValueError):
        string_match_all("a", [])
