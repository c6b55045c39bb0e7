"""RULER's tasks on the essays, with a real byte-level BPE tokenizer and a ChatML chat template built here,
checked against the prompt text read independently and against strings transcribed from NVIDIA RULER
(scripts/data/synthetic/constants.py, niah.py, variable_tracking.py, common_words_extraction.py,
freq_words_extraction.py)."""

import argparse
import re
import uuid
from collections import Counter
from functools import cache

import numpy as np
import pytest

from lkv_jax.data import ruler
from lkv_jax.data.essays import essay_names, load_essays
from lkv_jax.data.ruler_chat import ChatPrompts, ruler_prompts
from lkv_jax.data.synthetic import HFPromptEncoder
from lkv_jax.evaluation.tasks import ruler_task

NIAH = [t for t in ruler.TASKS if t.startswith("niah")]
NEEDLE_RE = re.compile(r"One of the special magic (numbers|uuids) for ([\w-]+) is: ([\w-]+)\.")
# transcribed from RULER
NOISE = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
NIAH_ONE = ("A special magic number is hidden within the following text. Make sure to memorize it. I will quiz you "
            "about the number afterwards.\n")
NIAH_MANY = ("Some special magic numbers are hidden within the following text. Make sure to memorize it. I will quiz "
             "you about the numbers afterwards.\n")
VT_HEAD = "Memorize and track the chain(s) of variable assignment hidden in the following text.\n\n"
CWE_HEAD = ("Below is a numbered list of words. In these words, some appear more often than others. Memorize the ones "
            "that appear most often.\n")
CWE_QUESTION = "\nQuestion: What are the 10 most common words in the above list?"
CWE_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_HEAD = ("Read the following coded text and track the frequency of each coded word. Find the three most "
            "frequently appeared coded words. ")
FWE_QUESTION = ("\nQuestion: Do not provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_PREFIX = " Answer: According to the coded text above, the three most frequently appeared words are:"
TOKENS_TO_GENERATE = {"niah": 128, "vt": 30, "cwe": 120, "fwe": 50}


@pytest.fixture(scope="module")
def tok_dir(bpe_tokenizer_dir):
    return bpe_tokenizer_dir


@pytest.fixture(scope="module")
def enc(tok_dir):
    return HFPromptEncoder(tok_dir)


@pytest.fixture(scope="module")
def make(enc):
    """make(task, length, index=0, seed=0) -> RulerPrompt (evaluation half), cached across tests."""
    chat = ChatPrompts(enc)

    @cache
    def one(task, length, index=0, seed=0):
        return chat.encode(ruler.generate_sample(task, length, index, count=chat.count, seed=seed))

    return one


def n_tok(enc, text):
    return len(enc.tokenizer.encode(text, add_special_tokens=False).ids)


def family(task):
    return "niah" if task.startswith("niah") else task


def asked_keys(question):
    listed = re.search(r"for (.+) mentioned in the provided text\?", question).group(1)
    return re.split(r", and |, ", listed)


def main_part(sample, head):
    """The task's own context (after any in-context example): the text after the last `head`."""
    return sample.context[sample.context.rindex(head) + len(head):]


def zipf_sizes(counts, n_vocab):
    """The sizes n whose RULER counts floor(n k^-2 / zeta(2)), k = 1..n_vocab, are the observed counts."""
    c = np.arange(1, n_vocab + 1, dtype=np.float64) ** -2.0 / (np.pi ** 2 / 6)  # synthetic.yaml's alpha 2
    observed = sorted(counts.values(), reverse=True) + [0] * (n_vocab - len(counts))
    near = range(int(observed[0] / c[0]) - 2, int((observed[0] + 1) / c[0]) + 3)
    return [n for n in near if np.floor(n * c).astype(int).tolist() == observed], c


def fwe_step(sample):
    """Most words one more unit adds to this fwe text: sum_k floor((n+1) c_k) - floor(n c_k) at its size n."""
    sizes, c = zipf_sizes(Counter(main_part(sample, FWE_HEAD).split()), (sample.length - 50) // 50)
    return max(int((np.floor((n + 1) * c) - np.floor(n * c)).sum()) for n in sizes)


def unit_slack(enc, sample):
    """Tokens one more haystack unit adds (the search stops within one unit of the budget), + 2 for the
    double space RULER's essay insertion writes when two needles share a sentence boundary."""
    t = family(sample.task)
    haystack_kind = ruler.TASKS[sample.task][1].get("type_haystack")
    if haystack_kind == "noise":
        return n_tok(enc, "\n" + NOISE) + 2
    if haystack_kind == "needle":
        lines = [m.group(0) for m in NEEDLE_RE.finditer(sample.context)]
        return max(n_tok(enc, "\n" + line) for line in lines) + 2
    if haystack_kind == "essay":
        words = set(NEEDLE_RE.sub(" ", main_part(sample, "afterwards.\n")).split())
        return max(n_tok(enc, " " + w) for w in words) + 2
    if t == "cwe":
        entries = re.findall(r" \d+\. [a-z]+", main_part(sample, CWE_HEAD))
        repeats = 1 if sample.length < 4096 else 3
        return repeats * max(n_tok(enc, e) for e in entries) + 2
    words = set(main_part(sample, FWE_HEAD).split())
    return fwe_step(sample) * max(n_tok(enc, " " + w) for w in words) + 2


# ---------------------------------------------------------------------------------- length
@pytest.mark.parametrize("length", [1024, 2048])
@pytest.mark.parametrize("task", list(ruler.TASKS))
def test_prompt_fills_the_length(enc, make, task, length):
    p = make(task, length)
    s = p.sample
    assert s.tokens_to_generate == TOKENS_TO_GENERATE[family(task)]
    n = len(p.prompt_ids)
    # the two segments hold exactly the tokens of the whole chat prompt read at once
    assert n == n_tok(enc, p.text)
    assert p.text == enc.render(s.user) + s.answer_prefix
    budget = length - s.tokens_to_generate
    assert budget - unit_slack(enc, s) <= n <= budget


@pytest.mark.parametrize("task", ["niah_single_2", "niah_multikey_3", "cwe"])
def test_prompt_fills_8k(enc, make, task):
    p = make(task, 8192)
    budget = 8192 - p.sample.tokens_to_generate
    assert budget - unit_slack(enc, p.sample) <= len(p.prompt_ids) <= budget


# ---------------------------------------------------------------------------------- niah
@pytest.mark.parametrize("task", NIAH)
def test_niah_needles_and_references(make, task):
    s = make(task, 1024).sample
    args = ruler.TASKS[task][1]
    found: dict[str, list[str]] = {}
    for kind, key, value in NEEDLE_RE.findall(s.context):
        assert kind == args["type_needle_v"]
        found.setdefault(key, []).append(value)
    keys = asked_keys(s.question)
    assert len(keys) == args["num_needle_q"]
    # the references are the values that follow the asked keys in the text, num_needle_v per key
    assert sorted(s.references) == sorted(v for k in keys for v in found[k])
    assert all(len(found[k]) == args["num_needle_v"] for k in keys)
    for k in keys:
        for v in found[k]:
            assert f"One of the special magic {args['type_needle_v']} for {k} is: {v}." in s.context
        key_ok = (re.fullmatch(r"[a-z]+-[a-z]+", k) if args["type_needle_k"] == "words"
                  else uuid.UUID(k).version == 4)
        assert key_ok
    for v in s.references:
        assert re.fullmatch(r"\d{7}", v) if args["type_needle_v"] == "numbers" else uuid.UUID(v).version == 4
    inserted = args["num_needle_v"] * max(args["num_needle_k"], args["num_needle_q"])
    body = main_part(s, "afterwards.\n")
    if args["type_haystack"] == "noise":
        lines = body.split("\n")
        assert len([x for x in lines if x != NOISE]) == inserted
    elif args["type_haystack"] == "needle":
        assert all(NEEDLE_RE.fullmatch(x) for x in body.split("\n"))
        assert len(found) == len(body.split("\n")) > 5  # every line another key
    else:  # the essay haystack is a run of the evaluation essays, from the first word, needles taken out
        assert len(NEEDLE_RE.findall(body)) == inserted
        haystack = " ".join(NEEDLE_RE.sub(" ", body).split())
        assert " ".join(" ".join(load_essays("eval")).split()).startswith(haystack)


@pytest.mark.parametrize("task,head,question,prefix", [
    ("niah_single_1", NIAH_ONE, "\nWhat is the special magic number for {q} mentioned in the provided text?",
     " The special magic number for {q} mentioned in the provided text is"),
    ("niah_multivalue", NIAH_MANY, "\nWhat are all the special magic numbers for {q} mentioned in the provided text?",
     " The special magic numbers for {q} mentioned in the provided text are"),
    ("niah_multiquery", NIAH_MANY, "\nWhat are all the special magic numbers for {q} mentioned in the provided text?",
     " The special magic numbers for {q} mentioned in the provided text are"),
])
def test_niah_template_is_rulers(make, task, head, question, prefix):
    s = make(task, 1024).sample
    q = ", ".join(asked_keys(s.question)[:-1]) + ", and " + asked_keys(s.question)[-1] if task.endswith("query") \
        else asked_keys(s.question)[0]
    assert s.context.startswith(head)
    assert s.question == question.format(q=q)
    assert s.answer_prefix == prefix.format(q=q)


def test_chat_segments(enc, make):
    """Context = chat head + RULER context; question = question + end of turn + assistant header + prefix."""
    p = make("niah_single_1", 1024)
    dec = lambda ids: enc.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)  # noqa: E731
    assert dec(p.context_ids) == "<|im_start|>user\n" + p.sample.context
    assert dec(p.question_ids) == p.sample.question + "<|im_end|>\n<|im_start|>assistant\n" + p.sample.answer_prefix


# ---------------------------------------------------------------------------------- vt
def follow_chain(text, value):
    """Every variable that ends up holding `value`, in assignment order (read from `VAR X = ...` lines)."""
    assigns = re.findall(r"^VAR ([A-Z]+) = (?:VAR )?([A-Z0-9]+) ?$", text, flags=re.M)
    holders, out, changed = {value}, [], True
    while changed:
        changed = False
        for name, src in assigns:
            if src in holders and name not in holders:
                holders.add(name)
                out.append(name)
                changed = True
    return out


def test_vt_follows_the_chain(make):
    s = make("vt", 1024).sample
    value = re.fullmatch(r"\nQuestion: Find all variables that are assigned the value (\d{5}) in the text above\.",
                         s.question).group(1)
    assert s.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the text above, 5 "
                               f"variables are assigned the value {value}, they are: ")
    body = main_part(s, VT_HEAD)
    assert list(s.references) == follow_chain(body, value)
    assert len(s.references) == 5 and all(re.fullmatch(r"[A-Z]{5}", r) for r in s.references)
    assert [x for x in body.split("\n") if not x.startswith("VAR ")] == [NOISE] * (body.count("\n") - 4)
    # the in-context example first: an answered vt prompt with three-letter names, then "\n\n" and the task
    example, rest = s.context.split("\n\n" + VT_HEAD)
    assert example.startswith(VT_HEAD) and rest == body
    m = re.search(r"assigned the value (\d{5}), they are:  ((?:[A-Z]{3} ?){5})$", example)
    assert follow_chain(example, m.group(1)) == m.group(2).split()


# ---------------------------------------------------------------------------------- cwe / fwe
def numbered_words(text):
    items = re.findall(r"(\d+)\. ([a-z]+)", text)
    assert [int(i) for i, _ in items] == list(range(1, len(items) + 1))
    return [w for _, w in items]


@pytest.mark.parametrize("length,common,uncommon,shot", [(1024, 6, 1, (3, 1)), (4096, 30, 3, (10, 3))])
def test_cwe_counts(make, length, common, uncommon, shot):
    s = make("cwe", length).sample
    assert s.question == CWE_QUESTION and s.answer_prefix == CWE_PREFIX
    counts = Counter(numbered_words(main_part(s, CWE_HEAD)))
    top = {w for w, c in counts.items() if c == common}
    assert len(top) == 10 and set(counts.values()) == {common, uncommon}
    assert set(s.references) == top
    # the answered example before it: its own list, its ten most common words listed after the prefix
    example = s.context[:s.context.rindex(CWE_HEAD)]
    assert example.startswith(CWE_HEAD) and example.endswith("\n")
    ex_list, ex_answer = example.split(CWE_QUESTION + CWE_PREFIX + " ")
    ex_counts = Counter(numbered_words(ex_list))
    assert set(ex_counts.values()) == set(shot)
    assert set(numbered_words(ex_answer)) == {w for w, c in ex_counts.items() if c == shot[0]}


@pytest.mark.parametrize("length", [1024, 2048])
def test_fwe_counts(make, length):
    s = make("fwe", length).sample
    assert s.context.startswith(FWE_HEAD) and s.question == FWE_QUESTION and s.answer_prefix == FWE_PREFIX
    counts = Counter(main_part(s, FWE_HEAD).split())
    ranked = counts.most_common()
    assert ranked[0][0] == "..."
    assert len(counts) <= (length - 50) // 50  # RULER: a vocabulary of (length - 50) // 50 coded words
    assert list(s.references) == [w for w, _ in ranked[1:4]]
    assert ranked[1][1] > ranked[2][1] > ranked[3][1] > ranked[4][1]
    assert zipf_sizes(counts, (length - 50) // 50)[0]  # the counts are RULER's Zipf counts for some size


# ---------------------------------------------------------------------------------- metric, ids, seeds
def test_metric_scores_like_ruler(enc):
    task = ruler_task("ruler/niah_multivalue", enc, length=1024, n_samples=2, seed=3)
    s = task.samples[0]
    refs = list(s.answers)
    assert task.max_new_tokens == 128 and task.name == "ruler/niah_multivalue-1024"
    assert task.score(s.extra["target"], s) == 1.0
    assert task.score("\x00 " + " and ".join(refs).upper() + "\n\t", s) == 1.0
    assert task.score(f"{refs[0]}, {refs[1]}", s) == 0.5
    assert task.score("I do not know.", s) == 0.0
    for name in ("vt", "cwe", "fwe", "niah_single_3"):
        t = ruler_task(name, enc, length=1024, n_samples=1, seed=3)
        assert t.score(t.samples[0].extra["target"], t.samples[0]) == 1.0
        assert t.score("nothing", t.samples[0]) == 0.0


def test_ids_evidence_and_determinism(enc, make):
    a = ruler_task("niah_multikey_1", enc, length=1024, n_samples=3, seed=5)
    b = ruler_task("niah_multikey_1", enc, length=1024, n_samples=3, seed=5)
    assert [s.id for s in a.samples] == [s.id for s in b.samples] and len({s.id for s in a.samples}) == 3
    for x, y in zip(a.samples, b.samples, strict=True):
        assert np.array_equal(x.prompt_ids, y.prompt_ids) and x.answers == y.answers
    assert a.samples[0].answers != a.samples[1].answers
    # evidence positions cover the asked needle, distractor positions the other three keys' needles
    s = a.samples[0]
    dec = lambda pos: enc.tokenizer.decode([int(s.context_ids[i]) for i in pos])  # noqa: E731
    needle = rf"One of the special magic numbers for [\w-]+ is: {s.answers[0]}\."
    assert re.search(needle, dec(s.extra["evidence_positions"]))
    assert len(NEEDLE_RE.findall(dec(s.extra["distractor_positions"]))) == 3
    same, other = make("vt", 1024, 0, 0).sample, make("vt", 1024, 0, 1).sample
    chat = ChatPrompts(enc)
    assert ruler.generate_sample("vt", 1024, 0, count=chat.count, seed=0) == same
    assert other.references != same.references and other.context != same.context


# ---------------------------------------------------------------------------------- train / eval halves
def test_training_prompts_share_no_sentence_with_evaluation(enc, make):
    assert not set(essay_names("train")) & set(essay_names("eval"))
    train = ruler_prompts(enc, tasks=("niah_single_2", "niah_multiquery"), lengths=(1024,), n_per_task=2, seed=9)
    assert [p.sample.split for p in train] == ["train"] * 4 and len({p.text for p in train}) == 4
    for p in train:
        assert len(p.prompt_ids) <= 1024 - 128
    sentences = lambda text: {x for x in re.split(r"(?<=[.!?]) ", " ".join(text.split())) if len(x) > 40}  # noqa: E731
    train_text = " ".join(" ".join(load_essays("train")).split())
    eval_sents = sentences(NEEDLE_RE.sub(" ", make("niah_single_2", 2048).sample.context))
    for p in train:
        haystack = sentences(NEEDLE_RE.sub(" ", p.sample.context.split("afterwards.\n", 1)[1]))
        assert haystack and not haystack & eval_sents
        assert all(x in train_text for x in list(haystack)[1:-1])  # first/last may be cut or wrap around


# ---------------------------------------------------------------------------------- lkv eval
def eval_args(model, **kw):
    base = dict(model=str(model), tokenizer=None, tasks=("ruler/niah_single_1",), lengths=(1024, 2048), n_samples=2,
                seed=1234, chat_template=True, longbench_dir=None, longbench_hub=False, max_length=31500)
    return argparse.Namespace(**{**base, **kw})


def test_lkv_eval_builds_ruler_tasks(tok_dir, tmp_path):
    from lkv_jax.commands.evaluate import build_tasks

    tasks = build_tasks(eval_args(tok_dir))
    assert [t.name for t in tasks] == ["ruler/niah_single_1-1024", "ruler/niah_single_1-2048"]
    for t, length in zip(tasks, (1024, 2048), strict=True):
        assert len(t.samples) == 2 and t.max_new_tokens == 128
        assert all(len(s.prompt_ids) <= length - 128 for s in t.samples)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        build_tasks(eval_args(tmp_path))
