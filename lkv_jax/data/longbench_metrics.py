"""LongBench metrics, as the official THUDM/LongBench `metrics.py` and `eval.py` compute them.

Every metric takes (prediction, ground_truth, **kwargs) and returns a float in [0, 1]; `score_sample`
applies the official per-dataset rules (first line only for trec/triviaqa/samsum/lsht, maximum over
the reference answers) and `score_task` the official task score (100 x mean, 2 decimals).

The official code calls `fuzzywuzzy.fuzz.ratio` for code similarity: here the same indel similarity
comes from `rapidfuzz` (the library python-Levenshtein, fuzzywuzzy's fast backend, is built on), with
fuzzywuzzy's rounding and empty-string rules. For ROUGE-L it calls `rouge.Rouge` (pltrdy/rouge), which
reconstructs the LCS recursively and so fails on very long sentences; `rouge_l_f` keeps its definition
with an iterative reconstruction, and tests/test_longbench.py checks it against the package on many
random texts. The Chinese tasks are out of scope (they need jieba).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

from rapidfuzz.distance import Indel


def normalize_answer(s: str) -> str:
    """Official SQuAD-style normalisation: lower case, drop punctuation, drop articles, squeeze spaces."""
    s = s.lower()
    exclude = set(string.punctuation)
    s = "".join(ch for ch in s if ch not in exclude)
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def f1_score(prediction: Sequence[str], ground_truth: Sequence[str]) -> float:
    """Token-multiset F1 of two token lists (0 when nothing is shared)."""
    common = Counter(prediction) & Counter(ground_truth)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction)
    recall = num_same / len(ground_truth)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """F1 over whitespace tokens after `normalize_answer` (narrativeqa, qasper, hotpotqa, ...)."""
    return float(f1_score(normalize_answer(prediction).split(), normalize_answer(ground_truth).split()))


def _lcs_table(x: Sequence, y: Sequence) -> list[list[int]]:
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    return table


def _lcs_words(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """The words of one longest common subsequence, reconstructed as pltrdy/rouge does (iteratively:
    the package recurses and fails on very long sentences, which LongBench then scores 0)."""
    table = _lcs_table(x, y)
    i, j, out = len(x), len(y), []
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _sentences(text: str) -> list[str]:
    # the package splits on "." and squeezes whitespace inside each non-empty piece
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def rouge_l_f(prediction: str, ground_truth: str) -> float:
    """Summary-level ROUGE-L F of pltrdy/rouge (`Rouge().get_scores(...)["rouge-l"]["f"]`).

    Sentences are split on "."; words are counted as SETS (the package's default `exclusive=True`):
    m / n = distinct words of the reference / prediction, and the overlap is the number of distinct
    words in the union, over reference sentences, of the LCS words with each prediction sentence.
    F = 2PR / (P + R + 1e-8). For single sentences without repeated words this is the textbook
    ROUGE-L F of the LCS. Raises ValueError on an empty prediction or reference (as the package).
    """
    hyp, ref = _sentences(prediction), _sentences(ground_truth)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")
    ref_words = [w for s in ref for w in s.split(" ")]
    hyp_words = [w for s in hyp for w in s.split(" ")]
    m, n = len(set(ref_words)), len(set(hyp_words))
    union: set[str] = set()
    for r in ref:
        for h in hyp:
            union |= set(_lcs_words(r.split(" "), h.split(" ")))
    llcs = len(union)
    r_lcs, p_lcs = llcs / m, llcs / n
    return 2.0 * (p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8)


def rouge_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Official `rouge_score`: ROUGE-L F, 0.0 when the rouge package would raise (empty text)."""
    try:
        return rouge_l_f(prediction, ground_truth)
    except ValueError:
        return 0.0


def classification_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """Official trec/lsht score: 1/k when the ground truth is among the k class names found in the
    prediction (class names contained in the ground truth but not equal to it are dropped), else 0.

    The official code removes from the list while iterating over it (so a match right after a
    removed one is not checked) and its difflib fallback is unreachable (`list != 0` is always
    true); both kept, for identical numbers."""
    all_classes = kwargs.get("all_classes")
    if not all_classes:
        raise ValueError("classification_score needs all_classes=[...] (the record's class names)")
    em_match_list = [c for c in all_classes if c in prediction]
    for match_term in em_match_list:  # noqa: B909 (mutation while iterating reproduces the official code)
        if match_term in ground_truth and match_term != ground_truth:
            em_match_list.remove(match_term)
    return 1.0 / len(em_match_list) if ground_truth in em_match_list else 0.0


def _fraction_equal(numbers: list[str], target: str) -> float:
    return 0.0 if not numbers else sum(n == target for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_retrieval_en: the fraction of the numbers in the prediction that equal the paragraph
    number of the ground truth ("Paragraph 12")."""
    matches = re.findall(r"Paragraph (\d+)", ground_truth)
    if not matches:
        raise ValueError(f"retrieval ground truth must read 'Paragraph <n>', got {ground_truth!r}")
    return float(_fraction_equal(re.findall(r"\d+", prediction), matches[0]))


def count_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """passage_count: the fraction of the numbers in the prediction that equal the ground truth."""
    return float(_fraction_equal(re.findall(r"\d+", prediction), str(ground_truth)))


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's `fuzz.ratio` (with python-Levenshtein): round(100 x normalised indel similarity),
    i.e. 2 LCS(a, b) / (len(a) + len(b)); 100 for equal strings (both empty included), 0 when exactly
    one is empty, as fuzzywuzzy's decorators return."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    # python-Levenshtein's `ratio` is this rapidfuzz call; fuzzywuzzy multiplies by 100 and rounds
    return int(round(100 * Indel.normalized_similarity(a, b)))


def code_sim_score(prediction: str, ground_truth: str, **kwargs) -> float:
    """lcc / repobench-p: edit similarity of the first prediction line that is not a comment or code
    fence (no "`", "#" or "//") with the ground-truth line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, ground_truth) / 100


# the official per-dataset mapping (eval.py's dataset2metric)
DATASET2METRIC: dict[str, Callable[..., float]] = {
    "narrativeqa": qa_f1_score,
    "qasper": qa_f1_score,
    "multifieldqa_en": qa_f1_score,
    "hotpotqa": qa_f1_score,
    "2wikimqa": qa_f1_score,
    "musique": qa_f1_score,
    "gov_report": rouge_score,
    "qmsum": rouge_score,
    "multi_news": rouge_score,
    "trec": classification_score,
    "triviaqa": qa_f1_score,
    "samsum": rouge_score,
    "passage_retrieval_en": retrieval_score,
    "passage_count": count_score,
    "lcc": code_sim_score,
    "repobench-p": code_sim_score,
}

# tasks whose prediction is cut to its first line before scoring (few-shot continuations)
FIRST_LINE_TASKS = frozenset({"trec", "triviaqa", "samsum", "lsht"})


def score_sample(dataset: str, prediction: str, answers: Sequence[str], all_classes=None) -> float:
    """One sample's official score in [0, 1]: the maximum of the dataset's metric over the answers."""
    if dataset not in DATASET2METRIC:
        raise ValueError(f"no LongBench metric for {dataset!r}; known: {', '.join(DATASET2METRIC)}")
    if isinstance(answers, str):
        raise TypeError("answers must be a list of reference strings, not one string")
    if dataset in FIRST_LINE_TASKS:
        prediction = prediction.lstrip("\n").split("\n")[0]
    metric = DATASET2METRIC[dataset]
    return max([0.0, *(metric(prediction, ground_truth, all_classes=all_classes) for ground_truth in answers)])


def score_task(dataset: str, predictions: Sequence[str], answers: Sequence[Sequence[str]], all_classes=None) -> float:
    """The official task score: round(100 * mean of `score_sample`, 2)."""
    if len(predictions) != len(answers) or not predictions:
        raise ValueError(f"need as many predictions as answer lists (>0), got {len(predictions)} and {len(answers)}")
    total = sum(score_sample(dataset, p, a, all_classes) for p, a in zip(predictions, answers, strict=True))
    return round(100 * total / len(predictions), 2)
